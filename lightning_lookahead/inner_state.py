"""What happens to the inner optimizer's per-parameter state at a Lookahead sync.

``keep`` (the paper's default) leaves it alone. ``reset`` restores each buffer to its value before
the first step. ``pullback`` interpolates the first-moment buffer like the weights, against a slow
copy that we own (never an alias of the live buffer, or every later pullback would be a no-op).
An optimizer whose state we do not recognise gets a clear error, never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, NAdam, Optimizer, RAdam

from lightning_lookahead._grouping import group_by_device_dtype, group_indices_by_device_dtype
from lightning_lookahead.distributed import local

InnerState = Literal["keep", "reset", "pullback"]

# Per optimizer family: the first-moment key, and every state key with its "before first step"
# value; None means "absent": a fresh SGD creates its buffer from the first gradient (buf = grad),
# which a zeroed buffer only matches when dampening == 0.
_ADAM_KEYS: dict[str, float | None] = {"step": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}
_KNOWN: dict[type[Optimizer], tuple[str, dict[str, float | None]]] = {
    SGD: ("momentum_buffer", {"momentum_buffer": None}),
    Adam: ("exp_avg", _ADAM_KEYS),
    AdamW: ("exp_avg", _ADAM_KEYS),
    NAdam: ("exp_avg", {**_ADAM_KEYS, "mu_product": 1.0}),
    RAdam: ("exp_avg", _ADAM_KEYS),
}


def _family(optimizer: Optimizer) -> tuple[str, dict[str, float | None]]:
    for cls in type(optimizer).__mro__:
        if cls in _KNOWN:
            return _KNOWN[cls]
    supported = ", ".join(c.__name__ for c in _KNOWN)
    raise ValueError(
        f"inner_state='reset'/'pullback' does not know the state of {type(optimizer).__name__};"
        f" supported: {supported}. Use inner_state='keep' for other optimizers."
    )


def _states(
    optimizer: Optimizer, named_params: Iterable[tuple[str, Tensor]], known: Mapping[str, float | None]
) -> list[tuple[str, dict]]:
    out = []
    for name, p in named_params:
        state = optimizer.state.get(p)
        if not state:  # no step taken for this parameter yet: nothing to adjust
            continue
        unknown = set(state) - set(known)
        if unknown:
            raise ValueError(
                f"{type(optimizer).__name__} holds state {sorted(unknown)} that inner_state cannot handle;"
                " use inner_state='keep'."
            )
        out.append((name, state))
    return out


def first_moment(optimizer: Optimizer, param: Tensor) -> Tensor | None:
    """The live first-moment buffer of ``param`` (None before its first step or without momentum)."""
    key, _ = _family(optimizer)
    return optimizer.state.get(param, {}).get(key)


@torch.no_grad()
def reset(optimizer: Optimizer, named_params: Iterable[tuple[str, Tensor]]) -> None:
    """Set every per-parameter buffer (moments and step counts) back to its initial value."""
    _, known = _family(optimizer)
    by_value: dict[float, list[Tensor]] = {}
    for _, state in _states(optimizer, named_params, known):
        for key, value in list(state.items()):
            initial = known[key]
            if initial is None:
                del state[key]
            elif isinstance(value, Tensor):
                by_value.setdefault(initial, []).append(value)
            else:  # python-number step counters (older checkpoints, capturable=False paths)
                state[key] = type(value)(initial)
    for value, tensors in by_value.items():
        tensors = [local(t) for t in tensors]
        for group in group_by_device_dtype(tensors):
            torch._foreach_zero_(group) if value == 0.0 else torch._foreach_fill_(group, value)  # type: ignore[attr-defined]


@torch.no_grad()
def pullback(
    optimizer: Optimizer, named_params: Iterable[tuple[str, Tensor]], slow: dict[str, Tensor], alpha: float
) -> None:
    """First moment m: ``m_slow <- m_slow + alpha (m - m_slow)``, then ``m <- m_slow``.

    ``slow`` maps parameter name -> our own slow first moment; a parameter first seen here starts from
    zeros (the buffer's value before any step). Second moments and step counts are kept.
    """
    key, known = _family(optimizer)
    live, slows = [], []
    for name, state in _states(optimizer, named_params, known):
        m = state.get(key)
        if m is None:  # e.g. SGD without momentum
            continue
        if name not in slow:
            slow[name] = torch.zeros_like(m)
        live.append(m)
        slows.append(slow[name])
    live, slows = [local(t) for t in live], [local(t) for t in slows]  # shards: the update is elementwise
    for idx in group_indices_by_device_dtype(live):
        s, m = [slows[i] for i in idx], [live[i] for i in idx]
        torch._foreach_lerp_(s, m, alpha)
        torch._foreach_copy_(m, s)


class InnerPolicy:
    """What a sync does to the inner optimizers' state; ``keep`` (the paper's) does nothing.
    A new policy is one subclass registered in ``INNER_POLICIES``."""

    def check(self, optimizer: Optimizer) -> None:
        """Raise ``ValueError`` at attach for an optimizer whose state this policy cannot handle."""

    def start(self, optimizers: int) -> None:
        """A new run (or new optimizers): forget what belonged to the previous ones."""

    def after_sync(self, index: int, optimizer: Optimizer, named_params: Sequence[tuple[str, Tensor]], alpha: float) -> None:
        """Called after an applied sync of optimizer ``index``."""

    def slow_moments(self) -> list[dict[str, Tensor]]:
        """Per optimizer, the slow state this policy owns (name -> tensor); empty for stateless ones."""
        return []


class KeepState(InnerPolicy):
    """Leave the inner optimizer's state alone (Zhang et al.)."""


class ResetState(InnerPolicy):
    """Moments and step counts back to their values before the first step."""

    def check(self, optimizer: Optimizer) -> None:
        _family(optimizer)

    def after_sync(self, index: int, optimizer: Optimizer, named_params: Sequence[tuple[str, Tensor]], alpha: float) -> None:
        reset(optimizer, named_params)


class PullbackState(InnerPolicy):
    """First moments interpolated like the weights, against slow moments this policy owns."""

    def __init__(self) -> None:
        self.moments: list[dict[str, Tensor]] = []

    def check(self, optimizer: Optimizer) -> None:
        _family(optimizer)

    def start(self, optimizers: int) -> None:
        self.moments = [{} for _ in range(optimizers)]

    def after_sync(self, index: int, optimizer: Optimizer, named_params: Sequence[tuple[str, Tensor]], alpha: float) -> None:
        pullback(optimizer, named_params, self.moments[index], alpha)

    def slow_moments(self) -> list[dict[str, Tensor]]:
        return self.moments


INNER_POLICIES: dict[str, type[InnerPolicy]] = {"keep": KeepState, "reset": ResetState, "pullback": PullbackState}
