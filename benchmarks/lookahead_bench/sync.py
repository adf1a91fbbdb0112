"""The sync-and-swap grid suite: every sync and eval-swap contender on the same parameters, per
(parameter count, tensor count) cell, interleaved in the same rounds, as times and paired ratios
(to the bound ``2 x copy_``, to ``ours``, to ``ours_measured``)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch

from .contenders import SWAP_CONTENDERS, SYNC_CONTENDERS, TRAFFIC, Compiled, ParamSet, compiled_contenders
from .harness import Summary, Timer, log, loop_timer, paired_ratios, timeit_interleaved


def bench_sync_grid(
    sizes: list[int],
    counts: list[int],
    repeats: int,
    min_sample_s: float,
    use_compile: bool,
    list_max: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    timer: Timer = loop_timer,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every sync and swap contender on the same parameters, per (size, tensor count), interleaved.
    ``device`` / ``dtype`` / ``timer`` default to the CPU run (float32, host clock)."""
    compiled = Compiled() if use_compile else None
    tag = "" if device == "cpu" else f" [{device} {str(dtype).removeprefix('torch.')}]"
    rows = []
    for n_params in sizes:
        for n_tensors in counts:
            t0 = time.perf_counter()
            ps = ParamSet(n_params, n_tensors, device=device, dtype=dtype)
            contenders = {n: make(ps) for n, make in {**SYNC_CONTENDERS, **SWAP_CONTENDERS}.items()}
            if compiled is not None:
                contenders.update(compiled_contenders(ps, compiled, with_list=n_tensors <= list_max))
            samples = timeit_interleaved({n: c.fn for n, c in contenders.items()}, repeats, min_sample_s, timer)
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
                "time_over_measured": {n: asdict(paired_ratios(samples, n, "ours_measured")) for n in syncs},
                "swap_over_ours": {n: asdict(paired_ratios(samples, n, "swap_ours")) for n in swaps},
                "swap_over_copy": {n: asdict(paired_ratios(samples, n, "copy")) for n in swaps},
            }
            rows.append(row)
            log(
                f"sync{tag} {n_params:.0e} params x {n_tensors} tensors: ours/bound "
                f"{row['ratio_to_bound']['ours']['median']:.2f}, pytorch_optimizer/ours "
                f"{row['time_over_ours']['pytorch_optimizer']['median']:.2f} ({time.perf_counter() - t0:.0f}s)"
            )
            del ps, contenders, samples
            gc.collect()
    info = {"compile_errors": compiled.errors, "compile_first_call_s": compiled.first_call_s} if compiled else {}
    return rows, info
