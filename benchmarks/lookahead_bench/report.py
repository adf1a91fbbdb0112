"""Writing the results: the machine description, ``results*.json`` and ``RESULTS*.md`` (tables,
goal verdicts, the GPU section from ``results_cuda*.json`` when a CUDA run left one)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ROOT
from .contenders import FUSED, PEERS, SWAP_CONTENDERS, TRAFFIC

# ====================================================================================== machine and files


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


def save_results(res: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(res, indent=1) + "\n")


def load_results(path: Path) -> dict[str, Any] | None:
    """The results saved at ``path``, or None when there are none."""
    return json.loads(path.read_text()) if path.exists() else None


# ====================================================================================== formatting


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


# ====================================================================================== grid tables (CPU and GPU)


def _fused(grid: list[dict[str, Any]]) -> list[str]:
    """The fused alternatives measured in this grid (the compiled ones may be absent)."""
    return [n for n in FUSED if any(n in r["ratio_to_bound"] for r in grid)]


def _traffic_line(fused: list[str]) -> str:
    return ", ".join(f"{n} {TRAFFIC[n]}x" for n in ("ours", *fused, *PEERS))


def _bound_table(grid: list[dict[str, Any]], fused: list[str]) -> str:
    rows = []
    for r in grid:
        rb = r["ratio_to_bound"]
        rows.append(
            [f"{r['params']:.0e}", str(r["tensors"]), f"{r['copy_GBps']:.1f}",
             f"{2e3 * r['time_s']['copy']['median']:.3f}", f"{1e3 * r['time_s']['ours']['median']:.3f}"]
            + [_fmt(rb[n]) if n in rb else "n/a" for n in ("ours", *fused)]
        )  # fmt: skip
    return _table(["params", "tensors", "copy GB/s", "bound ms", "ours ms", "ours", *fused], rows)


def _bound_goal(grid: list[dict[str, Any]]) -> str:
    big = [r for r in grid if r["params"] >= 1e7]
    return (
        f"Goal <= 1.3x bound, at >= 1e7 parameters (where the bound, not per-op cost, is what is measured):"
        f" `ours` (default, logs the distance) {_count_ok(big, 'ratio_to_bound', 'ours', lambda v: v <= 1.3)};"
        f" `ours_lean` (`log_stats=False`) {_count_ok(big, 'ratio_to_bound', 'ours_lean', lambda v: v <= 1.3)}."
        " Over all sizes: `ours` "
        f"{_count_ok(grid, 'ratio_to_bound', 'ours', lambda v: v <= 1.3)},"
        f" `ours_lean` {_count_ok(grid, 'ratio_to_bound', 'ours_lean', lambda v: v <= 1.3)}."
    )


def _peer_tables(grid: list[dict[str, Any]], fused: list[str]) -> list[str]:
    """Peers over ``ours`` (with the fused alternatives), then peers over ``ours_lean``, then the goal lines."""
    rows3 = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e3 * r['time_s']['ours']['median']:.3f}"]
        + [_fmt(r["time_over_ours"][n]) for n in PEERS]
        + [_fmt(r["time_over_ours"][n]) if n in r["time_over_ours"] else "n/a" for n in fused]
        for r in grid
    ]
    out = [_table(["params", "tensors", "ours ms", *PEERS, *fused], rows3), ""]
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
    return out


def _swap_table(grid: list[dict[str, Any]]) -> str:
    swaps = [n for n in SWAP_CONTENDERS if n != "swap_ours"]
    rows4 = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e6 * r['time_s']['swap_ours']['median']:.1f}",
         _fmt(r["swap_over_copy"]["swap_ours"], spec=".2g")]
        + [f"{_fmt(r['swap_over_ours'][n], digits=1)} / {_fmt(r['swap_over_copy'][n], digits=1)}" for n in swaps]
        for r in grid
    ]  # fmt: skip
    return _table(["params", "tensors", "ours µs", "ours / copy", *(f"{n[5:]}: / ours, / copy" for n in swaps)], rows4)


# ====================================================================================== RESULTS.md


def write_report(res: dict[str, Any], md_path: Path, png_path: Path, cuda: dict[str, Any] | None = None) -> None:
    """RESULTS.md from the CPU results ``res``; section 5 from the CUDA results ``cuda`` if given."""
    m, out = res["machine"], []
    gpu = f"{cuda['machine']['gpu']} (section 5, a separate `--device cuda` run)" if cuda else m["gpu"]
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
        f"GPU: {gpu}.",
        "",
        "All contenders of a table were timed in the same process, interleaved round-robin with a rotating order;"
        " cells are `median [q1, q3]` over rounds, and every ratio is taken per round (paired) before the"
        " median. Raw medians, quartiles and min/max are in `results.json`.",
        "",
    ]
    out += _training_section(res)
    out += _bound_section(res)
    out += _peer_section(res["sync_grid"], md_path, png_path)
    out += _swap_memory_section(res)
    out += ["## 5. GPU", ""] + (_gpu_section(cuda) if cuda else [f"GPU: {m['gpu']}.", ""])
    out += ["## Suggestion for the core", ""]
    out += _recommendation(res["sync_grid"])
    md_path.write_text("\n".join(out) + "\n")


def _training_section(res: dict[str, Any]) -> list[str]:
    out = ["## 1. Training overhead (Lightning fit, SGD momentum, batch 40)", ""]
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
    return out


def _bound_section(res: dict[str, Any]) -> list[str]:
    grid = res["sync_grid"]
    fused = _fused(grid)
    out = [
        "## 2. One sync vs the physical bound",
        "",
        "bound = 2 x t(`dst.copy_(src)` over the parameter bytes), timed on a flat tensor of the same size in the"
        " same rounds. Cells: time / bound. Traffic model in parameter bytes: "
        + _traffic_line(fused)
        + ". `ours_flat_eager` is the package's own sync on one flat tensor (isolates the per-tensor cost).",
        "",
    ]
    out += [_bound_table(grid, fused), ""]
    out += [
        _bound_goal(grid),
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
    return out


def _peer_section(grid: list[dict[str, Any]], md_path: Path, png_path: Path) -> list[str]:
    out = [
        "## 3. Against the peers (same tensors, same rounds)",
        "",
        "Cells: peer time / ours time (> 1: ours is faster). `timm` is a faithful re-implementation of"
        " `timm.optim.lookahead.Lookahead.update_slow` (timm is not installed: it pins another torch);"
        " `paper_loop` is the paper's per-parameter `.data` loop; `pytorch_optimizer` / `torch_optimizer` call the"
        " installed wrappers' own update (`update(group)` / `_update(group)`).",
        "",
    ]
    out += _peer_tables(grid, _fused(grid))
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
    return out


def _swap_memory_section(res: dict[str, Any]) -> list[str]:
    out = [
        "## 4. Evaluation swap and peak extra memory",
        "",
        "Swap round trip (slow weights in, fast weights back). Cells: time / ours, and time / one `copy_` of the"
        " parameters. WeightAveraging = `WeightAveraging._swap_models` (per parameter: clone + 2 copies);"
        " pytorch_optimizer = `backup_and_load_cache` + `clear_and_load_backup`.",
        "",
    ]
    out += [_swap_table(res["sync_grid"]), ""]
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
    return out


def _gpu_section(cuda: dict[str, Any]) -> list[str]:
    """Section 5 from a ``--device cuda`` run: per dtype, the bound, peer and swap tables of sections 2-4."""
    g = cuda["machine"]
    out = [
        f"Command: `{cuda['command']}` ({cuda['date']}, {cuda['wall_s']:.0f} s wall), results in"
        f" `{cuda['results_file']}`.  ",
        f"Device: {g['gpu']}, CUDA {g['cuda']}, torch {g['torch']}, package commit {g['package_commit']}"
        f"{' with uncommitted changes' if g['package_dirty'] else ''}.",
        "",
        "Same grid, contenders, interleaving and paired ratios as sections 2-4, on the device; each sample is the"
        " time between two CUDA events around its loop of calls (device synchronized before the first and at the"
        " last), so host waits inside a call (the guard's one `bool()`) count. The bound is 2 x t(`copy_`) in"
        " the same dtype; the traffic model is in parameter bytes of that dtype.",
        "",
    ]
    for dtype, part in cuda["dtypes"].items():
        grid = part["sync_grid"]
        if not grid:
            out += [f"### {dtype}", "", f"Not measured: {part.get('error', 'no rows')}", ""]
            continue
        fused = _fused(grid)
        out += [f"### {dtype}: one sync vs the bound", "", _bound_table(grid, fused), "", _bound_goal(grid), ""]
        if part.get("compile_info", {}).get("compile_errors"):
            out += [f"torch.compile failures: `{part['compile_info']['compile_errors']}`", ""]
        out += [f"### {dtype}: against the peers (peer time / ours time)", ""] + _peer_tables(grid, fused) + [""]
        out += [f"### {dtype}: evaluation swap round trip", "", _swap_table(grid), ""]
    return out


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
