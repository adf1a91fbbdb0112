"""The figure ``docs/bench_sync.png``: one sync vs parameter count per tensor count (top) and the
same as a multiple of the bound (bottom), from the sync grid's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .contenders import PEERS


def plot(grid: list[dict[str, Any]], path: Path) -> None:
    """Top row: one sync (median, IQR bars) vs parameter count, bound included; bottom: time / bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["tensors"] for r in grid})
    names = ["ours", "ours_measured", "blocked_update", "foreach_lerp_copy", "compiled_flat_4x", *PEERS]
    styles = dict(zip(names, ["o-", "o--", "s:", "D--", "d:", "v-", "^-", "x--", "+-."]))
    fig, axes = plt.subplots(2, len(counts), figsize=(5 * len(counts), 8.4), sharex=True, sharey="row", squeeze=False)
    for col, n_t in enumerate(counts):
        rows = sorted((r for r in grid if r["tensors"] == n_t), key=lambda r: r["params"])
        top, bottom = axes[0][col], axes[1][col]
        xs = [r["params"] for r in rows]
        top.plot(xs, [2 * r["time_s"]["copy"]["median"] for r in rows], "k-", lw=4, alpha=0.3, label="bound: 2 x copy_")
        bottom.axhline(1.0, color="k", lw=4, alpha=0.3)
        bottom.axhline(1.3, color="k", lw=1, ls=":", alpha=0.6)
        for n in names:
            pts = [r for r in rows if n in r["time_s"]]
            if not pts:
                continue
            kw: dict[str, Any] = dict(fmt=styles[n], ms=5, capsize=2, lw=2.2 if n == "ours" else 1.2, label=n)
            for ax, stats in ((top, [r["time_s"][n] for r in pts]), (bottom, [r["ratio_to_bound"][n] for r in pts])):
                med = [st["median"] for st in stats]
                err = [[m - st["q1"] for m, st in zip(med, stats)], [st["q3"] - m for m, st in zip(med, stats)]]
                ax.errorbar([r["params"] for r in pts], med, yerr=err, **kw)
                kw.pop("label", None)
        top.set(xscale="log", yscale="log", title=f"{n_t} tensors")
        bottom.set(xscale="log", yscale="log", xlabel="parameters (float32)")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("one sync (s): median, IQR")
    axes[1][0].set_ylabel("time / bound (dotted: 1.3x goal)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle("Lookahead sync vs parameter count: CPU, same tensors, interleaved rounds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
