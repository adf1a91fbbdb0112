"""A small character-level language model (decoder-only transformer) trained on Python's own
documentation (``pydoc_data.topics``) with AdamW, Lookahead(AdamW) and SNOO (Lookahead with outer
Nesterov momentum), over a learning-rate grid and seeds: final validation loss (nats and bits per
character) and steps to reach the AdamW baseline's final loss, the measure of the SNOO/DiLoCo papers.

Every method uses the same inner optimizer and schedule (AdamW, linear warm-up then cosine, per step);
``LookaheadCallback`` wraps it unchanged. Validation runs every ``eval_every`` steps on a fixed set of
validation windows; with the callback, validation sees the slow weights (the model one would deploy).
Runs are appended to the CSVs as they finish, so an interrupted study resumes by skipping the
(method, lr, seed) rows already there.

    python studies/lm_study.py                       # full study into docs/ (~35-45 min on 2 CPU cores)
    python studies/lm_study.py --report              # only tables (docs/lm_study.md section) and figure
    python studies/lm_study.py --quick               # smoke run (< 1 min) into studies/out-quick/
    python studies/lm_study.py --accelerator gpu     # the same grid with the larger `gpu` preset
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the lm/ helpers (also in the worker processes)
if (ROOT / "lightning_lookahead").is_dir():
    sys.path.insert(1, str(ROOT))  # the callback of this checkout, not whatever else is installed
from study_io import append_rows


@dataclass(frozen=True)
class Method:
    label: str
    k: int | None = None  # None: no callback (plain AdamW)
    alpha: float = 0.5
    mu: float = 0.0  # outer momentum, Nesterov when > 0


# CSV ids; order = legend order. snoo_k28 is the shipped `snoo` preset (conf/callbacks/snoo.yaml).
METHODS: dict[str, Method] = {
    "adamw": Method("AdamW"),
    "la_k5": Method("Lookahead k=5 α=0.5", 5, 0.5),
    "snoo_k28": Method("SNOO k=28 α=0.68 μ=0.37 (preset)", 28, 0.68, 0.37),
    "snoo_k5": Method("SNOO k=5 α=0.68 μ=0.37", 5, 0.68, 0.37),
}
BASELINE = "adamw"


@dataclass(frozen=True)
class Config:
    """Model, data and schedule of one preset. ``max_steps`` is a multiple of 5 and 28, so the final
    evaluation follows a sync for every method; ``eval_every`` is a multiple of 5 (k=5 runs are always
    evaluated right after a sync, k=28 runs only at multiples of 140 steps)."""

    name: str = "cpu"
    width: int = 96
    layers: int = 4
    heads: int = 4
    context: int = 64
    batch_size: int = 16
    max_steps: int = 980
    warmup: int = 50
    eval_every: int = 35
    val_windows: int = 256  # fixed validation windows per evaluation (16k characters)
    lrs: tuple[float, ...] = (4e-3, 8e-3, 1.6e-2)  # around AdamW's best (pilot: AdamW, seed 0, 1e-3 ... 1.6e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    precision: str = "32-true"
    threads: int = 1  # torch threads per worker process


PRESETS = {
    "cpu": Config(),
    "quick": Config(name="quick", width=32, layers=1, heads=2, context=32, batch_size=16, max_steps=140, warmup=10,
                    eval_every=35, val_windows=64, lrs=(1e-2,), seeds=(0,)),
    # A larger model for an accelerator (same grid). The corpus is only ~0.42M training characters, so this
    # preset (~2.7M parameters, ~8M training characters per run) is about as large as it can go before it
    # mostly measures overfitting; it buys more seeds per hour, not the papers' scale.
    "gpu": Config(name="gpu", width=192, layers=6, heads=6, context=128, batch_size=32, max_steps=1960, warmup=100,
                  eval_every=70, val_windows=512, lrs=(1e-3, 2e-3, 4e-3, 8e-3), threads=4),
}

RUN_COLUMNS = [
    "preset", "method", "k", "alpha", "outer_momentum", "lr", "seed", "n_params", "max_steps", "steps_done",
    "tokens", "val_loss", "val_bpc", "best_val_bpc", "final_train_loss", "diverged", "syncs", "train_seconds",
    "ms_per_step", "seconds",
]  # fmt: skip
CURVE_COLUMNS = ["preset", "method", "lr", "seed", "step", "val_loss", "val_bpc", "train_loss", "lr_now"]


def key(method: str, lr: float, seed: int) -> tuple[str, str, int]:
    return method, f"{float(lr):.6g}", int(seed)


# ----------------------------------------------------------------------------- one run
def _quiet(threads: int) -> None:
    import lightning  # noqa: F401  (sets its loggers' levels on import: silence them afterwards)
    import torch

    torch.set_num_threads(threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg in (".*does not have many workers.*", ".*LeafSpec.*", "Lookahead: the fast weights.*",
                ".*GPU available but not used.*", ".*Tensor Cores.*"):  # fmt: skip
        warnings.filterwarnings("ignore", msg)


def fit_one(method_id: str, lr: float, seed: int, cfg: Config, accelerator: str,
            profile: bool = False) -> tuple[dict, list[dict]]:  # fmt: skip
    """Train one (method, lr, seed); returns its run row and its curve rows. ``profile``: Lightning's
    SimpleProfiler times every hook, and the row gets ``callback_ms_per_step``, the time spent in the
    LookaheadCallback's training hooks (where it syncs) per step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lm.data import CharData, FixedWindows, RandomWindows
    from lm.model import LitLM
    from torch.utils.data import DataLoader

    from lightning_lookahead import LookaheadCallback

    class Recorder(Callback):
        """Validation loss at each evaluation, mean training loss (fast weights) since the previous
        one, the LR, and the time spent in validation (subtracted from the step time)."""

        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.losses: list[float] = []
            self.last_loss, self.diverged, self.val_seconds, self._t = math.nan, False, 0.0, 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.losses.append(loss)
            self.last_loss = loss
            if not math.isfinite(loss):
                self.diverged = trainer.should_stop = True

        def on_validation_start(self, trainer, pl_module) -> None:
            self._t = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            self.val_seconds += time.perf_counter() - self._t
            loss = float(trainer.callback_metrics["val/loss"])
            self.points.append({
                "step": trainer.global_step, "val_loss": loss, "val_bpc": loss / math.log(2),
                "train_loss": sum(self.losses) / len(self.losses) if self.losses else math.nan,
                "lr_now": trainer.optimizers[0].param_groups[0]["lr"],
            })  # fmt: skip
            self.losses = []

    t0 = time.perf_counter()
    m = METHODS[method_id]
    data = CharData()
    train = DataLoader(RandomWindows(data.train, cfg.context, cfg.batch_size, cfg.max_steps, seed), batch_size=None)
    val = DataLoader(FixedWindows(data.val, cfg.context, cfg.val_windows), batch_size=128)
    model = LitLM(data.vocab_size, cfg.context, cfg.width, cfg.layers, cfg.heads, lr, cfg.max_steps, cfg.warmup,
                  seed=seed)  # fmt: skip  (same init and batches for every method)
    recorder = Recorder()
    la = None if m.k is None else LookaheadCallback(k=m.k, alpha=m.alpha, outer_momentum=m.mu, nesterov=True,
                                                    log_stats=False)  # fmt: skip
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=cfg.precision, max_steps=cfg.max_steps, max_epochs=1,
        val_check_interval=cfg.eval_every, check_val_every_n_epoch=None, gradient_clip_val=1.0, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder] + ([la] if la else []), profiler="simple" if profile else None,
    )  # fmt: skip
    fit_start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    fit_seconds = time.perf_counter() - fit_start
    if recorder.diverged or not recorder.points or recorder.points[-1]["step"] != trainer.global_step:
        trainer.validate(model, val, verbose=False)  # stopped early: evaluate what the run ends with
    points = recorder.points
    train_seconds = fit_seconds - recorder.val_seconds
    row = {
        "preset": cfg.name, "method": method_id, "k": m.k or 0, "alpha": m.alpha if m.k else 1.0,
        "outer_momentum": m.mu, "lr": lr, "seed": seed, "n_params": sum(p.numel() for p in model.parameters()),
        "max_steps": cfg.max_steps, "steps_done": trainer.global_step,
        "tokens": trainer.global_step * cfg.batch_size * cfg.context, "val_loss": points[-1]["val_loss"],
        "val_bpc": points[-1]["val_bpc"], "best_val_bpc": min(p["val_bpc"] for p in points),
        "final_train_loss": recorder.last_loss, "diverged": recorder.diverged,
        "syncs": la.lookahead.syncs if la else 0, "train_seconds": round(train_seconds, 2),
        "ms_per_step": round(1000 * train_seconds / max(1, trainer.global_step), 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    if profile:
        hooks = trainer.profiler.recorded_durations  # action name -> durations, e.g. [Callback]Name.on_train_batch_end
        cb = sum(sum(v) for k, v in hooks.items() if k.startswith("[Callback]LookaheadCallback") and "train" in k)
        row["callback_ms_per_step"] = round(1000 * cb / max(1, trainer.global_step), 4)
    return row, [{"preset": cfg.name, "method": method_id, "lr": lr, "seed": seed} | p for p in points]


# ----------------------------------------------------------------------------- the study
def _done(runs_csv: Path, curves_csv: Path, cfg: Config) -> set[tuple[str, str, int]]:
    """Keys already in the runs CSV; curve rows of a run missing there (a crash between the two
    appends) are dropped so its rerun does not duplicate them."""
    import pandas as pd

    if not runs_csv.exists():
        curves_csv.unlink(missing_ok=True)
        return set()
    runs = pd.read_csv(runs_csv)
    if list(runs.columns) != RUN_COLUMNS or set(runs.preset) - {cfg.name}:
        raise SystemExit(f"{runs_csv} holds another preset or format than `{cfg.name}`; use another --out")
    done = {key(*r) for r in runs[["method", "lr", "seed"]].itertuples(index=False)}
    if curves_csv.exists():
        curves = pd.read_csv(curves_csv)
        keep = [key(*r) in done for r in curves[["method", "lr", "seed"]].itertuples(index=False)]
        if not all(keep):
            curves[keep].to_csv(curves_csv, index=False)
    return done


def _hms(s: float) -> str:
    m, s = divmod(round(s), 60)
    return f"{m}m{s:02d}s"


def run_study(out: Path, cfg: Config, accelerator: str, workers: int) -> None:
    runs_csv, curves_csv = out / "lm_study_runs.csv", out / "lm_study_curves.csv"
    grid = [(m, lr, s) for s in cfg.seeds for lr in cfg.lrs for m in cfg.methods]  # seed-major: a cut study
    done = _done(runs_csv, curves_csv, cfg)  # still covers every cell with fewer seeds
    todo = [g for g in grid if key(*g) not in done]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already in {runs_csv}, {len(todo)} to do"
          f" ({workers} worker(s), preset {cfg.name}, {cfg.max_steps} steps each, {accelerator})", flush=True)
    if not todo:
        return
    start = time.perf_counter()

    def finished(i: int, row: dict, curve: list[dict]) -> None:
        append_rows(curves_csv, curve, CURVE_COLUMNS)  # curves first: see _done
        append_rows(runs_csv, [row], RUN_COLUMNS)
        elapsed = time.perf_counter() - start
        flag = " DIVERGED" if row["diverged"] else ""
        print(f"[{i:3d}/{len(todo)}] {row['method']:9s} lr={row['lr']:<7.2g} seed={row['seed']}"
              f"  val_bpc={row['val_bpc']:.4f} (best {row['best_val_bpc']:.4f}){flag}  {row['ms_per_step']:.1f} ms/step,"
              f" {row['seconds']:.0f}s; elapsed {_hms(elapsed)}, ETA {_hms(elapsed / i * (len(todo) - i))}",
              flush=True)  # fmt: skip

    _quiet(cfg.threads)
    if workers == 1:
        for i, g in enumerate(todo, 1):
            finished(i, *fit_one(*g, cfg, accelerator))
    else:  # fork: the parent has run no torch op (no thread pool or CUDA context to inherit)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() and accelerator == "cpu" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet, initargs=(cfg.threads,)) as pool:
            futures = [pool.submit(fit_one, *g, cfg, accelerator) for g in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                finished(i, *fut.result())  # a failed run raises here: the study stops, what is done stays
    print(f"study done in {_hms(time.perf_counter() - start)}", flush=True)


TIMING_COLUMNS = ["preset", "method", "rep", "lr", "steps", "ms_per_step", "callback_ms_per_step", "syncs"]


def run_timing(out: Path, cfg: Config, accelerator: str, reps: int = 4, steps: int = 140) -> None:
    """Time per training step of each method in short fits run one at a time in this process, the
    methods interleaved (rotated each repetition) so that a change in the machine's load hits all of
    them alike, and the time inside the callback's training hooks (SimpleProfiler), whose share of the
    step is what the load cannot blur; a first AdamW fit warms up and is discarded. Writes
    lm_study_timing.csv (replaced)."""
    _quiet(cfg.threads)
    short = replace(cfg, max_steps=steps, eval_every=steps, val_windows=16)
    lr = cfg.lrs[len(cfg.lrs) // 2]
    fit_one(BASELINE, lr, 0, short, accelerator, profile=True)  # warm-up
    rows, methods = [], list(cfg.methods)
    for rep in range(reps):
        for m in methods[rep % len(methods):] + methods[: rep % len(methods)]:
            row, _ = fit_one(m, lr, 0, short, accelerator, profile=True)
            rows.append({"preset": cfg.name, "method": m, "rep": rep, "lr": lr, "steps": row["steps_done"],
                         "ms_per_step": row["ms_per_step"], "callback_ms_per_step": row["callback_ms_per_step"],
                         "syncs": row["syncs"]})  # fmt: skip
            print(f"timing rep {rep} {m:9s} {row['ms_per_step']:.1f} ms/step, callback {row['callback_ms_per_step']:.3f}"
                  " ms/step", flush=True)  # fmt: skip
    path = out / "lm_study_timing.csv"
    path.unlink(missing_ok=True)
    append_rows(path, rows, TIMING_COLUMNS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run, a test and not a result (preset `quick`)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default) or gpu")
    p.add_argument("--preset", choices=PRESETS, help="model/data preset (default: cpu, gpu with --accelerator gpu)")
    p.add_argument("--out", type=Path, help="output folder (default docs/, studies/out-quick/ with --quick,"
                   " studies/out-<preset>/ for another preset)")  # fmt: skip
    p.add_argument("--workers", type=int, help="training processes (default 2 on cpu, 1 otherwise)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="subset of the methods")
    p.add_argument("--lrs", nargs="+", type=float, help="override the preset's learning rates")
    p.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    p.add_argument("--report", action="store_true", help="only regenerate tables and figure from the CSVs")
    p.add_argument("--timing", action="store_true",
                   help="also time each method in short interleaved fits, one at a time (lm_study_timing.csv)")
    a = p.parse_args(argv)
    name = a.preset or ("quick" if a.quick else "gpu" if a.accelerator == "gpu" else "cpu")
    cfg = PRESETS[name]
    cfg = replace(cfg, methods=tuple(a.methods or cfg.methods), lrs=tuple(a.lrs or cfg.lrs),
                  seeds=tuple(a.seeds if a.seeds is not None else cfg.seeds))  # fmt: skip
    out = a.out or (ROOT / "docs" if name == "cpu" else HERE / f"out-{name}")
    out.mkdir(parents=True, exist_ok=True)
    if not a.report:
        workers = a.workers or (2 if a.accelerator == "cpu" else 1)
        run_study(out, cfg, a.accelerator, max(1, workers))
    if a.timing:
        run_timing(out, cfg, a.accelerator)
    from lm import report

    report.report(out, cfg, doc=ROOT / "docs" / "lm_study.md" if out == ROOT / "docs" else out / "lm_study.md")


if __name__ == "__main__":
    main()
