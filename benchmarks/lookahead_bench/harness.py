"""Timing: self-timing loops (CPU clock or CUDA events), interleaved rounds, paired ratios, quartiles.

Every comparison is one call of :func:`interleaved`: each contender is sampled once per round, with
the order rotated (and alternately reversed) each round, so a noisy shared machine slows all
contenders alike; ratios are taken per round (:func:`paired_ratios`) before the median.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Timer = Callable[[Callable[[], object], int], Callable[[], float]]  # (fn, loops) -> one self-timing sample


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


def minus_one(s: Summary) -> Summary:
    """A ratio's summary as a relative change (1.05 -> +0.05)."""
    return Summary(s.median - 1, s.q1 - 1, s.q3 - 1, s.min - 1, s.max - 1, s.n)


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


def loop_timer(fn: Callable[[], object], loops: int) -> Callable[[], float]:
    """A sample: seconds per call of ``fn`` over ``loops`` calls, host clock (``perf_counter``)."""

    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - t0) / loops

    return measure


def cuda_loop_timer(fn: Callable[[], object], loops: int) -> Callable[[], float]:
    """A sample: seconds per call of ``fn`` over ``loops`` calls, between two CUDA events on the
    current stream. The device is synchronized before the start event (nothing earlier is counted)
    and at the end event (all queued work is counted); host waits inside ``fn`` (a guard's
    ``bool(tensor)``) stall the stream and so count too, as they would in training."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def measure() -> float:
        torch.cuda.synchronize()
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / loops  # elapsed_time is in milliseconds

    return measure


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, min_sample_s: float = 0.02, timer: Timer = loop_timer
) -> dict[str, list[float]]:
    """Seconds per call of every fn: ``repeats`` samples each, interleaved; each sample loops the
    fn enough times to last ``min_sample_s`` (calibrated after one warm-up call). ``timer`` is
    :func:`loop_timer` (CPU) or :func:`cuda_loop_timer`."""
    measures = {}
    for name, fn in fns.items():
        fn()  # warm-up: lazy state, compilation, first-touch page faults
        dt = timer(fn, 1)()
        measures[name] = timer(fn, min(10_000, max(1, math.ceil(min_sample_s / max(dt, 1e-9)))))
    return interleaved(measures, repeats)


def paired_ratios(samples: dict[str, list[float]], num: str, den: str, den_scale: float = 1.0) -> Summary:
    """Per-round ratio ``num / (den_scale * den)``: pairs samples taken back to back."""
    return Summary.of(a / (den_scale * b) for a, b in zip(samples[num], samples[den]))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
