"""Smoke runs of the example entry points as a user types them (subprocesses, a few steps each):
the Hydra app (single run, toggled off, multirun sweep, bad override) and LightningCLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per subprocess; each takes ~10 s on 2 idle cores


def _run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if ok and proc.returncode != 0:
        pytest.fail(f"{args} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _lookahead_state(ckpt: Path) -> dict | None:
    """The LookaheadCallback's saved counters, or None if the run had no LookaheadCallback."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    return checkpoint["callbacks"].get("LookaheadCallback")


def test_hydra_app_trains_with_lookahead(tmp_path):
    proc = _run("examples/train.py", "trainer.max_steps=3", "callbacks.lookahead.k=2", f"hydra.run.dir={tmp_path}")
    assert "Final validation (slow weights): val/loss=" in proc.stdout.splitlines()[-1]
    state = _lookahead_state(tmp_path / "checkpoints" / "last.ckpt")
    assert state["k"] == 2 and state["steps"] == [3] and state["syncs"] == 1
    assert list((tmp_path / "csv").rglob("metrics.csv"))


def test_hydra_app_without_lookahead(tmp_path):
    proc = _run("examples/train.py", "trainer.max_steps=3", "callbacks=no_lookahead", f"hydra.run.dir={tmp_path}")
    assert "no Lookahead" in proc.stdout.splitlines()[-1]
    assert _lookahead_state(tmp_path / "checkpoints" / "last.ckpt") is None


def test_hydra_multirun_sweeps_k_and_alpha(tmp_path):
    _run("examples/train.py", "-m", "callbacks.lookahead.k=2,3", "callbacks.lookahead.alpha=0.8",
         "trainer.max_steps=3", "data=digits", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    states = [_lookahead_state(tmp_path / str(i) / "checkpoints" / "last.ckpt") for i in range(2)]
    assert [(s["k"], s["alpha"]) for s in states] == [(2, 0.8), (3, 0.8)]


def test_hydra_bad_override_prints_the_callbacks_message(tmp_path):
    proc = _run("examples/train.py", "callbacks.lookahead.k=0", f"hydra.run.dir={tmp_path}", ok=False)
    assert proc.returncode != 0
    assert "Invalid configuration: Lookahead `k` must be an int >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "InstantiationException" not in proc.stderr


CLI_FLAGS = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--data.dataset=digits"]


@pytest.mark.parametrize(
    "args",
    [
        ["--trainer.callbacks+=lightning_lookahead.LookaheadCallback", "--trainer.callbacks.k=2"],
        ["--config", "examples/cli_config.yaml", "--trainer.callbacks.k=2"],
    ],
    ids=["flags", "yaml"],
)
def test_lightning_cli_fit_with_lookahead(tmp_path, args):
    _run("examples/cli.py", "fit", *args, *CLI_FLAGS, f"--trainer.default_root_dir={tmp_path}")
    ckpts = list(tmp_path.rglob("*.ckpt"))  # epoch=0-step=3.ckpt (flags) or last.ckpt (yaml: val/acc not logged yet)
    assert ckpts
    for ckpt in ckpts:
        state = _lookahead_state(ckpt)
        assert state["k"] == 2 and state["syncs"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.callbacks+=lightning_lookahead.LookaheadCallback", "--trainer.callbacks.k=0"],
         "Lookahead `k` must be an int >= 1 (optimizer steps per sync), got 0"),
        (["--config", "examples/cli_config.yaml", "--trainer.callbacks.alpha=2"],
         "Lookahead `alpha` must be a finite float in (0, 1], got 2.0"),
    ],
    ids=["flags_k", "yaml_alpha"],
)  # fmt: skip
def test_lightning_cli_bad_value_ends_with_the_callbacks_message(tmp_path, args, message):
    """Like a type error: usage, then one `error:` line naming the argument and its range; exit 2."""
    proc = _run("examples/cli.py", "fit", *args, *CLI_FLAGS, f"--trainer.default_root_dir={tmp_path}", ok=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f'error: Parser key "trainer.callbacks": LookaheadCallback: {message}'
    assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr


def test_lookahead_error_reads_the_chain_or_the_listed_errors():
    sys.path.insert(0, str(ROOT / "examples"))
    from cli import lookahead_error

    ours = ValueError("Lookahead `k` must be an int >= 1 (optimizer steps per sync), got 0")
    try:
        raise ValueError("Does not validate against any of the Union subtypes") from ours
    except ValueError as err:
        assert lookahead_error(err) == str(ours)
    listed = ValueError(f"Does not validate against any of the Union subtypes\nErrors:\n  - {ours}\n  - Other error")
    assert lookahead_error(listed) == str(ours)
    assert lookahead_error(ValueError("Does not validate against any of the Union subtypes")) is None
