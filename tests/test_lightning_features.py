"""LookaheadCallback played against the Lightning features real projects combine it with: frozen
and partially optimised parameters, fine-tuning callbacks, tuners, weight-averaging callbacks,
re-created optimizers, end-of-training exports, finished-run resumes, pickling, logging cadence.

Every expected value comes from a plain loop written here or from Lightning's own behaviour,
never from the callback's output."""

from __future__ import annotations

import copy
import csv
import pickle
import warnings

import lightning as L
import pytest
import torch
from conftest import RegressionModule, loader, make_net, reference_lookahead, trainer
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    EMAWeightAveraging,
    LearningRateFinder,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from test_eval_and_checkpoints import StatefulLoader
from torch import nn

from lightning_lookahead import LookaheadCallback
from lightning_lookahead.callback import CHECKPOINT_KEY


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def plain_lookahead(net: nn.Module, trainable, make_opt, k: int, alpha: float, n_batches: int, switch=None):
    """Algorithm 1 over ``trainable`` only (the other parameters never change): returns (fast,
    slow). ``switch=(batch, make_opt2)`` replaces the optimizer before that batch, keeping phi."""
    opt = make_opt(trainable)
    slow = [p.detach().clone() for p in trainable]
    batches = list(loader())
    steps = 0
    for b in range(n_batches):
        if switch is not None and b == switch[0]:
            opt = switch[1](trainable)
        x, y = batches[b % len(batches)]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        steps += 1
        if steps % k == 0:
            with torch.no_grad():
                for p, s in zip(trainable, slow):
                    s.add_(alpha * (p - s))
                    p.copy_(s)
    return [p.detach().clone() for p in trainable], slow


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=0.02)


def _quiet_fit(t: L.Trainer, *args, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(*args, **kwargs)


# ----------------------------------------------------------------- frozen and partially optimised
class Partial(RegressionModule):
    """``frozen``: net.0 frozen, optimizer over the rest; ``frozen_in_optimizer``: net.0 frozen but
    in the optimizer; ``subset``: nothing frozen, the optimizer updates net.2 only."""

    def __init__(self, mode: str) -> None:
        super().__init__("sgd")
        self.mode = mode
        if mode != "subset":
            self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        if self.mode == "frozen":
            return sgd([p for p in self.parameters() if p.requires_grad])
        if self.mode == "subset":
            return sgd(self.net[2].parameters())
        return sgd(self.parameters())


@pytest.mark.parametrize("mode", ["frozen", "frozen_in_optimizer", "subset"])
def test_frozen_and_partially_optimised_parameters_checkpoint_and_resume(tmp_path, mode):
    model = Partial(mode)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = LookaheadCallback(k=4, alpha=0.5)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer(max_epochs=2, enable_checkpointing=True, callbacks=[cb, ckpt_cb]).fit(model, loader())

    net = make_net()
    net[0].requires_grad_(False)
    fast_ref, slow_ref = plain_lookahead(net, list(net[2].parameters()), sgd, 4, 0.5, n_batches=12)
    for name in ("net.0.weight", "net.0.bias"):
        assert torch.equal(getattr(model.net[0], name.split(".")[-1]), first[name])  # never updated
    torch.testing.assert_close(_flat(model.net[2].parameters()), _flat(slow_ref), atol=1e-6, rtol=0)

    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    assert set(ckpt[CHECKPOINT_KEY]["fast"]) == {"net.2.weight", "net.2.bias"}
    assert torch.equal(ckpt["state_dict"]["net.0.weight"], first["net.0.weight"])  # saved as it is
    torch.testing.assert_close(ckpt["state_dict"]["net.2.weight"], slow_ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ckpt[CHECKPOINT_KEY]["fast"]["net.2.weight"], fast_ref[0], atol=1e-6, rtol=0)

    # resume from the end of epoch 0 (mid k-cycle: 6 % 4 != 0) equals the uninterrupted run
    resumed, cb2 = Partial(mode), LookaheadCallback(k=4, alpha=0.5)
    _quiet_fit(trainer(max_epochs=2, callbacks=[cb2]), resumed, loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert torch.equal(_flat(resumed.parameters()), _flat(model.parameters()))
    assert torch.equal(_flat(cb2.lookahead.tensors()["fast"].values()), _flat(cb.lookahead.tensors()["fast"].values()))


class Backbone(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return sgd([p for p in self.parameters() if p.requires_grad])


class ParamsAtEpochStart(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_backbone_finetuning_checkpoints_and_resumes_with_fast_weights(tmp_path):
    """BackboneFinetuning unfreezes the backbone at epoch 1 (it joins Lookahead at the sync of step
    10, k=5). On resume, Lightning re-freezes it in setup and restores its param group: the
    backbone must come back with its fast weights, not the slow ones from state_dict."""
    cbs = [
        BackboneFinetuning(unfreeze_backbone_at_epoch=1),
        LookaheadCallback(k=5, alpha=0.5),
        ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"),
    ]
    _quiet_fit(trainer(max_epochs=3, enable_checkpointing=True, callbacks=cbs), Backbone(), loader())
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)  # step 12: 2 steps after a sync
    fast = ckpt[CHECKPOINT_KEY]["fast"]
    assert "backbone.0.weight" in fast and "head.weight" in fast
    assert not torch.equal(fast["backbone.0.weight"], ckpt["state_dict"]["backbone.0.weight"])  # fast != slow

    probe = ParamsAtEpochStart()
    cbs = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), LookaheadCallback(k=5, alpha=0.5), probe]
    _quiet_fit(trainer(max_epochs=3, callbacks=cbs), Backbone(), loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    for name, value in fast.items():
        assert torch.equal(probe.seen[0][name], value), name


class UnfreezeAt(Callback):
    """Freezes net.0 until epoch ``epoch``, resume-safe: it decides from the epoch alone, also in
    on_train_start (Lightning does not call on_train_epoch_start for an epoch resumed mid-way)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def setup(self, trainer, pl_module, stage):
        pl_module.net[0].requires_grad_(False)

    def on_train_start(self, trainer, pl_module):
        pl_module.net[0].requires_grad_(trainer.current_epoch >= self.epoch)

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.net[0].requires_grad_(trainer.current_epoch >= self.epoch)


def test_unfreeze_then_resume_at_every_step_is_bit_identical(tmp_path):
    """net.0 sits in the optimizer frozen, is unfrozen at epoch 1 (step 6) and joins Lookahead at
    the sync of step 10 (k=5). A resume from any step must continue bit-identically."""

    def run(max_epochs, ckpt_path=None, extra=()):
        model, cb = RegressionModule("sgd"), LookaheadCallback(k=5, alpha=0.5)
        t = trainer(max_epochs=max_epochs, enable_checkpointing=bool(extra), callbacks=[UnfreezeAt(1), cb, *extra])
        _quiet_fit(t, model, StatefulLoader(), ckpt_path=ckpt_path)
        return model, cb, t

    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full, full_cb, _ = run(3, extra=[every])
    assert "net.0.weight" in full_cb.lookahead.tensors()["slow"]
    for step in range(1, 18):
        if step % 6 == 0:  # Lightning resumes a last-batch checkpoint into the next epoch (pinned elsewhere)
            continue
        model, cb, t = run(3, ckpt_path=tmp_path / f"step={step}.ckpt")
        assert cb.lookahead.steps == [t.global_step] == [18]
        assert torch.equal(_flat(model.parameters()), _flat(full.parameters())), step
        fast, full_fast = cb.lookahead.tensors()["fast"], full_cb.lookahead.tensors()["fast"]
        assert fast.keys() == full_fast.keys()
        assert all(torch.equal(fast[n], full_fast[n]) for n in fast), step


# ----------------------------------------------------------------- optimizers replaced mid-fit
class Switchable(RegressionModule):
    use_adam = False

    def configure_optimizers(self):
        return adam(self.parameters()) if self.use_adam else sgd(self.parameters())


class SwitchToAdamAtEpoch1(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.use_adam = True
            trainer.strategy.setup_optimizers(trainer)


def test_optimizer_recreated_mid_fit_is_followed():
    model, cb = Switchable(), LookaheadCallback(k=4, alpha=0.5)
    with pytest.warns(UserWarning, match="optimizers were replaced"):
        t = trainer(max_epochs=2, callbacks=[SwitchToAdamAtEpoch1(), cb])
        t.fit(model, loader(), loader(1))
    assert cb.lookahead.steps == [t.global_step] == [12] and cb.lookahead.syncs == 3
    net = make_net()
    fast_ref, slow_ref = plain_lookahead(net, list(net.parameters()), sgd, 4, 0.5, 12, switch=(6, adam))
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)  # after fit: slow
    torch.testing.assert_close(_flat(cb.lookahead.tensors()["fast"].values()), _flat(fast_ref), atol=1e-6, rtol=0)


# ----------------------------------------------------------------- weight averaging
@pytest.mark.parametrize("first", [True, False], ids=["lookahead-first", "lookahead-last"])
@pytest.mark.parametrize(
    "make", [lambda: EMAWeightAveraging(), lambda: StochasticWeightAveraging(swa_lrs=0.01)], ids=["ema", "swa"]
)
def test_weight_averaging_callbacks_are_refused_naming_both(make, first):
    other = make()
    cbs = [LookaheadCallback(), other] if first else [other, LookaheadCallback()]
    with pytest.raises(ValueError, match=f"LookaheadCallback cannot be combined with {type(other).__name__}"):
        trainer(max_epochs=1, callbacks=cbs).fit(RegressionModule("sgd"), loader())


# ----------------------------------------------------------------- tuners
class LookaheadState(Callback):
    """Lookahead's complete state right before a tuner's trial (``before``, called by the tuner:
    Lightning moves tuner callbacks to the front of the list) and at the next training batch
    (this callback is listed after LookaheadCallback, so it sees the state after its hooks)."""

    def __init__(self, cb: LookaheadCallback) -> None:
        self.cb, self.states = cb, []

    def snapshot(self):
        la = self.cb.lookahead
        t = la.tensors()
        self.states.append((list(la.steps), la.syncs, _flat(t["fast"].values()).clone(), _flat(t["slow"].values()).clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.states) == 1:  # the first batch after the trial
            self.snapshot()

    def on_train_end(self, trainer, pl_module):
        if len(self.states) == 1:  # no batch after the trial (a mid-fit BatchSizeFinder ends the fit)
            self.snapshot()


class _TrialAtEpoch1:
    """The milestone pattern from LearningRateFinder's docstring: a tuner trial at epoch 1 (not at
    fit start), with Lookahead's state recorded right before it."""

    def __init__(self, probe: LookaheadState, **kw) -> None:
        super().__init__(**kw)  # type: ignore[call-arg]
        self.probe = probe

    def on_fit_start(self, *args):
        pass

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.probe.snapshot()
            self.trial(trainer, pl_module)


class MidFitLRFinder(_TrialAtEpoch1, LearningRateFinder):
    def trial(self, trainer, pl_module):
        self.lr_find(trainer, pl_module)


class MidFitBatchSizeFinder(_TrialAtEpoch1, BatchSizeFinder):
    def trial(self, trainer, pl_module):
        self.scale_batch_size(trainer, pl_module)


class BatchSized(RegressionModule):
    def __init__(self) -> None:
        super().__init__("sgd")
        self.batch_size = 8

    def train_dataloader(self):
        return loader(batch_size=self.batch_size)

    def val_dataloader(self):
        return loader(1, batch_size=self.batch_size)


@pytest.mark.parametrize("tuner", ["lr_finder", "batch_size_finder"])
def test_tuner_mid_fit_leaves_lookahead_state_exactly_as_it_was(tmp_path, tuner, recwarn):
    cb = LookaheadCallback(k=4, alpha=0.5)
    probe = LookaheadState(cb)
    if tuner == "lr_finder":
        kw = dict(num_training_steps=5, min_lr=1e-3, max_lr=1.0, update_attr=False)
        finder: Callback = MidFitLRFinder(probe, **kw)
        model: RegressionModule = RegressionModule("sgd")
        args = (loader(),)
    else:
        finder = MidFitBatchSizeFinder(probe, mode="power", steps_per_trial=2, max_trials=2)
        model, args = BatchSized(), ()
    t = trainer(max_epochs=3, default_root_dir=tmp_path, callbacks=[finder, cb, probe])
    t.fit(model, *args)
    s0, s1 = probe.states
    assert s0[:2] == s1[:2] and s0[0] == [6]
    assert not torch.equal(s0[2], s0[3])  # mid k-cycle: the rollback must restore both
    assert torch.equal(s0[2], s1[2]) and torch.equal(s0[3], s1[3])  # fast and slow weights, bit for bit
    assert cb.lookahead.steps == [t.global_step]  # trial steps were not counted
    assert not [w for w in recwarn if "without LookaheadCallback" in str(w.message)]
    if tuner == "lr_finder":  # the finder changed nothing (update_attr=False): the same run as without it
        plain, plain_cb = RegressionModule("sgd"), LookaheadCallback(k=4, alpha=0.5)
        trainer(max_epochs=3, callbacks=[plain_cb]).fit(plain, loader())
        assert torch.equal(_flat(model.parameters()), _flat(plain.parameters()))


@pytest.mark.parametrize("tune", ["lr_find", "scale_batch_size"])
def test_tuner_before_fit_changes_nothing_and_warns_nothing(tmp_path, tune, recwarn):
    model, cb = BatchSized(), LookaheadCallback(k=4, alpha=0.5)
    t = trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[cb])
    if tune == "lr_find":
        Tuner(t).lr_find(model, num_training=5, update_attr=False)
    else:
        Tuner(t).scale_batch_size(model, mode="power", steps_per_trial=2, max_trials=1)
        model.batch_size = 8  # keep the reference's batch size
    t.fit(model)
    assert not [w for w in recwarn if "without LookaheadCallback" in str(w.message)]
    assert cb.lookahead.steps == [t.global_step]
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=12)
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)


# ----------------------------------------------------------------- end of training
class ExportAtTrainEnd(Callback):
    def on_train_end(self, trainer, pl_module):
        self.exported = _flat(pl_module.parameters()).clone()


class ExportingModule(RegressionModule):
    def on_train_end(self):
        self.exported = _flat(self.parameters()).clone()


def test_on_train_end_exports_see_the_slow_weights():
    model, export = ExportingModule("sgd"), ExportAtTrainEnd()
    trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4, alpha=0.5), export]).fit(model, loader())
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=6)
    torch.testing.assert_close(export.exported, _flat(slow_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.exported, _flat(slow_ref), atol=1e-6, rtol=0)


def test_resume_of_a_finished_run_keeps_lookahead_state_for_later_checkpoints(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first = RegressionModule("sgd")
    trainer(max_epochs=2, enable_checkpointing=True, callbacks=[LookaheadCallback(k=5, alpha=0.5), ckpt_cb]).fit(
        first, loader()
    )
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)

    again, cb = RegressionModule("sgd", seed=3), LookaheadCallback(k=5, alpha=0.5)
    t = trainer(max_epochs=2, callbacks=[cb])
    _quiet_fit(t, again, loader(), ckpt_path=tmp_path / "last.ckpt")  # nothing left to train
    t.save_checkpoint(tmp_path / "again.ckpt")
    saved = torch.load(tmp_path / "again.ckpt", weights_only=True)
    assert saved[CHECKPOINT_KEY]["fast"].keys() == last[CHECKPOINT_KEY]["fast"].keys()
    for n, v in last[CHECKPOINT_KEY]["fast"].items():
        assert torch.equal(saved[CHECKPOINT_KEY]["fast"][n], v)
    assert torch.equal(_flat(again.parameters()), _flat(first.parameters()))  # the slow weights

    # and it still continues exactly: 3 epochs via the re-saved checkpoint == 3 epochs straight
    cont, straight = RegressionModule("sgd", seed=4), RegressionModule("sgd")
    _quiet_fit(trainer(max_epochs=3, callbacks=[LookaheadCallback(k=5, alpha=0.5)]), cont, loader(), ckpt_path=tmp_path / "again.ckpt")
    trainer(max_epochs=3, callbacks=[LookaheadCallback(k=5, alpha=0.5)]).fit(straight, loader())
    assert torch.equal(_flat(cont.parameters()), _flat(straight.parameters()))


# ----------------------------------------------------------------- pickling
class PickleEveryStage(Callback):
    def __init__(self, cb: LookaheadCallback) -> None:
        self.cb, self.copies = cb, []

    def _copy(self, where):
        self.copies.append((where, pickle.loads(pickle.dumps(self.cb)), copy.deepcopy(self.cb), list(self.cb.lookahead.steps)))

    def on_train_start(self, trainer, pl_module):
        self._copy("train_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            self._copy("mid_epoch")

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._copy("validation")


def test_callback_pickles_and_deepcopies_at_every_stage():
    cb = LookaheadCallback(k=4, alpha=0.5)
    pickle.loads(pickle.dumps(cb))  # before fit
    probe = PickleEveryStage(cb)
    trainer(max_epochs=1, num_sanity_val_steps=1, callbacks=[cb, probe]).fit(RegressionModule("sgd"), loader(), loader(1))
    pickle.loads(pickle.dumps(cb))  # after fit
    assert [w for w, *_ in probe.copies] == ["train_start", "mid_epoch", "validation"]
    for where, pickled, deep, steps in probe.copies:
        for c in (pickled, deep):
            assert c.lookahead.steps == steps, where
            # a copy counts the steps of its own copies of the optimizers, not the original's
            opt = c.lookahead.optimizers[0]
            before = list(c.lookahead.steps)
            c.lookahead.use_fast()  # a copy taken during validation holds the slow weights: step the fast ones
            opt.step()
            assert c.lookahead.steps == [before[0] + 1], where


# ----------------------------------------------------------------- checkpoints across settings
def test_pullback_checkpoint_resumed_with_keep_and_another_optimizer(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    cb = LookaheadCallback(k=4, alpha=0.5, inner_state="pullback")
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[cb, ckpt_cb]).fit(RegressionModule("adam"), loader())

    class Adagrad(RegressionModule):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters(), lr=0.05)

    # the new optimizer starts from its own fresh state (Adagrad cannot load Adam's: Lightning's part)
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    ckpt["optimizer_states"][0] = torch.optim.Adagrad(RegressionModule("sgd").parameters(), lr=0.05).state_dict()
    torch.save(ckpt, tmp_path / "adagrad.ckpt")
    model, cb2 = Adagrad("sgd"), LookaheadCallback(k=4, alpha=0.5, inner_state="keep")
    with pytest.warns(UserWarning, match="inner_state"):
        trainer(max_epochs=2, callbacks=[cb2]).fit(model, loader(), ckpt_path=tmp_path / "adagrad.ckpt")
    assert cb2.lookahead.steps == [12] and cb2.lookahead.tensors()["slow_moments"] == {}


def test_checkpoint_from_a_process_that_never_ran_fit_warns():
    """The main process after strategy='ddp_spawn' is such a process (fit runs in the workers)."""
    model, cb = RegressionModule("sgd"), LookaheadCallback()
    t = trainer(max_epochs=1, callbacks=[cb])
    t.strategy.connect(model)
    checkpoint = {"state_dict": model.state_dict()}
    with pytest.warns(UserWarning, match="never took part in a fit"):
        cb.on_save_checkpoint(t, model, checkpoint)
    assert CHECKPOINT_KEY not in checkpoint


# ----------------------------------------------------------------- runs shorter than k
@pytest.mark.parametrize("kwargs", [{"fast_dev_run": True}, {"limit_train_batches": 3, "max_epochs": 1}])
def test_evaluating_before_the_first_sync_warns_once(tmp_path, kwargs):
    cb = LookaheadCallback(k=5, alpha=0.5)
    t = trainer(default_root_dir=tmp_path, callbacks=[cb], **kwargs)
    with pytest.warns(UserWarning, match="first sync comes after k=5") as record:
        t.fit(RegressionModule("sgd"), loader(), loader(1))
    assert sum("first sync comes after" in str(w.message) for w in record) == 1


def test_no_early_warning_once_a_sync_happened(recwarn):
    trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[LookaheadCallback(k=4)]).fit(
        RegressionModule("sgd"), loader(), loader(1)
    )  # validation first runs after step 6, past the sync at step 4
    assert not [w for w in recwarn if "first sync" in str(w.message)]


# ----------------------------------------------------------------- logging cadence
def test_lookahead_metrics_follow_log_every_n_steps(tmp_path):
    class LogsLoss(RegressionModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    logger = CSVLogger(tmp_path, name="", version="")
    t = trainer(max_epochs=2, callbacks=[LookaheadCallback(k=3, alpha=0.5)], logger=logger, log_every_n_steps=4)
    t.fit(LogsLoss("sgd"), loader())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    lightning_steps = {int(r["step"]) for r in rows if r.get("train_loss")}
    ours = {int(r["step"]): r for r in rows if r.get("lookahead/syncs")}
    assert lightning_steps == {3, 7, 11}  # Lightning's own cadence for a step metric
    # syncs after steps 3, 6, 9, 12 (logged at indices 2, 5, 8, 11): a row only at Lightning's
    # logging steps, and only when a sync happened since the last row
    assert set(ours) == {3, 7, 11}
    assert [float(ours[s]["lookahead/syncs"]) for s in (3, 7, 11)] == [1.0, 2.0, 4.0]
    _, before = reference_lookahead("sgd", 3, 0.5, n_batches=11)  # the distance of the sync at step 12
    _, after = reference_lookahead("sgd", 3, 0.5, n_batches=12)
    expected = ((_flat(after) - _flat(before)).norm() / 0.5 / _flat(before).norm()).item()
    assert float(ours[11]["lookahead/rel_distance"]) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------- holes in the first suite
def test_callback_weights_at_alpha_other_than_one_half():
    model, cb = RegressionModule("adam"), LookaheadCallback(k=3, alpha=0.3)
    trainer(max_epochs=2, callbacks=[cb]).fit(model, loader())
    fast_ref, slow_ref = reference_lookahead("adam", 3, 0.3, n_batches=12)
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(_flat(cb.lookahead.tensors()["fast"].values()), _flat(fast_ref), atol=1e-6, rtol=0)
    _, wrong = reference_lookahead("adam", 3, 0.7, n_batches=12)  # alpha and 1 - alpha differ here
    assert not torch.allclose(_flat(model.parameters()), _flat(wrong), atol=1e-4)


def test_sanity_check_after_a_mid_cycle_resume_sees_the_slow_weights(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[LookaheadCallback(k=4), ckpt_cb]).fit(
        RegressionModule("sgd"), loader(), loader(1)
    )
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)  # step 6: fast != slow
    model = RegressionModule("sgd", seed=9)
    _quiet_fit(
        trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[LookaheadCallback(k=4)]),
        model,
        loader(),
        loader(1),
        ckpt_path=tmp_path / "epoch=0.ckpt",
    )
    sanity = dict(zip([n for n, _ in model.named_parameters()], model.val_param_snapshots[0]))
    for name, slow in ckpt["state_dict"].items():
        assert torch.equal(sanity[name], slow), name
    assert not torch.equal(ckpt["state_dict"]["net.0.weight"], ckpt[CHECKPOINT_KEY]["fast"]["net.0.weight"])


# ----------------------------------------------------------------- the pytorch_lightning namespace
def test_standalone_pytorch_lightning_namespace():
    pl = pytest.importorskip("pytorch_lightning")

    class PLModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return sgd(self.parameters())

    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = PLModule()
    with pytest.warns(UserWarning, match="save_weights_only=True"):
        t = pl.Trainer(
            max_epochs=2,
            callbacks=[LookaheadCallback(k=4, alpha=0.5), pl.callbacks.ModelCheckpoint(save_weights_only=True)],
            enable_checkpointing=True,
            default_root_dir="/tmp/unused-ll-pl",
            **kw,
        )
        t.fit(model, loader())
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=12)
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)
    for bad in (pl.callbacks.EMAWeightAveraging(), pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01)):
        with pytest.raises(ValueError, match="cannot be combined"):
            pl.Trainer(max_epochs=1, callbacks=[LookaheadCallback(), bad], **kw).fit(PLModule(), loader())


# ----------------------------------------------------------------- found by review
class ConvChannelsLast(RegressionModule):
    """A conv net that switches to channels_last in on_train_start, i.e. after Lookahead attached
    (during the sanity check); ``early=True`` switches before fit instead."""

    def __init__(self, early: bool = False) -> None:
        super().__init__("sgd")
        torch.manual_seed(0)
        self.conv, self.head, self.early = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 2), early
        if early:
            self.to(memory_format=torch.channels_last)

    def forward(self, x):
        img = x[:, :4].reshape(-1, 1, 2, 2).expand(-1, 2, 2, 2)
        return self.head(self.conv(img).mean((2, 3)))

    def on_train_start(self):
        self.to(memory_format=torch.channels_last)

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("net.")], lr=0.1)


def test_memory_format_changed_after_attach():
    """The slow weights follow a parameter re-laid out after attach (a crash at the first sync before)."""
    late, early = ConvChannelsLast(), ConvChannelsLast(early=True)
    for model in (late, early):
        trainer(max_epochs=1, num_sanity_val_steps=1, callbacks=[LookaheadCallback(k=2)]).fit(model, loader(), loader(1))
    assert late.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(late.parameters(), early.parameters()):
        assert torch.equal(a, b)


class RestoreInsideValidation(Callback):
    """Saves at the end of epoch 0, then restores that checkpoint at the start of validation in
    epoch 1 (while the slow weights are swapped in), and records Lookahead's state at the next batch."""

    def __init__(self, cb: LookaheadCallback, path) -> None:
        self.cb, self.path, self.stage, self.saved, self.after = cb, path, 0, None, None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0 and self.saved is None:  # once: the rollback replays this hook
            trainer.save_checkpoint(self.path)
            self.saved = torch.load(self.path, weights_only=True)

    def on_validation_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and self.stage == 0:
            self.stage = 1
            trainer._checkpoint_connector.restore(self.path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.stage == 1:
            self.stage = 2
            t = self.cb.lookahead.tensors()
            self.after = ({n: v.clone() for n, v in t["fast"].items()}, {n: v.clone() for n, v in t["slow"].items()})


def test_checkpoint_restored_inside_validation_is_applied(tmp_path):
    cb = LookaheadCallback(k=4, alpha=0.5)
    probe = RestoreInsideValidation(cb, tmp_path / "e0.ckpt")
    trainer(max_epochs=3, val_check_interval=3, limit_val_batches=1, callbacks=[cb, probe]).fit(
        RegressionModule("sgd"), loader(), loader()
    )
    ckpt = probe.saved
    fast, slow = probe.after
    for n in fast:
        assert torch.equal(slow[n], ckpt["state_dict"][n]), n  # before the fix: the pre-restore fast weights
        assert torch.equal(fast[n], ckpt[CHECKPOINT_KEY]["fast"][n]), n


def test_checkpoint_loaded_after_fit_drops_the_stale_lookahead_state(tmp_path):
    """After fit the module holds the slow weights; trainer.test(ckpt_path=older) replaces them, so a
    checkpoint saved then must not pair them with the fit's fast weights and counters."""
    cb = LookaheadCallback(k=4, alpha=0.5)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[cb, ckpt_cb])
    t.fit(RegressionModule("sgd"), loader(), loader(1))
    t.test(ckpt_path=tmp_path / "epoch=0.ckpt", dataloaders=loader(1), verbose=False)  # silent: nothing is wrong
    with pytest.warns(UserWarning, match="weights loaded after fit"):  # said when it matters
        t.save_checkpoint(tmp_path / "after_test.ckpt")
    saved = torch.load(tmp_path / "after_test.ckpt", weights_only=True)
    assert CHECKPOINT_KEY not in saved  # resuming from it warns and starts slow = fast = these weights
    old = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    for n, v in old["state_dict"].items():
        assert torch.equal(saved["state_dict"][n], v)
