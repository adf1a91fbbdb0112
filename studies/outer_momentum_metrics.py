"""Helpers of the outer-momentum study (studies/outer_momentum_study.py) that need no training:
steps to a target accuracy, per-seed aggregation, best learning rates and Markdown tables.

Kept apart from the runner so the tests can check them on synthetic curves in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

NOT_REACHED = "n.r."


def steps_to_target(steps: Sequence[int], accs: Sequence[float], target: float) -> int | None:
    """First evaluated step whose validation accuracy is >= ``target``; ``None`` if none is.

    ``steps`` must be increasing (the evaluation points of one run). A curve that reaches the
    target and later falls below it still counts from its first crossing (SNOO's compute factor is
    measured the same way, on the first time a quality is reached); the final accuracy is reported
    separately, so a run that does not stay there shows up in that column.
    """
    steps_arr = np.asarray(steps)
    if steps_arr.size and np.any(np.diff(steps_arr) <= 0):
        raise ValueError("`steps` must be strictly increasing")
    for step, acc in zip(steps_arr, accs):
        if math.isfinite(acc) and acc >= target:
            return int(step)
    return None


def target_column(target: float) -> str:
    """Column name of steps-to-``target`` in the per-run CSV, e.g. ``steps_to_95`` for 0.95."""
    return f"steps_to_{round(target * 100):d}"


def steps_summary(values: pd.Series) -> tuple[float, int, int]:
    """(mean over the seeds that reached the target, how many reached, how many seeds); a
    not-reached seed is NaN. The mean is NaN when no seed reached it."""
    reached = values.dropna()
    return (float(reached.mean()) if len(reached) else math.nan, len(reached), len(values))


def fmt_steps(values: pd.Series) -> str:
    """``"420±35"`` when every seed reached the target, ``"610 (2/3)"`` when only some did (mean of
    those), ``"n.r."`` when none did."""
    mean, reached, total = steps_summary(values)
    if reached == 0:
        return NOT_REACHED
    if reached < total:
        return f"{mean:.0f} ({reached}/{total})"
    return f"{mean:.0f}±{values.std(ddof=1):.0f}" if total > 1 else f"{mean:.0f}"


def fmt_mean_std(values: pd.Series, scale: float = 1.0, digits: int = 1) -> str:
    vals = values.astype(float) * scale
    if not np.isfinite(vals).all():
        bad = int((~np.isfinite(vals)).sum())
        finite = vals[np.isfinite(vals)]
        return f"{finite.mean():.{digits}f} ({bad} non-finite)" if len(finite) else "non-finite"
    if len(vals) < 2:
        return f"{vals.mean():.{digits}f}"
    return f"{vals.mean():.{digits}f}±{vals.std(ddof=1):.{digits}f}"


def best_lr_by_steps(results: pd.DataFrame, column: str) -> float | None:
    """The LR with the fewest mean steps to the target among the LRs at which *every* seed reached
    it (ties: the smaller LR); ``None`` if no LR qualifies. ``results``: one optimizer x method."""
    best: tuple[float, float] | None = None
    for lr, group in results.groupby("lr"):
        if group[column].isna().any():
            continue
        key = (float(group[column].mean()), float(lr))
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def best_lr_by_loss(results: pd.DataFrame) -> float:
    """The LR with the lowest mean final validation loss (non-finite counts as +inf)."""
    loss = results.assign(val_loss=results.val_loss.where(np.isfinite(results.val_loss), np.inf))
    means = loss.groupby("lr").val_loss.mean()
    return float(means.idxmin())


def lr_label(lr: float) -> str:
    return f"{lr:.2g}"


def pivot_table(results: pd.DataFrame, optimizer: str, methods: Sequence[str], cell) -> str:
    """Markdown table for one optimizer: a row per method, a column per LR, ``cell(group)`` text."""
    sub = results[results.optimizer == optimizer]
    lrs = sorted(sub.lr.unique())
    lines = ["| method | " + " | ".join(f"lr {lr_label(lr)}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]  # fmt: skip
    for method in methods:
        cells = []
        for lr in lrs:
            group = sub[(sub.method == method) & np.isclose(sub.lr, lr)]
            cells.append(cell(group) if len(group) else "")
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(results: pd.DataFrame, optimizer: str, methods: Sequence[str], targets: Sequence[float],
                   baseline: str) -> str:  # fmt: skip
    """One row per method. Per target: the steps at the method's own best LR (fewest mean steps
    among the LRs where every seed reached it), that LR, and the compute factor = the baseline's
    steps at *its* best LR / the method's. Then the best mean final accuracy over the LRs."""
    sub = results[results.optimizer == optimizer]
    head = "| method |" + "".join(f" steps to {t:.0%} (lr) | factor |" for t in targets)
    head += " best final acc % (lr) | final loss there |"
    lines = [head, "|---|" + "---|---|" * len(targets) + "---|---|"]
    base_steps = {}
    for t in targets:
        col = target_column(t)
        b = sub[sub.method == baseline]
        lr = best_lr_by_steps(b, col)
        base_steps[t] = math.nan if lr is None else float(b[np.isclose(b.lr, lr)][col].mean())
    for method in methods:
        m = sub[sub.method == method]
        if m.empty:
            continue
        row = f"| {method} |"
        for t in targets:
            col = target_column(t)
            lr = best_lr_by_steps(m, col)
            if lr is None:
                reached = m.groupby("lr")[col].apply(lambda v: v.notna().sum()).max()
                n = m.seed.nunique()
                row += f" {NOT_REACHED}{f' by all seeds ({reached}/{n} at best)' if reached else ''} | – |"
                continue
            g = m[np.isclose(m.lr, lr)][col]
            factor = base_steps[t] / g.mean()
            row += f" {fmt_steps(g)} ({lr_label(lr)}) | {f'{factor:.2f}×' if math.isfinite(factor) else '–'} |"
        acc = m.groupby("lr").val_acc.mean()
        lr = float(acc.idxmax())
        g = m[np.isclose(m.lr, lr)]
        row += f" {fmt_mean_std(g.val_acc, 100, 2)} ({lr_label(lr)}) | {fmt_mean_std(g.val_loss, 1, 3)} |"
        lines.append(row)
    return "\n".join(lines)
