"""Lookahead's settings, validated once: :class:`LookaheadConfig` builds the policy objects of a run."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lightning_lookahead.inner_state import INNER_POLICIES, InnerPolicy, InnerState
from lightning_lookahead.outer import (
    LerpStep,
    OptimizerStep,
    OuterOptimizerFactory,
    OuterStep,
    check_factory,
    sgd_factory,
)

OnNonFinite = Literal["warn", "raise"]
ON_NONFINITE: tuple[str, ...] = ("warn", "raise")
AveragePrecision = Literal["full", "bf16"]


def check_k(k: Any) -> int:
    if _is_bool(k) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"Lookahead `k` must be an int >= 1 (optimizer steps per sync), got {k!r}")
    return int(k)


def check_alpha(alpha: Any) -> float:
    if _is_bool(alpha) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not 0 < float(alpha) <= 1:
        raise ValueError(f"Lookahead `alpha` must be a finite float in (0, 1], got {alpha!r}")
    return float(alpha)


def check_outer_momentum(mu: Any) -> float:
    if _is_bool(mu) or not isinstance(mu, numbers.Real) or not math.isfinite(mu) or not 0 <= float(mu) < 1:
        raise ValueError(f"Lookahead `outer_momentum` must be a finite float in [0, 1), got {mu!r}")
    return float(mu)


def check_bool(name: str, value: Any) -> bool:
    if not _is_bool(value):
        raise ValueError(f"Lookahead `{name}` must be a bool, got {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Lookahead `{name}` must be one of {list(allowed)}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Lookahead `{name}` must be None or an int >= 1, got {value!r}")
    return int(value)


def _is_bool(value: Any) -> bool:
    """Python and numpy bools (numpy ints and floats are numbers.Integral/Real already)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


@dataclasses.dataclass(frozen=True)
class LookaheadConfig:
    """Every setting of a Lookahead run, validated when built (a ``ValueError`` naming the argument).

    The slow step is Lookahead's ``lerp`` unless ``outer_momentum > 0`` (the shorthand for
    ``torch.optim.SGD(lr=alpha, momentum=outer_momentum, nesterov=nesterov)``) or ``outer_optimizer``
    (any optimizer factory over the slow weights; ``alpha`` and ``outer_momentum`` must then stay at
    their defaults: the factory holds the learning rate).

    Example:
        >>> LookaheadConfig(k=10).k
        10
        >>> LookaheadConfig(alpha=2.0)
        Traceback (most recent call last):
        ...
        ValueError: Lookahead `alpha` must be a finite float in (0, 1], got 2.0
    """

    k: int = 5
    alpha: float = 0.5
    inner_state: InnerState = "keep"
    on_nonfinite: OnNonFinite = "warn"
    outer_momentum: float = 0.0
    nesterov: bool = True
    outer_optimizer: OuterOptimizerFactory | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "k", check_k(self.k))
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "inner_state", check_choice("inner_state", self.inner_state, tuple(INNER_POLICIES)))
        set_(self, "on_nonfinite", check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE))
        set_(self, "outer_momentum", check_outer_momentum(self.outer_momentum))
        set_(self, "nesterov", check_bool("nesterov", self.nesterov))
        if self.outer_optimizer is not None:
            if not callable(self.outer_optimizer):
                raise ValueError(
                    "Lookahead `outer_optimizer` must be a callable that builds a torch optimizer from parameters"
                    f" (e.g. functools.partial(torch.optim.Adam, lr=1e-3); Hydra: _partial_: true), got"
                    f" {self.outer_optimizer!r}"
                )
            check_factory(self.outer_optimizer)
            if self.alpha != 0.5 or self.outer_momentum != 0.0:
                raise ValueError(
                    "Lookahead `outer_optimizer` replaces the slow step that `alpha` and `outer_momentum` describe:"
                    f" leave them at their defaults (0.5, 0.0), got alpha={self.alpha}, outer_momentum="
                    f"{self.outer_momentum}; put the learning rate and momentum into the outer optimizer."
                )

    def outer_step(self) -> OuterStep:
        """A new slow step for one optimizer's parameters."""
        if self.outer_optimizer is not None:
            return OptimizerStep(self.outer_optimizer)
        if self.outer_momentum:
            return OptimizerStep(sgd_factory(self.alpha, self.outer_momentum, self.nesterov))
        return LerpStep(self.alpha)

    def inner_policy(self) -> InnerPolicy:
        """A new inner-state policy (one per run: pullback's slow moments live in it)."""
        return INNER_POLICIES[self.inner_state]()

    def saved(self) -> dict[str, Any]:
        """The settings that a state records (numbers and strings; the factory is code, not state)."""
        out = {f: getattr(self, f) for f in ("k", "alpha", "inner_state", "outer_momentum", "nesterov")}
        out["outer_optimizer"] = _describe(self.outer_optimizer)
        return out

    def changed_from(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The settings a saved state (:meth:`saved`) had that differ from these (keys it lacks are
        taken to be the first release's defaults; ``nesterov`` only counts with outer momentum)."""
        mine = self.saved()
        old = {**_FIRST_RELEASE, **{k: v for k, v in saved.items() if k in mine}}
        if not (mine["outer_momentum"] or old.get("outer_momentum")):
            old["nesterov"] = mine["nesterov"]
        return {k: old[k] for k in mine if k in old and old[k] != mine[k]}

    def same_outer_state(self, saved: Mapping[str, Any]) -> bool:
        """Whether a saved outer state (momentum buffers, an outer optimizer's state) means the same here."""
        return not ({"outer_momentum", "nesterov", "outer_optimizer"} & set(self.changed_from(saved)))


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
    """Local SGD's settings, validated when built (a ``ValueError`` naming the argument).

    ``ranks_per_worker``: ranks per worker (an int >= 1, or ``"node"``: the ranks of one node,
    resolved by :meth:`ranks_per_worker_for`); ``start``: optimizer steps of ordinary DDP over the
    whole world before the local steps begin; ``average_precision``: ``"full"`` (the weights' own
    dtype) or ``"bf16"`` (pseudo-gradients cross between workers as bfloat16, summed in float32).
    The last three need ``enabled``.

    Example:
        >>> LocalSGDConfig(True, ranks_per_worker="node").ranks_per_worker_for(devices_per_node=8)
        8
        >>> LocalSGDConfig(False, start=100)
        Traceback (most recent call last):
        ...
        ValueError: Lookahead `local_sgd_start` needs local_sgd=True
    """

    enabled: bool = False
    ranks_per_worker: int | Literal["node"] = 1
    start: int = 0
    average_precision: AveragePrecision = "full"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "enabled", check_bool("local_sgd", self.enabled))
        per = self.ranks_per_worker
        if per != "node" and (_is_bool(per) or not isinstance(per, numbers.Integral) or per < 1):
            raise ValueError(f"Lookahead `ranks_per_worker` must be an int >= 1 or 'node', got {per!r}")
        set_(self, "ranks_per_worker", per if per == "node" else int(per))
        start = self.start
        if _is_bool(start) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"Lookahead `local_sgd_start` must be an int >= 0 (optimizer steps), got {start!r}")
        set_(self, "start", int(start))
        set_(self, "average_precision", check_choice("average_precision", self.average_precision, ("full", "bf16")))
        if not self.enabled:
            for name, value, default in (
                ("ranks_per_worker", self.ranks_per_worker, 1),
                ("local_sgd_start", self.start, 0),
                ("average_precision", self.average_precision, "full"),
            ):
                if value != default:
                    raise ValueError(f"Lookahead `{name}` needs local_sgd=True")

    def ranks_per_worker_for(self, devices_per_node: int) -> int:
        """``ranks_per_worker`` as a number (``"node"``: ``devices_per_node``)."""
        return devices_per_node if self.ranks_per_worker == "node" else int(self.ranks_per_worker)


_FIRST_RELEASE = {"outer_momentum": 0.0, "nesterov": True, "outer_optimizer": None}  # 0.1.0 lacked these


def _describe(factory: OuterOptimizerFactory | None) -> str | None:
    """A stable text for an optimizer factory (``functools.partial`` and classes show their settings)."""
    if factory is None:
        return None
    func = getattr(factory, "func", factory)
    name = getattr(func, "__qualname__", type(func).__name__)
    kwargs = getattr(factory, "keywords", {}) or {}
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})"
