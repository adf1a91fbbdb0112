"""configs/ through Hydra's compose API: the Lookahead config comes from the package (one copy), Lookahead
is on by default, off with one override, overrides reach the callback, a bad value fails with the
callback's own ValueError, and the presets and the off switch change the `lookahead` entry only (the other
callbacks keep their settings, on the command line and in a sweep)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lightning_lookahead import LookaheadCallback

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "lightning_lookahead" / "conf"  # the Hydra configs that ship in the wheel
sys.path.insert(0, str(ROOT / "examples"))  # the configs' `_target_: mnist.LitCNN` and train.py live there
train = importlib.import_module("train")


@pytest.fixture
def make_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            # ${hydra:runtime.output_dir} only exists in a real run
            return compose("train.yaml", overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _make


def test_lookahead_config_comes_from_the_package(make_cfg):
    """The app composes lightning_lookahead/conf/callbacks/lookahead/default.yaml through hydra.searchpath; no
    config of this repository's app carries a lightning_lookahead `_target_` of its own."""
    assert make_cfg().callbacks.lookahead == OmegaConf.load(PACKAGED / "callbacks" / "lookahead" / "default.yaml")
    assert OmegaConf.load(ROOT / "configs" / "train.yaml").hydra.searchpath == ["pkg://lightning_lookahead.conf"]
    copies = [p for p in (ROOT / "configs").rglob("*.yaml") if "_target_: lightning_lookahead." in p.read_text()]
    assert not copies, f"keep the callback configs in {PACKAGED} only: {copies}"


def _lookaheads(callbacks: list) -> list[LookaheadCallback]:
    return [c for c in callbacks if isinstance(c, LookaheadCallback)]


def test_lookahead_on_by_default(make_cfg, tmp_path):
    callbacks = train.instantiate_group(make_cfg().callbacks)
    (la,) = _lookaheads(callbacks)
    assert (la.k, la.alpha, la.inner_state, la.eval_weights) == (5, 0.5, "keep", "slow")
    (ckpt,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"


@pytest.mark.parametrize("override", ["callbacks=no_lookahead", "~callbacks.lookahead"])
def test_lookahead_off_with_one_override(make_cfg, override):
    callbacks = train.instantiate_group(make_cfg(override).callbacks)
    assert not _lookaheads(callbacks)
    assert any(isinstance(c, ModelCheckpoint) for c in callbacks)  # the other callbacks stay


def test_overrides_reach_the_callback(make_cfg):
    cfg = make_cfg("callbacks.lookahead.k=10", "callbacks.lookahead.alpha=0.8", "callbacks.lookahead.inner_state=pullback")
    (la,) = _lookaheads(train.instantiate_group(cfg.callbacks))
    assert (la.k, la.alpha, la.inner_state) == (10, 0.8, "pullback")


def test_build_wires_model_data_trainer(make_cfg):
    datamodule, model, trainer = train.build(make_cfg("data=digits", "optimizer=adam", "optimizer.lr=0.01"))
    assert datamodule.hparams.dataset == "digits"
    assert (model.hparams.optimizer, model.hparams.lr) == ("adam", 0.01)
    assert len(_lookaheads(trainer.callbacks)) == 1
    assert any(isinstance(lg, CSVLogger) for lg in trainer.loggers)


@pytest.mark.parametrize(
    "override, message",
    [
        ("callbacks.lookahead.k=0", "`k` must be an int >= 1"),
        ("callbacks.lookahead.alpha=1.5", r"`alpha` must be a finite float in \(0, 1\]"),
        ("callbacks.lookahead.inner_state=foo", "`inner_state` must be one of"),
    ],
)
def test_bad_override_raises_the_callbacks_value_error(make_cfg, override, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        train.build(make_cfg(override))
    assert type(excinfo.value) is ValueError  # not wrapped in hydra's InstantiationException
    assert excinfo.value.__suppress_context__


def test_default_config_lists_every_option_at_its_default(make_cfg):
    """lookahead.yaml promises every option of the callback at its default: a new argument must appear there."""
    import inspect

    cfg = make_cfg()
    params = inspect.signature(LookaheadCallback).parameters
    entry = OmegaConf.to_container(cfg.callbacks.lookahead)
    assert set(entry) - {"_target_"} == set(params)
    assert {name: entry[name] for name in params} == {name: p.default for name, p in params.items()}


PRESETS = {
    "snoo": {"k": 28, "alpha": 0.68, "outer_momentum": 0.37},
    "diloco_outer": {"k": 20, "alpha": 0.7, "outer_momentum": 0.9},
}


def _without_lookahead(callbacks: DictConfig) -> dict:
    """The callbacks node minus its `lookahead` entry, resolved (interpolations such as the checkpoint's
    ${paths.output_dir} compared by value)."""
    return {name: node for name, node in OmegaConf.to_container(callbacks, resolve=True).items() if name != "lookahead"}


@pytest.mark.parametrize("form", ["callbacks/lookahead={}", "callbacks={}"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_outer_momentum_presets_compose_from_the_package_and_instantiate(make_cfg, name, form):
    """callbacks/lookahead=snoo (or callbacks=snoo) / diloco_outer: packaged presets of the outer-momentum
    slow step, one `lookahead` entry listing every option of the callback (as the default does), overridable
    as usual; only that entry differs from the default callbacks."""
    import inspect

    expected = PRESETS[name]
    cfg = make_cfg(form.format(name))
    assert list(cfg.callbacks) == list(make_cfg().callbacks)  # the same entries: one LookaheadCallback, same overrides
    assert cfg.callbacks.lookahead == OmegaConf.load(PACKAGED / "callbacks" / "lookahead" / f"{name}.yaml")
    options = set(inspect.signature(LookaheadCallback).parameters)
    assert set(cfg.callbacks.lookahead) - {"_target_"} == options
    (la,) = _lookaheads(train.instantiate_group(cfg.callbacks))
    assert (la.k, la.alpha, la.outer_momentum, la.nesterov) == (*expected.values(), True)
    assert (la.inner_state, la.eval_weights, la.on_nonfinite) == ("keep", "slow", "warn")
    heavy_ball = make_cfg(form.format(name), "callbacks.lookahead.nesterov=false")
    (la,) = _lookaheads(train.instantiate_group(heavy_ball.callbacks))
    assert la.nesterov is False and la.outer_momentum == expected["outer_momentum"]


def _check_other_callbacks(callbacks: list, tmp_path: Path) -> None:
    """configs/callbacks/default.yaml's checkpointing, summary and progress bar, with their settings."""
    (ckpt,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"
    assert (ckpt.monitor, ckpt.mode, ckpt.save_last, ckpt.filename) == ("val/acc", "max", True, "epoch_{epoch:03d}")
    assert ckpt.auto_insert_metric_name is False
    (summary,) = [c for c in callbacks if isinstance(c, ModelSummary)]
    assert summary._max_depth == -1
    (bar,) = [c for c in callbacks if isinstance(c, TQDMProgressBar)]
    assert bar.refresh_rate == 10


@pytest.mark.parametrize("override", ["callbacks/lookahead=snoo", "callbacks=snoo"])
def test_preset_keeps_the_other_callbacks_and_their_settings(make_cfg, tmp_path, override):
    """Issue 16, item 8: `callbacks=snoo` used to replace the whole callbacks node, dropping the app's
    checkpointing (monitor, last.ckpt, file names), model summary and progress bar."""
    cfg = make_cfg(override)
    assert _without_lookahead(cfg.callbacks) == _without_lookahead(make_cfg().callbacks)
    callbacks = train.instantiate_group(cfg.callbacks)
    _check_other_callbacks(callbacks, tmp_path)
    (la,) = _lookaheads(callbacks)
    assert (la.k, la.alpha, la.outer_momentum) == tuple(PRESETS["snoo"].values())
    # and the other entries stay overridable next to the preset (this used to fail: no progress_bar entry)
    quiet = make_cfg(override, "callbacks.progress_bar=null", "callbacks.model_checkpoint.monitor=val/loss")
    assert quiet.callbacks.progress_bar is None and quiet.callbacks.model_checkpoint.monitor == "val/loss"


@pytest.mark.parametrize("override", ["callbacks/lookahead=none", "callbacks=no_lookahead", "~callbacks.lookahead"])
def test_off_switch_removes_only_lookahead(make_cfg, tmp_path, override):
    cfg = make_cfg(override)
    assert cfg.callbacks.get("lookahead") is None  # null (none, no_lookahead) or deleted (~)
    assert _without_lookahead(cfg.callbacks) == _without_lookahead(make_cfg().callbacks)
    callbacks = train.instantiate_group(cfg.callbacks)
    assert not _lookaheads(callbacks)
    _check_other_callbacks(callbacks, tmp_path)
    assert len(callbacks) == len(train.instantiate_group(make_cfg().callbacks)) - 1


def _sweep(make_cfg, *overrides: str) -> list[DictConfig]:
    """The configs of the jobs of `python examples/train.py -m <overrides>`: Hydra's BasicSweeper splits the
    sweep into jobs' overrides exactly so, and each job composes them."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [make_cfg(*job) for job in batch]


@pytest.mark.parametrize(
    "sweep, expected_k",
    [
        ("callbacks=default,snoo,diloco_outer,no_lookahead", [5, 28, 20, None]),
        ("callbacks/lookahead=default,snoo,diloco_outer,none", [5, 28, 20, None]),
    ],
)
def test_sweep_over_presets_compares_like_with_like(make_cfg, sweep, expected_k):
    """`-m callbacks=default,snoo` used to compare a checkpointing run with one without checkpoints: now
    every job has the same non-Lookahead callbacks, and only the `lookahead` entry differs."""
    jobs = _sweep(make_cfg, sweep)
    others = [_without_lookahead(job.callbacks) for job in jobs]
    assert all(other == others[0] for other in others), others
    assert set(others[0]) == {"model_checkpoint", "model_summary", "progress_bar"}
    assert [job.callbacks.lookahead.k if job.callbacks.lookahead else None for job in jobs] == expected_k


@pytest.mark.timeout(300)
def test_hydra_app_checkpoints_under_the_snoo_preset(tmp_path):
    """A real run of examples/train.py (a few steps) under `callbacks=snoo`: the app's ModelCheckpoint
    (monitor val/acc, last.ckpt) is really there, and so is SNOO's Lookahead; `callbacks.progress_bar=null`
    next to the preset (which used to fail) is accepted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package configs, whatever is installed
    args = ["callbacks=snoo", "callbacks.lookahead.k=2", "callbacks.progress_bar=null", "trainer.max_steps=3",
            "data=digits", "logger=csv", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "examples/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=280, check=False)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Final validation (slow weights): val/loss=" in proc.stdout.splitlines()[-1]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["callbacks"]["LookaheadCallback"]
    assert (state["k"], state["alpha"], state["outer_momentum"], state["syncs"]) == (2, 0.68, 0.37, 1)
    (ckpt_key,) = [key for key in checkpoint["callbacks"] if key.startswith("ModelCheckpoint")]
    assert "'monitor': 'val/acc'" in ckpt_key and "'mode': 'max'" in ckpt_key
