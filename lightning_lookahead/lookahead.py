"""Lookahead for plain PyTorch optimizers: argument checks, per-optimizer step counting, syncs.

This is the whole algorithm without Lightning; :class:`~lightning_lookahead.LookaheadCallback`
only maps Trainer hooks onto it.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_lookahead import distributed
from lightning_lookahead import state as saved_state
from lightning_lookahead.config import (  # noqa: F401  (check_* are re-exported for the callback)
    LookaheadConfig,
    OnNonFinite,
    check_bool,
    check_choice,
    check_optional_int,
)
from lightning_lookahead.distributed import all_reduce_sum, is_sharded, reshard
from lightning_lookahead.inner_state import InnerState
from lightning_lookahead.outer import NonFiniteError, OuterOptimizerFactory
from lightning_lookahead.slow_weights import SlowWeights, SyncStats

_TRAINABLE = operator.attrgetter("requires_grad")


class _StepHook:
    """An optimizer step post-hook that counts for one optimizer (a class, so it pickles)."""

    def __init__(self, lookahead: Lookahead, index: int) -> None:
        self.lookahead, self.index = lookahead, index

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.lookahead.on_step(self.index, optimizer)


class Lookahead:
    """Lookahead (Zhang et al., 2019) around unmodified ``torch.optim`` optimizers.

    Counts each optimizer's *real* steps with a step post-hook (a step skipped by
    ``torch.amp.GradScaler`` either never calls ``optimizer.step``, or, for optimizers with their
    own AMP handling such as ``fused=True``, calls it with ``found_inf`` set, which the hook
    checks), and after every
    ``k``-th step of an optimizer syncs that optimizer's parameters:
    ``phi <- phi + alpha (theta - phi); theta <- phi``. With ``measure_distance`` (a bool, or a
    function of the optimizer index asked at each sync) a sync also records ``||theta - phi|| / ||phi||``
    in :attr:`last_stats`, computed on each cache block while it is in cache.

    That slow step is SGD with learning rate ``alpha`` on the pseudo-gradient ``phi - theta``.
    ``outer_momentum=mu > 0`` adds momentum to it: a buffer ``b <- mu b + (phi - theta)``, then
    ``phi <- phi - alpha ((phi - theta) + mu b)`` with ``nesterov=True`` (SNOO, Kallusky et al.
    2025; the outer step of DiLoCo, Douillard et al. 2023, with alpha=0.7, mu=0.9) or
    ``phi <- phi - alpha b`` with ``nesterov=False`` (SlowMo's heavy ball, Wang et al. 2020). This
    is ``torch.optim.SGD(lr=alpha, momentum=mu, nesterov=...)`` stepped on ``phi`` (that very
    optimizer); it keeps one more copy of the trained parameters. ``mu=0`` is plain Lookahead.
    ``outer_optimizer`` injects any other: a factory over the slow weights, e.g.
    ``functools.partial(torch.optim.Adam, lr=1e-3)`` (then ``alpha``/``outer_momentum`` stay at
    their defaults). During training the parameters of each (device, dtype) are views of one flat
    buffer (so a sync is a few flat ops); :meth:`release` gives them their own storage back.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> la = Lookahead(k=2, alpha=0.5)
        >>> la.attach([opt], model)
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     model(torch.ones(1, 4)).sum().backward()
        ...     opt.step()
        >>> la.syncs
        2
        >>> la.detach()
    """

    def __init__(
        self,
        k: int = 5,
        alpha: float = 0.5,
        inner_state: InnerState = "keep",
        on_nonfinite: OnNonFinite = "warn",
        measure_distance: bool | Callable[[int], bool] = False,
        outer_momentum: float = 0.0,
        nesterov: bool = True,
        outer_optimizer: OuterOptimizerFactory | None = None,
        *,
        config: LookaheadConfig | None = None,
        before_sync: Callable[[Lookahead, int], None] | None = None,
    ) -> None:
        # all settings are validated once, by LookaheadConfig; ``config`` replaces the arguments
        self.config = config or LookaheadConfig(k, alpha, inner_state, on_nonfinite, outer_momentum, nesterov, outer_optimizer)
        if not callable(measure_distance):
            measure_distance = check_bool("measure_distance", measure_distance)
        # ||theta - phi|| / ||phi|| at a sync of optimizer i when this is true (or returns true for i)
        self.measure_distance = measure_distance
        self.inner = self.config.inner_policy()
        # called as before_sync(self, index) before each sync, e.g. local SGD's weight averaging
        self.before_sync = before_sync
        self.groups: list[SlowWeights] = []
        self.optimizers: list[Optimizer] = []
        self.steps: list[int] = []  # real optimizer steps per optimizer
        self.syncs = 0  # syncs applied, all optimizers (including any whose device-side flag is unread)
        self.skipped = 0  # syncs skipped for non-finite fast weights
        self.last_stats: dict[int, SyncStats] = {}  # optimizer index -> stats of its latest sync
        self._unread: list[tuple[int, int, Tensor]] = []  # (optimizer, step, applied flag) decided on the device
        self._signatures: dict[int, tuple] = {}  # optimizer index -> its parameters' signature at the last sync
        self._handles: list[RemovableHandle] = []
        self._warned_nonfinite = False
        # a step counts only while gate() is true (None: always). The callback closes it while a
        # tuner's trial loop steps the optimizers, so trials leave Lookahead's state untouched.
        self.gate: Callable[[], bool] | None = None

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def inner_state(self) -> str:
        return self.config.inner_state

    @property
    def outer_momentum(self) -> float:
        return self.config.outer_momentum

    @property
    def nesterov(self) -> bool:
        return self.config.nesterov

    @property
    def on_nonfinite(self) -> str:
        return self.config.on_nonfinite

    @property
    def module(self) -> nn.Module:
        """The module given to :meth:`attach`."""
        return self._module

    @property
    def slow_moments(self) -> list[dict[str, Tensor]]:
        """Pullback's slow first moments per optimizer (empty lists for other policies)."""
        return self.inner.slow_moments() or [{} for _ in self.optimizers]

    # ------------------------------------------------------------ attach
    def attach(self, optimizers: Sequence[Optimizer], module: nn.Module, claim: Collection[str] | None = None) -> None:
        """Create slow weights for every trainable parameter of ``optimizers`` and start counting.

        Parameters are named as in ``module.named_parameters()``; each optimizer gets its own
        step counter and slow-weight group. ``claim`` (when resuming: the names a saved state has
        fast weights for) takes exactly those parameters of the optimizers instead, frozen or not;
        the others join at their optimizer's next sync, as they did in the run that saved it.
        """
        self.use_fast()  # a re-attach while the slow weights are swapped in starts from the fast ones
        self.detach()
        self._module = module
        self._names: dict[Tensor, str] = {p: n for n, p in module.named_parameters()}
        self._owner: dict[Tensor, int] = {}
        self.optimizers = list(optimizers)
        for opt in self.optimizers:
            self.inner.check(opt)
        if self.config.outer_optimizer is not None and any(is_sharded(p) for p in module.parameters()):
            raise ValueError(
                "Lookahead `outer_optimizer` is not supported with sharded (FSDP2) parameters: its state would"
                " have no sharded checkpoint layout. Use outer_momentum/nesterov (SGD), which is."
            )
        only = None if claim is None else frozenset(claim)
        self.groups = [self._group(self._claim(i, only=only)) for i in range(len(self.optimizers))]
        self.steps = [0] * len(self.optimizers)
        self.inner.start(len(self.optimizers))
        self.last_stats = {}
        self._unread = []
        self._signatures = {}
        self.hook()

    def _group(self, named: Sequence[tuple[str, Tensor]], slow: Mapping[str, Tensor] | None = None) -> SlowWeights:
        return SlowWeights(named, slow, outer=self.config.outer_step())

    @property
    def attached(self) -> bool:
        """True between :meth:`attach` and :meth:`detach` (steps are being counted)."""
        return bool(self._handles)

    def replace_optimizers(self, optimizers: Sequence[Optimizer]) -> bool:
        """Move to new optimizers that replaced the attached ones (same module); returns whether
        anything changed.

        Slow weights and the outer state carry over by parameter name; step counters carry over by
        optimizer index (a new index starts at 0); pullback's slow moments are dropped, since they
        belonged to the old optimizers' state. Parameters the new optimizers update for the first
        time (also ones of layers that replaced others) start with slow = their current values.
        Call it while the fast weights are in the parameters.
        """
        optimizers = list(optimizers)
        if len(optimizers) == len(self.optimizers) and all(a is b for a, b in zip(optimizers, self.optimizers)):
            return False
        for opt in optimizers:
            self.inner.check(opt)
        assert not self.swapped, "replace_optimizers() while the slow weights are swapped in"
        slow: dict[str, Tensor] = {}
        outer: dict[str, dict[str, Tensor]] = {}
        for g in self.groups:
            slow.update({n: t.clone() for n, t in g.slow_tensors().items()})
            outer.update(g.outer.state_by_name())
            g.release()  # the parameters leave the old layout; the new groups lay them out anew
        steps = self.steps
        self.detach()
        self.optimizers = optimizers
        self._names = {p: n for n, p in self._module.named_parameters()}  # layers may have been replaced
        self._owner = {}
        self.groups = [self._group(self._claim(i), slow) for i in range(len(optimizers))]
        for g in self.groups:
            g.outer.load_state_by_name({n: s for n, s in outer.items() if n in g.names})
        self.steps = [steps[i] if i < len(steps) else 0 for i in range(len(optimizers))]
        self.inner.start(len(optimizers))
        self.last_stats = {}
        self._signatures = {}
        self.hook()
        return True

    def _claim(self, index: int, only: frozenset[str] | None = None) -> list[tuple[str, Tensor]]:
        """Parameters of optimizer ``index`` that have no slow weights yet, named: the trainable
        ones, or exactly those named in ``only`` (frozen or not)."""
        opt, named = self.optimizers[index], []
        for group in opt.param_groups:
            for p in group["params"]:
                wanted = p.requires_grad if only is None else self._names.get(p) in only
                if self._owner.get(p) == index or not wanted:
                    continue
                if p in self._owner:
                    raise ValueError(
                        f"Parameter {self._names.get(p, '?')!r} is in optimizers {self._owner[p]} and {index};"
                        " Lookahead needs each parameter updated by one optimizer."
                    )
                if p not in self._names:
                    raise ValueError(
                        f"Optimizer {index} ({type(opt).__name__}) updates a tensor of shape {tuple(p.shape)}"
                        " that is not a parameter of the module; Lookahead matches tensors by parameter name."
                    )
                self._owner[p] = index
                named.append((self._names[p], p))
        return named

    def _adopt_new_parameters(self, index: int) -> None:
        # Fine-tuning schedules (Lightning's BaseFinetuning) add param groups or unfreeze
        # parameters mid-run; without this they would silently train without Lookahead. A cheap
        # signature (group and parameter counts, trainable flags) skips the search when nothing changed.
        groups = self.optimizers[index].param_groups
        signature = (len(groups), *(len(g["params"]) for g in groups), *(tuple(map(_TRAINABLE, g["params"])) for g in groups))
        if self._signatures.get(index) == signature:
            return
        self._signatures[index] = signature
        new = self._claim(index)
        if new:
            self.groups[index].add(new)
            warnings.warn(
                f"Lookahead: optimizer {index} now updates {len(new)} more parameter(s) (e.g. {new[0][0]!r});"
                " their slow weights start from their current values.",
                RuntimeWarning,
                stacklevel=3,
            )

    def release(self) -> None:
        """Give every parameter its own storage again (a copy of what it holds), so nothing of the
        contiguous layout leaks into ``torch.save(module.weight)`` or exports; the next sync or swap
        lays the parameters out again. The callback calls it when fit ends."""
        for g in self.groups:
            g.release()

    def detach(self) -> None:
        """Stop counting steps (the slow weights are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def hook(self) -> None:
        """(Re)start counting the optimizers' steps (:meth:`attach` does this)."""
        self.detach()
        self._handles = [opt.register_step_post_hook(_StepHook(self, i)) for i, opt in enumerate(self.optimizers)]

    def on_step(self, index: int, optimizer: Optimizer) -> None:
        """Count a step of optimizer ``index`` (its step post-hook) and sync every ``k``-th one."""
        # GradScaler skips a non-fused step by not calling step() at all; an optimizer with its
        # own AMP handling (fused=True) is called anyway with `found_inf` set: read it (one host
        # read per step, only in that case) so a skipped step is not counted.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        if self.gate is not None and not self.gate():
            return
        if self.swapped:
            raise RuntimeError(
                f"Lookahead: optimizer {index} stepped while the slow weights are swapped in (use_slow()), so it"
                " trained the slow weights; call use_fast() before training again."
            )
        self.steps[index] += 1
        if self.steps[index] % self.k == 0:  # O(1) python on every other step, no tensor work
            self.sync(index)

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles refer to the optimizers' hook dicts, which optimizers do not pickle: a copy
        # (pickle, deepcopy) re-hooks its own copies of the optimizers instead.
        state = self.__dict__.copy()
        state["_handles"] = bool(self._handles)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        hooked = state.pop("_handles")
        self.__dict__.update(state)
        self._handles = []
        if hooked:
            self.hook()

    # ------------------------------------------------------------ sync
    def sync(self, index: int) -> bool:
        """Sync optimizer ``index``'s parameters now; returns whether the sync was applied (on CUDA,
        where the decision stays on the device, ``True``: a skip is counted when :meth:`read_flags` runs)."""
        if not 0 <= index < len(self.groups):
            raise RuntimeError(
                f"Lookahead.sync({index!r}): attach(optimizers, module) first; attached optimizers: {len(self.groups)}"
            )
        self._adopt_new_parameters(index)  # new parameters join first (local SGD averages them too)
        if self.before_sync is not None:
            self.before_sync(self, index)
        group = self.groups[index]
        measure = self.measure_distance(index) if callable(self.measure_distance) else self.measure_distance
        # the inner-state policies act on the host's decision, so only "keep" may leave it on the device
        stats = group.sync(measure, device_side=self.inner_state == "keep")
        self.last_stats[index] = stats
        if isinstance(stats.applied, Tensor):
            self.syncs += 1  # corrected by read_flags() if the device skipped it
            self._unread.append((index, self.steps[index], stats.applied))
            return True
        if not stats.applied:
            self._skipped(index, self.steps[index], 1)
            return False
        self.syncs += 1
        self.inner.after_sync(index, self.optimizers[index], list(zip(group.names, group.params)), self.alpha)
        return True

    def read_flags(self) -> None:
        """Count the syncs that the device skipped (CUDA: the decision stays there), warning or
        raising as ``on_nonfinite`` says: one host read. The callback calls it at logger rows and
        at the end of each epoch; :meth:`state_dict` calls it too."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        skipped = (~torch.stack([flag.to(unread[0][2].device) for _, _, flag in unread])).tolist()
        for (index, step, _), skip in zip(unread, skipped):
            if skip:
                self.syncs -= 1
                self._skipped(index, step, 1)

    def _skipped(self, index: int, step: int, count: int) -> None:
        self.skipped += count
        msg = (
            f"Lookahead: the fast weights of optimizer {index} hold inf/nan at step {step};"
            " this sync was skipped and the slow weights were kept."
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(msg + " (warned once)", RuntimeWarning, stacklevel=3)

    def metrics(self) -> dict[str, float]:
        """``lookahead/syncs`` and, for each optimizer's latest measured sync, ``lookahead/rel_distance``
        (and ``rel_outer_step`` for an outer optimizer), suffixed ``/opt{i}`` with several optimizers.
        Host reads; with shards, a collective (every rank must call it at the same sync count)."""
        metrics = {"lookahead/syncs": float(self.syncs)}
        suffix = len(self.groups) > 1
        for i, s in self.last_stats.items():
            if s.d_sq is None or s.phi_sq is None or (isinstance(s.applied, Tensor) and not bool(s.applied)):
                continue  # not measured, or skipped on the device: no distance to report
            parts = torch.stack([s.d_sq, s.phi_sq] + ([s.step_sq] if s.step_sq is not None else []))
            if self.groups[i].any_sharded:  # shards: sum the squares over ranks first
                parts = all_reduce_sum(parts)
            norms = parts.sqrt() / parts[1].sqrt().clamp_min(1e-30)
            name = f"/opt{i}" if suffix else ""
            metrics[f"lookahead/rel_distance{name}"] = float(norms[0])
            if s.step_sq is not None:
                metrics[f"lookahead/rel_outer_step{name}"] = float(norms[2])
        return metrics

    def check_ranks(self) -> None:
        """Raise :class:`~lightning_lookahead.RankMismatchError` on every rank unless the replicated
        state (slow weights, outer state, step and sync counters) is bit-identical across ranks (shards
        differ by design). A collective: call it on every rank at the same point."""
        names, tensors = [], []
        for g in self.groups:
            outer = g.outer.state_by_name()
            for name, slow, sharded in zip(g.names, g.slow_tensors().values(), g.sharded):
                if sharded:
                    continue
                names.append(name)
                tensors.append(slow)
                for key, t in outer.get(name, {}).items():
                    if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
                        names.append(f"{name} (outer momentum)" if key == "momentum_buffer" else f"{name} (outer {key})")
                        tensors.append(t)
        counters = {f"step counter of optimizer {i}": s for i, s in enumerate(self.steps)}
        counters.update({"sync counter": self.syncs, "skipped-sync counter": self.skipped})
        # counters first: when they differ they are the cause, the weights the consequence
        distributed.check_replicated(list(counters) + names, [torch.tensor(float(v), dtype=torch.float64) for v in counters.values()] + tensors)

    # ------------------------------------------------------------ eval swap
    @property
    def swapped(self) -> bool:
        """True while the parameters hold the slow weights (evaluation, or after training)."""
        return any(g.swapped for g in self.groups)

    def use_slow(self) -> bool:
        """Put the slow weights into the parameters; returns False if they already were there."""
        return self._set_swapped(True)

    def use_fast(self) -> bool:
        """Put the fast weights back; returns False if they already were there."""
        return self._set_swapped(False)

    def _set_swapped(self, value: bool) -> bool:
        if any(g.any_sharded for g in self.groups) and any(g.swapped != value for g in self.groups):
            reshard(self._module)  # the next forward must gather the values we are about to write
        changed = False
        for g in self.groups:
            if g.swapped != value:
                g.swap()
                changed = True
        return changed

    # ------------------------------------------------------------ state (lightning_lookahead.state)
    def counters(self) -> dict[str, Any]:
        """Settings and counters: numbers and strings only (the callback keeps these in its own state)."""
        return saved_state.counters(self)

    def load_counters(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`counters` (checked: a ``ValueError`` names a damaged entry)."""
        saved_state.load_counters(self, state)

    def tensors(self) -> dict[str, Any]:
        """Name -> tensor maps ``fast``, ``slow``, pullback's ``slow_moments``, the outer ``momentum``
        buffers (the ``outer_momentum`` shorthand) and ``outer_state`` (an ``outer_optimizer``'s,
        name -> {key: tensor}); live tensors, not copies."""
        return saved_state.tensors(self)

    def load_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Restore after :meth:`attach` from a checkpoint whose model state the module already holds
        (the slow weights): the fast weights, the outer state and pullback's moments, checked first."""
        saved_state.load_tensors(self, tensors)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, ``torch.optim`` style: settings, counters, ``swapped``,
        each optimizer's parameter names and the name -> tensor maps of :meth:`tensors`, named without
        wrapper prefixes (Fabric, DDP, ``torch.compile``, activation checkpointing), so a state saved
        from a wrapped module loads into the bare one. The tensors are the live ones: take it together
        with the model's ``state_dict``, no swap in between (as ``fabric.save`` does); saved in one
        ``torch.save`` each storage is stored once. Loads with ``torch.load(weights_only=True)``."""
        return saved_state.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly, after :meth:`attach` (same optimizers in the same
        order, the same module, wrapped or not), before or after the model's and optimizers' states.
        Raises ``ValueError`` before changing anything when the state does not fit; other saved
        settings warn (another outer optimizer's state is dropped)."""
        saved_state.load_state_dict(self, state)
