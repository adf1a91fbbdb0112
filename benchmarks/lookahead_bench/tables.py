"""The sync-and-swap grid as Markdown: cell formatting, the bound / peer / swap tables and their
goal lines, shared by the CPU sections of ``RESULTS.md`` and the GPU section (``report.py``).
Every number printed here is read from the results; the prose only says how to read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .contenders import FUSED, PARTS, PEERS, SWAP_CONTENDERS, TRAFFIC

Row = dict[str, Any]

# ====================================================================================== formatting


def fmt(s: dict[str, float], digits: int = 2, pct: bool = False, spec: str = "") -> str:
    """``median [q1, q3]`` of a Summary dict (fixed-point ``digits``, a percentage, or a format ``spec``)."""
    f = (lambda v: f"{100 * v:+.{digits}f}%") if pct else (lambda v: format(v, spec or f".{digits}f"))
    return f"{f(s['median'])} [{f(s['q1'])}, {f(s['q3'])}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def count_ok(rows: list[Row], key: str, names: str | tuple[str, ...], ok: Callable[[float], bool]) -> str:
    """'**met** (n/n cells)' when ``ok`` holds for the median of every row (the worst of ``names``)."""
    if not rows:
        return "not measured (no such cells in this grid)"
    names = (names,) if isinstance(names, str) else names
    hits = [ok(min(r[key][n]["median"] for n in names)) for r in rows]
    return f"{verdict(all(hits))} ({sum(hits)}/{len(hits)} cells)"


def cell(r: Row) -> str:
    return f"{r['params']:.0e} x {r['tensors']}"


def _alternatives(grid: list[Row]) -> list[str]:
    """The parts of ours and the fused alternatives measured in this grid (the compiled ones may be absent)."""
    return [n for n in (*PARTS, *FUSED) if any(n in r["ratio_to_bound"] for r in grid)]


# ====================================================================================== one sync vs the bound


def bound_table(grid: list[Row]) -> str:
    alts = _alternatives(grid)
    rows = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{r['copy_GBps']:.1f}", f"{2e3 * r['time_s']['copy']['median']:.3f}",
         f"{1e3 * r['time_s']['ours']['median']:.3f}"]
        + [fmt(r["ratio_to_bound"][n]) if n in r["ratio_to_bound"] else "n/a" for n in ("ours", *alts)]
        for r in grid
    ]  # fmt: skip
    return table(["params", "tensors", "copy GB/s", "bound ms", "ours ms", "ours", *alts], rows)


def traffic_line(grid: list[Row]) -> str:
    return ", ".join(f"{n} {TRAFFIC[n]}x" for n in ("ours", *_alternatives(grid), *PEERS))


def bound_goal(grid: list[Row]) -> str:
    big = [r for r in grid if r["params"] >= 1e7]
    return (
        "Goal `ours` (the default guarded sync) <= 1.3x the bound at >= 1e7 parameters:"
        f" {count_ok(big, 'ratio_to_bound', 'ours', lambda v: v <= 1.3)}."
    )


def _x(r: Row, n: str) -> float:
    return r["ratio_to_bound"][n]["median"]


def _rest_us(r: Row) -> float:
    """Median time of ours beyond its two parts timed alone (guard, update), in µs: the per-sync work
    that is not bytes (Python, the pointer check, op dispatch), plus noise."""
    t = {n: r["time_s"][n]["median"] for n in ("ours", "guard", "blocked_update")}
    return 1e6 * (t["ours"] - t["guard"] - t["blocked_update"])


def bound_breakdown(grid: list[Row]) -> str:
    """Per cell at >= 1e7 parameters: ours, its two parts timed alone and the rest, as multiples of the bound."""
    return "; ".join(
        f"{cell(r)}: ours {_x(r, 'ours'):.2f} = guard {_x(r, 'guard'):.2f} + update {_x(r, 'blocked_update'):.2f}"
        f" + rest {_x(r, 'ours') - _x(r, 'guard') - _x(r, 'blocked_update'):.2f}"
        for r in grid
        if r["params"] >= 1e7 and "guard" in r["ratio_to_bound"]
    )


def fixed_cost(grid: list[Row]) -> str:
    """At the smallest size (bytes negligible): ours beyond guard + update per tensor count, and the
    slope per tensor between the fewest and the most tensors."""
    if not grid or "guard" not in grid[0]["time_s"]:
        return "not measured"
    small = sorted((r for r in grid if r["params"] == min(q["params"] for q in grid)), key=lambda r: r["tensors"])
    per = ", ".join(f"{r['tensors']} tensors {_rest_us(r):.0f} µs" for r in small)
    if len(small) < 2:
        return per
    lo, hi = small[0], small[-1]
    slope = (_rest_us(hi) - _rest_us(lo)) / (hi["tensors"] - lo["tensors"])
    return f"at {lo['params']:.0e} parameters: {per}, i.e. ~{slope:.2f} µs per tensor per sync"


# ====================================================================================== against the peers


def peer_table(grid: list[Row]) -> str:
    alts = _alternatives(grid)
    rows = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e3 * r['time_s']['ours']['median']:.3f}"]
        + [fmt(r["time_over_ours"][n]) if n in r["time_over_ours"] else "n/a" for n in (*PEERS, *alts)]
        for r in grid
    ]
    return table(["params", "tensors", "ours ms", *PEERS, *alts], rows)


def peer_goals(grid: list[Row]) -> list[str]:
    """The goal lines of the peer comparison, each with its count of cells."""
    many = [r for r in grid if r["tensors"] >= 100]
    speed = "time_over_ours"
    return [
        f"- Goal `ours` >= 1.0x pytorch_optimizer's update speed in every cell:"
        f" {count_ok(grid, speed, 'pytorch_optimizer', lambda v: v >= 1.0)}.",
        f"- Goal `ours` >= 2x pytorch_optimizer's update speed at >= 100 tensors:"
        f" {count_ok(many, speed, 'pytorch_optimizer', lambda v: v >= 2.0)}.",
        f"- Goal `ours` >= 2x the per-parameter loops (paper, timm) at >= 100 tensors:"
        f" {count_ok(many, speed, ('paper_loop', 'timm'), lambda v: v >= 2.0)}.",
    ]


def measured_line(grid: list[Row]) -> str:
    """Not a goal: how often a sync that also measures the distance still beats pytorch_optimizer."""
    hits = [r["time_over_measured"]["pytorch_optimizer"]["median"] >= 1.0 for r in grid]
    cost = [r["time_over_ours"]["ours_measured"]["median"] for r in grid]
    return (
        f"`ours_measured` (the distance measured too, as on the syncs a logger row records) is at least as fast as"
        f" pytorch_optimizer in {sum(hits)}/{len(hits)} cells; it takes {min(cost):.2f}x to {max(cost):.2f}x the"
        " time of `ours` (medians of the paired ratios)."
    )


def slower_cells(grid: list[Row]) -> list[Row]:
    """The cells where pytorch_optimizer's update is faster than ours (median of the paired ratios)."""
    return [r for r in grid if r["time_over_ours"]["pytorch_optimizer"]["median"] < 1.0]


def slower_breakdown(cells: list[Row]) -> str:
    """Per cell where pytorch_optimizer wins: it, ours and ours' parts as multiples of the bound (medians)."""
    return "; ".join(
        f"{cell(r)} ({r['params'] // r['tensors']:,} elements a tensor): pytorch_optimizer"
        f" {_x(r, 'pytorch_optimizer'):.2f}, ours {_x(r, 'ours'):.2f} = guard {_x(r, 'guard'):.2f} + update"
        f" {_x(r, 'blocked_update'):.2f} + rest {_x(r, 'ours') - _x(r, 'guard') - _x(r, 'blocked_update'):.2f}"
        for r in cells
        if "guard" in r["ratio_to_bound"]
    )


def update_vs_peer(cells: list[Row]) -> str:
    """In how many of ``cells`` ours' update alone (no guard) is no slower than pytorch_optimizer's."""
    hits = [_x(r, "blocked_update") <= _x(r, "pytorch_optimizer") for r in cells if "guard" in r["ratio_to_bound"]]
    return f"{sum(hits)}/{len(hits)}"


# ====================================================================================== eval swap


def swap_table(grid: list[Row]) -> str:
    swaps = [n for n in SWAP_CONTENDERS if n != "swap_ours"]
    rows = [
        [f"{r['params']:.0e}", str(r["tensors"]), f"{1e6 * r['time_s']['swap_ours']['median']:.1f}",
         fmt(r["swap_over_copy"]["swap_ours"], spec=".2g")]
        + [f"{fmt(r['swap_over_ours'][n], digits=1)} / {fmt(r['swap_over_copy'][n], digits=1)}" for n in swaps]
        for r in grid
    ]  # fmt: skip
    return table(["params", "tensors", "ours µs", "ours / copy", *(f"{n[5:]}: / ours, / copy" for n in swaps)], rows)


def short_of_two(grid: list[Row]) -> list[Row]:
    """The cells at >= 100 tensors where ours is less than 2x as fast as pytorch_optimizer."""
    return [r for r in grid if r["tensors"] >= 100 and r["time_over_ours"]["pytorch_optimizer"]["median"] < 2.0]


def two_x_breakdown(cells: list[Row]) -> str:
    """Per such cell: the speed ratio, then ours, pytorch_optimizer and the fused one-pass kernel x bound."""

    def fused(r: Row) -> str:
        has = "compiled_flat_4x" in r["ratio_to_bound"]
        return f", compiled_flat_4x {_x(r, 'compiled_flat_4x'):.2f}" if has else ""

    return "; ".join(
        f"{cell(r)}: {r['time_over_ours']['pytorch_optimizer']['median']:.2f}x (ours {_x(r, 'ours'):.2f},"
        f" pytorch_optimizer {_x(r, 'pytorch_optimizer'):.2f}{fused(r)})"
        for r in cells
    )


def loops_short_of_two(grid: list[Row]) -> str:
    """The cells at >= 100 tensors where ours is less than 2x as fast as a per-parameter loop."""

    def r2(r: Row, n: str) -> float:
        return r["time_over_ours"][n]["median"]

    return "; ".join(
        f"{cell(r)}: paper_loop {r2(r, 'paper_loop'):.2f}x, timm {r2(r, 'timm'):.2f}x"
        for r in grid
        if r["tensors"] >= 100 and min(r2(r, "paper_loop"), r2(r, "timm")) < 2.0
    )
