"""The LM study's --quick smoke run end to end (a subprocess with a hard timeout): a CSV row per method,
finite losses that fall, the syncs each method must have made, the generated tables and figure, and a
rerun that resumes (trains nothing)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "lm_study.py"


def _run(out: Path) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=False,
                          capture_output=True, text=True, timeout=150, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_study(tmp_path: Path) -> None:
    saved = list(sys.path)
    sys.path.insert(0, str(ROOT / "studies"))
    try:
        from lm_study import METHODS, PRESETS  # (it puts studies/ and the checkout on sys.path too)
    finally:
        sys.path[:] = saved
    cfg = PRESETS["quick"]
    out = _run(tmp_path)
    assert f"{len(METHODS)} to do" in out
    runs = pd.read_csv(tmp_path / "lm_study_runs.csv")
    curves = pd.read_csv(tmp_path / "lm_study_curves.csv")
    assert sorted(runs.method) == sorted(METHODS)  # one row per method (1 LR, 1 seed)
    assert (runs.steps_done == cfg.max_steps).all() and not runs.diverged.any()
    assert runs.val_loss.map(math.isfinite).all() and (runs.val_loss < math.log(100)).all()
    for _, r in runs.iterrows():
        assert r.syncs == (cfg.max_steps // r.k if r.k else 0), r.method
        c = curves[curves.method == r.method].sort_values("step")
        assert list(c.step) == list(range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every))
        assert c.val_loss.map(math.isfinite).all()
        assert c.val_loss.iloc[-1] < c.val_loss.iloc[0] - 0.05, r.method  # it learned something
        assert c.val_bpc.iloc[-1] == pytest.approx(r.val_bpc) == pytest.approx(r.val_loss / math.log(2))
    doc = (tmp_path / "lm_study.md").read_text()
    for m in METHODS.values():
        assert m.label in doc
    assert "Headline" in doc and (tmp_path / "lm_study.png").stat().st_size > 10_000
    assert "0 to do" in _run(tmp_path)  # resumes: every (method, lr, seed) is already in the CSV
    assert len(pd.read_csv(tmp_path / "lm_study_runs.csv")) == len(METHODS)
