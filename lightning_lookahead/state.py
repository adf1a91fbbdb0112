"""Lookahead's state, one Lightning-free path: counters, named tensors, ``state_dict`` and its
checked load, and the parameter names free of wrapper prefixes that make states portable."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_lookahead import inner_state as inner
from lightning_lookahead.distributed import like, local_from_saved, reshard_like

if TYPE_CHECKING:
    from lightning_lookahead.lookahead import Lookahead
    from lightning_lookahead.slow_weights import SlowWeights

STATE_VERSION = 1  # of Lookahead.state_dict()

# Wrappers that put their module under an attribute: Fabric (and Lightning's strategies) under
# `_forward_module`, torch.compile under `_orig_mod`, activation checkpointing under
# `_checkpoint_wrapped_module`; (Distributed)DataParallel under `module`, a common name that is
# dropped only below an actual DataParallel.
_WRAPPER_ATTRIBUTES = frozenset({"_forward_module", "_orig_mod", "_checkpoint_wrapped_module"})


def canonical_names(module: nn.Module) -> dict[str, str]:
    """``module.named_parameters()`` name -> the name without wrapper prefixes, so the same
    parameter has the same name whether ``module`` is wrapped (Fabric, DDP, ``torch.compile``,
    activation checkpointing) or not."""
    parallel = {path for path, m in module.named_modules() if isinstance(m, (nn.DataParallel, DistributedDataParallel))}
    out: dict[str, str] = {}
    for name, _ in module.named_parameters():
        parts, path = [], ""
        for part in name.split("."):
            parent, path = path, f"{path}.{part}" if path else part
            if part in _WRAPPER_ATTRIBUTES or (part == "module" and parent in parallel):
                continue
            parts.append(part)
        out[name] = ".".join(parts)
    if len(set(out.values())) < len(out):
        raise ValueError(f"Lookahead: parameter names {sorted(out)} are not unique once wrapper prefixes are dropped")
    return out


def counters(la: Lookahead) -> dict[str, Any]:
    """Settings and counters: numbers and strings only (the callback keeps these in its own
    state and the tensors elsewhere; :meth:`state_dict` in 0.1.0)."""
    la.read_flags()
    return {**la.config.saved(), "steps": list(la.steps), "syncs": la.syncs, "skipped": la.skipped}

def tensors(la: Lookahead) -> dict[str, Any]:
    """Name -> tensor maps for ``fast``, ``slow``, pullback's ``slow_moments``, the outer
    ``momentum`` buffers (the ``outer_momentum`` shorthand) and ``outer_state`` (an
    ``outer_optimizer``'s per-parameter state, name -> {key: tensor}); live, not copies."""
    out: dict[str, Any] = {"fast": {}, "slow": {}, "slow_moments": {}, "momentum": {}, "outer_state": {}}
    for g, m in zip(la.groups, la.slow_moments):
        out["fast"].update(g.fast_tensors())
        out["slow"].update(g.slow_tensors())
        out["slow_moments"].update(m)
        outer = g.outer.state_by_name()
        if la.config.outer_optimizer is None:
            out["momentum"].update({n: s["momentum_buffer"] for n, s in outer.items() if "momentum_buffer" in s})
        else:
            out["outer_state"].update(outer)
    return out

def _load_outer(la: Lookahead, g: SlowWeights, tensors: Mapping[str, Any]) -> None:
    params = dict(zip(g.names, g.params))
    if la.config.outer_optimizer is None:  # this rank's part of a saved (sharded or full) buffer
        momentum = tensors.get("momentum", {})
        state = {n: {"momentum_buffer": local_from_saved(params[n], t)} for n, t in momentum.items() if n in params}
    else:
        state = {n: s for n, s in tensors.get("outer_state", {}).items() if n in params}
    g.outer.load_state_by_name(state)

def load_counters(la: Lookahead, state: Mapping[str, Any]) -> None:
    """Restore :func:`counters` (all of :meth:`Lookahead.load_state_dict` in 0.1.0), checked."""
    steps = _checked_counter_list(state.get("steps"), len(la.groups))
    la.steps = steps
    la.syncs = _checked_count(state, "syncs")
    la.skipped = _checked_count(state, "skipped", 0)
    la._unread = []
    if not la.config.same_outer_state(state):
        for g in la.groups:  # the state of another outer optimizer means nothing to this one
            g.outer.load_state_by_name({})

def load_tensors(la: Lookahead, tensors: Mapping[str, Any]) -> None:
    """Restore after :meth:`attach`: the parameters already hold the slow weights (loaded from
    ``state_dict``), so ``phi`` is right; copy in the ``fast`` weights, the outer state and
    pullback's moments.

    Every parameter that had slow weights when the state was saved gets them back, also one
    that is frozen right now (a fine-tuning callback may unfreeze it before the next step, as
    in the run that saved it).
    """
    fast = dict(tensors["fast"])
    check_saved_fast(la, fast)
    saved_moments = tensors.get("slow_moments", {}) if la.inner_state == "pullback" else {}
    for i, g in enumerate(la.groups):
        new = la._claim(i, only=frozenset(fast))
        if new:
            g.add(new)
    for g, opt, moments in zip(la.groups, la.optimizers, la.slow_moments):
        g.load("fast", fast)
        _load_outer(la, g, tensors)
        moments.clear()
        for name, p in zip(g.names, g.params):
            live = inner.first_moment(opt, p) if name in saved_moments else None
            if live is not None:  # our slow moment takes the live buffer's layout (device, shards)
                moments[name] = reshard_like(live, saved_moments[name]).clone()

def check_saved_fast(la: Lookahead, fast: Mapping[str, Any]) -> None:
    """Saved fast weights must name parameters of the module, with their shapes (a ``ValueError``
    naming the entry otherwise); trained parameters they lack are named in a warning."""
    params = dict(la.module.named_parameters())
    for name, t in fast.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"Lookahead: the saved fast weights name {name!r}, which is not a parameter of the module")
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"Lookahead: the saved fast weights of {name!r} have shape {tuple(getattr(t, 'shape', ()))},"
                f" the parameter {tuple(p.shape)}"
            )
    trained = [la._names[p] for opt in la.optimizers for g in opt.param_groups for p in g["params"]
               if p.requires_grad and p in la._names]
    missing = [n for n in trained if n not in fast]
    if missing:  # legitimate when they were frozen at save time (a fine-tuning schedule): say so, never silently
        warnings.warn(
            f"Lookahead: the saved state has no fast weights for {len(missing)} parameter(s) that the optimizers train"
            f" now, e.g. {missing[:5]} (frozen when it was saved?); they join at their optimizer's next sync with"
            " slow = their current values.",
            RuntimeWarning,
            stacklevel=4,
        )


def state_dict(la: Lookahead) -> dict[str, Any]:
    """Everything needed to resume exactly, ``torch.optim`` style (see :meth:`load_state_dict`).

    Settings (``k``, ``alpha``, ``inner_state``, ``outer_momentum``, ``nesterov``), counters
    (``steps`` per optimizer, ``syncs``, ``skipped``), ``swapped`` (whether the module holds the
    slow weights), ``params`` (each optimizer's parameter names, in order) and name -> tensor
    maps ``fast``, ``slow``, ``momentum`` (outer momentum buffers), ``outer_state`` (an outer
    optimizer's, name -> {key: tensor}) and ``slow_moments`` (pullback's). Both the fast and the slow copy are always included, so the state restores
    exactly whatever the module holds when it is saved or loaded. The tensors are the live
    ones, not copies (as in ``torch.optim``), and ``swapped`` is read now: take this together
    with the model's ``state_dict``, no swap in between (as ``fabric.save`` does). Saved with the
    model's ``state_dict`` in one ``torch.save``, each storage is stored once, so the file grows
    by one copy of the trained parameters (plus the buffers). Only tensors, numbers, strings,
    lists and dicts: it loads with ``torch.load(path, weights_only=True)``.

    Names are the module's parameter names without wrapper prefixes (Fabric's
    ``_forward_module.``, DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, activation
    checkpointing's ``_checkpoint_wrapped_module.``), so a state saved from a wrapped module
    loads into the bare one and vice versa.
    """
    canonical = canonical_names(la.module) if la.groups else {}  # raw name -> canonical

    def named(tensors: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {canonical[n]: like(params[n], t.detach()) if n in params else t.detach()
                for n, t in tensors.items()}

    params = {n: p for g in la.groups for n, p in zip(g.names, g.params)}
    live = tensors(la)
    return {
        "version": STATE_VERSION,
        **counters(la),
        "swapped": la.swapped,
        "params": [[canonical[n] for n in g.names] for g in la.groups],
        "fast": named(live["fast"], params),
        "slow": named(live["slow"], params),
        "momentum": named(live["momentum"], params),
        "outer_state": {canonical[n]: {k: v.detach() if isinstance(v, Tensor) else v for k, v in s.items()}
                        for n, s in live["outer_state"].items()},
        "slow_moments": named(live["slow_moments"], {}),
    }

def load_state_dict(la: Lookahead, state: Mapping[str, Any]) -> None:
    """Restore a :meth:`state_dict` exactly; call it after :meth:`attach` (same optimizers, in
    the same order, and the same module, wrapped or not).

    Whatever the module holds at this moment (fast, slow or other weights) is overwritten: its
    trained parameters get the saved fast weights, or the slow ones if the state was saved
    while they were swapped in. So the model's ``state_dict``, which holds the same values,
    may be loaded before or after this, and the optimizer's too. The settings are this
    object's own: other saved ones warn (a changed outer momentum drops the saved buffers).

    Raises ``ValueError`` before changing anything when the state does not fit: another number
    of optimizers, parameter names the module lacks or another optimizer updates, tensors of
    another shape. A 0.1.0 counters-only state (no ``version``) restores the counters only.
    """
    if "version" not in state:
        warnings.warn(
            "Lookahead.load_state_dict got a counters-only state (lightning-lookahead 0.1.0); restoring the"
            " counters only. Lookahead.state_dict() now holds the tensors too.",
            DeprecationWarning,
            stacklevel=2,
        )
        load_counters(la, state)
        return
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise ValueError(f"Lookahead state version {state.get('version')!r} is not {STATE_VERSION}, the supported one")
    if not la.optimizers or not hasattr(la, "_module"):
        raise RuntimeError("Lookahead.load_state_dict needs attach(optimizers, module) first")
    for key, kind in (("params", list), ("steps", list), ("fast", Mapping), ("slow", Mapping)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"Lookahead state: {key!r} must be a {kind.__name__}, got {state.get(key)!r:.80}")
    _checked_counter_list(state["steps"], len(state["params"]))
    _checked_count(state, "syncs")
    _checked_count(state, "skipped", 0)
    saved = [list(names) for names in state["params"]]
    if len(saved) != len(la.optimizers):
        raise ValueError(
            f"Lookahead state was saved with {len(saved)} optimizer(s); this Lookahead is attached to"
            f" {len(la.optimizers)}"
        )
    canonical = canonical_names(la.module)
    by_name: dict[str, Tensor] = {canonical[n]: p for n, p in la.module.named_parameters()}
    missing = [n for names in saved for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"Lookahead state has {len(missing)} parameter(s) the module lacks, e.g. {missing[:5]};"
            f" the module's (without wrapper prefixes) are e.g. {list(by_name)[:5]}"
        )
    owners: dict[Tensor, int] = {}
    for i, names in enumerate(saved):
        own = {p for group in la.optimizers[i].param_groups for p in group["params"]}
        for name in names:
            p = by_name[name]
            if p not in own or p in owners:
                raise ValueError(
                    f"Lookahead state: parameter {name!r} was updated by optimizer {i} (and no other);"
                    " the attached optimizers differ"
                )
            owners[p] = i
    outer = {f"{name}/{k}": v for name, s in state.get("outer_state", {}).items() for k, v in s.items()}
    for key, entries in (*((key, state.get(key, {})) for key in ("fast", "slow", "momentum", "slow_moments")),
                         ("outer_state", outer)):
        for entry, t in entries.items():
            name = entry.rpartition("/")[0] if key == "outer_state" else entry
            param = by_name.get(name)
            if param is None or param not in owners:
                raise ValueError(f"Lookahead state: {key!r} has {name!r}, which is not one of its parameters")
            if not isinstance(t, Tensor) or (tuple(t.shape) != tuple(param.shape) and key != "outer_state"):
                raise ValueError(
                    f"Lookahead state: {key}[{entry!r}] has shape {tuple(getattr(t, 'shape', ()))},"
                    f" the parameter {tuple(param.shape)}"
                )
    for key in ("fast", "slow"):
        lacking = [n for names in saved for n in names if n not in state[key]]
        if lacking:
            raise ValueError(f"Lookahead state: {key!r} lacks parameters {lacking[:5]}")
    changed = la.config.changed_from(state)
    if changed:
        warnings.warn(
            f"Lookahead: the state was saved with {changed}; continuing with this object's {la.config.saved()}.",
            RuntimeWarning,
            stacklevel=2,
        )
    same_outer = la.config.same_outer_state(state)

    # Checked: from here on nothing raises for a state that fits.
    la.use_fast()  # the parameters get their own storage back; their values are overwritten below
    raw: dict[Tensor, str] = {p: n for n, p in la.module.named_parameters()}
    la._names, la._owner = raw, owners
    by_raw = {raw[by_name[c]]: c for names in saved for c in names}

    def renamed(key: str, names: Sequence[str]) -> dict[str, Any]:
        entries = state.get(key, {})
        return {n: entries[by_raw[n]] for n in names if by_raw[n] in entries}

    la.groups = []
    la.inner.start(len(saved))
    for i, names in enumerate(saved):
        group = la._group([(raw[by_name[c]], by_name[c]) for c in names])
        group.load("slow", renamed("slow", group.names))
        group.load("fast", renamed("fast", group.names))
        outer_state = {key: renamed(key, group.names) for key in ("momentum", "outer_state")}
        _load_outer(la, group, outer_state if same_outer else {})
        la.groups.append(group)
        moments = la.slow_moments[i]
        if la.inner_state == "pullback":
            for name, p in zip(group.names, group.params):
                if by_raw[name] in state["slow_moments"]:
                    live = inner.first_moment(la.optimizers[i], p)  # None until the optimizer is loaded
                    template = live if live is not None else p
                    moments[name] = reshard_like(template, state["slow_moments"][by_raw[name]]).clone()
    load_counters(la, state)
    la.last_stats = {}
    if state["swapped"]:
        la.use_slow()

def _checked_count(state: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Lookahead state: {key!r} must be an int >= 0, got {value!r}")
    return value


def _checked_counter_list(steps: Any, optimizers: int) -> list[int]:
    if not isinstance(steps, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"Lookahead state: 'steps' must be a list of ints >= 0 (one per optimizer), got {steps!r}")
    if len(steps) != optimizers:
        raise ValueError(f"Lookahead state has {len(steps)} optimizers, this run has {optimizers}")
    return list(steps)
