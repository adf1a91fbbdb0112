"""The operations timed: our sync and eval swap, the peers' (paper loop, timm, pytorch_optimizer,
torch_optimizer, Lightning's WeightAveraging) and fused alternatives (foreach, torch.compile), each
built on one shared :class:`ParamSet` so every contender of a grid cell acts on the same tensors.

A ``make(ps) -> Contender`` function per contender; :data:`SYNC_CONTENDERS` and
:data:`SWAP_CONTENDERS` list them, :data:`TRAFFIC` gives each sync's traffic model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import ALPHA, K

# ====================================================================================== the shared tensors


class ParamSet:
    """``n_tensors`` parameters (``n_params`` in all) in ``module``, all views of one flat buffer
    kept outside the module, so flat-buffer kernels and per-tensor methods act on the very same
    memory (and a deepcopy of the module copies the parameters only). Every parameter has a (zero)
    gradient: timm and pytorch_optimizer skip parameters without one. float32 on the CPU unless
    ``device`` / ``dtype`` say otherwise (the values are drawn on the CPU, then moved)."""

    def __init__(
        self, n_params: int, n_tensors: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        sizes = [n_params // n_tensors] * n_tensors
        sizes[-1] += n_params - sum(sizes)
        self.flat = torch.randn(n_params, generator=g).to(device=device, dtype=dtype)  # a no-op for CPU float32
        self.flat_grad = torch.zeros(n_params, device=device, dtype=dtype)
        self.module = nn.ParameterList()
        offset = 0
        for s in sizes:
            p = nn.Parameter(self.flat[offset : offset + s])
            p.grad = self.flat_grad[offset : offset + s]
            self.module.append(p)
            offset += s

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.module)

    @property
    def theta(self) -> list[Tensor]:
        return [p.data for p in self.module]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


@dataclass
class Contender:
    """One operation to time, and the tensors its method keeps between calls (its slow copy etc.)."""

    fn: Callable[[], object]
    held: Callable[[], list[Tensor]] = field(default=lambda: [])


def _sgd(params: list[nn.Parameter]) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.0)


def ours(module: nn.Module, measure_distance: bool = False, own_copy: bool = True):
    """The package's core (what ``LookaheadCallback`` drives) as a plain-PyTorch user builds it,
    attached to its own copy of ``module``: attaching moves the parameters into the core's flat
    storage, which must not re-point the tensors the other contenders work on. ``own_copy=False``:
    attach to ``module`` itself (already a private copy, e.g. made before a memory baseline)."""
    import copy

    from lightning_lookahead.lookahead import Lookahead

    own = copy.deepcopy(module) if own_copy else module
    la = Lookahead(k=K, alpha=ALPHA, measure_distance=measure_distance)
    la.attach([_sgd(list(own.parameters()))], own)
    return la


def _ours_held(la) -> Callable[[], list[Tensor]]:
    """What the core keeps beyond the module's parameters: the slow weights."""
    return lambda: [t for g in la.groups for t in g.slow_tensors().values()]


# ====================================================================================== sync: update rules


def _paper_sync(params: list[Tensor], slow: list[Tensor], alpha: float) -> None:
    """The paper's reference update: a per-parameter ``.data`` loop."""
    for p, s in zip(params, slow):
        s.add_(alpha * (p.data - s))
        p.data.copy_(s)


class TimmLookahead:
    """Minimal faithful re-implementation of ``timm.optim.lookahead.Lookahead`` (``update_slow`` /
    ``sync_lookahead``): per-parameter loop, slow buffer kept in the wrapper's per-parameter state,
    parameters without a gradient skipped. timm is not installed here (it pins another torch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        self.param_groups = optimizer.param_groups
        self.alpha = alpha
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        for group in self.param_groups:
            for fast_p in group["params"]:
                if fast_p.grad is None:
                    continue
                param_state = self.state.setdefault(fast_p, {})
                if "slow_buffer" not in param_state:
                    param_state["slow_buffer"] = torch.empty_like(fast_p.data).copy_(fast_p.data)
                slow = param_state["slow_buffer"]
                slow.add_(fast_p.data - slow, alpha=self.alpha)
                fast_p.data.copy_(slow)


def _flat_lerp_copy(theta: Tensor, phi: Tensor, alpha: float) -> None:
    """One pass: read theta and phi, write both (4x parameter bytes)."""
    phi.lerp_(theta, alpha)
    theta.copy_(phi)


def _flat_sq_norms(theta: Tensor, phi: Tensor) -> Tensor:
    """Read-only pass: ``[||theta - phi||^2, ||phi||^2]`` (2x parameter bytes)."""
    d = theta - phi
    return torch.stack([(d * d).sum(), (phi * phi).sum()])


def _blocked_lerp_copy(theta: Tensor, phi: Tensor, alpha: float) -> None:
    """Our sync without its guard: per cache block of the flat buffers, lerp then copy (4x)."""
    from lightning_lookahead.outer import blocks

    for t, p in blocks(theta, phi):
        p.lerp_(t, alpha)
        t.copy_(p)


def _list_lerp_copy(theta: list[Tensor], phi: list[Tensor], alpha: float) -> None:
    for t, p in zip(theta, phi):
        p.lerp_(t, alpha)
        t.copy_(p)


class Compiled:
    """``torch.compile``d kernels, compiled lazily; a failure is recorded instead of raised."""

    def __init__(self) -> None:
        for cfg in ("recompile_limit", "cache_size_limit"):  # one compile per list layout of the grid
            if hasattr(torch._dynamo.config, cfg):
                setattr(torch._dynamo.config, cfg, 64)
        self.flat_lerp_copy = torch.compile(_flat_lerp_copy, dynamic=True)
        self.flat_sq_norms = torch.compile(_flat_sq_norms, dynamic=True)
        self.list_lerp_copy = torch.compile(_list_lerp_copy, dynamic=True)
        self.errors: dict[str, str] = {}
        self.first_call_s: dict[str, float] = {}

    def probe(self, name: str, fn: Callable[[], object]) -> bool:
        """Run fn once (compiling it); False, with the error recorded, if compilation fails."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any backend failure means "not available here"
            self.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return False
        self.first_call_s.setdefault(name, time.perf_counter() - t0)
        return True


class CompiledGuardedSync:
    """The package's semantics on flat buffers: guard and logged distance first (2x read-only),
    then the fused update (4x); theta and phi stay untouched when theta is not finite."""

    def __init__(self, compiled: Compiled, theta: Tensor, phi: Tensor, alpha: float) -> None:
        self.c, self.theta, self.phi, self.alpha = compiled, theta, phi, alpha

    @torch.no_grad()
    def __call__(self) -> Tensor | None:
        sq = self.c.flat_sq_norms(self.theta, self.phi)
        if not bool(torch.isfinite(sq[0])):  # the one host sync, as in the package
            return None
        self.c.flat_lerp_copy(self.theta, self.phi, self.alpha)
        return sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-30)


def _foreach_pair(theta: list[Tensor], phi: list[Tensor], alpha: float) -> None:
    torch._foreach_lerp_(phi, theta, alpha)
    torch._foreach_copy_(theta, phi)


def _foreach_guarded(theta: list[Tensor], phi: list[Tensor], alpha: float) -> None:
    """Eager, keeps the guard (phi untouched unless theta is finite), drops the logged distance: 6x."""
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(theta)).sum())):
        _foreach_pair(theta, phi, alpha)


# ====================================================================================== sync: contenders


def _own_slow(ps: ParamSet, op: Callable[[list[Tensor], list[Tensor], float], None], params: bool = False) -> Contender:
    slow = [t.clone() for t in ps.theta]
    fast = ps.params if params else ps.theta
    return Contender(torch.no_grad()(lambda: op(fast, slow, ALPHA)), lambda: slow)


def _c_ours(ps: ParamSet, module: nn.Module | None = None, measure_distance: bool = False) -> Contender:
    """The default: guard + lerp + copy on the flat buffers, no distance measurement. ``module``:
    attach to that private copy of ``ps.module`` instead of a fresh deepcopy."""
    la = ours(ps.module if module is None else module, measure_distance, own_copy=module is None)
    return Contender(lambda: la.sync(0), _ours_held(la))


def _c_ours_measured(ps: ParamSet, module: nn.Module | None = None) -> Contender:
    """A sync whose distance a logger row records (the callback asks for it on those syncs only)."""
    return _c_ours(ps, module, measure_distance=True)


def _c_guard(ps: ParamSet) -> Contender:
    """Our guard alone, as a sync runs it first: one sum over theta in its dtype, one host read (1x)."""
    return Contender(lambda: math.isfinite(ps.flat.sum().item()))


def _c_blocked_update(ps: ParamSet) -> Contender:
    """Our sync's update alone (no guard, no pointer check) on flat buffers: ``ours`` = guard + this."""
    phi = ps.flat.clone()
    return Contender(torch.no_grad()(lambda: _blocked_lerp_copy(ps.flat, phi, ALPHA)), lambda: [phi])


def _c_timm(ps: ParamSet) -> Contender:
    timm = TimmLookahead(_sgd(ps.params), ALPHA)
    return Contender(timm.sync_lookahead, lambda: [s["slow_buffer"] for s in timm.state.values()])


def _c_pytorch_optimizer(ps: ParamSet) -> Contender:
    import pytorch_optimizer

    po = pytorch_optimizer.Lookahead(_sgd(ps.params), k=K, alpha=ALPHA)
    return Contender(lambda: [po.update(g) for g in po.param_groups], lambda: [s["slow_params"] for s in po.state.values()])


def _c_torch_optimizer(ps: ParamSet) -> Contender:
    import torch_optimizer

    to = torch_optimizer.Lookahead(_sgd(ps.params), k=K, alpha=ALPHA)
    return Contender(lambda: [to._update(g) for g in to.param_groups], lambda: [s["slow_param"] for s in to.state.values()])


def _c_copy(ps: ParamSet) -> Contender:
    n, like = ps.flat.numel(), {"device": ps.flat.device, "dtype": ps.flat.dtype}
    src, dst = torch.randn(n, **like), torch.empty(n, **like)
    return Contender(lambda: dst.copy_(src))


SYNC_CONTENDERS: dict[str, Callable[[ParamSet], Contender]] = {
    "copy": _c_copy,  # one copy_ of the parameter bytes: the bound is twice this
    "ours": _c_ours,
    "ours_measured": _c_ours_measured,
    "guard": _c_guard,
    "blocked_update": _c_blocked_update,
    "foreach_lerp_copy": lambda ps: _own_slow(ps, _foreach_pair),
    "foreach_guarded": lambda ps: _own_slow(ps, _foreach_guarded),
    "paper_loop": lambda ps: _own_slow(ps, _paper_sync, params=True),
    "timm": _c_timm,
    "pytorch_optimizer": _c_pytorch_optimizer,
    "torch_optimizer": _c_torch_optimizer,
}


def compiled_contenders(ps: ParamSet, compiled: Compiled, with_list: bool) -> dict[str, Contender]:
    """The torch.compile'd sync variants that compile on this machine (failures land in ``compiled.errors``)."""
    flat_phi, flat_phi2 = ps.flat.clone(), ps.flat.clone()
    out = {
        "compiled_flat_4x": Contender(lambda: compiled.flat_lerp_copy(ps.flat, flat_phi, ALPHA), lambda: [flat_phi]),
        "compiled_flat_guarded": Contender(CompiledGuardedSync(compiled, ps.flat, flat_phi2, ALPHA), lambda: [flat_phi2]),
    }
    if with_list:
        theta, slow = ps.theta, [t.clone() for t in ps.theta]
        out["compiled_list_4x"] = Contender(lambda: compiled.list_lerp_copy(theta, slow, ALPHA), lambda: slow)
    with torch.no_grad():
        return {n: c for n, c in out.items() if compiled.probe(f"{n}/{len(ps.theta)}", c.fn)}


# traffic per sync in parameter bytes (reads + writes, not counting write-allocate)
TRAFFIC = {
    "copy": 2, "ours": 5, "ours_measured": 5, "guard": 1, "blocked_update": 4,
    "foreach_lerp_copy": 5, "foreach_guarded": 6, "compiled_flat_4x": 4, "compiled_flat_guarded": 6,
    "compiled_list_4x": 4, "paper_loop": 10, "timm": 8, "pytorch_optimizer": 5, "torch_optimizer": 7,
}  # fmt: skip
PEERS = ("paper_loop", "timm", "pytorch_optimizer", "torch_optimizer")
PARTS = ("ours_measured", "guard", "blocked_update")  # ours with the distance, and ours in two parts
FUSED = (
    "foreach_lerp_copy", "foreach_guarded", "compiled_flat_4x", "compiled_flat_guarded",
    "compiled_list_4x",
)  # fmt: skip

# ====================================================================================== eval swap: contenders


def _s_ours(ps: ParamSet, module: nn.Module | None = None) -> Contender:
    """Round trip of the eval swap: re-points every parameter at the slow buffer's views and back."""
    la = ours(ps.module if module is None else module, own_copy=module is None)

    def round_trip() -> None:
        la.use_slow()
        la.use_fast()

    return Contender(round_trip, _ours_held(la))


def _s_weight_averaging(ps: ParamSet) -> Contender:
    """Lightning's WeightAveraging swaps its AveragedModel in for evaluation with ``_swap_models``."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import AveragedModel

    wa = WeightAveraging(use_buffers=False)
    wa._average_model = AveragedModel(ps.module, use_buffers=False)

    def round_trip() -> None:
        wa._swap_models(ps.module)  # type: ignore[arg-type]
        wa._swap_models(ps.module)  # type: ignore[arg-type]

    return Contender(round_trip, lambda: list(wa._average_model.module.parameters()))


def _s_pytorch_optimizer(ps: ParamSet) -> Contender:
    import pytorch_optimizer

    po = pytorch_optimizer.Lookahead(_sgd(ps.params), k=K, alpha=ALPHA)

    def round_trip() -> None:
        po.backup_and_load_cache()
        po.clear_and_load_backup()

    return Contender(round_trip, lambda: [s["slow_params"] for s in po.state.values()])


SWAP_CONTENDERS: dict[str, Callable[[ParamSet], Contender]] = {
    "swap_ours": _s_ours,
    "swap_weight_averaging": _s_weight_averaging,
    "swap_pytorch_optimizer": _s_pytorch_optimizer,
}
