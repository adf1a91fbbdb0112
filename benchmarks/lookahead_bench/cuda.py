"""The CUDA suite: the sync-and-swap grid of ``sync.py`` on a CUDA device, in float32 and
bfloat16, same contenders and peers, each sample timed between CUDA events (``harness.cuda_loop_timer``).
Results go to ``results_cuda*.json``; ``report.py`` renders them as section 5 of ``RESULTS*.md``."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from .config import CUDA_DTYPES, Config
from .harness import cuda_loop_timer, log
from .report import machine
from .sync import bench_sync_grid


def cuda_unavailable() -> str | None:
    """Why ``--device cuda`` cannot run here, or None when it can."""
    if torch.cuda.is_available():
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"--device cuda: CUDA is not available here (torch {torch.__version__}, {build},"
        f" {torch.cuda.device_count()} CUDA device(s) visible). Run it on a machine with an NVIDIA GPU and a CUDA"
        " build of torch (benchmarks/gpu_check.sh); the CPU benchmark is `python benchmarks/bench_lookahead.py`."
    )


def cuda_machine() -> dict[str, Any]:
    """The host description of ``report.machine`` plus the device's."""
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        **machine(),
        "gpu": f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor})",
        "cuda": torch.version.cuda,
        "device_count": torch.cuda.device_count(),
    }


def bench_cuda(cfg: Config, res: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> None:
    """The grid on ``cuda`` for each of :data:`CUDA_DTYPES`, into ``res['dtypes']``; ``save(res)``
    after each dtype, so a run cut short by a time limit keeps what it finished."""
    res.setdefault("dtypes", {})
    for name in CUDA_DTYPES:
        t0 = time.perf_counter()
        try:
            grid, info = bench_sync_grid(
                cfg.sizes, cfg.counts, cfg.sync_repeats, cfg.min_sample_s, cfg.compile, cfg.list_compile_max_tensors,
                device="cuda", dtype=getattr(torch, name), timer=cuda_loop_timer,
            )  # fmt: skip
            res["dtypes"][name] = {"sync_grid": grid, "compile_info": info, "wall_s": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - keep the other dtype's results (an OOM, a missing kernel)
            traceback.print_exc()
            res["dtypes"][name] = {"sync_grid": [], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        res["peak_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        save(res)
        error = res["dtypes"][name].get("error")
        log(f"cuda {name}: {f'FAILED, {error}' if error else 'done'} ({time.perf_counter() - t0:.0f}s)")
        torch.cuda.empty_cache()


def cuda_config(cfg: Config) -> dict[str, Any]:
    """The settings a CUDA run uses (the grid's; the training and memory settings do not apply)."""
    keep = ("sizes", "counts", "sync_repeats", "min_sample_s", "compile", "list_compile_max_tensors")
    return {**{k: v for k, v in asdict(cfg).items() if k in keep}, "dtypes": list(CUDA_DTYPES)}
