"""Shared constants of every suite (alpha, k, learning rate, paths) and the full / quick run settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
BENCH_DIR = ROOT / "benchmarks"
ENTRY = BENCH_DIR / "bench_lookahead.py"  # the one command; the memory suite re-runs it as a child
ALPHA = 0.5
K = 5
LR = 0.01  # SGD(momentum=0.9) learning rate of the training runs
CUDA_DTYPES = ("float32", "bfloat16")  # the dtypes of the CUDA grid (--device cuda)


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
