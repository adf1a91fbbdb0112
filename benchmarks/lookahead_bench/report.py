"""Writing the results: the machine description, ``results*.json`` and ``RESULTS*.md`` (the
sections, their goal verdicts and the prose on how to read them; the grid tables come from
``tables.py``; the GPU section from ``results_cuda*.json`` when a CUDA run left one)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from .config import ROOT
from .contenders import TRAFFIC
from .tables import (
    bound_breakdown,
    bound_goal,
    bound_table,
    fixed_cost,
    fmt,
    loops_short_of_two,
    measured_line,
    peer_goals,
    peer_table,
    short_of_two,
    slower_breakdown,
    slower_cells,
    swap_table,
    table,
    traffic_line,
    two_x_breakdown,
    update_vs_peer,
    verdict,
)

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
        "load_average": list(os.getloadavg()),  # 1, 5, 15 min, at the start: other work on the machine
        "gpu": "not measured (no device lent)",
        "package_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip(),
        "package_dirty": bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "lightning_lookahead"]).strip()),
    }


def save_results(res: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(res, indent=1) + "\n")


def load_results(path: Path) -> dict[str, Any] | None:
    """The results saved at ``path``, or None when there are none."""
    return json.loads(path.read_text()) if path.exists() else None


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
        _load_line(res),
        f"Software: Python {m['python']}, torch {m['torch']} (CPU, {m['torch_threads']} thread(s)), lightning"
        f" {m['lightning']}, pytorch_optimizer {m['pytorch_optimizer']}, torch_optimizer {m['torch_optimizer']}.  ",
        f"Package: lightning_lookahead at commit {m['package_commit']}"
        f"{' with uncommitted changes' if m['package_dirty'] else ''}.  ",
        f"GPU: {gpu}.",
        "",
        "All contenders of a table were timed in the same process, interleaved round-robin with a rotating order;"
        " cells are `median [q1, q3]` over rounds, and every ratio is taken per round (paired) before the"
        " median. On a loaded machine the absolute times wander; the paired ratios are the comparison to read."
        " Raw medians, quartiles and min/max are in `results.json`.",
        "",
        "What is measured (the core since the flat-storage sync): at attach the trained parameters of each"
        " (device, dtype) move into one flat buffer (each `p.data` becomes a view of it; the Parameter objects,"
        " the optimizer and DDP's reducer stay the same) and the slow weights phi are one flat tensor with the"
        " same layout. A sync checks that every parameter still points where it was put (one pointer comparison"
        " per parameter), then guards: `theta.sum()` in theta's dtype is finite only if every element is (a"
        " non-finite sum falls back to an exact min/max check), one host read, before anything is written. Then,"
        " per ~128K-element cache block on CPU, `phi.lerp_(theta, alpha); theta.copy_(phi)`. The distance"
        " ||theta - phi|| / ||phi|| is measured only when asked (`measure_distance`; the callback asks on the"
        " syncs whose value reaches a logger row), per block while it is in cache. The eval swap re-points each"
        " parameter at its view of the other buffer.",
        "",
    ]
    out += _training_section(res)
    out += _bound_section(res)
    out += _peer_section(res["sync_grid"], md_path, png_path)
    out += _swap_memory_section(res)
    out += ["## 5. GPU", ""] + (_gpu_section(cuda) if cuda else [f"GPU: {m['gpu']}.", ""])
    md_path.write_text("\n".join(out) + "\n")


def _load_line(res: dict[str, Any]) -> str:
    """The load average at the start and the end of the run (other work sharing the cores)."""
    start, end = res["machine"].get("load_average"), res.get("load_average_end")
    if start is None:
        return "Load average: not recorded.  "
    parts = [f"{when} {', '.join(f'{v:.2f}' for v in avg)}" for when, avg in (("start", start), ("end", end)) if avg]
    return f"Load average (1, 5, 15 min): {'; '.join(parts)}, on {res['machine']['nproc']} cores.  "


def _training_goals(t: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(non-sync overhead <= 1%, total k=5 <= 1% + in-situ sync/k, in-situ sync <= 1.5x its in-situ bound)."""
    predicted = t["predicted_in_situ_sync_over_k"]["median"]
    return (
        t["overhead_nonsync"]["median"] <= 0.01,
        t["overhead_total_k5"]["median"] <= 0.01 + predicted,
        t["sync_over_bound_in_situ"]["median"] <= 1.5,
    )


def _training_section(res: dict[str, Any]) -> list[str]:
    out = ["## 1. Training overhead (Lightning fit, SGD momentum, batch 40)", ""]
    trows, goals = [], []
    for t in res["training"]:
        goals.append((t, *_training_goals(t)))
        sps = t["steps_per_s_median"]
        trows.append([
            f"{t['task']} ({t['tensors']} tensors, {t['params']:,} params)",
            f"{sps['plain']:.1f} / {sps['lookahead_k5']:.1f} / {sps['lookahead_nosync']:.1f}",
            fmt(t["overhead_nonsync"], pct=True),
            fmt(t["overhead_total_k5"], pct=True),
            fmt(t["control_half_lr_vs_plain"], pct=True),
            f"{fmt(t['predicted_in_situ_sync_over_k'], pct=True)} ({fmt(t['predicted_sync_over_k'], pct=True)})",
            f"{1e6 * t['sync_in_situ_s']['median']:.0f} ({1e6 * t['sync_s']['median']:.0f})",
            fmt(t["sync_over_bound_in_situ"]),
        ])  # fmt: skip
    out += [
        table(
            ["task", "steps/s plain / k=5 / k=1e9", "non-sync overhead (k=1e9 vs plain)", "total overhead k=5",
             "control: plain at lr/2 vs plain", "sync/k: in situ (hot loop)", "one sync µs: in situ (hot loop)",
             "one sync / bound, in situ"],
            trows,
        ),  # fmt: skip
        "",
        f"Timed window: {res['config']['train_steps']} optimizer steps after {res['config']['train_warmup']} warm-up"
        f" steps, in blocks of 5 steps (each block of the k=5 run holds exactly one sync); a run's step time is its"
        f" median block / 5, and {res['config']['train_repeats']} rounds give the quartiles. `sync/k` ="
        " (one sync) / 5 / (plain step time), with the sync timed in situ (every sync of the k=5 run, with the"
        " caches as training leaves them) and, in parentheses, in a hot loop on the same model in the same rounds."
        " The in-situ bound is 2 x one `copy_` of the parameter bytes, timed right after each sync between two"
        " buffers last touched at the previous sync (that copy is not counted in the k=5 step time). No logger is"
        " attached, so no sync measures the distance. Control: the step time of these CPU models depends on the"
        " weights themselves (a plain run at half the learning rate follows another trajectory and runs at"
        " another speed), and Lookahead changes the trajectory, so part of the total overhead is not the"
        " callback's work at all.",
        "",
    ]
    for t, g_nonsync, g_total, g_bound in goals:
        limit = 0.01 + t["predicted_in_situ_sync_over_k"]["median"]
        total, nonsync = t["overhead_total_k5"], t["overhead_nonsync"]
        out.append(
            f"- {t['task']}: goal total k=5 overhead <= 1% + sync/k ({100 * limit:.2f}%): {verdict(g_total)}"
            f" ({fmt(total, pct=True)}{_unresolved(total, limit)}); goal one sync <= 1.5x its bound in situ:"
            f" {verdict(g_bound)} ({t['sync_over_bound_in_situ']['median']:.2f}x); goal non-sync overhead <= 1%:"
            f" {verdict(g_nonsync)} ({fmt(nonsync, pct=True)}{_unresolved(nonsync, 0.01)})."
        )
    out += [
        "",
        "How to read it: the median of one fit against another moves by several percent on this shared machine"
        " (see the control column: two plain runs differ by as much), so an overhead whose IQR contains its"
        " limit is not resolved here. One sync, in situ / hot loop / in-situ bound (median µs): "
        + "; ".join(
            f"{t['task']} {1e6 * t['sync_in_situ_s']['median']:.0f} / {1e6 * t['sync_s']['median']:.0f} /"
            f" {1e6 * t['bound_in_situ_s']['median']:.0f}"
            for t in res["training"]
        )
        + ". At these model sizes the bound is tens to hundreds of µs, so the sync's per-sync work that is not"
        " bytes (section 2: the rest at the smallest size) weighs as much as its traffic, and in situ that work"
        " runs with the caches (code and data) as the training step left them.",
        "",
    ]
    return out


def _unresolved(s: dict[str, float], limit: float) -> str:
    """A note when the limit lies inside the IQR: the median's side of it is this machine's noise."""
    return "; the limit is inside the IQR" if s["q1"] <= limit <= s["q3"] else ""


def _bound_section(res: dict[str, Any]) -> list[str]:
    grid = res["sync_grid"]
    floor = TRAFFIC["ours"] / (2 * TRAFFIC["copy"])
    out = [
        "## 2. One sync vs the physical bound",
        "",
        "bound = 2 x t(`dst.copy_(src)` over the parameter bytes), timed on a flat tensor of the same size in the"
        " same rounds: a sync must read theta and phi and write both (4x the parameter bytes), twice the traffic"
        " of a copy. Cells: time / bound. Traffic model in parameter bytes: " + traffic_line(grid) + ".",
        "",
        "`ours_measured` is `ours` with the distance measured on every sync; `guard` (the sum over theta and its"
        " host read) and `blocked_update` (the per-block lerp + copy on flat buffers, no guard, no pointer check)"
        " are the two parts of `ours` timed alone, so `ours` ~ guard + update + the pointer check. The compiled"
        " and foreach alternatives are timed on the same tensors for comparison; `compiled_flat_4x` (one fused"
        " kernel, no guard) is the floor.",
        "",
        bound_table(grid),
        "",
        bound_goal(grid),
        "",
        f"How to read it: the guard must read all of theta before anything is written (an inf/nan theta must"
        f" leave phi untouched), so a bandwidth-bound `ours` moves {TRAFFIC['ours']}x the parameter bytes against"
        f" the bound's {2 * TRAFFIC['copy']}x, i.e. {floor:.2f}x the bound by the traffic model, leaving little"
        " room under 1.3x for the rest: the per-sync work that is not bytes (the checks of every parameter's"
        " pointer and sharding, the block loop, the host read). Measured at >= 1e7 parameters (x bound, medians;"
        f" rest = ours - guard - update, noise where negative): {bound_breakdown(grid) or 'no such cells'}."
        " The rest at the smallest size, where the bytes cost next to nothing (median µs):"
        f" {fixed_cost(grid)}; the same per-tensor cost is what the 1000-tensor cells add.",
        "",
    ]
    if res.get("compile_info", {}).get("compile_errors"):
        out += [f"torch.compile failures: `{res['compile_info']['compile_errors']}`", ""]
    return out


def _peer_section(grid: list[dict[str, Any]], md_path: Path, png_path: Path) -> list[str]:
    out = [
        "## 3. Against the peers (same tensors, same rounds)",
        "",
        "Cells: other time / ours time (> 1: ours is faster). `timm` is a faithful re-implementation of"
        " `timm.optim.lookahead.Lookahead.update_slow` (timm is not installed: it pins another torch);"
        " `paper_loop` is the paper's per-parameter `.data` loop; `pytorch_optimizer` / `torch_optimizer` call the"
        " installed wrappers' own update (`update(group)` / `_update(group)`). Every one of them works per tensor;"
        " none guards against inf/nan or measures a distance.",
        "",
        peer_table(grid),
        "",
        *peer_goals(grid),
        "",
        measured_line(grid),
        "",
        *_peer_explanation(grid),
        f"![sync time vs parameter count]({os.path.relpath(png_path, md_path.parent)})",
        "",
    ]
    return out


def _peer_explanation(grid: list[dict[str, Any]]) -> list[str]:
    """Why the peer goals land where they do; the numbers come from the grid."""
    out = [
        "How to read it: `ours` costs a handful of ops on flat tensors plus one pointer comparison per parameter,"
        " whatever the tensor count; every peer issues two to four ops per tensor from Python (pytorch_optimizer:"
        " `lerp_` + `copy_` per parameter, with a state lookup each). With many tensors the peers' per-tensor cost"
        " dominates, with few large tensors both are bound by memory traffic.",
        "",
    ]
    cells = slower_cells(grid)
    if cells:
        out += [
            "Where pytorch_optimizer is faster (few tensors, each large enough that its two ops per tensor cost"
            " little): its update is unguarded, a per-tensor `lerp_` + `copy_` whose `copy_` re-reads phi from"
            " the cache `lerp_` just wrote when the tensor fits in cache, the locality our update gets by cache"
            f" blocking. `ours` first reads all of theta for the guard (nothing may be written before the guard"
            f" has seen every element), {TRAFFIC['ours']}x the bytes in all, plus its per-sync rest. Measured, x"
            f" bound (medians; rest = ours - guard - update): {slower_breakdown(cells)}. Our update alone is no"
            f" slower than pytorch_optimizer's in {update_vs_peer(cells)} of these cells: the guard's read of theta"
            " and the per-sync rest are what loses them.",
            "",
        ]
    short = short_of_two(grid)
    if short:
        out += [
            "Where the 2x margin at >= 100 tensors is missed, pytorch_optimizer's per-tensor cost is too small a"
            " share of its time for one flat layout to halve it: both spend their time in the same eager `lerp_` and"
            " `copy_` kernels, ours reads theta once more for the guard, and ours' rest grows with the tensor count."
            " Ratio pytorch_optimizer / ours, then each x bound (medians): " + two_x_breakdown(short) + ". Only a"
            " fused one-pass kernel (`compiled_flat_4x`, no guard) gets below the eager pair; on this CPU the bound"
            " (two eager `copy_`) is not the floor it is on paper.",
            "",
        ]
    loops = loops_short_of_two(grid)
    if loops:
        out += [
            "The per-parameter loops fall short of 2x where their per-tensor ops are cheap next to the bytes"
            f" (loop time / ours time, medians): {loops}.",
            "",
        ]
    return out


def _swap_memory_section(res: dict[str, Any]) -> list[str]:
    out = [
        "## 4. Evaluation swap and peak extra memory",
        "",
        "Swap round trip (slow weights in, fast weights back). Cells: time / ours, and time / one `copy_` of the"
        " parameters. Ours re-points each parameter at its view of the other flat buffer (no bytes move, so its"
        " time grows with the tensor count, not the parameter bytes); WeightAveraging = `WeightAveraging._swap_models`"
        " (per parameter: clone + 2 copies); pytorch_optimizer = `backup_and_load_cache` + `clear_and_load_backup`.",
        "",
        swap_table(res["sync_grid"]),
        "",
    ]
    mem = [r for r in res["memory"] if "error" not in r]
    if mem:
        mb = mem[0]["param_bytes"]
        out += [
            f"Memory, one fresh process (the rows one after another, each on its own model), model"
            f" {mb / 1e6:.0f} MB float32 in {mem[0]['tensors']} tensors,"
            " resident set (VmRSS; peak = VmHWM after a reset via /proc/self/clear_refs), glibc forced to mmap"
            " blocks >= 64 KiB so freed tensors leave the resident set. In parameter bytes: persistent = kept"
            " between calls; transient = extra peak during one call; counted = bytes of the tensors the method keeps."
            " Ours attaches to a copy of the model made before the baseline is read (attaching moves the parameters"
            " into its flat buffer and frees their old storage), so its rows count what the core adds.",
            "",
            table(
                ["method", "op", "persistent", "transient", "peak extra", "counted"],
                [[r["method"], r["op"], f"{r['persistent_x']:.3f}", f"{r['transient_x']:.3f}",
                  f"{r['peak_extra_x']:.3f}", f"{r['counted_held_x']:.3f}"] for r in mem],
            ),  # fmt: skip
            "",
        ]
        ours = {r["op"]: r for r in mem if r["method"] == "ours"}
        if ours:
            ok = all(r["peak_extra_x"] <= 1.02 and r["transient_x"] <= 0.02 for r in ours.values())
            detail = ", ".join(
                f"{op} {r['peak_extra_x']:.3f}x peak, {r['transient_x']:.3f}x transient" for op, r in ours.items()
            )
            out += [
                f"- Goal peak extra memory = 1.0x parameters (the slow weights), no transient copies in a sync or a"
                f" swap: {verdict(ok)} (ours: {detail}).",
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
        " last). On CUDA the core keeps the skip decision on the device (`torch.where`, no host read), a"
        " different path from the CPU's. The bound is 2 x t(`copy_`) in the same dtype; the traffic model is in"
        " parameter bytes of that dtype.",
        "",
    ]
    for dtype, part in cuda["dtypes"].items():
        grid = part["sync_grid"]
        if not grid:
            out += [f"### {dtype}", "", f"Not measured: {part.get('error', 'no rows')}", ""]
            continue
        out += [f"### {dtype}: one sync vs the bound", "", bound_table(grid), "", bound_goal(grid), ""]
        if part.get("compile_info", {}).get("compile_errors"):
            out += [f"torch.compile failures: `{part['compile_info']['compile_errors']}`", ""]
        out += [f"### {dtype}: against the peers (other time / ours time)", "", peer_table(grid), ""]
        out += [*peer_goals(grid), ""]
        out += [f"### {dtype}: evaluation swap round trip", "", swap_table(grid), ""]
    return out
