"""``outer_optimizer``: an injected torch optimizer stepped on phi with gradient phi - theta, against
torch stepping on the pseudo-gradient in a plainly written loop; its state through resumes; Hydra's
``_partial_``; and the contiguous storage as Lightning users see it (ownership after fit, models
changed mid-run)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import RegressionModule, loader, make_net, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_lookahead import Lookahead, LookaheadCallback
from lightning_lookahead.callback import CHECKPOINT_KEY

ADAM = functools.partial(torch.optim.Adam, lr=0.05, betas=(0.8, 0.95))
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def _batches():
    return list(loader())


def _reference(factory, k: int, steps: int):
    """torch's own optimizer on separate slow tensors, stepped on phi - theta every k inner steps."""
    net = make_net()
    params = list(net.parameters())
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    slow = [p.detach().clone().requires_grad_() for p in params]
    outer = factory(slow)
    batches = _batches()
    for step in range(1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
        if step % k == 0:
            with torch.no_grad():
                for s, p in zip(slow, params):
                    s.grad = s.detach() - p.detach()
                outer.step()
                for s, p in zip(slow, params):
                    p.copy_(s)
    return params, slow, outer


def _ours(factory, k: int, steps: int, start: dict | None = None):
    net = make_net()
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(k=k, outer_optimizer=factory)
    la.attach([inner], net)
    done = 0
    if start is not None:
        net.load_state_dict(start["model"])
        inner.load_state_dict(start["inner"])
        la.load_state_dict(start["lookahead"])
        done = la.steps[0]
    batches = _batches()
    for step in range(done + 1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
    return net, inner, la


@pytest.mark.parametrize("factory", [ADAM, NESTEROV], ids=["adam", "sgd-nesterov"])
@pytest.mark.parametrize("k", [1, 3])
def test_outer_optimizer_equals_torch_on_the_pseudo_gradient(factory, k):
    params, slow, outer = _reference(factory, k, steps=13)
    net, _, la = _ours(factory, k, steps=13)
    for p, q in zip(params, net.parameters()):
        assert torch.equal(p.detach(), q.detach())
    for s, t in zip(slow, la.tensors()["slow"].values()):
        assert torch.equal(s.detach(), t)
    ours = la.tensors()["outer_state"]
    for s, name in zip(slow, ours):
        for key, value in outer.state[s].items():
            assert torch.equal(value, ours[name][key]), (name, key)


def test_outer_optimizer_state_resumes_bit_for_bit_mid_cycle(tmp_path):
    net, inner, la = _ours(ADAM, k=4, steps=6)  # stopped between syncs 1 and 2
    path = tmp_path / "state.pt"
    torch.save({"model": net.state_dict(), "inner": inner.state_dict(), "lookahead": la.state_dict()}, path)
    resumed = _ours(ADAM, k=4, steps=14, start=torch.load(path, weights_only=True))
    full = _ours(ADAM, k=4, steps=14)
    for a, b in zip(resumed[0].parameters(), full[0].parameters()):
        assert torch.equal(a, b)
    for kind in ("slow", "fast"):
        for a, b in zip(resumed[2].tensors()[kind].values(), full[2].tensors()[kind].values()):
            assert torch.equal(a, b)
    for name, state in full[2].tensors()["outer_state"].items():
        for key, value in state.items():
            assert torch.equal(resumed[2].tensors()["outer_state"][name][key], value)


def test_callback_outer_adam_resumes_exactly_from_a_checkpoint(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    full = LookaheadCallback(k=4, outer_optimizer=ADAM)
    trainer(max_epochs=3, callbacks=[full, ck], enable_checkpointing=True).fit(RegressionModule("adam"), loader())
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)  # after 6 steps: mid-cycle
    assert set(saved[CHECKPOINT_KEY]["outer_state"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    resumed = LookaheadCallback(k=4, outer_optimizer=ADAM)
    trainer(max_epochs=3, callbacks=[resumed]).fit(RegressionModule("adam"), loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    for kind in ("fast", "slow"):
        for a, b in zip(resumed.lookahead.tensors()[kind].values(), full.lookahead.tensors()[kind].values()):
            assert torch.equal(a, b)
    want = full.lookahead.tensors()["outer_state"]
    got = resumed.lookahead.tensors()["outer_state"]
    assert all(torch.equal(got[n][key], v) for n, s in want.items() for key, v in s.items())


def test_hydra_partial_outer_optimizer():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        """
        _target_: lightning_lookahead.LookaheadCallback
        k: 3
        outer_optimizer:
          _target_: torch.optim.Adam
          _partial_: true
          lr: 0.05
          betas: [0.8, 0.95]
        """
    )
    cb = instantiate(cfg)
    assert isinstance(cb.outer_optimizer, functools.partial) and cb.outer_optimizer.func is torch.optim.Adam
    trainer(max_epochs=1, callbacks=[cb]).fit(RegressionModule("sgd"), loader())
    outer = cb.lookahead.groups[0].outer.optimizer
    assert isinstance(outer, torch.optim.Adam) and outer.param_groups[0]["lr"] == 0.05
    assert cb.lookahead.syncs == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(outer_optimizer=ADAM, alpha=0.7), "leave them at their defaults"),
        (dict(outer_optimizer=ADAM, outer_momentum=0.9), "leave them at their defaults"),
        (dict(outer_optimizer="adam"), "`outer_optimizer` must be a callable"),
    ],
)
def test_outer_optimizer_bad_combinations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookaheadCallback(**kwargs)
    with pytest.raises(ValueError, match=match):
        Lookahead(**kwargs)


# ------------------------------------------------------------------ storage as Lightning users see it
def _owns_storage(module: nn.Module) -> bool:
    return all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in module.parameters())


def test_parameters_are_flat_views_during_fit_and_own_their_storage_after():
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(len({p.untyped_storage().data_ptr() for p in pl_module.parameters()}))

    model = RegressionModule("adam")
    trainer(max_epochs=1, callbacks=[LookaheadCallback(k=2), Probe()]).fit(model, loader())
    assert set(seen) == {1}  # one flat buffer during training
    assert _owns_storage(model)


def test_parameters_own_their_storage_after_an_exception():
    class Boom(RegressionModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom("sgd")
    cb = LookaheadCallback(k=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader())
    assert _owns_storage(model)
    for p, s in zip(model.parameters(), cb.lookahead.tensors()["slow"].values()):
        assert torch.equal(p.detach(), s)  # the module holds the slow weights, as after a normal end


class _CastModule(RegressionModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        dtype = self.net[0].weight.dtype
        return nn.functional.mse_loss(self(x.to(dtype)), y.to(dtype))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return super().validation_step((x.to(self.net[0].weight.dtype), y.to(self.net[0].weight.dtype)), batch_idx)


def test_model_cast_to_double_mid_fit_keeps_lookahead_exact():
    class ToDouble(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                pl_module.double()  # the optimizer's parameters are the same objects, in float64 now

    model = _CastModule("sgd")
    cb = LookaheadCallback(k=2)
    trainer(max_epochs=1, callbacks=[cb, ToDouble()], limit_val_batches=1).fit(model, loader(), loader())
    slow = cb.lookahead.tensors()["slow"]
    assert all(t.dtype == torch.float64 for t in slow.values())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert cb.lookahead.syncs == 3


def test_layer_replaced_mid_fit_joins_lookahead():
    class Replace(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3 and not hasattr(self, "done"):
                self.done = True
                pl_module.net[2] = nn.Linear(16, 2)
                trainer.strategy.setup_optimizers(trainer)

    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=2)
    with pytest.warns(UserWarning, match="optimizers were replaced"):
        trainer(max_epochs=2, callbacks=[cb, Replace()]).fit(model, loader())
    slow = cb.lookahead.tensors()["slow"]
    assert slow["net.2.weight"].shape == (2, 16)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), slow[name])  # after fit: the module holds the slow weights
    assert cb.lookahead.syncs == 6


@pytest.mark.parametrize("factory", [ADAM, NESTEROV], ids=["adam", "sgd-nesterov"])
def test_outer_state_follows_a_dtype_change(factory):
    """model.double() mid-run: the outer optimizer's state is converted like the model and keeps working."""
    net, inner, la = _ours(factory, k=2, steps=4)
    before = {n: {k: v.clone() for k, v in s.items()} for n, s in la.tensors()["outer_state"].items()}
    net.double()
    batches = _batches()
    for x, y in batches[:2]:
        nn.functional.mse_loss(net(x.double()), y.double()).backward()
        inner.step()
        inner.zero_grad()
    assert la.syncs == 3
    for name, state in la.tensors()["outer_state"].items():
        for key, value in state.items():
            if value.dim():  # moment buffers: float64 now, continued from the float32 values
                assert value.dtype == torch.float64 and not torch.equal(value, before[name][key].double())
    for p, s in zip(net.parameters(), la.tensors()["slow"].values()):
        assert s.dtype == torch.float64 and torch.equal(p.detach(), s)
