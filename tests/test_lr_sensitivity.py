"""examples/lr_sensitivity.py: --quick writes the expected CSV rows and readable PNGs; the
too-small/too-large LRs of the curve figure bracket the baseline's best LR."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.image import imread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import lr_sensitivity as study  # noqa: E402


def test_quick_study_writes_csvs_and_pngs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/lr_sensitivity.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = study.make_runs(quick=True)
    assert sum("ETA" in line for line in proc.stdout.splitlines()) == len(runs)  # one progress line per run

    results = pd.read_csv(tmp_path / "lr_sensitivity.csv")
    assert {"optimizer", "lookahead", "lr", "seed", "val_loss", "val_acc"} <= set(results.columns)
    assert sorted(map(tuple, results[["optimizer", "lookahead", "lr", "seed"]].values.tolist())) == sorted(
        (r.optimizer, r.lookahead, r.lr, r.seed) for r in runs
    )
    assert set(results.lookahead) == {"none", "a0.5", "a0.8"} and set(results.optimizer) == {"sgd", "adam"}
    assert results.val_acc.between(0, 1).all()
    # 8 steps per run: Lookahead (k=5) synced once, the baseline never
    assert (results.syncs == np.where(results.lookahead == "none", 0, 1)).all()

    curves = pd.read_csv(tmp_path / "lr_curves.csv")
    assert len(curves) == len(runs) * study.POINTS_PER_EPOCH
    assert np.isfinite(curves.train_loss).all()

    for name in ("lr_sensitivity.png", "lr_curves.png"):
        image = imread(tmp_path / name)
        assert image.shape[0] > 400 and image.shape[1] > 400
        assert image.std() > 0.05  # not a blank canvas


def test_curve_lrs_bracket_the_baselines_best_lr():
    lrs = np.logspace(-3, 0, 7)  # half-decade grid; the baseline is best at lrs[4] = 0.1
    baseline_loss = [2.3, 1.8, 0.7, 0.3, 0.2, 1.4, 2.3]
    results = pd.DataFrame({"optimizer": "sgd", "lookahead": "none", "lr": lrs, "val_loss": baseline_loss})
    lookahead = results.assign(lookahead="a0.5", val_loss=0.01)  # must not move the choice
    small, large = study.curve_lrs(pd.concat([results, lookahead]), "sgd")
    assert (small, large) == (lrs[2], lrs[5])  # a decade below, half a decade above
