"""studies/worker_groups_study.py's report (tables, checks, the write-up's generated section, the
figure) from a tiny CSV written here: nothing is trained and no process is launched."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import worker_groups_study as study

P = 38_282  # float32 parameters of examples/mnist.py's CNN


def _row(config: str, seed: int, acc: float, inter: float, intra: float, **kw) -> dict:
    """A CSV row as the grid writes it (512 steps, 4 CPU processes); bytes per step given by hand."""
    c = study.CONFIGS[config]
    local = c.ranks_per_worker is not None
    row = {
        "config": config, "workers": c.workers(4), "ranks_per_worker": c.ranks_per_worker or "",
        "k": c.k if local else "", "average_precision": c.precision if local else "",
        "local_sgd_start": c.start(512) if local else "", "seed": seed, "steps": 512, "devices": 4,
        "accelerator": "cpu", "val_acc": acc, "val_loss": 1 - acc, "inter_bytes": inter * 512,
        "intra_bytes": intra * 512, "inter_bytes_per_step": inter, "intra_bytes_per_step": intra,
        "logged_inter_per_step": inter if local else "nan", "logged_intra_per_step": intra if local else "nan",
        "syncs": 512 // c.k if local else 0, "averaged": 512 // c.k if local else 0, "ranks_identical": True,
        "fit_seconds": 10.0 + seed, "run_seconds": 30.0, "n_params": P,
    }  # fmt: skip
    row.update(kw)
    return row


def _rows() -> list[dict]:
    # the bytes written out from the design: DDP P x 4 per step; 2x2 k=16: a half slice (P/2 x 4 bytes)
    # per sync across, the gradients (P x 4) every step plus the half slice per sync inside; 4x1 k=4:
    # all of P x 4 per sync; bf16: half the bytes across; warm-up: 64 steps of world-wide gradients (4P
    # bytes each), then 2x2 (28 syncs of a half slice, 2P bytes, each way)
    return [
        _row("ddp", 0, 0.950, 153_128, 0),
        _row("ddp", 1, 0.954, 153_128, 0),
        _row("2x2 k=16", 0, 0.950, 4_785.25, 157_913.25),
        _row("2x2 k=16", 1, 0.970, 4_785.25, 157_913.25),
        _row("4x1 k=4", 0, 0.900, 38_282, 0),
        _row("4x1 k=4", 1, 0.910, 38_282, 0),
        _row("2x2 k=16 bf16", 0, 0.940, 2_392.625, 157_913.25),
        _row("2x2 k=16 warm-up", 0, 0.960, (64 * 4 * P + 28 * 2 * P) / 512, (448 * 4 * P + 28 * 2 * P) / 512),
    ]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, study.FIELDS)
        w.writeheader()
        w.writerows(rows)


def test_tables_give_means_spreads_ratios_and_differences_from_the_csv(tmp_path):
    _write_csv(tmp_path / "s.csv", _rows())
    text = study.report(study.read_rows(tmp_path / "s.csv"))
    lines = text.splitlines()
    assert "8 runs: 5 configurations x seeds [0, 1]; 512 optimizer steps each; 4 x cpu processes" in text
    table = [line for line in lines if line.startswith("| ") and " k=" in line or line.startswith("| ddp |")]
    # configurations in the study's order, each row: bytes, ratio to DDP, mean ± sample std, per seed, fit s
    assert table[:5] == [
        "| ddp | DDP over 4 | 153,128 | 1 | 0 | 0.9520 ± 0.0028 | 0.0480 ± 0.0028 | 0.9500 / 0.9540 | 10.5 | 30.0 |",
        "| 2x2 k=16 | 2x2 | 4,785 | 1/32 | 157,913 | 0.9600 ± 0.0141 | 0.0400 ± 0.0141 | 0.9500 / 0.9700 | 10.5 | 30.0 |",
        "| 4x1 k=4 | 4x1 | 38,282 | 1/4 | 0 | 0.9050 ± 0.0071 | 0.0950 ± 0.0071 | 0.9000 / 0.9100 | 10.5 | 30.0 |",
        "| 2x2 k=16 bf16 | 2x2 | 2,393 | 1/64 | 157,913 | 0.9400 ± 0.0000 | 0.0600 ± 0.0000 | 0.9400 | 10.0 | 30.0 |",
        "| 2x2 k=16 warm-up | 2x2 | 23,328 | 1/7 | 138,174 | 0.9600 ± 0.0000 | 0.0400 ± 0.0000 | 0.9600 | 10.0 | 30.0 |",
    ]
    # differences to DDP in points, with the larger of the two seed spreads beside them
    assert "| 2x2 k=16 | +0.80 | 1.41 |" in lines
    assert "| 4x1 k=4 | -4.70 | 0.71 |" in lines
    assert "| 2x2 k=16 bf16 | -1.20 | 0.28 |" in lines
    assert "- 8/8 runs ended with bit-identical weights on every rank (SHA-1 of the weights)" in lines
    assert "- measured bytes per step = the design's prediction (P = 38282 float32 values) in 8/8 runs" in lines
    assert any(line.startswith("- the callback's logged") and "in 6/6 local-SGD runs" in line for line in lines)
    assert "- syncs = steps / k in 6/6 local-SGD runs" in lines
    assert "NOT in" not in text


def test_checks_name_the_runs_that_break_them(tmp_path):
    rows = _rows()
    # 2x2 k=16 seed 1: twice the bytes across, and the ranks differ; 4x1 k=4 seed 0: a wrong logged value and sync count
    rows[3].update(inter_bytes_per_step=9_570.5, ranks_identical=False)
    rows[4].update(logged_intra_per_step=1.0, syncs=127)
    _write_csv(tmp_path / "s.csv", rows)
    lines = study.report(study.read_rows(tmp_path / "s.csv")).splitlines()
    assert "- 7/8 runs ended with bit-identical weights on every rank (SHA-1 of the weights)" in lines
    assert any(line.endswith("in 7/8 runs; NOT in: 2x2 k=16 seed 1") for line in lines)
    assert any(line.startswith("- the callback's logged") and line.endswith("in 4/6 local-SGD runs; NOT in: 2x2 k=16 seed 1,"
               " 4x1 k=4 seed 0") for line in lines)  # fmt: skip
    assert "- syncs = steps / k in 5/6 local-SGD runs; NOT in: 4x1 k=4 seed 0" in lines


def test_the_write_up_keeps_its_prose_and_gets_the_figure(tmp_path):
    _write_csv(tmp_path / "s.csv", _rows())
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nprose before\n\n{study.BEGIN}\nstale table\n{study.END}\n\nthe reading\n")
    study.make_report(tmp_path / "s.csv", doc, tmp_path / "fig.png")
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose before\n\n" + study.BEGIN)
    assert text.endswith(f"{study.END}\n\nthe reading\n")
    assert "stale table" not in text and "| 2x2 k=16 bf16 | 2x2 | 2,393 |" in text
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the GENERATED markers"):
        study.write_doc(doc, "x")
    with pytest.raises(ValueError, match="no rows"):
        study.report([])
