"""What counts as a step (AMP skips, several optimizers), bad input, non-finite weights, logging, compile."""

import csv
import math

import lightning as L
import pytest
import torch
from conftest import RegressionModule, loader, make_net, reference_lookahead, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_lookahead import Lookahead, LookaheadCallback, NonFiniteError


class SyncLog(Callback):
    def __init__(self, cb):
        self.cb, self.syncs = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.syncs.append(self.cb.lookahead.syncs)


class PoisonGrad(RegressionModule):
    """Makes one gradient non-finite right after backward (before the scaler unscales and checks)."""

    def __init__(self, poison_batches, opt="sgd"):
        super().__init__(opt)
        self.poison_batches = set(poison_batches)

    def on_after_backward(self):
        if self.batch_idx_now in self.poison_batches:
            next(self.parameters()).grad[0, 0] = float("inf")

    def on_train_batch_start(self, batch, batch_idx):
        self.batch_idx_now = batch_idx


class FusedPoisonGrad(PoisonGrad):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)  # GradScaler calls step() with found_inf


@pytest.mark.parametrize("module", [PoisonGrad, FusedPoisonGrad], ids=["sgd", "fused-adam"])
def test_amp_skipped_step_does_not_count(module):
    """A real GradScaler skips the step with an inf gradient; the sync lands one batch later."""
    model = module(poison_batches={1})
    cb = LookaheadCallback(k=3, alpha=0.5)
    log = SyncLog(cb)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_epochs=1, plugins=[plugin], callbacks=[cb, log]).fit(model, loader())
    # batch 1 was skipped by the scaler (global_step counts only real steps)
    assert log.syncs == [0, 0, 0, 1, 1, 1]  # without the skip: [0, 0, 1, 1, 1, 2]
    assert cb.lookahead.steps == [5]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _syncs_under_grad_scaler(make_optimizer) -> tuple[list[int], Lookahead]:
    """Four GradScaler steps with k=2, the first with a non-finite gradient: syncs after each step."""
    net = make_net()
    opt = make_optimizer(net.parameters())
    la = Lookahead(k=2, alpha=0.5)
    la.attach([opt], net)
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(iter(loader()))
    syncs = []
    for i in range(4):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(net(x), y)).backward()
        if i == 0:
            net[0].weight.grad[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
        syncs.append(la.syncs)
    return syncs, la


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),  # GradScaler does not call step() on inf
        lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),  # step() is called with found_inf set
    ],
    ids=["sgd", "fused-adam"],
)
def test_amp_skip_plain_pytorch_grad_scaler(make_optimizer):
    syncs, la = _syncs_under_grad_scaler(make_optimizer)
    assert syncs == [0, 0, 1, 1]
    assert la.steps == [3]


class GAN(L.LightningModule):
    """Manual optimization with two optimizers stepping at different rates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gen, self.disc = nn.Linear(6, 6), nn.Linear(6, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        g_loss = -self.disc(self.gen(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        if batch_idx % 2 == 0:  # the discriminator steps every other batch
            d_loss = self.disc(self.gen(x).detach()).mean() - self.disc(x).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.05), torch.optim.Adam(self.disc.parameters(), lr=0.01)


def _gan_reference(batches, k, alpha):
    torch.manual_seed(0)
    gen, disc = nn.Linear(6, 6), nn.Linear(6, 1)
    opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=0.05), torch.optim.Adam(disc.parameters(), lr=0.01)
    slow = {m: [p.detach().clone() for p in m.parameters()] for m in (gen, disc)}
    steps = {gen: 0, disc: 0}

    def step(opt, m):
        opt.step()
        steps[m] += 1
        if steps[m] % k == 0:
            with torch.no_grad():
                for p, s in zip(m.parameters(), slow[m]):
                    s.add_(alpha * (p - s))
                    p.copy_(s)

    for batch_idx, (x, _) in enumerate(batches):
        opt_g.zero_grad()
        (-disc(gen(x)).mean()).backward()
        step(opt_g, gen)
        if batch_idx % 2 == 0:
            opt_d.zero_grad()
            (disc(gen(x).detach()).mean() - disc(x).mean()).backward()
            step(opt_d, disc)
    return slow, steps[gen], steps[disc]


def test_two_optimizers_each_count_their_own_steps():
    model = GAN()
    cb = LookaheadCallback(k=2, alpha=0.5)
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader())
    slow, n_g, n_d = _gan_reference(list(loader()), 2, 0.5)
    assert cb.lookahead.steps == [n_g, n_d] == [6, 3]
    assert cb.lookahead.syncs == 6 // 2 + 3 // 2
    for m, ref in ((model.gen, slow[_first(slow)]), (model.disc, slow[_second(slow)])):
        for p, s in zip(m.parameters(), ref):  # module holds the slow weights after fit
            torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)


def _first(d):
    return list(d)[0]


def _second(d):
    return list(d)[1]


def test_parameter_in_two_optimizers_is_refused():
    class Shared(RegressionModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.net[0].parameters(), lr=0.1)

        def training_step(self, batch, batch_idx):
            return None

    model = Shared()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="in optimizers 0 and 1"):
        trainer(max_epochs=1, callbacks=[LookaheadCallback()]).fit(model, loader())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "`k` must be an int >= 1"),
        (dict(k=-3), "`k` must be an int >= 1"),
        (dict(k=2.0), "`k` must be an int >= 1"),
        (dict(k=True), "`k` must be an int >= 1"),
        (dict(k="5"), "`k` must be an int >= 1"),
        (dict(alpha=0.0), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(alpha=1.5), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(alpha=-0.5), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(alpha=float("nan")), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(alpha=float("inf")), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(alpha=True), r"`alpha` must be a finite float in \(0, 1\]"),
        (dict(inner_state="pull-back"), r"`inner_state` must be one of \['keep', 'reset', 'pullback'\]"),
        (dict(eval_weights="average"), r"`eval_weights` must be one of \['slow', 'fast'\]"),
        (dict(on_nonfinite="ignore"), r"`on_nonfinite` must be one of \['warn', 'raise'\]"),
        (dict(check_ranks_every=0), "`check_ranks_every` must be None or an int >= 1"),
        (dict(log_stats="yes"), "`log_stats` must be a bool"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookaheadCallback(**kwargs)


def test_integral_values_are_accepted():
    import numpy as np

    cb = LookaheadCallback(k=np.int64(3), alpha=1)
    assert cb.k == 3 and isinstance(cb.k, int) and cb.alpha == 1.0


@pytest.mark.parametrize("policy", ["reset", "pullback"])
def test_unknown_optimizer_state_is_an_error_not_a_no_op(policy):
    class WithRMSprop(RegressionModule):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    with pytest.raises(ValueError, match="does not know the state of RMSprop"):
        trainer(max_epochs=1, callbacks=[LookaheadCallback(inner_state=policy)]).fit(WithRMSprop(), loader())
    # keep works with any optimizer
    trainer(max_epochs=1, callbacks=[LookaheadCallback(inner_state="keep")]).fit(WithRMSprop(), loader())


def test_pullback_slow_moment_is_not_an_alias():
    """Peers store the live buffer as the 'slow' moment, so every later pullback is a no-op."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(k=1, alpha=0.5, inner_state="pullback")
    la.attach([opt], net)
    x, y = next(iter(loader()))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    for name, p in net.named_parameters():
        live = opt.state[p]["momentum_buffer"]
        slow = la.slow_moments[0][name]
        assert slow.data_ptr() != live.data_ptr()
        assert torch.equal(slow, live)  # equal values right after a pullback, separate storage


class NaNAtStep(RegressionModule):
    def __init__(self, step):
        super().__init__("sgd")
        self.nan_step = step

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == self.nan_step:
            next(self.parameters()).grad[0, 0] = float("nan")


@pytest.mark.parametrize("log_stats", [True, False], ids=["stats-sync", "lean-sync"])
def test_nonfinite_fast_weights_never_reach_the_slow_weights(log_stats, tmp_path):
    model = NaNAtStep(step=3)  # the 4th step writes nan into theta; k=4 syncs right after it
    cb = LookaheadCallback(k=4, alpha=0.5, log_stats=log_stats)
    logger = CSVLogger(tmp_path, name="", version="") if log_stats else False  # logger + log_stats: stats path
    with pytest.warns(RuntimeWarning, match="inf/nan .* skipped") as rec:
        trainer(max_epochs=2, callbacks=[cb], logger=logger).fit(model, loader())
    assert bool(cb.lookahead.measure_distance) == log_stats
    assert len([w for w in rec if "inf/nan" in str(w.message)]) == 1  # warned once, though skipped twice
    slow = cb.lookahead.tensors()["slow"]
    init = dict(make_net().named_parameters())
    for name, s in slow.items():
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, init[name.removeprefix("net.")].detach())  # no sync was applied
    assert cb.lookahead.syncs == 0 and cb.lookahead.skipped == 3


def test_nonfinite_raise():
    with pytest.raises(NonFiniteError, match="inf/nan"):
        trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4, on_nonfinite="raise")]).fit(NaNAtStep(3), loader())


def test_logs_syncs_and_relative_distance_only_at_sync_steps(tmp_path):
    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=3, alpha=0.5)
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(model, loader())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    logged = {int(r["step"]): float(r["lookahead/rel_distance"]) for r in rows if r.get("lookahead/rel_distance")}
    syncs = {int(r["step"]): float(r["lookahead/syncs"]) for r in rows if r.get("lookahead/syncs")}
    # Lightning logs a step's metrics under the step index before increment: syncs after steps 3, 6, 9, 12
    assert sorted(logged) == [2, 5, 8, 11]
    assert [syncs[s] for s in sorted(syncs)] == [1, 2, 3, 4]
    for step in sorted(logged):
        # phi_s = phi + alpha (theta_s - phi)  =>  ||theta_s - phi|| = ||phi_s - phi|| / alpha
        _, slow_before = reference_lookahead("sgd", 3, 0.5, n_batches=step)  # no sync at step-1
        _, slow_after = reference_lookahead("sgd", 3, 0.5, n_batches=step + 1)
        before, after = (torch.cat([t.flatten() for t in x]) for x in (slow_before, slow_after))
        expected = ((after - before).norm() / 0.5 / before.norm()).item()
        assert math.isclose(logged[step], expected, rel_tol=1e-4)


@pytest.mark.parametrize("how", ["module", "submodule"])
def test_torch_compile(how):
    class Compiled(RegressionModule):
        def __init__(self):
            super().__init__("sgd")
            if how == "submodule":
                self.net = torch.compile(self.net, backend="aot_eager")

    model = Compiled()
    cb = LookaheadCallback(k=3, alpha=0.5)
    fit_model = torch.compile(model, backend="aot_eager") if how == "module" else model
    t = trainer(max_epochs=2, callbacks=[cb])
    t.fit(fit_model, loader(), loader(1))
    names = list(cb.lookahead.tensors()["slow"])
    assert all(("_orig_mod" in n) == (how == "submodule") for n in names)
    _, slow_ref = reference_lookahead("sgd", 3, 0.5, n_batches=12)
    for p, s in zip(model.parameters(), slow_ref):
        torch.testing.assert_close(p.detach(), s, atol=1e-5, rtol=0)
    assert model.val_param_snapshots  # validation ran (on slow weights) through the compiled module
    for p, s in zip(model.val_param_snapshots[-1], slow_ref):
        torch.testing.assert_close(p, s, atol=1e-5, rtol=0)


class _RecordOps:
    """Every ATen op dispatched inside the block (metadata-only ops such as views included)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


_METADATA_OPS = ("view", "slice", "alias", "detach", "_to_copy", "lift_fresh")


def _sync_kernels(n_tensors: int, k: int = 3) -> list[list[str]]:
    """The compute ops (no views) of each of k step-hook calls on n_tensors small parameters."""
    net = nn.ParameterList([nn.Parameter(torch.randn(7)) for _ in range(n_tensors)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    la = Lookahead(k=k, alpha=0.5)
    la.attach([opt], net)
    (hook,) = opt._optimizer_step_post_hooks.values()
    recorded = []
    for _ in range(k):
        with _RecordOps() as rec:
            hook(opt, (), {})
        recorded.append([op for op in rec.ops if not any(m in op for m in _METADATA_OPS)])
    return recorded


def test_non_sync_steps_do_no_tensor_work():
    """The step hook runs no tensor op (hence no kernel, no host sync) unless a sync is due."""
    recorded = _sync_kernels(3)
    assert recorded[0] == [] and recorded[1] == []
    assert any(op.startswith("aten.copy_") for op in recorded[2])  # the third step syncs


def test_sync_kernels_do_not_grow_with_the_number_of_tensors():
    """The contiguous layout: a sync launches the same kernels for 4 parameters as for 40 (the
    guard's one reduction, one lerp and one copy on the flat buffers), not one per parameter and op."""
    few, many = _sync_kernels(4)[2], _sync_kernels(40)[2]
    assert few == many, (few, many)
    assert sum(op.startswith("aten.lerp") for op in few) == 1 and sum(op.startswith("aten.copy_") for op in few) == 1
    assert sum(op.startswith("aten.sum") for op in few) == 1


def test_parameters_added_mid_run_get_slow_weights():
    """BaseFinetuning-style schedules add a param group mid-run; those parameters must join."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net[0])

        def finetune_function(self, pl_module, current_epoch, optimizer):
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.05, initial_denom_lr=1.0)

    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=4, alpha=0.5)
    with pytest.warns(RuntimeWarning, match="2 more parameter"):
        trainer(max_epochs=3, callbacks=[Unfreeze(), cb]).fit(model, loader())
    slow = cb.lookahead.tensors()["slow"]
    assert {"net.0.weight", "net.0.bias"} <= set(slow)
    # joined at the first sync of epoch 1 (step 8) and synced again at steps 12 and 16:
    # its slow weights moved away from the frozen initial values
    init = make_net().state_dict()
    assert not torch.equal(slow["net.0.weight"], init["0.weight"])
    assert torch.equal(model.net[0].weight.detach(), slow["net.0.weight"])  # module holds slow after fit


def test_reset_restores_a_fresh_sgd_even_with_dampening():
    """A fresh SGD sets its buffer to the first gradient; a zeroed buffer would give (1-d) * grad."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    la = Lookahead(k=2, alpha=1.0, inner_state="reset")
    la.attach([opt], net)
    x, y = next(iter(loader()))
    for _ in range(2):  # the second step syncs and resets
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    fresh_net = make_net()
    fresh_net.load_state_dict(net.state_dict())
    fresh = torch.optim.SGD(fresh_net.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    for model, o in ((net, opt), (fresh_net, fresh)):
        o.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        o.step()
    for a, b in zip(net.parameters(), fresh_net.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
