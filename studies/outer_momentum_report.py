"""Figures and Markdown tables of the outer-momentum study from its CSVs (no training here).

Called by ``studies/outer_momentum_study.py`` after the runs and by ``--plot-only``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import outer_momentum_metrics as om  # noqa: E402
from outer_momentum_study import BASELINE, METHODS, OPTIMIZERS, Config  # noqa: E402

STYLE = {
    "plain": dict(color="black", marker="o"),
    "la_k5_a0.5": dict(color="tab:blue", marker="s"),
    "la_k5_a0.8": dict(color="tab:cyan", marker="D"),
    "snoo_k5_a0.5": dict(color="tab:red", marker="^"),
    "snoo_k5_a0.7": dict(color="tab:orange", marker="v"),
    "snoo_k20_a0.5": dict(color="tab:purple", marker="P"),
}


def _style(method: str) -> dict:
    return STYLE.get(method, dict(color="gray", marker="x")) | {"label": METHODS[method].label}


def _methods(results: pd.DataFrame) -> list[str]:
    return [m for m in METHODS if m in set(results.method)]


def _jitter(lr: np.ndarray, i: int, n: int) -> np.ndarray:
    """Spread the methods' markers a little along the log LR axis so error bars do not overlap."""
    return lr * 10 ** (0.035 * (i - (n - 1) / 2))


def _subtitle(results: pd.DataFrame) -> str:
    r = results.iloc[0]
    return (f"MNIST-5k (4,000 train / 1,000 val), small CNN, {int(r.max_steps)} optimizer steps of batch"
            f" {int(r.batch_size)}, constant LR, {results.seed.nunique()} seed(s) per point."
            " Lookahead/SNOO validated on their slow weights.")  # fmt: skip


def plot_final(results: pd.DataFrame, path: Path) -> None:
    """Final validation error (log) and loss (log) vs LR: a line per method, ±std bars."""
    methods = _methods(results)
    cap = math.log(10)  # a non-finite loss is drawn at the chance level ln 10
    data = results.assign(
        err=100 * (1 - results.val_acc),
        val_loss=results.val_loss.where(np.isfinite(results.val_loss), cap),
    )
    fig, axes = plt.subplots(2, len(OPTIMIZERS), figsize=(13, 8.5), sharex="col")
    for col, (opt, opt_label) in enumerate(OPTIMIZERS.items()):
        for i, method in enumerate(methods):
            sub = data[(data.optimizer == opt) & (data.method == method)]
            if sub.empty:
                continue
            for row, metric in enumerate(("err", "val_loss")):
                stats = sub.groupby("lr")[metric].agg(["mean", "std"]).fillna(0.0)
                x = _jitter(stats.index.to_numpy(), i, len(methods))
                axes[row, col].errorbar(x, stats["mean"], yerr=stats["std"], ms=5, capsize=2, lw=1.4,
                                        **_style(method))  # fmt: skip
        axes[0, col].set_title(opt_label)
        axes[1, col].set_xlabel("inner learning rate (log)")
        axes[1, col].set_xscale("log")
        for row in range(2):
            axes[row, col].set_yscale("log")
            axes[row, col].grid(True, which="both", alpha=0.25)
        ticks = [1, 2, 3, 5, 10, 20, 50, 90]
        axes[0, col].set_yticks(ticks, [f"{t}%" for t in ticks])
        axes[0, col].set_ylim(0.8, 100)
    axes[0, 0].set_ylabel("final validation error = 100% − accuracy (log)")
    axes[1, 0].set_ylabel("final validation loss (log)")
    _legend_below(fig, axes[0, 0])
    fig.suptitle(_subtitle(results) + "\nMean ± std over seeds. Non-finite losses drawn at ln 10; markers spread a little along x per"
                 " method so bars do not overlap.", fontsize=9.5)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(results: pd.DataFrame, targets: tuple[float, ...], path: Path) -> None:
    """Steps to each target accuracy vs LR. Filled marker: every seed reached it (mean, min-max
    bar); hollow: only some did (their mean, label r/n); a cross on the top line: none did."""
    methods = _methods(results)
    max_steps = int(results.max_steps.max())
    top = max_steps * 1.25  # the "not reached" line
    fig, axes = plt.subplots(len(targets), len(OPTIMIZERS), figsize=(13, 4.2 * len(targets)), sharex="col",
                             squeeze=False)  # fmt: skip
    for row, target in enumerate(targets):
        col_name = om.target_column(target)
        for col, (opt, opt_label) in enumerate(OPTIMIZERS.items()):
            ax = axes[row, col]
            for i, method in enumerate(methods):
                sub = results[(results.optimizer == opt) & (results.method == method)]
                if sub.empty:
                    continue
                style = _style(method)
                xs, ys, lo, hi, full = [], [], [], [], []
                for lr, g in sub.groupby("lr"):
                    x = float(_jitter(np.array([lr]), i, len(methods))[0])
                    mean, reached, total = om.steps_summary(g[col_name])
                    if reached == 0:
                        ax.plot(x, top, marker="x", color=style["color"], ms=7, ls="none")
                        continue
                    vals = g[col_name].dropna()
                    xs.append(x), ys.append(mean), lo.append(mean - vals.min()), hi.append(vals.max() - mean)
                    full.append(reached == total)
                    if reached < total:
                        ax.annotate(f"{reached}/{total}", (x, mean), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=style["color"])  # fmt: skip
                if not xs:
                    ax.plot([], [], ls="-", **style)  # keep the legend entry
                    continue
                ax.plot(xs, ys, ls="-", lw=1.2, color=style["color"])
                ax.plot([], [], ls="-", lw=1.2, **style)  # legend entry with the marker
                ax.errorbar(xs, ys, yerr=[lo, hi], ls="none", color=style["color"], capsize=2, lw=1)
                for x, y, f in zip(xs, ys, full):
                    ax.plot(x, y, marker=style["marker"], ms=6, color=style["color"],
                            mfc=style["color"] if f else "white", ls="none")  # fmt: skip
            ax.axhline(max_steps, color="gray", lw=0.8, ls=":")
            ax.set_ylim(0, top * 1.06)
            yt = [t for t in ax.get_yticks() if 0 <= t <= max_steps]
            ax.set_yticks(yt + [top], [f"{t:.0f}" for t in yt] + ["not\nreached"])
            ax.set_xscale("log")
            ax.grid(True, alpha=0.25)
            ax.set_title(f"{opt_label}: steps to {target:.0%} validation accuracy", fontsize=10)
            ax.set_ylabel("optimizer steps (fewer is better)")
        axes[-1, 0].set_xlabel("inner learning rate (log)")
        axes[-1, -1].set_xlabel("inner learning rate (log)")
    _legend_below(fig, axes[0, 0])
    fig.suptitle(_subtitle(results) + f"\nEvaluated every {int(results.eval_every.iloc[0])} steps. Filled: all seeds"
                 " reached the target (mean, min-max bar); hollow: only r/n seeds did (their mean); ×: none did.",
                 fontsize=9.5)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05 / len(targets) * 2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_below(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)


def best_lrs(results: pd.DataFrame, target: float) -> dict[tuple[str, str], float]:
    """(optimizer, method) -> its best LR: fewest steps to ``target`` with every seed reaching it,
    else the lowest mean final validation loss."""
    best = {}
    for (opt, method), g in results.groupby(["optimizer", "method"]):
        lr = om.best_lr_by_steps(g, om.target_column(target))
        best[(opt, method)] = lr if lr is not None else om.best_lr_by_loss(g)
    return best


def plot_curves(results: pd.DataFrame, curves: pd.DataFrame, target: float, path: Path) -> None:
    """Validation accuracy vs step of each method at its own best LR (mean, min-max band)."""
    methods = _methods(results)
    best = best_lrs(results, target)
    fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(13, 4.8), squeeze=False)
    for col, (opt, opt_label) in enumerate(OPTIMIZERS.items()):
        ax = axes[0, col]
        for method in methods:
            if (opt, method) not in best:
                continue
            lr = best[(opt, method)]
            sub = curves[(curves.optimizer == opt) & (curves.method == method) & np.isclose(curves.lr, lr)]
            stats = sub.groupby("step").val_acc.agg(["mean", "min", "max"])
            style = _style(method)
            ax.plot(stats.index, 100 * stats["mean"], color=style["color"], lw=1.4,
                    label=f"{style['label']}, lr {lr:.2g}")  # fmt: skip
            ax.fill_between(stats.index, 100 * stats["min"], 100 * stats["max"], color=style["color"], alpha=0.12)
        ax.axhline(100 * target, color="gray", lw=0.8, ls=":")
        ax.set_ylim(85, 100)
        ax.set_title(f"{opt_label}: each method at its best LR (fewest steps to {target:.0%})", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy % (slow weights)")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7.5, loc="lower right")
    fig.suptitle(_subtitle(results) + "\nMean over seeds, band = min-max. Zoomed to 85-100%.", fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(results: pd.DataFrame, targets: tuple[float, ...]) -> str:
    """All Markdown tables of the study (headline first)."""
    methods = _methods(results)
    parts = []
    for opt, opt_label in OPTIMIZERS.items():
        if results[results.optimizer == opt].empty:
            continue
        parts.append(f"### {opt_label}\n")
        parts.append("Headline: each method at its own best LR (fewest mean steps among the LRs where every seed"
                     f" reached the target); factor = {BASELINE}'s steps at its best LR / the method's.\n")  # fmt: skip
        parts.append(om.headline_table(results, opt, methods, targets, BASELINE) + "\n")
        parts.append("Final validation accuracy % (mean±std over seeds):\n")
        parts.append(om.pivot_table(results, opt, methods, lambda g: om.fmt_mean_std(g.val_acc, 100, 2)) + "\n")
        parts.append("Final validation loss (mean±std over seeds):\n")
        parts.append(om.pivot_table(results, opt, methods, lambda g: om.fmt_mean_std(g.val_loss, 1, 3)) + "\n")
        for t in targets:
            col = om.target_column(t)
            parts.append(f"Steps to {t:.0%} validation accuracy (mean±std; `(r/n)`: only r of n seeds reached it,"
                         " mean of those; `n.r.`: none did):\n")  # fmt: skip
            parts.append(om.pivot_table(results, opt, methods, lambda g, c=col: om.fmt_steps(g[c])) + "\n")
        diverged = results[(results.optimizer == opt) & results.diverged.astype(bool)]
        if len(diverged):
            cells = diverged.groupby(["method", "lr"]).size()
            listed = ", ".join(f"{m} lr {om.lr_label(lr)} ×{n}" for (m, lr), n in cells.items())
            parts.append(f"Runs whose training loss went non-finite (stopped there): {listed}\n")
    return "\n".join(parts)


def report(out: Path, cfg: Config) -> None:
    results = pd.read_csv(out / "outer_momentum_study.csv")
    curves = pd.read_csv(out / "outer_momentum_curves.csv")
    targets = tuple(t for t in cfg.targets if om.target_column(t) in results.columns)
    plot_final(results, out / "outer_momentum_study.png")
    plot_steps(results, targets, out / "outer_momentum_steps.png")
    plot_curves(results, curves, targets[len(targets) // 2], out / "outer_momentum_curves.png")
    text = tables(results, targets)
    (out / "outer_momentum_tables.md").write_text(
        "<!-- generated by studies/outer_momentum_study.py from outer_momentum_study.csv; do not edit -->\n\n"
        + text
    )
    print(text)
    print(f"wrote {out}/outer_momentum_{{study.csv,curves.csv,study.png,steps.png,curves.png,tables.md}}")
