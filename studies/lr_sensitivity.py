"""Learning-rate sensitivity of SGD(momentum) and Adam with and without Lookahead on real MNIST-5k.

Sweeps the learning rate over 3 decades (7 half-decade steps) x 3 seeds for each optimizer and
each variant (none, Lookahead k=5 alpha=0.5, k=5 alpha=0.8), training the example CNN of
examples/mnist.py for 3 epochs per run, and writes to --out (default docs/):

    lr_sensitivity.csv   one row per run: final validation loss/accuracy (slow weights with Lookahead)
    lr_curves.csv        training loss (mean over each quarter epoch) per run
    lr_sensitivity.png   final validation loss and accuracy vs learning rate (mean, min-max band)
    lr_curves.png        training-loss curves at a too-small and a too-large LR (best LR /10 and x3.2)

    python studies/lr_sensitivity.py              # full study (126 runs, ~5 min on 2 CPU cores)
    python studies/lr_sensitivity.py --quick      # 12 tiny runs (< 1 min), for the tests
    python studies/lr_sensitivity.py --plot-only  # redraw the PNGs from the CSVs in --out
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_lookahead import LookaheadCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # mnist.py
from mnist import LitCNN, MNISTDataModule  # noqa: E402

K = 5
VARIANTS: dict[str, float | None] = {"none": None, "a0.5": 0.5, "a0.8": 0.8}  # name -> alpha
LRS = {"sgd": np.logspace(-3, 0, 7), "adam": np.logspace(-4, -1, 7)}  # 3 decades each
SEEDS = (0, 1, 2)
POINTS_PER_EPOCH = 4  # resolution of the training-loss curves
OPT_LABEL = {"sgd": "SGD (momentum 0.9)", "adam": "Adam"}
VARIANT_STYLE = {
    "none": dict(color="black", label="no Lookahead"),
    "a0.5": dict(color="tab:blue", label=f"Lookahead k={K}, α=0.5"),
    "a0.8": dict(color="tab:orange", label=f"Lookahead k={K}, α=0.8"),
}


@dataclass(frozen=True)
class Run:
    optimizer: str
    lookahead: str
    lr: float
    seed: int


class LossCurve(Callback):
    """Training loss (of the fast weights, i.e. the minibatch loss) averaged over each
    1/POINTS_PER_EPOCH of an epoch."""

    def __init__(self) -> None:
        self.batch_losses: list[float] = []
        self.points: list[tuple[float, float]] = []  # (epoch, mean loss)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.batch_losses.append(float(loss))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        chunks = np.array_split(np.asarray(self.batch_losses), POINTS_PER_EPOCH)
        for i, chunk in enumerate(chunks):
            self.points.append((trainer.current_epoch + (i + 1) / POINTS_PER_EPOCH, float(chunk.mean())))
        self.batch_losses = []


def make_runs(quick: bool) -> list[Run]:
    seeds = SEEDS[:1] if quick else SEEDS
    runs = []
    for opt, lrs in LRS.items():
        for lr in lrs[[1, -2]] if quick else lrs:
            for variant in VARIANTS:
                runs.extend(Run(opt, variant, float(lr), seed) for seed in seeds)
    return runs


def fit_one(run: Run, datamodule: MNISTDataModule, epochs: int, quick: bool) -> tuple[dict, list[dict]]:
    """Train one configuration; returns its result row and its training-loss curve rows."""
    L.seed_everything(run.seed, verbose=False)  # same init and batch order for every variant
    model = LitCNN(optimizer=run.optimizer, lr=run.lr)
    curve = LossCurve()
    alpha = VARIANTS[run.lookahead]
    lookahead = LookaheadCallback(k=K, alpha=alpha, log_stats=False) if alpha is not None else None
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=8 if quick else 1.0,
        limit_val_batches=2 if quick else 1.0,
        callbacks=[curve] + ([lookahead] if lookahead else []),
    )
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.callback_metrics  # last validation: slow weights with Lookahead
    train_losses = [loss for _, loss in curve.points]
    row = asdict(run) | {
        "epochs": epochs,
        "batches_per_epoch": trainer.num_training_batches,
        "val_loss": float(metrics["val/loss"]),
        "val_acc": float(metrics["val/acc"]),
        "final_train_loss": train_losses[-1],
        # the fast weights went inf/nan: Lookahead then skips every later sync, so its slow weights
        # are a snapshot from before the blow-up -- flagged so the comparison stays honest
        "diverged": not all(math.isfinite(x) for x in train_losses),
        "syncs": lookahead.lookahead.syncs if lookahead else 0,
        "skipped_syncs": lookahead.lookahead.skipped if lookahead else 0,
    }
    return row, [asdict(run) | {"epoch": e, "train_loss": loss} for e, loss in curve.points]


def run_study(out: Path, quick: bool) -> None:
    runs = make_runs(quick)
    epochs = 1 if quick else 3
    datamodule = MNISTDataModule(dataset="mnist", batch_size=64, val_fraction=0.2, seed=0)
    rows, curves = [], []
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        row, curve = fit_one(run, datamodule, epochs, quick)
        rows.append(row)
        curves.extend(curve)
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (len(runs) - i)
        print(
            f"[{i:3d}/{len(runs)}] {run.optimizer:4s} {run.lookahead:4s} lr={run.lr:<8.2g} seed={run.seed}"
            f"  val_loss={row['val_loss']:8.4f} val_acc={row['val_acc']:.3f}{' DIVERGED' if row['diverged'] else ''}"
            f"  ({time.perf_counter() - t0:4.1f}s, elapsed {_hms(elapsed)}, ETA {_hms(eta)})",
            flush=True,
        )
        # rewrite after every run: a long study that is interrupted keeps what it has
        pd.DataFrame(rows).to_csv(out / "lr_sensitivity.csv", index=False)
        pd.DataFrame(curves).to_csv(out / "lr_curves.csv", index=False)


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def plot_sensitivity(results: pd.DataFrame, path: Path) -> None:
    """Final validation loss and accuracy vs LR: mean over seeds with a min-max band."""
    # a diverged run has a nan/inf loss: draw it at the chance-level loss ln(10) so it stays visible
    capped = results.assign(val_loss=results.val_loss.where(np.isfinite(results.val_loss), math.log(10)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    for col, opt in enumerate(LRS):
        for variant, style in VARIANT_STYLE.items():
            sub = capped[(capped.optimizer == opt) & (capped.lookahead == variant)]
            if sub.empty:
                continue
            for row, metric in enumerate(("val_loss", "val_acc")):
                stats = sub.groupby("lr")[metric].agg(["mean", "min", "max"])
                ax = axes[row, col]
                ax.plot(stats.index, stats["mean"], marker="o", ms=4, **style)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.15)
        axes[0, col].set_title(OPT_LABEL[opt])
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("learning rate")
        axes[1, col].set_xscale("log")
    axes[0, 0].set_ylabel("final validation loss (log)")
    axes[1, 0].set_ylabel("final validation accuracy")
    axes[0, 0].legend(fontsize=8)
    n_seeds = results.seed.nunique()
    fig.suptitle(
        f"MNIST-5k (4,000 train / 1,000 val), small CNN, {results.epochs.max()} epoch(s) of"
        f" {results.batches_per_epoch.max()} batches per run; mean of {n_seeds} seed(s),"
        " band = min-max.\nLookahead evaluated on its slow weights; non-finite losses drawn at ln 10.",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_lrs(results: pd.DataFrame, opt: str) -> tuple[float, float]:
    """A too-small and a too-large LR for the curves: one decade below and half a decade above
    the LR at which the baseline (no Lookahead) reached its lowest mean validation loss."""
    baseline = results[(results.optimizer == opt) & (results.lookahead == "none")]
    mean_loss = baseline.groupby("lr").val_loss.mean()  # index: the sorted grid
    best = int(np.nanargmin(mean_loss.to_numpy()))
    per_decade = max(1, round(1 / np.diff(np.log10(mean_loss.index)).mean())) if len(mean_loss) > 1 else 1
    small = max(best - per_decade, 0)
    large = min(best + max(per_decade // 2, 1), len(mean_loss) - 1)
    return float(mean_loss.index[small]), float(mean_loss.index[large])


def plot_curves(results: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Training-loss curves at a too-small and a too-large LR per optimizer (mean, min-max band)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for row, opt in enumerate(LRS):
        small, large = curve_lrs(results, opt)
        for col, (lr, what) in enumerate(((small, "too small"), (large, "too large"))):
            ax = axes[row, col]
            for variant, style in VARIANT_STYLE.items():
                sub = curves[(curves.optimizer == opt) & (curves.lookahead == variant) & np.isclose(curves.lr, lr)]
                if sub.empty:
                    continue
                stats = sub.groupby("epoch").train_loss.agg(["mean", "min", "max"])
                ax.plot(stats.index, stats["mean"], **style)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.15)
            ax.set_title(f"{OPT_LABEL[opt]}, {what} LR = {lr:.2g}", fontsize=10)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss (minibatch mean, log)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Training loss of the fast weights (mean over each quarter epoch); mean of seeds, band = min-max",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out(quick: bool) -> Path:
    """docs/ for the real study; a git-ignored folder for --quick, which must never overwrite it."""
    here = Path(__file__).resolve().parent
    return here / "out-quick" / "lr_sensitivity" if quick else here.parent / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 tiny runs (a smoke test, not a result)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default docs/; with --quick studies/out-quick/, git-ignored)"
    )
    parser.add_argument("--plot-only", action="store_true", help="only redraw the PNGs from the CSVs in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see below)")
    args = parser.parse_args()
    if args.out is None:
        args.out = default_out(args.quick)
    # a CNN this small gains little from a second thread, and on a shared machine extra threads
    # spin against other processes: one epoch took 3.7 s with 1 thread vs 30 s with 2 under load
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    # per-run Lightning chatter (GPU/TPU info, worker hints) would bury the one-line progress
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", "Lookahead: the fast weights.*")  # counted in `skipped_syncs`
    if not args.plot_only:
        run_study(args.out, args.quick)
    results = pd.read_csv(args.out / "lr_sensitivity.csv")
    curves = pd.read_csv(args.out / "lr_curves.csv")
    plot_sensitivity(results, args.out / "lr_sensitivity.png")
    plot_curves(results, curves, args.out / "lr_curves.png")
    print(f"wrote {args.out}/lr_sensitivity.{{csv,png}} and {args.out}/lr_curves.{{csv,png}}")


if __name__ == "__main__":
    main()
