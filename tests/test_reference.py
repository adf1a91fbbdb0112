"""The callback against an independent, plainly written Lookahead loop (the paper's Algorithm 1)."""

import tempfile

import pytest
import torch
from conftest import RegressionModule, loader, reference_lookahead, trainer
from lightning.pytorch.callbacks import Callback as L_Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_lookahead import LookaheadCallback

ATOL = 1e-6


def _fit(opt, k, alpha, batches, inner_state="keep", accumulate=1, log_stats=True):
    model = RegressionModule(opt)
    cb = LookaheadCallback(k=k, alpha=alpha, inner_state=inner_state, log_stats=log_stats)
    # with a logger, log_stats and a row every step every sync also measures the distance
    logger = CSVLogger(tempfile.mkdtemp(), name="", version="") if log_stats else False
    t = trainer(max_epochs=batches // 6, accumulate_grad_batches=accumulate, callbacks=[cb], logger=logger,
                log_every_n_steps=1)
    t.fit(model, loader())
    assert bool(cb.lookahead.measure_distance) == log_stats
    return model, cb


@pytest.mark.parametrize("log_stats", [True, False], ids=["stats-sync", "lean-sync"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_reference(opt, k, log_stats):
    model, cb = _fit(opt, k, 0.5, batches=24, log_stats=log_stats)
    fast_ref, slow_ref = reference_lookahead(opt, k, 0.5, n_batches=24)
    # after fit the module holds the slow weights; the fast ones live in the callback
    for p, s in zip(model.parameters(), slow_ref):
        torch.testing.assert_close(p.detach(), s, atol=ATOL, rtol=0)
    fast = cb.lookahead.tensors()["fast"]
    for (name, _), f in zip(model.named_parameters(), fast_ref):
        torch.testing.assert_close(fast[name], f, atol=ATOL, rtol=0)
    assert cb.lookahead.syncs == 24 // k


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("inner_state", ["keep", "reset", "pullback"])
def test_inner_state_policies_match_reference(opt, inner_state):
    model, cb = _fit(opt, 3, 0.5, batches=24, inner_state=inner_state)
    fast_ref, slow_ref = reference_lookahead(opt, 3, 0.5, n_batches=24, inner_state=inner_state)
    for p, s in zip(model.parameters(), slow_ref):
        torch.testing.assert_close(p.detach(), s, atol=ATOL, rtol=0)
    fast = cb.lookahead.tensors()["fast"]
    for (name, _), f in zip(model.named_parameters(), fast_ref):
        torch.testing.assert_close(fast[name], f, atol=ATOL, rtol=0)


def test_policies_differ():
    """Each policy changes the trajectory (a policy that silently did nothing would equal keep)."""
    results = {}
    for policy in ["keep", "reset", "pullback"]:
        model, _ = _fit("adam", 3, 0.5, batches=24, inner_state=policy)
        results[policy] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.allclose(results["keep"], results["reset"], atol=1e-4)
    assert not torch.allclose(results["keep"], results["pullback"], atol=1e-4)
    assert not torch.allclose(results["reset"], results["pullback"], atol=1e-4)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_accumulation_counts_optimizer_steps(opt):
    # 6 batches per epoch, accumulate 4: steps after batches 4 and 6 (forced at epoch end)
    model, cb = _fit(opt, 3, 0.5, batches=18, accumulate=4)
    assert cb.lookahead.steps == [6]
    assert cb.lookahead.syncs == 2
    fast_ref, slow_ref = reference_lookahead(opt, 3, 0.5, n_batches=18, accumulate=4)
    for p, s in zip(model.parameters(), slow_ref):
        torch.testing.assert_close(p.detach(), s, atol=ATOL, rtol=0)


@pytest.mark.parametrize("log_stats", [True, False], ids=["stats-sync", "lean-sync"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_k1_alpha1_is_plain_training(opt, log_stats):
    plain = RegressionModule(opt)
    trainer(max_epochs=3).fit(plain, loader())
    la, _ = _fit(opt, 1, 1.0, batches=18, log_stats=log_stats)
    for a, b in zip(plain.parameters(), la.parameters()):
        assert torch.equal(a, b)


def test_first_sync_after_exactly_k_steps():
    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=4, alpha=0.5)
    seen = []

    class Probe(L_Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(cb.lookahead.syncs)

    trainer(max_epochs=1, callbacks=[cb, Probe()]).fit(model, loader())
    assert seen == [0, 0, 0, 1, 1, 1]

