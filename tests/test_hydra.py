"""configs/ through Hydra's compose API: the Lookahead config comes from the package (one copy), Lookahead
is on by default, off with one override, overrides reach the callback, and a bad value fails with the
callback's own ValueError."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lightning_lookahead import LookaheadCallback

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "lightning_lookahead" / "conf"  # the Hydra configs that ship in the wheel
sys.path.insert(0, str(ROOT / "examples"))  # the configs' `_target_: mnist.LitCNN` and train.py live there
import train  # noqa: E402


@pytest.fixture
def make_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            # ${hydra:runtime.output_dir} only exists in a real run
            return compose("train.yaml", overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _make


def test_lookahead_config_comes_from_the_package(make_cfg):
    """The app composes lightning_lookahead/conf/callbacks/lookahead.yaml through hydra.searchpath; no
    config of this repository's app carries a lightning_lookahead `_target_` of its own."""
    assert make_cfg().callbacks.lookahead == OmegaConf.load(PACKAGED / "callbacks" / "lookahead.yaml").lookahead
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


@pytest.mark.parametrize(
    "name, expected",
    [
        ("snoo", dict(k=28, alpha=0.68, outer_momentum=0.37)),
        ("diloco_outer", dict(k=20, alpha=0.7, outer_momentum=0.9)),
    ],
)
def test_outer_momentum_presets_compose_from_the_package_and_instantiate(make_cfg, name, expected):
    """callbacks=snoo / callbacks=diloco_outer: packaged presets of the outer-momentum slow step, one
    `lookahead` entry listing every option of the callback (as lookahead.yaml does), overridable as usual."""
    import inspect

    cfg = make_cfg(f"callbacks={name}")
    assert list(cfg.callbacks) == ["lookahead"]  # the same entry name: one LookaheadCallback, same overrides
    assert cfg.callbacks.lookahead == OmegaConf.load(PACKAGED / "callbacks" / f"{name}.yaml").lookahead
    options = set(inspect.signature(LookaheadCallback).parameters)
    assert set(cfg.callbacks.lookahead) - {"_target_"} == options
    (la,) = _lookaheads(train.instantiate_group(cfg.callbacks))
    assert (la.k, la.alpha, la.outer_momentum, la.nesterov) == (*expected.values(), True)
    assert (la.inner_state, la.eval_weights, la.on_nonfinite) == ("keep", "slow", "warn")
    heavy_ball = make_cfg(f"callbacks={name}", "callbacks.lookahead.nesterov=false")
    (la,) = _lookaheads(train.instantiate_group(heavy_ball.callbacks))
    assert la.nesterov is False and la.outer_momentum == expected["outer_momentum"]
