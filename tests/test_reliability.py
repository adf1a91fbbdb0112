"""Reliability, round 3: a swapped re-attach, damaged checkpoints, errors that name the problem,
no false alarm after fit + test(ckpt_path), the outer state kept across a changed k, and a rank
check that compares bits (1 ulp, imaginary parts)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import RegressionModule, end_spawned_process, loader, make_net, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lookahead import Lookahead, LookaheadCallback
from lightning_lookahead.callback import CHECKPOINT_KEY
from lightning_lookahead.distributed import _bits_checksum


def _attached(**kw):
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    la = Lookahead(k=2, **kw)
    la.attach([opt], net)
    return net, opt, la


def _steps(net, opt, n):
    for x, y in list(loader())[:n]:
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_attach_while_the_slow_weights_are_swapped_in_starts_from_the_fast_ones():
    net, opt, la = _attached()
    _steps(net, opt, 3)  # one sync, then a step: fast != slow
    fast = [p.detach().clone() for p in net.parameters()]
    la.use_slow()
    la.attach([opt], net)
    assert not la.swapped
    for p, f in zip(net.parameters(), fast):
        assert torch.equal(p.detach(), f)
    for s, f in zip(la.tensors()["slow"].values(), fast):
        assert torch.equal(s, f)  # a fresh start: slow = fast


def test_sync_before_attach_names_the_mistake():
    with pytest.raises(RuntimeError, match="attach"):
        Lookahead().sync(0)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.update(steps="7"), "'steps' must be a list"),
        (lambda s: s.update(steps=[-1]), "'steps' must be a list of ints"),
        (lambda s: s.update(syncs="1"), "'syncs' must be an int"),
        (lambda s: s.update(fast=[1, 2]), "'fast' must be a Mapping"),
        (lambda s: s.update(version=99), "version 99"),
    ],
)
def test_core_load_state_dict_refuses_damaged_states_before_changing_anything(change, match):
    net, opt, la = _attached()
    _steps(net, opt, 3)
    state = la.state_dict()
    before = [p.detach().clone() for p in net.parameters()]
    change(state)
    with pytest.raises(ValueError, match=match):
        la.load_state_dict(state)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_numpy_values_are_accepted_like_python_ones():
    la = Lookahead(k=np.int64(3), alpha=np.float32(0.5), nesterov=np.bool_(False), measure_distance=np.bool_(True))
    assert (la.k, la.alpha, la.nesterov, la.measure_distance) == (3, 0.5, False, True)
    with pytest.raises(ValueError, match="`k` must be an int"):
        Lookahead(k=np.bool_(True))
    with pytest.raises(ValueError, match="`measure_distance` must be a bool"):
        Lookahead(measure_distance="yes")


def _checkpoint(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, filename="run", save_top_k=-1)
    trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4), ck], enable_checkpointing=True).fit(
        RegressionModule("sgd"), loader()
    )
    return tmp_path / "run.ckpt"


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda e: e["fast"].update({"net.0.weight": torch.zeros(1, 6)}), r"'net.0.weight' have shape \(1, 6\)"),
        (lambda e: e["fast"].update({"net.9.weight": torch.zeros(2)}), "'net.9.weight', which is not a parameter"),
        (lambda e: e.update(layout="flat-v2"), "'flat-v2', which this version does not know"),
        (lambda e: e.update(fast=[1]), r"\['fast'\] must map parameter names to tensors"),
    ],
)
def test_damaged_checkpoint_entry_is_a_clear_error_on_resume(tmp_path, damage, match):
    path = _checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt[CHECKPOINT_KEY])
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs=2, callbacks=[LookaheadCallback(k=4)]).fit(RegressionModule("sgd"), loader(), ckpt_path=path)


def test_missing_fast_weights_are_named_in_a_warning(tmp_path):
    path = _checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt[CHECKPOINT_KEY]["fast"].pop("net.2.bias")
    torch.save(ckpt, path)
    with pytest.warns(RuntimeWarning, match=r"no fast weights for 1 parameter\(s\).*net.2.bias"):
        trainer(max_epochs=2, callbacks=[LookaheadCallback(k=4)]).fit(RegressionModule("sgd"), loader(), ckpt_path=path)


def test_non_dict_entry_is_a_clear_error(tmp_path):
    path = _checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt[CHECKPOINT_KEY] = 3
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"checkpoint\['lookahead'\] must be a dict"):
        trainer(max_epochs=2, callbacks=[LookaheadCallback(k=4)]).fit(RegressionModule("sgd"), loader(), ckpt_path=path)


@pytest.mark.parametrize("state", [{"steps": 5}, {"k": 4}, [1, 2]])
def test_corrupted_callback_state_is_a_clear_error(state):
    cb = LookaheadCallback(k=4)
    cb._stage = "fit"
    with pytest.raises(ValueError, match="LookaheadCallback state is corrupted"):
        cb.load_state_dict(state)  # type: ignore[arg-type]


def test_fit_then_test_best_checkpoint_says_nothing_until_such_a_checkpoint_is_saved(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    t = trainer(max_epochs=2, callbacks=[LookaheadCallback(k=2), ck], enable_checkpointing=True)
    model = RegressionModule("sgd")
    t.fit(model, loader(), loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.test(model, loader(), ckpt_path="best", verbose=False)
    assert not [w for w in caught if "Lookahead" in str(w.message)]
    with pytest.warns(UserWarning, match="weights loaded after fit"):
        t.save_checkpoint(tmp_path / "after_test.ckpt")


def test_changed_k_keeps_the_outer_momentum_buffer():
    net, opt, la = _attached(outer_momentum=0.9)
    _steps(net, opt, 4)
    state = la.state_dict()
    assert state["momentum"]
    net2 = make_net()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    other_k = Lookahead(k=3, outer_momentum=0.9)
    other_k.attach([opt2], net2)
    with pytest.warns(RuntimeWarning, match="'k': 2"):
        other_k.load_state_dict(state)
    for name, b in state["momentum"].items():
        assert torch.equal(other_k.tensors()["momentum"][name], b)  # the same outer optimizer: kept


def test_rank_checksum_sees_one_ulp_and_imaginary_parts():
    x = torch.randn(1000)
    y = x.clone()
    y[517] = torch.nextafter(y[517], torch.tensor(float("inf")))  # one ulp, one element
    assert not torch.equal(_bits_checksum(x), _bits_checksum(y))
    swapped = x.clone()
    swapped[[3, 4]] = swapped[[4, 3]]  # same values, other positions
    assert not torch.equal(_bits_checksum(x), _bits_checksum(swapped))
    c = torch.randn(50, dtype=torch.complex64)
    d = c.clone()
    d[7] += 1e-3j  # only the imaginary part differs
    assert not torch.equal(_bits_checksum(c), _bits_checksum(d))
    assert torch.equal(_bits_checksum(x), _bits_checksum(x.clone()))


# ------------------------------------------------------------------ found by the adversarial review of the redesign
def test_slow_weights_carry_no_autograd_history_and_copies_work():
    """attach with grad enabled (a plain loop): the slow weights are constants for autograd."""
    import copy

    net, opt, la = _attached()
    slow = la.tensors()["slow"]["0.bias"]
    assert not slow.requires_grad and slow.grad_fn is None
    p = net[0].bias
    with torch.no_grad():
        p.add_(1.0)
    ((p - slow) ** 2).sum().backward()
    assert torch.equal(p.grad, 2 * (p.detach() - slow))
    copy.deepcopy(la)


def test_outer_optimizer_that_overflows_is_named_not_silent():
    """float16 weights with Adam's eps=1e-8 (underflows to 0): the outer step makes inf/nan from finite weights."""
    import functools

    from lightning_lookahead import NonFiniteError

    m = torch.nn.Linear(8, 8).half()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    la = Lookahead(k=2, outer_optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    la.attach([opt], m)
    with pytest.raises(NonFiniteError, match="outer optimizer \\(Adam\\) turned finite weights into inf/nan"):
        for _ in range(2):
            with torch.no_grad():
                m.weight[0].add_(1e-3)  # the other rows' pseudo-gradient is 0: Adam divides 0 by 0 + 0
            opt.step()


def test_outer_optimizer_that_cannot_step_is_refused_at_once():
    import functools

    with pytest.raises(ValueError, match="trial step failed"):
        Lookahead(outer_optimizer=functools.partial(torch.optim.LBFGS, lr=0.1))  # needs a closure


def test_parameters_overlapping_in_memory_are_refused():
    base = torch.zeros(10)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(base[0:6])
    m.b = torch.nn.Parameter(base[4:10])
    with pytest.raises(ValueError, match="'a' and 'b' overlap in memory"):
        Lookahead().attach([torch.optim.SGD(m.parameters(), lr=0.1)], m)


def test_scalar_parameter_step_counter_keeps_its_dtype_when_the_model_is_cast():
    import functools

    m = torch.nn.Module()
    m.scale = torch.nn.Parameter(torch.tensor(2.0))
    m.w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    la = Lookahead(k=1, outer_optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    la.attach([opt], m)
    for _ in range(2):
        (m.scale * m.w).sum().backward()
        opt.step()
        opt.zero_grad()
    m.bfloat16()
    (m.scale * m.w).sum().backward()
    opt.step()
    state = la.tensors()["outer_state"]["scale"]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["step"].dtype == torch.float32
    assert float(state["step"]) == 3.0


def test_a_new_view_at_the_same_address_is_noticed():
    """p.data = p.data.t(): the same pointer with another shape; noticed (a clear error), never
    silently reverted by the next swap."""
    net, opt, la = _attached()
    w = net[0].weight
    w.data = w.data.t()
    with pytest.raises(ValueError, match=r"'0.weight' changed shape from \(16, 6\) to \(6, 16\)"):
        la.use_slow()


def test_stepping_while_swapped_is_a_clear_error():
    net, opt, la = _attached()
    la.use_slow()
    torch.nn.functional.mse_loss(net(torch.ones(1, 6)), torch.zeros(1, 2)).backward()
    with pytest.raises(RuntimeError, match="stepped while the slow weights are swapped in"):
        opt.step()


def _replicated_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from lightning_lookahead.distributed import RankMismatchError, check_replicated

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.linspace(-1e3, 1e3, 1000)
    check_replicated(["x"], [x])  # identical: passes
    if rank == 1:
        x[517] = torch.nextafter(x[517], torch.tensor(float("inf")))
    try:
        check_replicated(["x"], [x])
        result = "passed"
    except RankMismatchError as e:
        result = str(e)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(result)
    end_spawned_process()


def test_check_replicated_raises_on_every_rank_for_one_ulp(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_replicated_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        assert "first differing entry: 'x'" in (tmp_path / f"rank{rank}.txt").read_text()


def test_large_finite_float16_weights_pass_the_outer_step_check():
    """The outer step's own finiteness check is exact: a float16 sum of these weights overflows, they do not."""
    m = torch.nn.Linear(1000, 100).half()
    with torch.no_grad():
        m.weight.fill_(50.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    la = Lookahead(k=1, outer_momentum=0.5)
    la.attach([opt], m)
    opt.step()
    assert la.syncs == 1 and torch.equal(m.weight.detach(), torch.full((100, 1000), 50.0, dtype=torch.half))
