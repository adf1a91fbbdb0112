"""Local SGD across data-parallel ranks, with Lookahead's slow step as the outer step (pure PyTorch).

The world is split into equal contiguous *workers* of ``ranks_per_worker`` ranks (default 1: every
rank is a worker). Inside a worker, gradients are all-reduced at every step as plain DDP would
within that group; between workers nothing moves for ``k`` optimizer steps. At a sync the workers'
fast weights (and the module's floating buffers, e.g. BatchNorm statistics) are averaged,
``theta = mean_w theta_w``, and then the ordinary Lookahead sync runs on that average:
``phi <- phi + alpha (theta - phi)`` (or the outer momentum step, DiLoCo's with alpha=0.7, mu=0.9
Nesterov; SlowMo's heavy ball; any injected outer optimizer), ``theta <- phi``. Every rank ends
the sync with identical ``phi`` and ``theta``.

Ranks of one worker hold the same weights, so the average across workers is hierarchical: rank
``j`` of each worker all-reduces only slice ``j`` of the flattened weights with rank ``j`` of the
other workers, then each worker all-gathers its slices. The payload each rank sends across workers
is the parameter bytes divided by ``ranks_per_worker``.

This module does one job: the averaging, the workers' gradient all-reduce (a DDP communication
hook on the worker's process group), counting the bytes of both, and carrying per-rank state
through checkpoints. It imports no Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lookahead._grouping import group_by_device_dtype, group_indices_by_device_dtype
from lightning_lookahead.config import LocalSGDConfig
from lightning_lookahead.distributed import _collective_device, local, min_max, rank, world_size

if TYPE_CHECKING:
    from lightning_lookahead.lookahead import Lookahead

PER_RANK_KEY = "per_rank"  # checkpoint["lookahead"][PER_RANK_KEY]: one entry per rank, rank order
GROUPING_KEY = "ranks_per_worker"  # checkpoint["lookahead"][GROUPING_KEY]: the grouping it was saved with


class Workers:
    """The world as ``world / ranks_per_worker`` equal contiguous workers, and the process groups
    a sync needs: ``intra`` (this rank's worker) and ``cross`` (the ranks at this rank's position in
    every worker). ``None`` where the group would hold this rank alone. Creating them is a
    collective: every rank must construct ``Workers`` at the same point.

    Example: 4 ranks, ``ranks_per_worker=2``: workers {0, 1} and {2, 3}; rank 1 has ``intra`` =
    {0, 1}, ``cross`` = {1, 3}, ``position`` 1 (it sends slice 1 of the weights across).
    """

    def __init__(self, ranks_per_worker: int) -> None:
        world, me = world_size(), rank()
        if world % ranks_per_worker:
            problem = "is more than" if ranks_per_worker > world else "does not divide"
            raise ValueError(
                f"Lookahead local SGD: ranks_per_worker={ranks_per_worker} {problem} the {world} processes"
                " (equal workers of consecutive ranks); use a divisor of the world size (or 'node' for the"
                " ranks of one node)."
            )
        self.size = ranks_per_worker  # ranks per worker
        self.count = world // ranks_per_worker  # workers
        self.index, self.position = divmod(me, ranks_per_worker)
        self.intra: Any = None  # a ProcessGroup
        self.cross: Any = None
        if world == 1:
            return
        if self.size == world:
            self.intra = dist.group.WORLD
        elif self.size == 1:
            self.cross = dist.group.WORLD
        else:
            r, n = self.size, self.count
            self.intra, _ = dist.new_subgroups_by_enumeration([list(range(w * r, w * r + r)) for w in range(n)])
            self.cross, _ = dist.new_subgroups_by_enumeration([[w * r + j for w in range(n)] for j in range(r)])

    def first_rank(self) -> int:
        """The global rank of this worker's first rank."""
        return self.index * self.size


class WeightAverager:
    """Local SGD as a step before each Lookahead sync: the synced optimizer's fast weights and the
    module's floating buffers are averaged over the workers, then the ordinary slow step runs on
    the average. Give it to the core as ``before_sync``:

    Example::

        averager = WeightAverager(LocalSGDConfig(True, ranks_per_worker=8), Workers(8))
        la = Lookahead(k=16, alpha=0.5, before_sync=averager)
        la.attach([optimizer], model)
        averager.wrap(ddp_model)                 # the workers' gradient all-reduce (a comm hook)
        for batch in data:
            averager.prepare(ddp_model, la.steps[0])  # before each forward: DDP's flags for this step
            ...

    Each rank counts its own optimizer steps, and every rank must take the same number of them (as
    under DDP), so the collectives line up. In a single process it does nothing.

    ``config.start`` steps of ordinary DDP over the whole world come first (:meth:`prepare` decides
    the phase per batch; a sync during warm-up averages nothing: every rank holds the same weights).
    With ``config.average_precision="bf16"`` the pseudo-gradients ``theta_w - phi`` cross between
    workers as bfloat16 and are summed in float32 on arrival: the average becomes
    ``phi + mean_w bf16(theta_w - phi)``; buffers stay exact.

    :attr:`inter_bytes` counts the payload bytes this rank sent between workers since :meth:`start`
    (its slice at syncs; the world-wide gradient all-reduce during warm-up), :attr:`intra_bytes`
    those inside its worker (the gradient all-reduce, the all-gather of the slices at syncs).
    Payload, not wire traffic: a ring all-reduce sends about twice that per rank.
    """

    def __init__(self, config: LocalSGDConfig | None = None, workers: Workers | None = None) -> None:
        self.config = config if config is not None else LocalSGDConfig(True)
        self.workers = workers if workers is not None else Workers(1)
        self.warming_up = False  # this step all-reduces gradients over the whole world
        self.start(0)

    def start(self, steps: int) -> None:
        """Count bytes from here; ``steps``: the optimizer steps already taken (a resumed run)."""
        self.inter_bytes = 0
        self.intra_bytes = 0
        self.averaged = 0  # syncs that averaged across workers
        self.steps_at_start = steps

    # ---------------------------------------------------------------- the sync
    @torch.no_grad()
    def __call__(self, la: Lookahead, index: int) -> None:
        # During warm-up (as prepare() set it for this batch) every rank took the same steps on the
        # same all-reduced gradients since this optimizer's last sync: nothing to average.
        if self.workers.count == 1 or self.warming_up:
            return
        group = la.groups[index]
        fast = [local(p) for p in group.params]
        buffers = list(floating_buffers(la.module).values())
        # statistics (and constants such as position tables) are summed in float64: the float32 sum
        # of 3 equal values is not always 3x their value, and a constant would drift by an ulp a sync
        if self.workers.size > 1:  # a worker's ranks saw different batches: their statistics differ
            for part in group_by_device_dtype(buffers):
                self._flat(part, self._mean_in_worker, torch.float64)
        for part in group_by_device_dtype(buffers):
            self._flat(part, self._mean_across, torch.float64)
        if self.config.average_precision == "bf16":
            slow = list(group.slow_tensors().values())
            for idx in group_indices_by_device_dtype(fast):
                self._mean_deltas([fast[i] for i in idx], [slow[i] for i in idx])
        else:  # the weights are summed in their own dtype, as DDP sums gradients
            for part in group_by_device_dtype(fast):
                self._flat(part, self._mean_across)
        self.averaged += 1

    def _flat(self, tensors: list[Tensor], mean: Any, dtype: torch.dtype | None = None) -> None:
        flat = torch._utils._flatten_dense_tensors(tensors)  # one contiguous copy of the group
        averaged = mean(flat.to(_collective_device(flat), dtype or flat.dtype)).to(flat.device, flat.dtype)
        for t, avg in zip(tensors, torch._utils._unflatten_dense_tensors(averaged, tensors)):
            t.copy_(avg)

    def _mean_deltas(self, fast: list[Tensor], slow: list[Tensor]) -> None:
        theta = torch._utils._flatten_dense_tensors(fast)
        phi = torch._utils._flatten_dense_tensors(slow)
        on = _collective_device(theta)
        delta = self._mean_across(theta.sub_(phi).to(on), reduced=True).to(theta.device)
        for t, avg in zip(fast, torch._utils._unflatten_dense_tensors(phi.add_(delta), fast)):
            t.copy_(avg)

    def _mean_in_worker(self, flat: Tensor) -> Tensor:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.workers.intra)
        self.intra_bytes += _nbytes(flat)
        return flat.div_(self.workers.size)

    def _mean_across(self, flat: Tensor, reduced: bool = False) -> Tensor:
        """The mean of ``flat`` over the workers, where every rank of a worker holds the same ``flat``:
        this rank's slice crosses (all-reduced, or with ``reduced`` all-gathered as bfloat16 and
        summed in float32), then the worker all-gathers the averaged slices."""
        w = self.workers
        n = flat.numel()
        width = math.ceil(n / w.size)
        if w.size > 1:
            padded = flat.new_zeros(width * w.size)
            padded[:n] = flat
            piece = padded[w.position * width : (w.position + 1) * width]
        else:
            piece = flat
        if reduced:
            payload = piece.to(torch.bfloat16)
            arrived = payload.new_empty(w.count * width)
            _gather(arrived, payload, group=w.cross)
            piece = arrived.view(w.count, width).float().sum(0).div_(w.count).to(flat.dtype)
            self.inter_bytes += _nbytes(payload)
        else:
            dist.all_reduce(piece, op=dist.ReduceOp.SUM, group=w.cross)
            piece.div_(w.count)
            self.inter_bytes += _nbytes(piece)
        if w.size == 1:
            return piece
        whole = flat.new_empty(width * w.size)
        _gather(whole, piece.contiguous(), group=w.intra)
        self.intra_bytes += _nbytes(piece)
        return whole[:n]

    # ---------------------------------------------------------------- the steps between syncs
    def wrap(self, model: nn.Module) -> None:
        """Route a ``DistributedDataParallel`` wrapper's gradient all-reduce through this averager
        (registered once, before its first backward; an averager that replaces this one, e.g. after a
        mid-fit restore, takes the route over). Not registered when every rank is its own worker
        and nothing warms up: then DDP's gradient all-reduce is simply switched off."""
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return
        route = getattr(model, "_lookahead_hook", None)
        if route is None and (self.workers.size > 1 or self.config.start > 0):
            route = model._lookahead_hook = _Route()  # type: ignore[assignment]
            # unannotated: DDP compares the hook's annotations with the classes, and ours are strings
            model.register_comm_hook(route, lambda route, bucket: route.averager._allreduce_hook(bucket))
        if route is not None:
            route.averager = self

    def _allreduce_hook(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        grads = bucket.buffer()
        group: Any = self.workers.intra  # never None here: prepare() turns the all-reduce off then
        if self.warming_up and self.workers.count > 1:  # ordinary DDP: the whole world
            group = dist.group.WORLD
            self.inter_bytes += _nbytes(grads)
        else:
            self.intra_bytes += _nbytes(grads)
        return allreduce_hook(group, bucket)

    def prepare(self, model: nn.Module, steps: int) -> None:
        """Set a ``DistributedDataParallel`` wrapper up for the next forward/backward, ``steps``
        optimizer steps into the run: during warm-up, and throughout when all ranks are one worker,
        ordinary DDP over the world (buffers broadcast from rank 0 if DDP was set to); otherwise the
        worker's gradient all-reduce (none when a worker is one rank) and no buffer broadcast
        (buffers are averaged at syncs). Under manual optimisation with several steps per batch the
        phase changes at batch boundaries.

        DDP reads these flags in ``forward`` (``no_sync()`` sets the same flag), so call this before
        every forward: Lightning's ``no_sync`` restores the value it found, but under manual
        optimisation it sets the gradient flag back to ``True`` after each forward.
        """
        self.warming_up = steps < self.config.start
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return
        if not hasattr(model, "_lookahead_broadcast_buffers"):  # the user's choice, before we change it
            model._lookahead_broadcast_buffers = bool(model.broadcast_buffers)  # type: ignore[assignment]
        ddp = self.warming_up or self.workers.count == 1  # ordinary DDP over the world, buffers included
        model.require_backward_grad_sync = ddp or self.workers.size > 1
        model.require_forward_param_sync = ddp
        model.broadcast_buffers = ddp and bool(model._lookahead_broadcast_buffers)

    def comm_metrics(self, steps: int) -> dict[str, float]:
        """Bytes since :meth:`start` and per optimizer step since then (all optimizers together;
        ``steps``: all steps taken so far), between workers and inside them."""
        per = max(steps - self.steps_at_start, 1)
        return {
            "lookahead/inter_bytes": float(self.inter_bytes),
            "lookahead/inter_bytes_per_step": self.inter_bytes / per,
            "lookahead/intra_bytes": float(self.intra_bytes),
            "lookahead/intra_bytes_per_step": self.intra_bytes / per,
        }


class _Route:
    """The DDP comm hook's state: the averager that counts and routes the gradient all-reduce."""

    averager: WeightAverager


def _gather(out: Tensor, piece: Tensor, group: Any) -> None:
    """All-gather ``piece`` from every rank of ``group`` into ``out``, in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    gather(out, piece, group=group)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def floating_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The module's floating-point buffers by name (BatchNorm running mean/var); integer ones such as
    ``num_batches_tracked`` advance identically on every rank and are left alone."""
    return {n: b for n, b in module.named_buffers() if b.is_floating_point()}


# ---------------------------------------------------------------------------- DDP
def check_ddp_module(model: nn.Module) -> None:
    """Refuse DDP settings that local SGD cannot honour."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and getattr(model, "static_graph", False):
        raise ValueError(
            "LookaheadCallback(local_sgd=True) does not support DDP's static_graph=True: static-graph DDP plans"
            " its gradient all-reduces from the first iteration, and local SGD switches them off or onto the"
            " worker's ranks. Use static_graph=False (the default)."
        )


def sync_batchnorm_note(module: nn.Module, workers: Workers) -> str | None:
    """A warning when SyncBatchNorm would exchange statistics between workers at every forward."""
    if workers.count == 1 or not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        return None
    return (
        "Lookahead local SGD: the model has SyncBatchNorm layers, which exchange batch statistics at every"
        " forward over their process group (by default all ranks, so also between workers), outside local SGD's"
        " schedule and byte counts. Use BatchNorm (local SGD averages its statistics at syncs), or give"
        " SyncBatchNorm a worker's ranks as process_group."
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
            " plans its gradient all-reduces from the first iteration, and local SGD switches them off or onto"
            " the worker's ranks. Use static_graph=False (the default)."
        )
    hooks = [n for n in ("_ddp_comm_hook", "_ddp_comm_wrapper", "_model_averaging_period") if getattr(strategy, n, None)]
    if hooks:
        raise ValueError(
            "LookaheadCallback(local_sgd=True) owns DDP's gradient all-reduce (off, or its own communication hook"
            " over each worker's ranks), so a DDP communication hook (ddp_comm_hook / ddp_comm_wrapper /"
            " model_averaging_period: " + ", ".join(h.lstrip("_") for h in hooks) + ") would never run, and"
            " post-local-SGD model averaging would average a second time. Remove it."
        )
    if scaler is not None:
        raise ValueError(
            "LookaheadCallback(local_sgd=True) cannot be used with a GradScaler (precision='16-mixed'): without"
            " a world-wide gradient all-reduce each worker decides on its own to skip a step for inf/nan gradients, so"
            " the ranks' step counts and sync collectives would drift apart. Use precision='bf16-mixed' or 32."
        )
    return True


def check_equal_batches(batches: float) -> None:
    """Refuse an epoch whose number of training batches differs between ranks, on every rank.

    The syncs' collectives pair up across ranks by order, so every rank must take the same number
    of optimizer steps; a rank with a shorter data loader would sync against another rank's later
    step, then leave the others waiting. One 2-float all-reduce per epoch; ``inf`` (an iterable
    dataset without a length) cannot be checked and passes.
    """
    if world_size() == 1:
        return
    fewest, most = (x.item() for x in min_max(torch.tensor(batches, dtype=torch.float64)))
    if most != fewest:
        raise ValueError(
            f"Lookahead local SGD: the ranks' training data loaders have different lengths this epoch ({fewest:g}"
            f" to {most:g} batches; this rank: {batches:g}), so their syncs would fall on different steps and the"
            " collectives would pair up wrongly or hang. Give every rank the same number of batches: Lightning's"
            " DistributedSampler (use_distributed_sampler=True, the default) pads the shards to equal length;"
            " with your own sampler use equal shards or drop_last=True."
        )


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
            "buffers": floating_buffers(la.module),
            "slow_moments": dict(tensors["slow_moments"]),
            "optimizers": [opt.state_dict() for opt in optimizers],
        }
    )
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    return everyone if rank() == 0 else None


def rank_state(
    per_rank: Sequence[Mapping[str, Any]] | None, workers: Workers, saved_grouping: int | None
) -> Mapping[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank list (``None`` when there is none).

    The rule: the same number of ranks and the same ``ranks_per_worker`` -> each rank its own entry
    (an exact resume); the same number of ranks, another grouping -> each worker's ranks take the
    entry of the worker's first rank, so a worker starts as one replica; another number of ranks ->
    ``None`` (every rank continues from rank 0's state, which Lightning loaded). Both changes warn.
    """
    if not per_rank:
        return None
    if len(per_rank) != world_size():
        if rank() == 0:
            warnings.warn(
                f"Lookahead local SGD: the checkpoint holds the state of {len(per_rank)} ranks, this run has"
                f" {world_size()}; every rank continues from rank 0's fast weights and optimizer state.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    saved = saved_grouping or 1  # checkpoints from before worker groups: one rank per worker
    if saved != workers.size:
        if rank() == 0:
            warnings.warn(
                f"Lookahead local SGD: the checkpoint was saved with ranks_per_worker={saved}, this run has"
                f" {workers.size}; each worker continues from the saved state (fast weights, buffers,"
                " optimizer state) of its first rank.",
                RuntimeWarning,
                stacklevel=2,
            )
        return per_rank[workers.first_rank()]
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
