"""Lookahead in a Lightning checkpoint dict, in the strategy's own layout (Lightning-free: plain
dicts and torch.distributed). ``checkpoint["state_dict"]`` gets the slow weights; the fast weights,
the outer state and pullback's moments ride along in ``checkpoint["lookahead"]``, or, in a distributed
checkpoint, as prefixed shards in ``state_dict`` so that every rank writes its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_lookahead import distributed, inner_state

if TYPE_CHECKING:
    from lightning_lookahead.lookahead import Lookahead

CHECKPOINT_KEY = "lookahead"  # top-level checkpoint entry with the fast weights (not the callback state)
FAST_PREFIX = "_lookahead_fast."  # distributed checkpoints: our shards live in state_dict under these
MOMENT_PREFIX = "_lookahead_slow_moment."
MOMENTUM_PREFIX = "_lookahead_outer_momentum."
NOT_STARTED = "not_started"  # checkpoint written in a fit before its first training step
TENSOR_ENTRIES = ("fast", "slow_moments", "momentum", "outer_state")  # of checkpoint["lookahead"]
LAYOUTS = (None, "sharded", NOT_STARTED)  # checkpoint["lookahead"]["layout"]: None is the plain layout


def checked_entry(entry: Any) -> dict[str, Any] | None:
    """checkpoint["lookahead"], checked for what can be checked before the parameters exist (names
    and shapes are checked by the core when it loads them): a clear error, never a silent misread."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"Lookahead: checkpoint[{CHECKPOINT_KEY!r}] must be a dict, got {type(entry).__name__}")
    if entry.get("layout") not in LAYOUTS:
        raise ValueError(
            f"Lookahead: checkpoint[{CHECKPOINT_KEY!r}]['layout'] is {entry.get('layout')!r}, which this version"
            f" does not know (known: {[x for x in LAYOUTS if x]} or absent); was it written by a newer version?"
        )
    if entry.get("layout") is None:
        for key in TENSOR_ENTRIES:
            value = entry.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(v, (torch.Tensor, dict)) for v in value.values()):
                raise ValueError(
                    f"Lookahead: checkpoint[{CHECKPOINT_KEY!r}][{key!r}] must map parameter names to tensors,"
                    f" got {value!r:.120}"
                )
        if "fast" not in entry:
            raise ValueError(f"Lookahead: checkpoint[{CHECKPOINT_KEY!r}] has no 'fast' weights")
    return entry


def write(la: Lookahead, module: torch.nn.Module, checkpoint: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Put ``la``'s state into ``checkpoint`` (call on every rank: the gathered layout is a collective).

    Three layouts, following the strategy's own: plain tensors (single process, DDP); DTensor
    shards in a distributed checkpoint; full tensors gathered from shards (rank 0 keeps them).
    Parameters without slow weights (frozen, or updated by no optimizer) are saved as they are.
    """
    tensors = la.tensors()
    params = dict(module.named_parameters())
    state = checkpoint["state_dict"]
    sharded_file = any(distributed.is_sharded(v) for v in state.values())
    gather = any(distributed.is_sharded(p) for p in params.values()) and not sharded_file
    keep = not gather or distributed.rank() == 0  # a gathered checkpoint is written by rank 0 alone

    def out(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        t = t.detach()
        if distributed.is_sharded(t):  # pullback's slow moments are DTensors like the live moments
            p, t = t, t.to_local()
        if sharded_file:
            return distributed.like(p, t)
        if gather:
            whole = distributed.full(p, t)  # a collective: every rank takes part...
            return whole.cpu() if keep else None  # ...but only rank 0 keeps a host copy
        return t

    slow = {n: out(t, params[n]) for n, t in tensors["slow"].items()}
    fast = {n: out(t, params[n]) for n, t in tensors["fast"].items()}
    moments = {n: out(t, t) for n, t in tensors["slow_moments"].items()}
    momentum = {n: out(t, params[n]) for n, t in tensors["momentum"].items()}
    outer_state = {n: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                   for n, s in tensors["outer_state"].items()}  # never sharded: refused at attach
    if state:  # empty on ranks > 0 of a gathered state_dict
        keys = state_dict_keys(module, state)
        missing = [n for n in slow if n not in keys]
        if missing:  # e.g. a state_dict hook that drops them
            warn(
                f"Lookahead: parameters {missing[:5]} have no state_dict entry, so their slow weights are"
                " not in checkpoint['state_dict'] (their fast weights are in checkpoint['lookahead']).",
            )
        for name, ks in keys.items():
            if name not in slow:  # frozen or not optimised: the module's value is the only one
                continue
            value = slow[name]
            assert value is not None  # None only on ranks > 0 of a gathered checkpoint, whose state is empty
            for key in ks:
                state[key] = value if sharded_file else value.to(state[key].device)
    if sharded_file:
        state.update({f"{FAST_PREFIX}{n}": t for n, t in fast.items()})
        state.update({f"{MOMENT_PREFIX}{n}": t for n, t in moments.items()})
        state.update({f"{MOMENTUM_PREFIX}{n}": t for n, t in momentum.items()})
        checkpoint[CHECKPOINT_KEY] = {"layout": "sharded"}
    elif keep:
        checkpoint[CHECKPOINT_KEY] = {"fast": fast, "slow_moments": moments, "momentum": momentum}
        if outer_state:
            checkpoint[CHECKPOINT_KEY]["outer_state"] = outer_state


def load_sharded(la: Lookahead, path: str) -> dict[str, Any]:
    """Read our shards from a distributed checkpoint directory (every rank reads its own)."""
    templates = {}
    for g, opt in zip(la.groups, la.optimizers):
        for name, p in zip(g.names, g.params):
            templates[f"{FAST_PREFIX}{name}"] = distributed.like(p, torch.empty_like(distributed.local(p)))
            if la.outer_momentum:
                templates[f"{MOMENTUM_PREFIX}{name}"] = distributed.like(p, torch.empty_like(distributed.local(p)))
            live = inner_state.first_moment(opt, p) if la.inner_state == "pullback" else None
            if live is not None:
                templates[f"{MOMENT_PREFIX}{name}"] = torch.empty_like(live)
    loaded = distributed.load_sharded(path, templates)
    return {
        key: {k.removeprefix(prefix): v for k, v in loaded.items() if k.startswith(prefix)}
        for key, prefix in (("fast", FAST_PREFIX), ("slow_moments", MOMENT_PREFIX), ("momentum", MOMENTUM_PREFIX))
    }


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # dropped from state_dict keys by wrappers


def state_dict_keys(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, list[str]]:
    """Canonical parameter name -> its state_dict keys (tied weights have several; activation
    checkpointing and torch.distributed's state_dict helpers drop wrapper prefixes from keys)."""

    def norm(key: str) -> str:
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        return key

    canonical = {p: n for n, p in module.named_parameters()}
    by_key = {norm(n): canonical[p] for n, p in module.named_parameters(remove_duplicate=False)}
    out: dict[str, list[str]] = {}
    for key in state:
        name = by_key.get(norm(key))
        if name is not None:
            out.setdefault(name, []).append(key)
    return out
