"""The slow (outer) step of a sync: how ``phi`` moves towards the fast weights ``theta``.

A step sees the parameters of one optimizer as buckets (:class:`~lightning_lookahead.slow_weights.Bucket`):
per (device, dtype), one flat tensor of theta and one of phi (the contiguous storage), or aligned
lists of per-parameter tensors (sharded or oddly strided parameters). It updates ``phi``, then sets
``theta <- phi``. A new outer optimizer is one subclass of :class:`OuterStep`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_lookahead.slow_weights import Bucket

OuterOptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]

CPU_BLOCK = 1 << 17  # elements: theta + phi of a float32 block fit a 1 MiB L2, so copy_ reads what lerp_ wrote
DEVICE_BLOCK = 1 << 24  # elsewhere: only bounds the temporaries of the device-side path


def blocks(theta: Tensor, phi: Tensor) -> Iterable[tuple[Tensor, Tensor]]:
    """Aligned 1-D tensors cut into blocks: cache-sized on CPU, where each op of a block reads what
    the previous one left in cache (measured ~1.3x -> ~1.05x the bare op pair at 1e7+ elements)."""
    size = CPU_BLOCK if theta.device.type == "cpu" else DEVICE_BLOCK
    if theta.numel() <= size:
        yield theta, phi
        return
    for lo in range(0, theta.numel(), size):
        yield theta[lo : lo + size], phi[lo : lo + size]


class NonFiniteError(FloatingPointError):
    """The fast weights held inf/nan at a sync and ``on_nonfinite="raise"`` was chosen, or an outer
    optimizer turned finite weights into inf/nan."""


class OuterStep:
    """The slow step on the pseudo-gradient ``phi - theta``; subclasses implement :meth:`apply`."""

    #: whether :meth:`apply_masked` exists (a skip-or-apply decision that stays on the device)
    device_side = False

    def apply(self, buckets: Sequence[Bucket]) -> Tensor | None:
        """Update phi, then ``theta <- phi``. Buckets that measure record ``||theta - phi||`` before
        the update; a step may return ``||phi_new - phi||^2`` (a float32 scalar) when they do."""
        raise NotImplementedError

    def apply_masked(self, buckets: Sequence[Bucket], ok: Tensor) -> None:
        """:meth:`apply` where ``ok`` (a 0-dim bool on the device) is true, else nothing, with no host read."""
        raise NotImplementedError

    def rebind(self, names: Sequence[str], phi: Sequence[Tensor]) -> None:
        """The slow weights were laid out anew (new parameters, dtype, device, shape or storage):
        ``phi[i]`` is now the slow tensor of ``names[i]``."""

    def state_by_name(self) -> dict[str, dict[str, Tensor]]:
        """Per-parameter outer state, name -> {key: tensor} (live tensors)."""
        return {}

    def load_state_by_name(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore :meth:`state_by_name`; names it lacks start fresh."""


class LerpStep(OuterStep):
    """Lookahead: ``phi <- phi + alpha (theta - phi)`` (``torch.lerp``), then ``theta <- phi``.
    ``alpha == 1`` copies theta into phi and leaves theta untouched, so ``k=1, alpha=1`` is plain training."""

    device_side = True

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def apply(self, buckets: Sequence[Bucket]) -> None:
        for b in buckets:
            for theta, phi in b.parts():
                b.measure(theta, phi)
                if len(theta) == 1:  # a block of the flat buffers: plain ops, less dispatch than foreach
                    if self.alpha == 1.0:
                        phi[0].copy_(theta[0])
                    else:
                        phi[0].lerp_(theta[0], self.alpha)
                        theta[0].copy_(phi[0])
                elif self.alpha == 1.0:
                    torch._foreach_copy_(phi, theta)
                else:
                    torch._foreach_lerp_(phi, theta, self.alpha)  # the kernel of torch.lerp on each tensor
                    torch._foreach_copy_(theta, phi)

    def apply_masked(self, buckets: Sequence[Bucket], ok: Tensor) -> None:
        # where(ok, theta, phi): a skipped sync lerps phi towards itself (a no-op, never 0 * inf);
        # where(ok, phi, theta) leaves theta as it was. Three passes instead of two, no host read.
        for b in buckets:
            for theta, phi in b.parts():
                b.measure(theta, phi)
                for t, p in zip(theta, phi):
                    target = torch.where(ok, t, p)
                    if self.alpha == 1.0:
                        p.copy_(target)
                    else:
                        p.lerp_(target, self.alpha)
                        torch.where(ok, p, t, out=t)


class OptimizerStep(OuterStep):
    """An injected ``torch.optim`` optimizer stepped on phi with gradient ``phi - theta`` (torchft's
    DiLoCo outer step; FedAdam-style with Adam), then ``theta <- phi``.

    ``factory(params)`` builds it over one tensor per trained parameter (views of the slow weights
    with the parameter's shape), e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``. The
    pseudo-gradient is computed into the fast weights' storage where it is contiguous (they are
    overwritten by phi right after), so it costs no memory beyond the optimizer's own state.
    """

    def __init__(self, factory: OuterOptimizerFactory) -> None:
        self.factory = factory
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []
        self.optimizer: Optimizer | None = None

    def rebind(self, names: Sequence[str], phi: Sequence[Tensor]) -> None:
        old = dict(zip(self.names, self.params))
        state = self.optimizer.state if self.optimizer is not None else {}
        params = []
        for name, t in zip(names, phi):
            p = old.get(name)
            if p is None:
                p = nn.Parameter(t)
            else:  # the same object (the optimizer's state is keyed by it), pointed at its new storage
                mine = state.get(p)
                if mine and p.shape != t.shape:
                    mine.clear()  # a resized parameter: its outer state starts afresh
                elif mine:  # moment buffers follow the weights' dtype and device (step counters keep theirs)
                    for key, v in mine.items():
                        if isinstance(v, Tensor) and v.shape == p.shape and key != "step":
                            mine[key] = v.to(device=t.device, dtype=t.dtype)
                p.data = t
            params.append(p)
        rebuild = self.optimizer is None or set(old) != set(names)
        saved = self.state_by_name() if rebuild else {}
        self.names, self.params = list(names), params
        if rebuild:  # parameters joined or left: a new optimizer, carrying the state of those kept
            self.optimizer = self.factory(self.params)
            self.load_state_by_name(saved)

    def apply(self, buckets: Sequence[Bucket]) -> Tensor | None:
        assert self.optimizer is not None
        measured = any(b.stats is not None for b in buckets)
        before = [p.detach().clone() for p in self.params] if measured else []
        for b in buckets:  # bucket b holds the parameters at positions b.idx
            for i, g in zip(b.idx, b.pseudo_gradients()):
                self.params[i].grad = g
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        # exactly (min/max: a sum of large finite float16 weights would overflow), before theta is written
        finite = [ok for b in buckets if (ok := b.finite("slow")) is not None]
        if not all(bool(ok) for ok in finite):  # theta was finite (guarded): the outer step itself overflowed
            raise NonFiniteError(
                f"Lookahead: the outer optimizer ({type(self.optimizer).__name__}) turned finite weights into inf/nan;"
                " the slow weights are no longer usable. In float16, Adam's default eps=1e-8 underflows to 0:"
                " use eps >= 1e-4, a smaller learning rate, or float32 weights."
            )
        for b in buckets:
            b.copy_phi_to_theta()
        if not measured or not self.params:
            return None
        return sq_norm(list(torch._foreach_sub([p.detach() for p in self.params], before)))

    def state_by_name(self) -> dict[str, dict[str, Tensor]]:
        if self.optimizer is None:
            return {}
        state = self.optimizer.state
        return {n: dict(state[p]) for n, p in zip(self.names, self.params) if state.get(p)}

    def load_state_by_name(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        assert self.optimizer is not None
        current = self.optimizer.state_dict()
        index = {n: i for i, n in enumerate(self.names)}
        saved = {index[n]: dict(s) for n, s in state.items() if n in index and s}
        # load_state_dict casts each entry the way the optimizer wants it (device, dtype, step counters)
        self.optimizer.load_state_dict({"state": saved, "param_groups": current["param_groups"]})


HALF_DTYPES = (torch.float16, torch.bfloat16)


def sq_norm(tensors: list[Tensor]) -> Tensor:
    """Sum of squares as a float32 scalar on the tensors' device (no host read). Half-precision
    norms accumulate in float32: a float16 norm overflows at 65504."""
    if not tensors:
        return torch.zeros(())
    low = tensors[0].dtype in HALF_DTYPES
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)
    return torch.stack(norms).float().square().sum()


def check_factory(factory: OuterOptimizerFactory) -> None:
    """Build the optimizer over a tiny tensor and take one step, so a factory that cannot be an
    outer optimizer (it needs a closure, sparse gradients, ...) fails now, not k steps into a run."""
    probe = nn.Parameter(torch.zeros(2))
    probe.grad = torch.zeros(2)
    try:
        factory([probe]).step()
    except Exception as e:
        raise ValueError(
            f"Lookahead `outer_optimizer` must build a torch optimizer that steps on a plain gradient; a trial"
            f" step failed with {type(e).__name__}: {e}"
        ) from e


def sgd_factory(lr: float, momentum: float, nesterov: bool) -> OuterOptimizerFactory:
    """The ``outer_momentum`` shorthand: ``torch.optim.SGD(lr=alpha, momentum=mu, nesterov=...)``
    (a ``functools.partial``, so a Lookahead holding it pickles)."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov)
