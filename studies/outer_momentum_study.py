"""Outer momentum (SNOO-style Nesterov on the slow step) vs Lookahead vs the plain optimizer on
real MNIST-5k: final validation accuracy/loss and steps to a target validation accuracy, over a
learning-rate grid, for SGD(momentum 0.9) and AdamW as inner optimizers.

Every run trains the CNN of examples/mnist.py for a fixed number of optimizer steps (no LR
schedule) and validates every ``eval_every`` steps (a multiple of every k in the grid, so each
evaluation comes right after a sync; Lookahead/SNOO runs are validated on their slow weights, as the
callback does). Results are appended to CSVs after every run, so an interrupted study resumes where
it stopped (runs already in the CSV are skipped):

    outer_momentum_study.csv    one row per run: final val loss/acc, steps to each target, syncs, time
    outer_momentum_curves.csv   one row per evaluation: step, val loss/acc, mean training loss since the last one
    outer_momentum_study.png    final validation error and loss vs LR, a line per method (mean, ±std bars)
    outer_momentum_steps.png    steps to each target accuracy vs LR, a line per method
    outer_momentum_curves.png   validation accuracy vs step at each method's best LR

    python studies/outer_momentum_study.py                # full study into docs/ (~30 min on 2 cores)
    python studies/outer_momentum_study.py --refine       # then add one in-between LR per optimizer (resumes)
    python studies/outer_momentum_study.py --extra        # or add the EXTRA methods (resumes the CSVs)
    python studies/outer_momentum_study.py --quick        # tiny smoke run (< 1 min) into studies/out-quick/
    python studies/outer_momentum_study.py --plot-only    # redraw PNGs and print tables from the CSVs
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # outer_momentum_metrics.py (also in workers)
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "examples"))  # mnist.py (also in workers)

import numpy as np  # noqa: E402

import outer_momentum_metrics as om  # noqa: E402
from study_io import append_rows

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    label: str
    k: int | None = None  # None: no Lookahead at all (the plain inner optimizer)
    alpha: float = 0.5
    mu: float = 0.0  # outer momentum (Nesterov when > 0)


# Method ids are the CSV values; order = legend order. The first five answer the study's question;
# EXTRA methods run only with --extra (after the others, resuming the same CSVs), and in --quick.
METHODS: dict[str, Method] = {
    "plain": Method("plain (no Lookahead)"),
    "la_k5_a0.5": Method("Lookahead k=5 α=0.5", 5, 0.5),
    "la_k5_a0.8": Method("Lookahead k=5 α=0.8", 5, 0.8),
    "snoo_k5_a0.5": Method("SNOO k=5 α=0.5 μ=0.9", 5, 0.5, 0.9),
    "snoo_k20_a0.5": Method("SNOO k=20 α=0.5 μ=0.9", 20, 0.5, 0.9),
    "snoo_k5_a0.7": Method("SNOO k=5 α=0.7 μ=0.9 (DiLoCo's α)", 5, 0.7, 0.9),
}
EXTRA = ("snoo_k5_a0.7",)
BASELINE = "plain"
OPTIMIZERS = {"sgd": "SGD (momentum 0.9)", "adamw": "AdamW (wd 0.01)"}
LRS = {  # 5 learning rates over 3 decades (0.75-decade steps) per optimizer
    "sgd": np.logspace(-3.5, -0.5, 5),  # 3.2e-4 ... 0.32
    "adamw": np.logspace(-4.5, -1.5, 5),  # 3.2e-5 ... 0.032
}
# --refine: one more LR per optimizer, chosen after the main grid had run: the geometric midpoint
# between the grid LRs where the outer-momentum runs peak (0.01 / 0.0010) and the one where the
# baseline peaks and SNOO k=5 starts to fail (0.056 / 0.0056). Run for every main method, so
# the column stays a fair comparison.
REFINE_LRS = {"sgd": (10**-1.625,), "adamw": (10**-2.625,)}  # 0.024, 0.0024
REFINE_METHODS = ("snoo_k5_a0.5", "snoo_k20_a0.5", "plain", "la_k5_a0.5", "la_k5_a0.8")
SEEDS = (0, 1, 2)
TARGETS = (0.90, 0.95, 0.97)


@dataclass(frozen=True)
class Config:
    max_steps: int = 960  # 7.7 epochs of 125 batches: 5x the 189 steps of studies/lr_sensitivity.py
    eval_every: int = 60  # a multiple of every k above: each evaluation follows a sync
    batch_size: int = 32
    limit_val_batches: float | int = 1.0  # 1,000 validation images in 2 batches of 512
    targets: tuple[float, ...] = TARGETS
    quick: bool = False


QUICK = Config(max_steps=40, eval_every=20, limit_val_batches=1, targets=(0.5, 0.7), quick=True)


@dataclass(frozen=True)
class Run:
    optimizer: str
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return run_key(self.optimizer, self.method, self.lr, self.seed)


def run_key(optimizer: str, method: str, lr: float, seed: int) -> str:
    return f"{optimizer}|{method}|{float(lr):.6g}|{int(seed)}"


def make_runs(quick: bool, extra: bool = False, refine: bool = False) -> list[Run]:
    """The grid, seed-major (a study stopped early still covers every cell with fewer seeds);
    EXTRA methods (only with ``extra``; always in the quick smoke run) and the REFINE_LRS runs
    (only with ``refine``, never in the smoke run) come after it."""
    seeds = SEEDS[:1] if quick else SEEDS
    main = [m for m in METHODS if m not in EXTRA]
    runs = []
    for methods in [main] + ([list(EXTRA)] if extra or quick else []):
        for seed in seeds:
            for opt, lrs in LRS.items():
                for lr in lrs[[3]] if quick else lrs:
                    runs.extend(Run(opt, method, float(lr), seed) for method in methods)
    if refine and not quick:
        for seed in seeds:
            for opt, lrs in REFINE_LRS.items():
                runs.extend(Run(opt, m, float(lr), seed) for lr in lrs for m in REFINE_METHODS)
    return runs


STUDY_COLUMNS = [
    "optimizer", "method", "k", "alpha", "outer_momentum", "lr", "seed", "max_steps", "steps_done", "batch_size",
    "eval_every", "val_loss", "val_acc", "best_val_acc", "final_train_loss", "diverged", "syncs", "skipped_syncs",
    "seconds",
]  # fmt: skip  (+ one steps_to_XX column per target)
CURVE_COLUMNS = ["optimizer", "method", "lr", "seed", "step", "val_loss", "val_acc", "train_loss"]


def study_columns(cfg: Config) -> list[str]:
    return STUDY_COLUMNS + [om.target_column(t) for t in cfg.targets]


# ----------------------------------------------------------------------------- one run (in a worker)
def _quiet() -> None:
    import lightning  # noqa: F401  (it sets its loggers' levels on import: silence them afterwards)
    import torch

    torch.set_num_threads(1)  # tiny CNN on a shared 2-core machine: a second thread only spins
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", "Lookahead: the fast weights.*")  # counted in `skipped_syncs`


def _make_model(optimizer: str, lr: float):
    import torch
    from mnist import LitCNN

    class StudyCNN(LitCNN):
        """examples/mnist.py's CNN with AdamW (decoupled weight decay 0.01, torch's default) as a
        third optimizer choice; SGD is the parent's (momentum 0.9, no weight decay). The training
        step logs nothing (the Recorder takes the loss from its output): 20% less time per step."""

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
            return super().configure_optimizers()

    return StudyCNN(optimizer="sgd" if optimizer == "sgd" else "adam", lr=lr)


def _evaluate(model, datamodule, limit_batches: float | int) -> tuple[float, float]:
    """Validation loss and accuracy of the module's current weights (after a fit that stopped early),
    measured like LitCNN's logged ``val/loss`` (Lightning weights the batch means by batch size, so
    the mean over images) and ``val/acc`` (torchmetrics'
    MulticlassAccuracy: the mean of the per-class accuracies)."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    model.eval()
    acc = MulticlassAccuracy(10)
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(datamodule.val_dataloader()):
            if isinstance(limit_batches, int) and i >= limit_batches:
                break
            logits = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            acc.update(logits, y)
    return loss_sum / n, float(acc.compute())


def fit_one(run: Run, cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one configuration; returns its CSV row and its curve rows."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from mnist import MNISTDataModule

    from lightning_lookahead import LookaheadCallback

    class Recorder(Callback):
        """Validation metrics after every evaluation and the mean minibatch loss of the fast
        weights since the previous one; stops the fit at the first non-finite training loss."""

        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.losses: list[float] = []
            self.last_loss = math.nan
            self.diverged = False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.losses.append(loss)
            self.last_loss = loss
            if not math.isfinite(loss):
                self.diverged = True
                trainer.should_stop = True  # nothing more to learn from NaN fast weights

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            self.points.append({
                "step": trainer.global_step, "val_loss": float(m["val/loss"]), "val_acc": float(m["val/acc"]),
                "train_loss": float(np.mean(self.losses)) if self.losses else math.nan,
            })  # fmt: skip
            self.losses = []

    t0 = time.perf_counter()
    method = METHODS[run.method]
    datamodule = MNISTDataModule(dataset="mnist", batch_size=cfg.batch_size, val_fraction=0.2, seed=0)
    L.seed_everything(run.seed, verbose=False)  # same init and batch order for every method
    model = _make_model(run.optimizer, run.lr)
    recorder = Recorder()
    lookahead = None
    if method.k is not None:
        lookahead = LookaheadCallback(k=method.k, alpha=method.alpha, outer_momentum=method.mu, nesterov=True,
                                      log_stats=False)  # fmt: skip
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.eval_every,
        check_val_every_n_epoch=None,  # count eval_every over the whole run, across epochs
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=cfg.limit_val_batches,
        callbacks=[recorder] + ([lookahead] if lookahead else []),
    )
    trainer.fit(model, datamodule=datamodule)
    points = recorder.points
    if recorder.diverged or not points or points[-1]["step"] != trainer.global_step:
        # stopped early: evaluate what the run ends with (Lookahead: its slow weights, frozen at the
        # last finite sync; plain: the non-finite weights themselves)
        val_loss, val_acc = _evaluate(model, datamodule, cfg.limit_val_batches)
        points.append({"step": trainer.global_step, "val_loss": val_loss, "val_acc": val_acc,
                       "train_loss": float(np.mean(recorder.losses)) if recorder.losses else math.nan})  # fmt: skip
    steps = [p["step"] for p in points]
    accs = [p["val_acc"] for p in points]
    row = asdict(run) | {
        "k": method.k or 0,
        "alpha": method.alpha if method.k else 1.0,
        "outer_momentum": method.mu,
        "max_steps": cfg.max_steps,
        "steps_done": trainer.global_step,
        "batch_size": cfg.batch_size,
        "eval_every": cfg.eval_every,
        "val_loss": points[-1]["val_loss"],
        "val_acc": points[-1]["val_acc"],
        "best_val_acc": max(accs),
        "final_train_loss": recorder.last_loss,
        "diverged": recorder.diverged,
        "syncs": lookahead.lookahead.syncs if lookahead else 0,
        "skipped_syncs": lookahead.lookahead.skipped if lookahead else 0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    for t in cfg.targets:
        row[om.target_column(t)] = om.steps_to_target(steps, accs, t)
    curve = [asdict(run) | p for p in points]
    return row, curve


# ----------------------------------------------------------------------------- the study (main process)
def _done_keys(study_csv: Path, curves_csv: Path, cfg: Config) -> set[str]:
    """Runs already in the study CSV; curve rows of an unfinished run (a crash between the two
    appends) are dropped so that its rerun does not duplicate them."""
    import pandas as pd

    if not study_csv.exists():
        if curves_csv.exists():
            curves_csv.unlink()
        return set()
    done = pd.read_csv(study_csv)
    if list(done.columns) != study_columns(cfg):
        raise SystemExit(f"{study_csv} has other columns than this configuration writes; use another --out")
    keys = {run_key(*r) for r in done[["optimizer", "method", "lr", "seed"]].itertuples(index=False)}
    if curves_csv.exists():
        curves = pd.read_csv(curves_csv)
        keep = [run_key(*r) in keys for r in curves[["optimizer", "method", "lr", "seed"]].itertuples(index=False)]
        if not all(keep):
            curves[keep].to_csv(curves_csv, index=False)
    return keys


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_row(row: dict[str, Any], cfg: Config) -> str:
    steps = " ".join(
        f"{t:.0%}@{'n.r.' if row[om.target_column(t)] is None else row[om.target_column(t)]}" for t in cfg.targets
    )
    flag = " DIVERGED" if row["diverged"] else ""
    return (f"{row['optimizer']:5s} {row['method']:13s} lr={row['lr']:<8.2g} seed={row['seed']}"
            f"  val_acc={row['val_acc']:.4f} val_loss={row['val_loss']:.4f}  steps to {steps}{flag}")  # fmt: skip


def run_study(out: Path, cfg: Config, workers: int, extra: bool = False, refine: bool = False) -> None:
    study_csv, curves_csv = out / "outer_momentum_study.csv", out / "outer_momentum_curves.csv"
    runs = make_runs(cfg.quick, extra, refine)
    done = _done_keys(study_csv, curves_csv, cfg)
    todo = [r for r in runs if r.key not in done]
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already in {study_csv}, {len(todo)} to do"
          f" ({workers} worker process(es), {cfg.max_steps} steps each)", flush=True)  # fmt: skip
    if not todo:
        return
    start = time.perf_counter()
    _quiet()  # import torch, lightning and the data once here, so forked workers start at once
    import lightning_lookahead  # noqa: F401
    from mnist import load_images

    load_images("mnist")  # lru_cached: the workers inherit it
    # fork: the parent has run no torch op (no thread pools to inherit); spawn where fork is missing
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quiet) as pool:
        futures = {pool.submit(fit_one, run, cfg): run for run in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            row, curve = fut.result()  # a failed run raises here: the study stops, what is done stays
            append_rows(curves_csv, curve, CURVE_COLUMNS)  # curves first: see _done_keys
            append_rows(study_csv, [row], study_columns(cfg))
            elapsed = time.perf_counter() - start
            eta = elapsed / i * (len(todo) - i)
            print(f"[run {i:3d}/{len(todo)}] {_fmt_row(row, cfg)}  ({row['seconds']:.1f}s;"
                  f" elapsed {_hms(elapsed)}, ETA {_hms(eta)})", flush=True)  # fmt: skip
    print(f"study done in {_hms(time.perf_counter() - start)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (a test, not a result)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: docs/, or studies/out-quick/ with --quick)")  # fmt: skip
    parser.add_argument("--extra", action="store_true", help=f"also run the EXTRA methods {EXTRA}")
    parser.add_argument("--refine", action="store_true",
                        help=f"also run {REFINE_METHODS} at the extra LRs {REFINE_LRS}")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw PNGs / print tables from the CSVs")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    out = args.out or (Path(__file__).resolve().parent / "out-quick" if args.quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        run_study(out, cfg, max(1, args.workers), args.extra, args.refine)
    import outer_momentum_report

    outer_momentum_report.report(out, cfg)


if __name__ == "__main__":
    main()
