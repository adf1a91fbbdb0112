"""Lookahead's values in ``trainer.callback_metrics`` (and the progress bar with ``prog_bar=True``):
monitorable by EarlyStopping and ModelCheckpoint, updated with the logger rows, never faked."""

from __future__ import annotations

import pytest
from conftest import RegressionModule, loader, trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_lookahead import LookaheadCallback


class Probe(Callback):
    """Reads trainer.callback_metrics after every training batch (callbacks run in list order)."""

    def __init__(self, lookahead: LookaheadCallback) -> None:
        self.lookahead, self.seen, self.counts = lookahead, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(trainer.callback_metrics["lookahead/syncs"]))
        self.counts.append(self.lookahead.lookahead.syncs)


@pytest.mark.parametrize("every", [1, 4])
def test_syncs_in_callback_metrics_follow_the_logger_rows(every):
    cb = LookaheadCallback(k=2)
    probe = Probe(cb)
    t = trainer(max_steps=12, callbacks=[cb, probe], log_every_n_steps=every)
    t.fit(RegressionModule(), loader())
    # the current count from the first batch on, updated at the logging cadence when a sync happened
    expected, shown = [], 0.0
    for step, count in enumerate(probe.counts, start=1):
        if step % every == 0:
            shown = float(count)
        expected.append(shown)
    assert probe.seen == expected
    assert probe.seen[-1] == 6.0 and "lookahead/syncs" not in t.progress_bar_metrics
    assert "lookahead/rel_distance" not in t.callback_metrics  # no logger, no prog_bar: not measured


def test_model_checkpoint_monitors_syncs(tmp_path):
    """The key exists before the first sync (k larger than an epoch), so ModelCheckpoint finds it."""
    cb = LookaheadCallback(k=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="lookahead/syncs", mode="max", save_top_k=1, filename="{epoch}")
    t = trainer(max_epochs=3, callbacks=[cb, ckpt], log_every_n_steps=1, enable_checkpointing=True)
    t.fit(RegressionModule(), loader(), loader())
    assert float(ckpt.best_model_score) == 2.0  # 18 steps, k=8: syncs 0, 1, 2 at the epoch ends
    assert ckpt.best_model_path.endswith("epoch=2.ckpt")


@pytest.mark.parametrize(("k", "stops"), [(100, True), (2, False)])
def test_early_stopping_monitors_syncs(k, stops):
    cb = LookaheadCallback(k=k)
    stop = EarlyStopping(monitor="lookahead/syncs", mode="max", patience=1, check_on_train_epoch_end=True)
    t = trainer(max_epochs=5, callbacks=[cb, stop], log_every_n_steps=1)
    t.fit(RegressionModule(), loader())
    assert (t.current_epoch < 5) == stops  # no new sync is no improvement; a new sync is one


def test_prog_bar_shows_syncs_and_distance_not_as_logger_rows(tmp_path):
    cb = LookaheadCallback(k=2, prog_bar=True)
    t = trainer(max_steps=6, callbacks=[cb], log_every_n_steps=1, logger=CSVLogger(tmp_path))
    t.fit(RegressionModule(), loader())
    bar = t.progress_bar_metrics
    assert bar["lookahead/syncs"] == 3.0 and bar["lookahead/rel_distance"] > 0
    assert float(t.callback_metrics["lookahead/rel_distance"]) == bar["lookahead/rel_distance"]
    assert not any(key.startswith("lookahead/") for key in t.logged_metrics)  # rows come from our own path


def test_prog_bar_measures_the_distance_without_a_logger():
    cb = LookaheadCallback(k=2, prog_bar=True)
    t = trainer(max_steps=4, callbacks=[cb], log_every_n_steps=1)
    t.fit(RegressionModule(), loader())
    assert t.progress_bar_metrics["lookahead/rel_distance"] > 0


def test_bad_prog_bar_value_names_the_argument():
    with pytest.raises(ValueError, match="`prog_bar` must be a bool"):
        LookaheadCallback(prog_bar="yes")


def test_distance_is_measured_only_on_the_syncs_a_row_records(tmp_path, monkeypatch):
    """k=2, a row every 10 steps: of the syncs at steps 2, 4, ..., 30 only those at 10, 20, 30 (the
    last before each row) measure ||theta - phi||, and each row carries a distance."""
    import csv

    from lightning_lookahead.slow_weights import SlowWeights

    measured = []
    original = SlowWeights.sync

    def spy(self, measure=False, device_side=True):
        measured.append(measure)
        return original(self, measure, device_side)

    monkeypatch.setattr(SlowWeights, "sync", spy)
    cb = LookaheadCallback(k=2, alpha=0.5)
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(max_epochs=5, callbacks=[cb], logger=logger, log_every_n_steps=10).fit(RegressionModule("sgd"), loader())
    assert len(measured) == 15  # 30 steps, k=2
    assert [i for i, m in enumerate(measured) if m] == [4, 9, 14]  # the syncs at steps 10, 20, 30
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lookahead/rel_distance")]
    assert [int(r["step"]) for r in rows] == [9, 19, 29] and all(float(r["lookahead/rel_distance"]) > 0 for r in rows)
