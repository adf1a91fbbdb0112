"""studies/lr_sensitivity.py: --quick writes the expected CSV rows and readable PNGs; the
too-small/too-large LRs of the curve figure bracket the baseline's best LR.

studies/outer_momentum_study.py: --quick runs end to end (CSV columns, syncs, curves, PNGs) and
resumes; steps-to-target, best LR and compute factor on synthetic numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
sys.path.insert(1, str(ROOT / "examples"))  # mnist.py
import lr_sensitivity as study  # noqa: E402
import outer_momentum_metrics as om  # noqa: E402
import outer_momentum_study as oms  # noqa: E402


def test_quick_study_writes_csvs_and_pngs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "studies/lr_sensitivity.py", "--quick", "--out", str(tmp_path)],
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


# ---------------------------------------------------------------- studies/outer_momentum_study.py


def test_outer_momentum_quick_study_end_to_end_and_resume(tmp_path):
    cmd = [sys.executable, "studies/outer_momentum_study.py", "--quick", "--out", str(tmp_path), "--workers", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = oms.make_runs(quick=True)
    assert {r.method for r in runs} == set(oms.METHODS) and {r.optimizer for r in runs} == set(oms.OPTIMIZERS)
    assert sum(line.startswith("[run ") and "ETA" in line for line in proc.stdout.splitlines()) == len(runs)

    cfg = oms.QUICK
    results = pd.read_csv(tmp_path / "outer_momentum_study.csv")
    assert list(results.columns) == oms.study_columns(cfg)
    assert sorted(oms.run_key(*r) for r in results[["optimizer", "method", "lr", "seed"]].itertuples(index=False)) \
        == sorted(r.key for r in runs)  # fmt: skip
    assert (results.steps_done == cfg.max_steps).all() and not results.diverged.any()
    assert results.val_acc.between(0, 1).all() and np.isfinite(results.val_loss).all()
    # syncs = steps // k (k=5: 8, k=20: 2), none without Lookahead; momentum only where asked
    expected_syncs = [cfg.max_steps // k if k else 0 for k in results.k]
    assert results.syncs.tolist() == expected_syncs
    assert set(results[results.method.str.startswith("snoo")].outer_momentum) == {0.9}
    assert set(results[~results.method.str.startswith("snoo")].outer_momentum) == {0.0}

    curves = pd.read_csv(tmp_path / "outer_momentum_curves.csv")
    assert list(curves.columns) == oms.CURVE_COLUMNS
    for run in results.itertuples(index=False):
        c = curves[(curves.optimizer == run.optimizer) & (curves.method == run.method) & (curves.seed == run.seed)]
        assert c.step.tolist() == list(range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every))
        assert c.val_acc.iloc[-1] == pytest.approx(run.val_acc)  # the final row is the last evaluation
        for t in cfg.targets:  # the CSV's steps-to-target agree with the curve
            got = getattr(run, om.target_column(t))
            want = om.steps_to_target(c.step.tolist(), c.val_acc.tolist(), t)
            assert (np.isnan(got) and want is None) or got == want

    for name in ("outer_momentum_study.png", "outer_momentum_steps.png", "outer_momentum_curves.png"):
        image = imread(tmp_path / name)
        assert image.shape[0] > 400 and image.shape[1] > 400 and image.std() > 0.05
    assert "| method |" in (tmp_path / "outer_momentum_tables.md").read_text()

    # resumable: a second call finds every run done and trains nothing
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(runs)} already in" in again.stdout and "[run " not in again.stdout
    assert len(pd.read_csv(tmp_path / "outer_momentum_study.csv")) == len(runs)
    assert len(pd.read_csv(tmp_path / "outer_momentum_curves.csv")) == len(curves)


def test_steps_to_target_on_a_synthetic_curve():
    steps = list(range(60, 961, 60))
    accs = [1 - 0.9 * math.exp(-s / 200) for s in steps]  # crosses 0.95 at s = 200 ln 18 = 578.1
    assert om.steps_to_target(steps, accs, 0.95) == 600  # first evaluation at or after the crossing
    assert om.steps_to_target(steps, accs, accs[3]) == 240  # reaching the target exactly counts
    assert om.steps_to_target(steps, accs, 0.999) is None  # never reached
    assert om.steps_to_target(steps, accs, 0.0) == 60
    dip = [0.5, 0.96, 0.7, 0.97]  # first crossing counts even if the curve falls back
    assert om.steps_to_target([10, 20, 30, 40], dip, 0.95) == 20
    assert om.steps_to_target([10, 20, 30], [math.nan, 0.99, 0.99], 0.9) == 20  # NaN never reaches
    assert om.steps_to_target([], [], 0.9) is None
    with pytest.raises(ValueError, match="increasing"):
        om.steps_to_target([20, 10], [0.1, 0.2], 0.9)
    assert om.target_column(0.95) == "steps_to_95" and om.target_column(0.9) == "steps_to_90"


def test_best_lr_and_compute_factor_on_synthetic_results():
    nan = math.nan
    rows = []
    for method, lr, per_seed in [
        ("plain", 0.01, [600, 660, 540]), ("plain", 0.1, [300, nan, 240]),  # 0.1 faster but one seed fails
        ("fast", 0.01, [240, 300, 360]), ("fast", 0.1, [nan, nan, nan]),
    ]:  # fmt: skip
        rows += [dict(optimizer="sgd", method=method, lr=lr, seed=s, steps_to_95=v, val_acc=0.96, val_loss=0.1)
                 for s, v in enumerate(per_seed)]  # fmt: skip
    results = pd.DataFrame(rows)
    plain = results[results.method == "plain"]
    assert om.best_lr_by_steps(plain, "steps_to_95") == 0.01  # an LR counts only if every seed reached
    assert om.best_lr_by_steps(results[(results.method == "fast") & (results.lr == 0.1)], "steps_to_95") is None
    assert om.fmt_steps(plain[plain.lr == 0.01].steps_to_95) == "600±60"
    assert om.fmt_steps(plain[plain.lr == 0.1].steps_to_95) == "270 (2/3)"
    assert om.fmt_steps(pd.Series([nan, nan])) == om.NOT_REACHED
    table = om.headline_table(results, "sgd", ["plain", "fast"], [0.95], "plain")
    assert "| fast | 300±60 (0.01) | 2.00× |" in table  # 600 / 300
    assert "| plain | 600±60 (0.01) | 1.00× |" in table


def test_resume_drops_curve_rows_of_an_unfinished_run(tmp_path):
    cfg = oms.QUICK
    study_csv, curves_csv = tmp_path / "s.csv", tmp_path / "c.csv"
    done = dict.fromkeys(oms.study_columns(cfg), 0) | dict(optimizer="sgd", method="plain", lr=0.01, seed=0)
    pd.DataFrame([done]).to_csv(study_csv, index=False)
    curve = dict(optimizer="sgd", method="plain", lr=0.01, seed=0, step=20, val_loss=1.0, val_acc=0.5, train_loss=1.0)
    orphan = curve | dict(method="la_k5_a0.5")  # its study row was never written (a crash in between)
    pd.DataFrame([curve, orphan]).to_csv(curves_csv, index=False)
    assert oms._done_keys(study_csv, curves_csv, cfg) == {oms.run_key("sgd", "plain", 0.01, 0)}
    assert pd.read_csv(curves_csv).method.tolist() == ["plain"]
