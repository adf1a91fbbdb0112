"""Local SGD across data-parallel ranks, with Lookahead's slow step as the outer step (pure PyTorch).

Each rank trains its own fast weights ``theta_r`` on its own data for ``k`` optimizer steps
without any gradient all-reduce; at a sync the fast weights (and the module's floating buffers,
e.g. BatchNorm statistics) are averaged over ranks, ``theta = mean_r theta_r``, and then the
ordinary Lookahead sync runs on that average: ``phi <- phi + alpha (theta - phi)`` (or the outer
momentum step, DiLoCo's with alpha=0.7, mu=0.9 Nesterov; SlowMo's heavy ball), ``theta <- phi``.
Every rank ends the sync with identical ``phi`` and ``theta``.

This module does one job: the averaging (one ``all_reduce`` per (device, dtype) over a
flattened copy), counting the bytes it all-reduces, turning DDP's own gradient and buffer
communication off, and carrying per-rank state through checkpoints. It imports no Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lookahead._grouping import group_by_device_dtype
from lightning_lookahead.distributed import _collective_device, local, rank, world_size

if TYPE_CHECKING:
    from lightning_lookahead.lookahead import Lookahead

PER_RANK_KEY = "per_rank"  # checkpoint["lookahead"][PER_RANK_KEY]: one entry per rank, rank order


@torch.no_grad()
def average_(tensors: Sequence[Tensor]) -> int:
    """Replace each tensor by its mean over all ranks, in place; returns the bytes all-reduced.

    One ``all_reduce`` (SUM) per (device, dtype) group over a flattened copy, then a division by
    the world size. Every rank must pass tensors of the same shapes, dtypes and order. The sum is
    taken in the tensors' own dtype, as DDP does with gradients. A single process returns 0.
    """
    world = world_size()
    if world == 1 or not tensors:
        return 0
    sent = 0
    for group in group_by_device_dtype(list(tensors)):
        flat = torch._utils._flatten_dense_tensors(group)  # one contiguous copy of the group
        on = flat.to(_collective_device(flat))
        dist.all_reduce(on, op=dist.ReduceOp.SUM)
        on.div_(world)
        sent += on.numel() * on.element_size()
        for t, avg in zip(group, torch._utils._unflatten_dense_tensors(on.to(flat.device), group)):
            t.copy_(avg)
    return sent


def floating_buffers(module: nn.Module) -> list[Tensor]:
    """The module's floating-point buffers (BatchNorm running mean/var); integer ones such as
    ``num_batches_tracked`` advance identically on every rank and are left alone."""
    return [b for b in module.buffers() if b.is_floating_point()]


class WeightAverager:
    """Local SGD as a step before each Lookahead sync: the synced optimizer's fast weights and the
    module's floating buffers are averaged over the ranks, then the ordinary slow step runs on the
    average. Give it to the core as ``before_sync``:

    Example::

        la = Lookahead(k=16, alpha=0.5, before_sync=WeightAverager())
        la.attach([optimizer], model)   # every rank; turn DDP's own all-reduce off (disable_ddp_sync)

    Each rank counts its own optimizer steps, and every rank must take the same number of them (as
    under DDP), so the averaging collectives line up. In a single process it does nothing.
    :attr:`allreduce_bytes` counts the payload bytes all-reduced since :meth:`start` (payload, not
    wire traffic: a ring all-reduce sends about twice that per rank).
    """

    def __init__(self) -> None:
        self.start(0)

    def start(self, steps: int) -> None:
        """Count bytes from here; ``steps``: the optimizer steps already taken (a resumed run)."""
        self.allreduce_bytes = 0
        self.allreduce_calls = 0  # syncs that all-reduced (each is one collective per dtype)
        self.steps_at_start = steps

    def __call__(self, la: Lookahead, index: int) -> None:
        fast = [local(p) for p in la.groups[index].params]
        sent = average_(fast + floating_buffers(la.module))
        if sent:
            self.allreduce_bytes += sent
            self.allreduce_calls += 1

    def comm_metrics(self, steps: int) -> dict[str, float]:
        """``lookahead/allreduce_bytes`` (since :meth:`start`) and ``lookahead/allreduce_bytes_per_step``
        (per optimizer step since then, all optimizers together; ``steps``: all steps taken so far)."""
        return {
            "lookahead/allreduce_bytes": float(self.allreduce_bytes),
            "lookahead/allreduce_bytes_per_step": self.allreduce_bytes / max(steps - self.steps_at_start, 1),
        }


# ---------------------------------------------------------------------------- DDP
def disable_ddp_sync(model: nn.Module) -> bool:
    """Turn off a ``DistributedDataParallel`` wrapper's gradient all-reduce and buffer broadcast
    for the next forward/backward; returns whether ``model`` is such a wrapper.

    DDP reads ``require_backward_grad_sync`` in ``forward`` (``no_sync()`` sets the same flag), so
    call this before every forward: Lightning's ``no_sync`` restores the value it found, but under
    manual optimisation it sets the flag back to ``True`` after each forward. Buffers are
    broadcast from rank 0 before a forward only while ``broadcast_buffers`` (``forward_sync_buffers``)
    and ``require_forward_param_sync`` hold; local SGD averages them at syncs instead.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return False
    model.require_backward_grad_sync = False
    model.require_forward_param_sync = False
    model.broadcast_buffers = False  # a property over forward_sync_buffers in recent torch
    return True


def check_ddp_module(model: nn.Module) -> None:
    """Refuse DDP settings that local SGD cannot honour."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and getattr(model, "static_graph", False):
        raise ValueError(
            "LookaheadCallback(local_sgd=True) does not support DDP's static_graph=True: static-graph DDP plans"
            " its gradient all-reduces from the first iteration, and local SGD runs without any. Use"
            " static_graph=False (the default)."
        )


def check_strategy(strategy: Any, world: int, scaler: Any = None) -> bool:
    """Whether local SGD applies to this (Lightning) strategy: ``True`` for DDP with more than one
    process, ``False`` for a single process (plain Lookahead); ``ValueError`` otherwise.

    Duck-typed on the class names in the strategy's MRO, so both ``lightning.pytorch`` and
    ``pytorch_lightning`` strategies are recognised without importing either.
    """
    names = {c.__name__ for c in type(strategy).__mro__}
    if "ModelParallelStrategy" in names:
        raise ValueError(
            "LookaheadCallback(local_sgd=True) does not support ModelParallelStrategy (FSDP2): each rank holds"
            " only shards of the parameters and FSDP2 reduce-scatters every gradient, so there are no per-rank"
            " full fast weights to train locally and average. Use strategy='ddp' (or 'ddp_spawn'), or"
            " local_sgd=False for Lookahead on FSDP2."
        )
    if world <= 1:
        return False
    if "DDPStrategy" not in names:
        raise ValueError(
            f"LookaheadCallback(local_sgd=True) supports DDPStrategy ('ddp', 'ddp_spawn'), got"
            f" {type(strategy).__name__}."
        )
    kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
    if kwargs.get("static_graph"):
        raise ValueError(
            "LookaheadCallback(local_sgd=True) does not support DDPStrategy(static_graph=True): static-graph DDP"
            " plans its gradient all-reduces from the first iteration, and local SGD runs without any."
            " Use static_graph=False (the default)."
        )
    hooks = [n for n in ("_ddp_comm_hook", "_ddp_comm_wrapper", "_model_averaging_period") if getattr(strategy, n, None)]
    if hooks:
        raise ValueError(
            "LookaheadCallback(local_sgd=True) turns DDP's gradient all-reduce off, so a DDP communication hook"
            " (ddp_comm_hook / ddp_comm_wrapper / model_averaging_period: " + ", ".join(h.lstrip("_") for h in hooks) +
            ") would never run, and post-local-SGD model averaging would average a second time. Remove it."
        )
    if scaler is not None:
        raise ValueError(
            "LookaheadCallback(local_sgd=True) cannot be used with a GradScaler (precision='16-mixed'): without"
            " the gradient all-reduce each rank decides on its own to skip a step for inf/nan gradients, so"
            " the ranks' step counts and sync collectives would drift apart. Use precision='bf16-mixed' or 32."
        )
    return True


# ---------------------------------------------------------------------------- checkpoints
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather_rank_states(la: Lookahead, optimizers: Sequence[Optimizer]) -> list[dict[str, Any]] | None:
    """Every rank's own state (fast weights, floating buffers such as BatchNorm statistics,
    pullback's slow moments, inner optimizer states) as a list in rank order, for rank 0's
    checkpoint (a collective: call on every rank; ``None`` on the other ranks and in a single
    process). Host copies; the checkpoint grows by world size x (parameters + optimizer state).
    """
    if world_size() == 1:
        return None
    tensors = la.tensors()
    mine = _to_cpu(
        {
            "fast": dict(tensors["fast"]),
            "buffers": {n: b for n, b in la.module.named_buffers() if b.is_floating_point()},
            "slow_moments": dict(tensors["slow_moments"]),
            "optimizers": [opt.state_dict() for opt in optimizers],
        }
    )
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    return everyone if rank() == 0 else None


def rank_state(per_rank: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank list, or ``None`` when there is none or it was
    written by another number of ranks (then every rank continues from rank 0's state)."""
    if not per_rank:
        return None
    if len(per_rank) != world_size():
        warnings.warn(
            f"Lookahead local SGD: the checkpoint holds the state of {len(per_rank)} ranks, this run has"
            f" {world_size()}; every rank continues from rank 0's fast weights and optimizer state.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return per_rank[rank()]


@torch.no_grad()
def load_buffers(module: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    """Overwrite the module's floating buffers with this rank's saved ones (Lightning loads rank 0's)."""
    own = dict(module.named_buffers())
    for name, saved in buffers.items():
        if name in own:
            own[name].copy_(saved)


def load_optimizer_states(optimizers: Sequence[Optimizer], states: Sequence[Mapping[str, Any]]) -> None:
    """Overwrite the inner optimizers' state with this rank's saved one (Lightning loads rank 0's)."""
    if len(states) != len(optimizers):
        raise ValueError(f"checkpoint has {len(states)} per-rank optimizer states, this run has {len(optimizers)}")
    for opt, state in zip(optimizers, states):
        opt.load_state_dict(dict(state))
