"""Outer momentum on the slow step (issue 9): SNOO / DiLoCo's outer step / SlowMo.

Every expected value comes from ``reference_outer`` below, written plainly: the slow weights are
separate leaf tensors and the outer optimizer is a real ``torch.optim.SGD(lr=alpha, momentum=mu,
nesterov=...)`` stepped with ``.grad = phi - theta``. Nothing in it calls this package.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import BATCH, RegressionModule, loader, make_net, make_optimizer, reference_lookahead, trainer
from test_eval_and_checkpoints import StatefulLoader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_lookahead import Lookahead, LookaheadCallback
from lightning_lookahead.callback import CHECKPOINT_KEY
from lightning_lookahead.outer import LerpStep

NAMES = [f"net.{n}" for n, _ in make_net().named_parameters()]
MU = 0.9
RESET_WARNING = "outer momentum buffer starts from zero"


# --------------------------------------------------------------------------- reference
def reference_outer(
    opt: str,
    k: int,
    alpha: float,
    mu: float,
    nesterov: bool,
    n_batches: int,
    inner_state: str = "keep",
    batch_size: int = BATCH,
    switch: tuple[int, float, bool] | None = None,
    new_inner_at: int | None = None,
    trace: list | None = None,
):
    """Lookahead with ``torch.optim.SGD`` as the outer optimizer on the pseudo-gradient.

    Runs ``n_batches`` batches of the shuffle-free loader (cycling epochs); every ``k`` inner steps:
    ``phi.grad = phi - theta``, ``outer.step()``, ``theta <- phi``, then the inner-state policy (as
    conftest.reference_lookahead does). ``switch=(step, mu2, nesterov2)``: after that many inner
    steps a fresh outer SGD with those settings takes over (a zero buffer); ``new_inner_at``: after
    that many steps a fresh inner optimizer takes over. ``trace`` collects, per
    sync, phi before, theta before and phi after. ``mu = 0`` is plain Lookahead, ``phi.lerp_(theta,
    alpha)`` (SGD without momentum computes the same value with other rounding). Returns (fast,
    slow, momentum buffers); a buffer is None where there is none (mu = 0, or no sync yet).
    """
    net = make_net(0)
    params = list(net.parameters())
    inner = make_optimizer(opt, params)
    slow = [nn.Parameter(p.detach().clone()) for p in params]

    def new_outer(m: float, nest: bool) -> torch.optim.SGD | None:
        return torch.optim.SGD(slow, lr=alpha, momentum=m, nesterov=nest) if m else None

    outer = new_outer(mu, nesterov)
    slow_m: dict[int, torch.Tensor] = {}
    first_moment = "momentum_buffer" if opt == "sgd" else "exp_avg"
    batches = list(loader(0, batch_size))
    steps = 0
    for b in range(n_batches):
        x, y = batches[b % len(batches)]
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
        steps += 1
        if steps % k == 0:
            with torch.no_grad():
                before = ([s.detach().clone() for s in slow], [p.detach().clone() for p in params])
                if outer is None:  # mu = 0: plain Lookahead, phi + alpha (theta - phi) as torch.lerp rounds it
                    for s, p in zip(slow, params):
                        s.lerp_(p, alpha)
                else:
                    for s, p in zip(slow, params):
                        s.grad = s.detach() - p.detach()  # the pseudo-gradient
                    outer.step()
                for s, p in zip(slow, params):
                    p.copy_(s)
                if trace is not None:
                    after = [s.detach().clone() for s in slow]
                    trace.append({"step": steps, "phi": before[0], "theta": before[1], "phi_new": after})
                for j, p in enumerate(params):
                    state = inner.state[p]
                    if inner_state == "reset":
                        for v in state.values():
                            v.zero_()
                    elif inner_state == "pullback":
                        m = state[first_moment]
                        sm = slow_m.setdefault(j, torch.zeros_like(m))
                        sm.lerp_(m, alpha)  # m_slow + alpha (m - m_slow)
                        m.copy_(sm)
        if switch is not None and steps == switch[0]:
            outer = new_outer(switch[1], switch[2])
        if steps == new_inner_at:  # the inner optimizer is re-created (fresh state); phi and b go on
            inner = make_optimizer(opt, params)
    momentum = [outer.state[s].get("momentum_buffer") if outer else None for s in slow]
    return [p.detach() for p in params], [s.detach() for s in slow], momentum


# --------------------------------------------------------------------------- helpers
def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def _plain(opt, k, alpha, mu, nesterov, n_batches, inner_state="keep", measure=True, net=None, **kw) -> Lookahead:
    """Lookahead.attach on a plain PyTorch loop (no Lightning)."""
    net = net if net is not None else make_net(0)
    inner = make_optimizer(opt, [p for p in net.parameters() if p.requires_grad])
    la = Lookahead(k, alpha, inner_state, outer_momentum=mu, nesterov=nesterov, measure_distance=measure, **kw)
    la.attach([inner], net)
    batches = list(loader())
    for b in range(n_batches):
        x, y = batches[b % len(batches)]
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
    la.detach()
    return la


def _assert_equal_lists(got: dict, expected: list, what: str) -> None:
    """``got``: name -> tensor, named as in the module (``net.`` prefix) or the bare net; in parameter order."""
    assert [n.removeprefix("net.") for n in got] == [n.removeprefix("net.") for n in NAMES], what
    for (n, g), e in zip(got.items(), expected):
        same = torch.equal(g, e)  # (not in the assert: keeps pytest's report short)
        assert same, (what, n, (g.double() - e.double()).abs().max().item())


def _fit(
    opt="sgd", epochs=2, k=4, alpha=0.5, mu=MU, nesterov=True, inner_state="keep", callbacks=(), train=None,
    ckpt_path=None, **kw,
):  # fmt: skip
    model = RegressionModule(opt, seed=123 if ckpt_path else 0)  # resumed: everything must come from the ckpt
    cb = LookaheadCallback(k=k, alpha=alpha, inner_state=inner_state, outer_momentum=mu, nesterov=nesterov)
    t = trainer(max_epochs=epochs, callbacks=[cb, *callbacks], **kw)
    t.fit(model, train if train is not None else loader(), loader(1), ckpt_path=ckpt_path)
    return model, cb, t


def _assert_same_run(model, cb, full, full_cb, label) -> None:
    """Resumed == uninterrupted, bit for bit: module (slow after fit), fast, slow, momentum, counters."""
    assert torch.equal(_flat(model.parameters()), _flat(full.parameters())), label
    for kind in ("fast", "slow", "momentum"):
        got, want = cb.lookahead.tensors()[kind], full_cb.lookahead.tensors()[kind]
        assert list(got) == list(want), (label, kind)
        for n in want:
            assert torch.equal(got[n], want[n]), (label, kind, n)
    assert (cb.lookahead.steps, cb.lookahead.syncs) == (full_cb.lookahead.steps, full_cb.lookahead.syncs), label


def _has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


# --------------------------------------------------------------------------- 1. exactly torch SGD
@pytest.mark.parametrize("measure", [True, False], ids=["stats-sync", "lean-sync"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy-ball"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_plain_pytorch_equals_torch_sgd_outer_optimizer_bit_for_bit(opt, nesterov, k, measure):
    la = _plain(opt, k, 0.5, MU, nesterov, n_batches=24, measure=measure)
    fast, slow, momentum = reference_outer(opt, k, 0.5, MU, nesterov, n_batches=24)
    tensors = la.tensors()
    _assert_equal_lists(tensors["fast"], fast, "fast")
    _assert_equal_lists(tensors["slow"], slow, "slow")
    _assert_equal_lists(tensors["momentum"], momentum, "momentum")
    assert la.syncs == 24 // k and la.skipped == 0
    # the momentum changes the trajectory: plain Lookahead would not pass the checks above
    assert not torch.allclose(_flat(slow), _flat(reference_lookahead(opt, k, 0.5, n_batches=24)[1]), atol=1e-4)


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy-ball"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_callback_equals_reference_at_diloco_setting(opt, nesterov):
    """alpha=0.7, mu=0.9 through Lightning: after fit the module holds the reference's slow weights."""
    model, cb, _ = _fit(opt, epochs=2, k=5, alpha=0.7, mu=MU, nesterov=nesterov)
    fast, slow, momentum = reference_outer(opt, 5, 0.7, MU, nesterov, n_batches=12)  # syncs at 5, 10
    for p, s in zip(model.parameters(), slow):
        assert torch.equal(p.detach(), s)
    _assert_equal_lists(cb.lookahead.tensors()["fast"], fast, "fast")
    _assert_equal_lists(cb.lookahead.tensors()["momentum"], momentum, "momentum")
    # validation after epoch 1 (step 6) saw the slow weights of the reference at that point
    _, slow6, _ = reference_outer(opt, 5, 0.7, MU, nesterov, n_batches=6)
    for p, s in zip(model.val_param_snapshots[0], slow6):
        assert torch.equal(p, s)


# --------------------------------------------------------------------------- 2. mu = 0 is Lookahead
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_zero_outer_momentum_is_plain_lookahead_bit_for_bit(opt, k, nesterov):
    la = _plain(opt, k, 0.5, 0.0, nesterov, n_batches=24)
    net = make_net(0)  # a default-constructed Lookahead on the same loop
    inner = make_optimizer(opt, net.parameters())
    plain = Lookahead(k, 0.5)
    plain.attach([inner], net)
    for b in range(24):
        x, y = list(loader())[b % 6]
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
    for kind in ("fast", "slow"):
        _assert_equal_lists(la.tensors()[kind], list(plain.tensors()[kind].values()), kind)
    fast_ref, slow_ref = reference_lookahead(opt, k, 0.5, n_batches=24)  # the paper's update, written plainly
    torch.testing.assert_close(_flat(la.tensors()["fast"].values()), _flat(fast_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(_flat(la.tensors()["slow"].values()), _flat(slow_ref), atol=1e-6, rtol=0)
    assert la.tensors()["momentum"] == {} and plain.tensors()["momentum"] == {}
    assert all(isinstance(g.outer, LerpStep) for g in la.groups)  # the lerp step: no buffer memory at all


def test_zero_outer_momentum_callback_equals_default_callback_and_saves_no_buffer(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, filename="last")
    model, cb, _ = _fit("adam", epochs=2, k=3, mu=0.0, nesterov=False, callbacks=[ck], enable_checkpointing=True)
    default = RegressionModule("adam")
    trainer(max_epochs=2, callbacks=[LookaheadCallback(k=3)]).fit(default, loader(), loader(1))
    assert torch.equal(_flat(model.parameters()), _flat(default.parameters()))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt[CHECKPOINT_KEY]["momentum"] == {}
    assert cb.lookahead.tensors()["momentum"] == {}


def test_one_momentum_buffer_per_trained_parameter_after_the_first_sync():
    net = make_net(0)
    net[0].requires_grad_(False)  # frozen, not optimised: no slow weights, no buffer
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    inner = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    la = Lookahead(k=2, alpha=0.5, outer_momentum=MU)
    la.attach([inner], net)
    x, y = next(iter(loader()))
    seen = []
    for _ in range(4):
        nn.functional.mse_loss(net(x), y).backward()
        inner.step()
        inner.zero_grad()
        seen.append(dict(la.tensors()["momentum"]))
    assert seen[0] == {}  # nothing before the first sync (no memory spent on a buffer yet)
    for buffers in seen[1:]:
        assert list(buffers) == trained
    params = dict(net.named_parameters())
    slow, fast = la.tensors()["slow"], la.tensors()["fast"]
    for n, b in seen[-1].items():
        assert b.shape == params[n].shape and b.dtype == params[n].dtype
        assert b.data_ptr() not in (slow[n].data_ptr(), fast[n].data_ptr())  # its own storage
        assert b.abs().sum() > 0
    assert all(seen[-1][n] is seen[1][n] for n in trained)  # updated in place, not re-allocated
    # mu = 0: still nothing after syncs
    la0 = _plain("sgd", 2, 0.5, 0.0, True, n_batches=4)
    assert la0.syncs == 2 and la0.tensors()["momentum"] == {}


class _Net(nn.Module):
    """Tensors larger than the sync's cache block (split into views), a non-contiguous one, a tiny one."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.big = nn.Parameter((torch.randn(700, 200, generator=g) * 0.05).to(dtype))  # 140000 > CPU_BLOCK
        self.tr = nn.Parameter((torch.randn(400, 400, generator=g) * 0.05).to(dtype).t())  # non-contiguous
        self.small = nn.Parameter(torch.randn(7, generator=g).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.big) @ self.tr[:200, :10] + self.small.sum()


def _lookahead_vs_torch_sgd(net_fn, dtype, n_in):
    """Six inner SGD steps, k=2: (Lookahead's, torch SGD's) [slow, fast, momentum] lists."""
    results = []
    for use_lookahead in (True, False):
        net = net_fn()
        params = list(net.parameters())
        inner = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if use_lookahead:
            la = Lookahead(k=2, alpha=0.7, outer_momentum=MU)
            la.attach([inner], net)
        else:
            slow = [nn.Parameter(p.detach().clone()) for p in params]
            outer = torch.optim.SGD(slow, lr=0.7, momentum=MU, nesterov=True)  # default: the per-tensor path
        g = torch.Generator().manual_seed(1)
        for step in range(1, 7):
            net(torch.randn(3, n_in, generator=g).to(dtype)).square().mean().backward()
            inner.step()
            inner.zero_grad()
            if not use_lookahead and step % 2 == 0:
                with torch.no_grad():
                    for s, p in zip(slow, params):
                        s.grad = s.detach() - p.detach()
                    outer.step()
                    for s, p in zip(slow, params):
                        p.copy_(s)
        if use_lookahead:
            t = la.tensors()
            results.append([list(t[kind].values()) for kind in ("slow", "fast", "momentum")])
        else:
            results.append([slow, params, [outer.state[s]["momentum_buffer"] for s in slow]])
    return results


def _assert_all_equal(results, dtype) -> None:
    for kind, got, want in zip(("slow", "fast", "momentum"), *results):
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(b).all(), (kind, i)  # a trajectory worth comparing
            same = torch.equal(a.detach(), b.detach())  # (not in the assert: keeps pytest's report short)
            assert same, (kind, i, str(dtype), (a.detach().double() - b.detach().double()).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_blocked_and_non_contiguous_tensors_equal_torch_sgd(dtype):
    """The sync works on cache blocks (views) of large tensors; still exactly torch.optim.SGD.
    (Not asked of bfloat16/float16 here: torch's own CPU kernels round a half-precision
    ``add(alpha=...)`` differently in a vectorised body and a scalar tail, so their bits depend on
    how a tensor is split, even without Lookahead.)"""
    from lightning_lookahead.outer import CPU_BLOCK

    assert _Net(dtype).big.numel() > CPU_BLOCK and not _Net(dtype).tr.is_contiguous()
    _assert_all_equal(_lookahead_vs_torch_sgd(lambda: _Net(dtype), dtype, 700), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_outer_momentum_equals_torch_sgd(dtype):
    """bfloat16/float16 weights (e.g. precision="bf16-true"), tensors below the cache block: the buffer
    must decay by mu itself, as torch.optim.SGD does (``buf.mul_(mu)`` computes in float32), not by
    mu rounded to the weights' dtype (0.9 -> 0.8984375 in bfloat16)."""
    _assert_all_equal(_lookahead_vs_torch_sgd(lambda: make_net(0).to(dtype), dtype, 6), dtype)


def test_replaced_optimizers_keep_the_momentum_buffer():
    """Optimizers re-created during fit (Lookahead.follow): slow weights and buffer carry over by name."""

    class Recreate(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # after step 6: one sync (step 4) made a buffer
                trainer.strategy.setup_optimizers(trainer)

    with pytest.warns(UserWarning, match="optimizers were replaced"):
        model, cb, _ = _fit("adam", epochs=2, k=4, mu=MU, callbacks=[Recreate()])
    fast, slow, momentum = reference_outer("adam", 4, 0.5, MU, True, n_batches=12, new_inner_at=6)
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), slow))
    _assert_equal_lists(cb.lookahead.tensors()["fast"], fast, "fast")
    _assert_equal_lists(cb.lookahead.tensors()["momentum"], momentum, "momentum")


# --------------------------------------------------------------------------- 3. exact resume
def _no_mismatch_warning(records) -> None:
    assert not [w for w in records if "saved with" in str(w.message)], [str(w.message) for w in records]


@pytest.mark.parametrize(
    "opt,nesterov,inner_state", [("sgd", True, "keep"), ("adam", False, "pullback"), ("adam", True, "reset")]
)
def test_resume_at_every_epoch_end_is_bit_identical_with_momentum(tmp_path, opt, nesterov, inner_state):
    """Epoch ends at steps 6, 12, 18 with k=4: mid-cycle, at a sync, mid-cycle; the buffer exists in all."""
    run = dict(opt=opt, k=4, mu=MU, nesterov=nesterov, inner_state=inner_state)
    full, full_cb, _ = _fit(epochs=4, **run)
    ck = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    _fit(epochs=3, callbacks=[ck], enable_checkpointing=True, **run)
    ckpts = sorted(tmp_path.glob("*.ckpt"))
    assert len(ckpts) == 3
    for path in ckpts:
        assert torch.load(path, weights_only=True)[CHECKPOINT_KEY]["momentum"]  # a buffer to restore
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            model, cb, _ = _fit(epochs=4, ckpt_path=path, **run)
        _no_mismatch_warning(rec)
        _assert_same_run(model, cb, full, full_cb, path.name)


@pytest.mark.filterwarnings("ignore:Lookahead.*only 1 optimizer step")
def test_resume_from_every_train_step_is_bit_identical_with_momentum(tmp_path):
    """A checkpoint after every step: before the first sync (no buffer yet), right after syncs and
    at every position inside the k-cycle."""
    full, full_cb, _ = _fit("adam", epochs=3, k=4, mu=MU)
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _fit("adam", epochs=2, k=4, mu=MU, callbacks=[ck], enable_checkpointing=True, train=StatefulLoader())
    ckpts = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    assert [int(p.stem.split("=")[1]) for p in ckpts] == list(range(1, 13))
    for path in ckpts:
        step = int(path.stem.split("=")[1])
        assert bool(torch.load(path, weights_only=True)[CHECKPOINT_KEY]["momentum"]) == (step >= 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, cb, t = _fit("adam", epochs=3, k=4, mu=MU, train=StatefulLoader(), ckpt_path=path)
        if step % 6 == 0:
            # Lightning's limitation (see test_eval_and_checkpoints): a checkpoint at the last batch of
            # an epoch resumes into the next epoch and loses one
            assert t.global_step == 12
            continue
        _assert_same_run(model, cb, full, full_cb, path.name)


def test_resume_from_checkpoint_written_inside_validation_is_bit_identical(tmp_path):
    class SaveInsideValidation(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):  # the slow weights are swapped in
            if not trainer.sanity_checking:
                trainer.save_checkpoint(tmp_path / f"inside{trainer.current_epoch}.ckpt")

    full, full_cb, _ = _fit("sgd", epochs=4, k=4, mu=MU, nesterov=False)
    _fit("sgd", epochs=2, k=4, mu=MU, nesterov=False, callbacks=[SaveInsideValidation()], num_sanity_val_steps=1)
    for path in sorted(tmp_path.glob("inside*.ckpt")):
        ckpt = torch.load(path, weights_only=True)
        # inside validation the module holds phi; the checkpoint still files phi, theta, b where they belong
        n = 6 * (int(path.stem[-1]) + 1)
        fast, slow, momentum = reference_outer("sgd", 4, 0.5, MU, False, n_batches=n)
        _assert_equal_lists({k: ckpt["state_dict"][k] for k in NAMES}, slow, "state_dict")
        _assert_equal_lists(ckpt[CHECKPOINT_KEY]["fast"], fast, "fast")
        _assert_equal_lists(ckpt[CHECKPOINT_KEY]["momentum"], momentum, "momentum")
        model, cb, _ = _fit("sgd", epochs=4, k=4, mu=MU, nesterov=False, ckpt_path=path)
        _assert_same_run(model, cb, full, full_cb, path.name)


# --------------------------------------------------------------------------- 4. checkpoint contents
def test_checkpoint_holds_the_buffer_next_to_the_fast_weights(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    model, cb, _ = _fit("adam", epochs=2, k=5, mu=MU, callbacks=[ck], enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)  # tensors, numbers, strings only
    fast, slow, momentum = reference_outer("adam", 5, 0.5, MU, True, n_batches=12)  # syncs 5, 10; saved at 12
    _assert_equal_lists(ckpt[CHECKPOINT_KEY]["momentum"], momentum, "momentum")  # SGD's momentum_buffer
    _assert_equal_lists(ckpt[CHECKPOINT_KEY]["fast"], fast, "fast")
    _assert_equal_lists({n: ckpt["state_dict"][n] for n in NAMES}, slow, "state_dict")  # deployable: phi
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("LookaheadCallback")]
    state = ckpt["callbacks"][key]
    assert not _has_tensor(state)  # Lightning deep-copies the callback state: no buffer there
    assert (state["outer_momentum"], state["nesterov"]) == (MU, True)
    assert not any("momentum" in k for k in ckpt["state_dict"])  # single file: no prefixed entries
    # the deployable model still loads without the callback
    loaded = RegressionModule.load_from_checkpoint(tmp_path / "epoch=1.ckpt")
    assert torch.equal(_flat(loaded.parameters()), _flat(slow))


# --------------------------------------------------------------------------- 5. other settings
@pytest.mark.parametrize(
    "saved,resumed",
    [((0.9, True), (0.5, True)), ((0.9, True), (0.9, False)), ((0.0, True), (0.9, True)), ((0.9, True), (0.0, True))],
    ids=["mu-0.9-to-0.5", "nesterov-to-heavy-ball", "mu-0-to-0.9", "mu-0.9-to-0"],
)
def test_checkpoint_with_other_outer_settings_warns_and_restarts_the_buffer(tmp_path, saved, resumed):
    ck = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    _fit("sgd", epochs=1, k=4, mu=saved[0], nesterov=saved[1], callbacks=[ck], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=RESET_WARNING):
        model, cb, _ = _fit(
            "sgd", epochs=2, k=4, mu=resumed[0], nesterov=resumed[1], ckpt_path=tmp_path / "epoch=0.ckpt"
        )
    assert (cb.lookahead.outer_momentum, cb.lookahead.nesterov) == resumed
    assert cb.lookahead.steps == [12] and cb.lookahead.syncs == 3
    # saved at step 6 (one sync at step 4); from there a fresh outer optimizer, i.e. a zero buffer
    fast, slow, momentum = reference_outer("sgd", 4, 0.5, saved[0], saved[1], 12, switch=(6, *resumed))
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), slow))
    if resumed[0] == 0.0:  # plain Lookahead from step 6 on: the loaded buffer is dropped, not kept
        assert cb.lookahead.tensors()["momentum"] == {}
    else:
        _assert_equal_lists(cb.lookahead.tensors()["momentum"], momentum, "momentum")
    if saved[0]:  # keeping the old buffer would have given another trajectory
        _, kept, _ = reference_outer("sgd", 4, 0.5, resumed[0], resumed[1], 12)
        assert not torch.equal(_flat(slow), _flat(kept))


def test_nesterov_flag_without_momentum_on_either_side_does_not_warn(tmp_path, recwarn):
    """nesterov means nothing at outer_momentum=0: no 'saved with' warning, no buffer to reset."""
    ck = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    _fit("sgd", epochs=1, k=4, mu=0.0, nesterov=False, callbacks=[ck], enable_checkpointing=True)
    _fit("sgd", epochs=2, k=4, mu=0.0, nesterov=True, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert not [w for w in recwarn if "saved with" in str(w.message)]


# --------------------------------------------------------------------------- 6. non-finite guard
class PoisonGrad(RegressionModule):
    """An inf gradient right after backward on the given batches (as in test_steps_and_inputs)."""

    def __init__(self, poison_batches, opt="sgd"):
        super().__init__(opt)
        self.poison_batches = set(poison_batches)

    def on_train_batch_start(self, batch, batch_idx):
        self.batch_idx_now = batch_idx

    def on_after_backward(self):
        if self.batch_idx_now in self.poison_batches:
            next(self.parameters()).grad[0, 0] = float("inf")


class Record(Callback):
    def __init__(self, cb):
        self.cb, self.rows = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = self.cb.lookahead.tensors()
        self.rows.append({kind: {n: v.clone() for n, v in t[kind].items()} for kind in ("slow", "momentum")})


@pytest.mark.parametrize("log_stats", [True, False], ids=["stats-sync", "lean-sync"])
def test_nonfinite_fast_weights_never_reach_the_buffer(tmp_path, log_stats):
    model = PoisonGrad(poison_batches={3})  # step 4 writes inf into theta; k=2 syncs right after it
    cb = LookaheadCallback(k=2, alpha=0.5, outer_momentum=MU, log_stats=log_stats)
    rec = Record(cb)
    logger = CSVLogger(tmp_path, name="", version="") if log_stats else False
    with pytest.warns(RuntimeWarning, match="inf/nan"):
        trainer(max_epochs=1, callbacks=[cb, rec], logger=logger).fit(model, loader())
    assert bool(cb.lookahead.measure_distance) == log_stats
    assert cb.lookahead.syncs == 1 and cb.lookahead.skipped == 2  # step 2 applied; 4 and 6 skipped
    after_first_sync = rec.rows[1]
    _, slow2, momentum2 = reference_outer("sgd", 2, 0.5, MU, True, n_batches=2)
    _assert_equal_lists(after_first_sync["momentum"], momentum2, "momentum after the applied sync")
    for row in rec.rows[3:]:  # the skipped syncs changed nothing, bit for bit
        for kind in ("slow", "momentum"):
            for n in NAMES:
                assert torch.equal(row[kind][n], after_first_sync[kind][n]), (kind, n)
                assert torch.isfinite(row[kind][n]).all()
    assert not torch.isfinite(cb.lookahead.tensors()["fast"]["net.0.weight"]).all()  # theta did diverge
    _assert_equal_lists(cb.lookahead.tensors()["slow"], slow2, "slow")


# --------------------------------------------------------------------------- 7. inner state
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy-ball"])
@pytest.mark.parametrize("inner_state", ["reset", "pullback"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_inner_state_policies_with_outer_momentum_equal_reference(opt, inner_state, nesterov):
    la = _plain(opt, 3, 0.5, MU, nesterov, n_batches=24, inner_state=inner_state)
    fast, slow, momentum = reference_outer(opt, 3, 0.5, MU, nesterov, n_batches=24, inner_state=inner_state)
    _assert_equal_lists(la.tensors()["fast"], fast, "fast")
    _assert_equal_lists(la.tensors()["slow"], slow, "slow")
    _assert_equal_lists(la.tensors()["momentum"], momentum, "momentum")
    # the policy mattered (a policy that silently did nothing would equal keep)
    _, kept, _ = reference_outer(opt, 3, 0.5, MU, nesterov, n_batches=24)
    assert not torch.equal(_flat(slow), _flat(kept))


def test_pullback_with_outer_momentum_through_the_callback():
    model, cb, _ = _fit("adam", epochs=4, k=3, mu=MU, inner_state="pullback")
    fast, slow, momentum = reference_outer("adam", 3, 0.5, MU, True, n_batches=24, inner_state="pullback")
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), slow))
    _assert_equal_lists(cb.lookahead.tensors()["fast"], fast, "fast")
    _assert_equal_lists(cb.lookahead.tensors()["momentum"], momentum, "momentum")


# --------------------------------------------------------------------------- 8. bad input
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.9", None])
@pytest.mark.parametrize("cls", [Lookahead, LookaheadCallback])
def test_bad_outer_momentum_is_refused(cls, value):
    with pytest.raises(ValueError, match=r"`outer_momentum` must be a finite float in \[0, 1\)"):
        cls(outer_momentum=value)


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
@pytest.mark.parametrize("cls", [Lookahead, LookaheadCallback])
def test_bad_nesterov_is_refused(cls, value):
    with pytest.raises(ValueError, match="`nesterov` must be a bool"):
        cls(outer_momentum=MU, nesterov=value)


@pytest.mark.parametrize("cls", [Lookahead, LookaheadCallback])
def test_integral_and_numpy_outer_momentum_are_accepted(cls):
    import numpy as np

    for value, expected in ((0, 0.0), (np.float64(0.9), 0.9), (np.float32(0.5), 0.5)):
        obj = cls(outer_momentum=value)
        assert obj.outer_momentum == expected and type(obj.outer_momentum) is float


# --------------------------------------------------------------------------- 9. logging
def _rows(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy-ball"])
def test_logs_relative_outer_step_at_sync_rows_only(tmp_path, nesterov):
    model = RegressionModule("sgd")
    cb = LookaheadCallback(k=3, alpha=0.5, outer_momentum=MU, nesterov=nesterov)
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(model, loader())
    rows = _rows(tmp_path)
    outer = {int(r["step"]): float(r["lookahead/rel_outer_step"]) for r in rows if r.get("lookahead/rel_outer_step")}
    dist = {int(r["step"]): float(r["lookahead/rel_distance"]) for r in rows if r.get("lookahead/rel_distance")}
    assert sorted(outer) == sorted(dist) == [2, 5, 8, 11]  # after steps 3, 6, 9, 12 (Lightning logs step - 1)
    trace: list = []
    reference_outer("sgd", 3, 0.5, MU, nesterov, n_batches=12, trace=trace)
    assert [t["step"] - 1 for t in trace] == sorted(outer)
    for t in trace:
        phi, theta, phi_new = (_flat(t[key]) for key in ("phi", "theta", "phi_new"))
        expected_step = ((phi_new - phi).norm() / phi.norm()).item()
        expected_dist = ((theta - phi).norm() / phi.norm()).item()
        assert math.isclose(outer[t["step"] - 1], expected_step, rel_tol=1e-4), t["step"]
        assert math.isclose(dist[t["step"] - 1], expected_dist, rel_tol=1e-4), t["step"]
    # with momentum the outer step is not alpha times the distance (else the new metric says nothing)
    assert not math.isclose(outer[5], 0.5 * dist[5], rel_tol=1e-2)


def test_no_outer_step_metric_without_momentum(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(max_epochs=1, callbacks=[LookaheadCallback(k=3)], logger=logger, log_every_n_steps=1).fit(
        RegressionModule("sgd"), loader()
    )
    rows = _rows(tmp_path)
    assert any(r.get("lookahead/rel_distance") for r in rows)
    assert "lookahead/rel_outer_step" not in rows[0]


# --------------------------------------------------------------------------- rank check (white box)
def test_rank_check_covers_the_momentum_buffers(monkeypatch):
    """check_ranks_every hands every replicated buffer to the collective next to its slow weights
    (single process: the collective itself is a no-op, so record what it is given)."""
    from lightning_lookahead import distributed

    calls = []
    def record(names, tensors):
        calls.append((list(names), list(tensors)))

    monkeypatch.setattr(distributed, "check_replicated", record)
    cb = LookaheadCallback(k=2, alpha=0.5, outer_momentum=MU, check_ranks_every=1)
    trainer(max_epochs=1, callbacks=[cb]).fit(RegressionModule("sgd"), loader())
    assert len(calls) == 3 + 1  # batches 2, 4, 6 and the end of training
    names, tensors = calls[-1]
    given = dict(zip(names, tensors))
    for n, b in cb.lookahead.tensors()["momentum"].items():
        assert torch.equal(given[f"{n} (outer momentum)"], b)
    assert set(cb.lookahead.tensors()["momentum"]) == set(NAMES)


# --------------------------------------------------------------------------- 10. distributed
STEPS_PER_EPOCH = 3  # 48 samples, global batch 16 (tests/dist/worker.py: k=4, alpha=0.5, SGD momentum 0.9)


def _dist():
    from test_distributed import load, run_worker  # noqa: PLC0415 (a slow-only dependency)

    return load, run_worker


def _assert_matches_single_process(slow: dict, epochs: int) -> None:
    # DDP averages two half-batch gradients: another float summation order than one 16-sample mean
    _, ref, _ = reference_outer("sgd", 4, 0.5, MU, True, n_batches=STEPS_PER_EPOCH * epochs, batch_size=16)
    for n, r in zip(NAMES, ref):
        torch.testing.assert_close(slow[n], r, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ddp_momentum_runs(tmp_path_factory):
    load, run_worker = _dist()
    root = tmp_path_factory.mktemp("ddp_om")
    common = ("--strategy", "ddp", "--outer-momentum", "0.9", "--epochs", "3", "--check-every", "1")
    run_worker(root / "full", *common, "--ckpt-dir", str(root / "ck"), "--csv", timeout=180)
    # epoch=1.ckpt is at step 6: after the sync at step 4 (a buffer to restore), mid k=4 cycle
    run_worker(root / "resumed", *common, "--ckpt", str(root / "ck" / "epoch=1.ckpt"), timeout=180)
    return root, load


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_outer_momentum_ranks_identical_resume_exact_and_single_process(ddp_momentum_runs):
    root, load = ddp_momentum_runs
    assert torch.load(root / "ck" / "epoch=1.ckpt", weights_only=True)[CHECKPOINT_KEY]["momentum"]
    for rank in (0, 1):
        full, resumed = load(root / "full", "fit", rank), load(root / "resumed", "fit", rank)
        assert full["steps"] == resumed["steps"] == [9] and full["syncs"] == 2
        for kind in ("slow", "fast", "momentum"):
            assert list(full[kind]) == NAMES, kind
            for n in NAMES:
                assert torch.equal(full[kind][n], resumed[kind][n]), (rank, kind, n)  # resumed == uninterrupted
                assert torch.equal(full[kind][n], load(root / "full", "fit", 0)[kind][n]), (rank, kind, n)  # ranks
    _assert_matches_single_process(load(root / "full", "fit", 0)["slow"], epochs=3)
    # --check-every 1 ran (it raises on a mismatch) and the outer step was logged once per sync, by rank 0
    rows = _rows(root / "full")
    assert sorted(int(r["step"]) for r in rows if r.get("lookahead/rel_outer_step")) == [3, 7]


@pytest.fixture(scope="module")
def fsdp2_momentum_runs(tmp_path_factory):
    load, run_worker = _dist()
    root = tmp_path_factory.mktemp("fsdp2_om")
    common = ("--strategy", "fsdp2", "--outer-momentum", "0.9", "--epochs", "4", "--no-validate")
    # A: uninterrupted, distributed checkpoint directories at every epoch end
    run_worker(root / "full", *common, "--ckpt-dir", str(root / "ck_dir"), timeout=180)
    # B: resumed from A's sharded directory at step 6; writes single-file (full) checkpoints itself
    run_worker(
        root / "from_dir", *common, "--full-ckpt", "--ckpt", str(root / "ck_dir" / "epoch=1.ckpt"),
        "--ckpt-dir", str(root / "ck_file"), timeout=180,
    )  # fmt: skip
    # C: resumed from B's single file at step 9 (after syncs at 4 and 8, mid-cycle)
    from_file = ("--full-ckpt", "--ckpt", str(root / "ck_file" / "epoch=2.ckpt"))
    run_worker(root / "from_file", *common, *from_file, timeout=180)
    return root, load


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp2_outer_momentum_resume_from_sharded_and_full_checkpoints_is_exact(fsdp2_momentum_runs):
    import torch.distributed.checkpoint as dcp

    root, load = fsdp2_momentum_runs
    saved = dcp.FileSystemReader(str(root / "ck_dir" / "epoch=1.ckpt")).read_metadata().state_dict_metadata
    assert {f"state_dict._lookahead_outer_momentum.{n}" for n in NAMES} <= set(saved)
    file_ckpt = torch.load(root / "ck_file" / "epoch=2.ckpt", weights_only=True)
    shapes = {f"net.{n}": p.shape for n, p in make_net().named_parameters()}
    assert {n: t.shape for n, t in file_ckpt[CHECKPOINT_KEY]["momentum"].items()} == shapes  # gathered, full
    for rank in (0, 1):
        full = load(root / "full", "fit", rank)
        assert full["steps"] == [12] and full["syncs"] == 3
        momentum_numel = sum(t.numel() for t in full["momentum"].values())
        assert momentum_numel * 2 == full["total_numel"]  # the buffer is sharded like the weights
        for layout in ("from_dir", "from_file"):
            resumed = load(root / layout, "fit", rank)
            assert resumed["steps"] == full["steps"]
            for kind in ("slow", "fast", "momentum"):
                assert list(resumed[kind]) == NAMES, (layout, kind)
                for n in NAMES:  # this rank's local shards
                    assert torch.equal(full[kind][n], resumed[kind][n]), (layout, rank, kind, n)
    gathered = {n: torch.cat([load(root / "full", "fit", r)["slow"][n] for r in (0, 1)]) for n in NAMES}
    _assert_matches_single_process(gathered, epochs=4)
