"""Evaluation on slow weights, bit-exact swap back, checkpoint contents and exact resume."""

import copy
import warnings

import pytest
import torch
from conftest import RegressionModule, loader, reference_lookahead, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lookahead import LookaheadCallback
from lightning_lookahead.callback import CHECKPOINT_KEY


def _flat(params):
    return torch.cat([p.detach().flatten() for p in params])


class Snapshot(Callback):
    """Records the module's parameters at the end of every training batch (the fast weights)."""

    def __init__(self):
        self.fast = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fast.append(_flat(pl_module.parameters()).clone())


def test_validation_sees_slow_weights_and_fast_weights_come_back():
    model = RegressionModule("sgd")
    cb, snap = LookaheadCallback(k=5, alpha=0.5), Snapshot()
    t = trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[cb, snap])
    t.fit(model, loader(), loader(1))
    # sanity check + 2 epochs: 3 snapshots, each must equal the paper's slow weights at that time
    assert len(model.val_param_snapshots) == 3
    torch.testing.assert_close(_flat(model.val_param_snapshots[0]), _flat(RegressionModule("sgd").parameters()))
    for epoch, snap_params in enumerate(model.val_param_snapshots[1:], start=1):
        fast_ref, slow_ref = reference_lookahead("sgd", 5, 0.5, n_batches=6 * epoch)
        torch.testing.assert_close(_flat(snap_params), _flat(slow_ref), atol=1e-6, rtol=0)
        assert not torch.allclose(_flat(snap_params), _flat(fast_ref))  # 6, 12 are not multiples of 5: they differ
    # training continued from the fast weights, bit-exactly: epoch 2 equals the reference
    fast_ref, _ = reference_lookahead("sgd", 5, 0.5, n_batches=12)
    torch.testing.assert_close(snap.fast[-1], _flat(fast_ref), atol=1e-6, rtol=0)


def test_eval_weights_fast_opt_out():
    model = RegressionModule("sgd")
    cb, snap = LookaheadCallback(k=4, alpha=0.5, eval_weights="fast"), Snapshot()
    trainer(max_epochs=1, callbacks=[cb, snap]).fit(model, loader(), loader(1))
    assert torch.equal(_flat(model.val_param_snapshots[-1]), snap.fast[-1])


def test_swap_back_is_bit_exact_and_survives_validation_exception():
    class Boom(RegressionModule):
        def validation_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    model = Boom("sgd")
    cb, snap = LookaheadCallback(k=4, alpha=0.5), Snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[cb, snap]).fit(model, loader(), loader(1))
    # the exception hit while the slow weights were swapped in for validation: fit is over, so as
    # after a normal end the module holds the slow weights and the fast ones are intact in the callback
    assert cb.lookahead.swapped
    assert torch.equal(_flat(cb.lookahead.tensors()["fast"].values()), snap.fast[-1])
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=6)
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)


def test_unpaired_hooks_never_train_on_slow_weights():
    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=4, alpha=0.5)
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(model, loader())
    ref_model = copy.deepcopy(model)
    # simulate an evaluation loop that started but never ended, then continue training
    cb.lookahead.use_fast()
    assert t.state.fn == "fit"
    cb._begin_eval(t, model)
    assert cb.lookahead.swapped
    cb.on_train_batch_start(t, model, None, 0)
    assert not cb.lookahead.swapped
    assert not torch.equal(_flat(model.parameters()), _flat(ref_model.parameters()))  # fast != slow


def test_after_fit_module_holds_slow_weights_and_validate_test_predict_use_them(tmp_path):
    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=4, alpha=0.5)
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(model, loader())
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=6)
    torch.testing.assert_close(_flat(model.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)
    model.val_param_snapshots.clear()
    t.validate(model, loader(1), verbose=False)
    t.test(model, loader(1), verbose=False)
    preds = t.predict(model, loader(1))
    for snap in model.val_param_snapshots:
        torch.testing.assert_close(_flat(snap), _flat(slow_ref), atol=1e-6, rtol=0)
    x = next(iter(loader(1)))[0]
    net = RegressionModule("sgd").net
    with torch.no_grad():
        for p, s in zip(net.parameters(), slow_ref):
            p.copy_(s)
        torch.testing.assert_close(preds[0], net(x), atol=1e-6, rtol=0)


def _ckpt_trainer(tmp_path, cb, **kw):
    return trainer(
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_last=False)],
        **kw,
    )


def test_checkpoint_holds_slow_weights_fast_weights_and_counters(tmp_path):
    model = RegressionModule("adam")
    cb = LookaheadCallback(k=4, alpha=0.5, inner_state="pullback")
    _ckpt_trainer(tmp_path, cb, max_epochs=1).fit(model, loader())
    path = next(tmp_path.glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)  # tensors, numbers, strings, dicts only
    fast_ref, slow_ref = reference_lookahead("adam", 4, 0.5, n_batches=6, inner_state="pullback")
    names = [n for n, _ in model.named_parameters()]
    for name, s, f in zip(names, slow_ref, fast_ref):
        torch.testing.assert_close(ckpt["state_dict"][name], s, atol=1e-6, rtol=0)
        torch.testing.assert_close(ckpt[CHECKPOINT_KEY]["fast"][name], f, atol=1e-6, rtol=0)
    assert set(ckpt[CHECKPOINT_KEY]["slow_moments"]) == set(names)
    state = ckpt["callbacks"]["LookaheadCallback"]
    assert state["steps"] == [6] and state["syncs"] == 1 and state["k"] == 4
    # the callback state holds no tensors (Lightning deep-copies it on load)
    assert not any(isinstance(v, torch.Tensor) for v in state.values())
    # the deployable model loads without the callback
    loaded = RegressionModule.load_from_checkpoint(path)
    torch.testing.assert_close(_flat(loaded.parameters()), _flat(slow_ref), atol=1e-6, rtol=0)


def test_checkpoint_written_during_validation(tmp_path):
    """ModelCheckpoint(monitor=...) saves in on_validation_end; slow weights may be swapped in."""

    class SaveInsideValidation(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):  # runs while slow weights are in
            trainer.save_checkpoint(tmp_path / "inside.ckpt")

    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=4, alpha=0.5)
    trainer(max_epochs=1, callbacks=[cb, SaveInsideValidation()]).fit(model, loader(), loader(1))
    ckpt = torch.load(tmp_path / "inside.ckpt", weights_only=True)
    fast_ref, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=6)
    names = [n for n, _ in model.named_parameters()]
    for name, s, f in zip(names, slow_ref, fast_ref):
        torch.testing.assert_close(ckpt["state_dict"][name], s, atol=1e-6, rtol=0)
        torch.testing.assert_close(ckpt[CHECKPOINT_KEY]["fast"][name], f, atol=1e-6, rtol=0)


def _uninterrupted(opt, epochs, inner_state="keep", **kw):
    model = RegressionModule(opt)
    cb = LookaheadCallback(k=4, alpha=0.5, inner_state=inner_state)
    trainer(max_epochs=epochs, callbacks=[cb], **kw).fit(model, loader(), loader(1))
    return model, cb


@pytest.mark.parametrize("opt,inner_state", [("sgd", "keep"), ("adam", "pullback"), ("adam", "reset")])
def test_resume_at_every_epoch_end_is_bit_identical(tmp_path, opt, inner_state):
    """Checkpoints at epoch ends fall at steps 6, 12 (k=4: mid-cycle and... every position)."""
    full, full_cb = _uninterrupted(opt, 4, inner_state)
    _ckpt_trainer(tmp_path, LookaheadCallback(k=4, alpha=0.5, inner_state=inner_state), max_epochs=3).fit(
        RegressionModule(opt), loader(), loader(1)
    )
    for ckpt in sorted(tmp_path.glob("*.ckpt")):
        model = RegressionModule(opt, seed=123)  # different init: everything must come from the ckpt
        cb = LookaheadCallback(k=4, alpha=0.5, inner_state=inner_state)
        trainer(max_epochs=4, callbacks=[cb]).fit(model, loader(), loader(1), ckpt_path=ckpt)
        assert torch.equal(_flat(model.parameters()), _flat(full.parameters())), ckpt.name
        for a, b in zip(cb.lookahead.tensors()["fast"].values(), full_cb.lookahead.tensors()["fast"].values()):
            assert torch.equal(a, b)
        assert cb.lookahead.steps == full_cb.lookahead.steps


class StatefulLoader:
    """A deterministic, resumable loader: Lightning restores its position on mid-epoch resume."""

    def __init__(self):
        self.batches = list(loader())
        self.start = 0
        self.pos = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.pos = self.start
        self.start = 0
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.start = state["pos"]


@pytest.mark.parametrize("every", [1, 3, 5])
def test_resume_from_every_n_train_steps_is_bit_identical(tmp_path, every):
    full, full_cb = _uninterrupted("adam", 3)
    t = trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[
            LookaheadCallback(k=4, alpha=0.5),
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"),
        ],
    )
    t.fit(RegressionModule("adam"), StatefulLoader(), loader(1))
    ckpts = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    assert len(ckpts) == 12 // every
    for ckpt in ckpts:
        step = int(ckpt.stem.split("=")[1])
        model, cb = RegressionModule("adam", seed=5), LookaheadCallback(k=4, alpha=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = trainer(max_epochs=3, callbacks=[cb])
            t.fit(model, StatefulLoader(), loader(1), ckpt_path=ckpt)
        # our step counter always agrees with Lightning's own
        assert cb.lookahead.steps == [t.global_step]
        if step % 6 == 0:
            # Lightning's limitation, not ours: a checkpoint taken at the last batch of an epoch
            # (before the epoch is marked done) resumes into the *next* epoch and loses one.
            assert t.global_step == 12
            continue
        assert torch.equal(_flat(model.parameters()), _flat(full.parameters())), ckpt.name
        assert cb.lookahead.steps == full_cb.lookahead.steps


def test_checkpoint_without_callback_state_warns_and_starts_from_loaded_weights(tmp_path):
    model = RegressionModule("sgd")
    t = trainer(max_epochs=1, default_root_dir=tmp_path)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    cb = LookaheadCallback(k=100, alpha=0.5)  # no sync during the check below

    class SlowAtStart(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.fast = _flat(cb.lookahead.tensors()["fast"].values())
                self.slow = _flat(cb.lookahead.tensors()["slow"].values())

    probe = SlowAtStart()
    resumed = RegressionModule("sgd", seed=7)
    with pytest.warns(UserWarning, match="without LookaheadCallback"):
        trainer(max_epochs=2, callbacks=[cb, probe]).fit(resumed, loader(), ckpt_path=tmp_path / "plain.ckpt")
    assert torch.equal(probe.slow, _flat(model.parameters()))
    assert torch.equal(probe.fast, _flat(model.parameters()))


def test_checkpoint_with_other_k_alpha_warns_and_uses_new_values(tmp_path):
    _ckpt_trainer(tmp_path, LookaheadCallback(k=4, alpha=0.5), max_epochs=1).fit(RegressionModule("sgd"), loader())
    cb = LookaheadCallback(k=3, alpha=0.8)
    with pytest.warns(UserWarning, match="saved with"):
        trainer(max_epochs=2, callbacks=[cb]).fit(RegressionModule("sgd"), loader(), ckpt_path=next(tmp_path.glob("*.ckpt")))
    assert cb.lookahead.k == 3 and cb.lookahead.alpha == 0.8
    assert cb.lookahead.steps == [12] and cb.lookahead.syncs == 1 + 2  # step 4 (old k), then steps 9, 12


def test_tied_weights_share_one_slow_copy(tmp_path):
    class Tied(RegressionModule):
        def __init__(self):
            super().__init__("sgd")
            self.head = torch.nn.Linear(16, 16, bias=False)
            self.tail = torch.nn.Linear(16, 16, bias=False)
            self.tail.weight = self.head.weight

        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[2](self.tail(self.head(h)))

    model = Tied()
    cb = LookaheadCallback(k=4, alpha=0.5)
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "tied.ckpt")
    ckpt = torch.load(tmp_path / "tied.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["head.weight"], ckpt["state_dict"]["tail.weight"])
    assert torch.equal(ckpt["state_dict"]["head.weight"], model.head.weight.detach())  # slow, post-fit
    assert "tail.weight" not in ckpt[CHECKPOINT_KEY]["fast"]


def test_wrapped_modules_still_get_slow_weights_in_state_dict(tmp_path):
    """Activation checkpointing drops `_checkpoint_wrapped_module.` from state_dict keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Wrapped(RegressionModule):
        def __init__(self):
            super().__init__("sgd")
            self.net[0] = checkpoint_wrapper(self.net[0])

    model = Wrapped()
    assert "net.0._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
    assert "net.0.weight" in model.state_dict()
    t = trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4, alpha=0.5)])
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "w.ckpt")
    ckpt = torch.load(tmp_path / "w.ckpt", weights_only=True)
    _, slow_ref = reference_lookahead("sgd", 4, 0.5, n_batches=6)
    for key, s in zip(["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"], slow_ref):
        torch.testing.assert_close(ckpt["state_dict"][key], s, atol=1e-6, rtol=0)


def test_evaluation_after_a_failed_fit_uses_the_requested_weights(tmp_path):
    """After a crash the callback still holds that run's slow weights; validate/test must not
    swap them over a checkpoint the user asked for."""

    class Crash(RegressionModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("crash")
            return super().training_step(batch, batch_idx)

    model = Crash("sgd")
    cb = LookaheadCallback(k=2, alpha=0.5)
    t = trainer(max_epochs=1, callbacks=[cb])
    with pytest.raises(RuntimeError, match="crash"):
        t.fit(model, loader())
    wanted = RegressionModule("sgd", seed=3)
    model.load_state_dict(wanted.state_dict())
    model.val_param_snapshots.clear()
    t.test(model, loader(1), verbose=False)
    assert torch.equal(_flat(model.val_param_snapshots[-1]), _flat(wanted.parameters()))


def _drop_prompt(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "prompt", None)


def test_parameter_left_out_of_state_dict_warns_instead_of_failing(tmp_path):
    class Hidden(RegressionModule):
        def __init__(self):
            super().__init__("sgd")
            self.prompt = torch.nn.Parameter(torch.zeros(2))
            self._register_state_dict_hook(_drop_prompt)

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.prompt.square().sum()

    model = Hidden()
    t = trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4, alpha=0.5)])
    t.fit(model, loader())
    with pytest.warns(UserWarning, match="no state_dict entry"):
        t.save_checkpoint(tmp_path / "h.ckpt")
    ckpt = torch.load(tmp_path / "h.ckpt", weights_only=True)
    assert "prompt" not in ckpt["state_dict"] and "prompt" in ckpt[CHECKPOINT_KEY]["fast"]
