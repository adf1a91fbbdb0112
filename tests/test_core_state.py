"""Lookahead's own state (``state_dict`` / ``load_state_dict``) for plain PyTorch and Fabric loops:
a run saved mid k-cycle and resumed continues bit for bit like the uninterrupted one, whatever the
module held when it was saved, whichever state is loaded first, wrapped or bare names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import loader, make_net, make_optimizer, reference_lookahead
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_lookahead import Lookahead

K, SAVE_AT, TOTAL = 3, 7, 14  # optimizer steps; 7 is one step into the third k-cycle
BATCHES = list(loader())
VARIANTS = {
    "keep": ("sgd", {}),
    "momentum": ("sgd", {"outer_momentum": 0.9}),
    "pullback": ("adam", {"inner_state": "pullback"}),
}


def build(variant: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Lookahead]:
    opt_name, kwargs = VARIANTS[variant]
    net = make_net(seed)
    return net, make_optimizer(opt_name, net.parameters()), Lookahead(k=K, alpha=0.5, **kwargs)


def step(net: nn.Module, opt: torch.optim.Optimizer, b: int, backward=None) -> None:
    x, y = BATCHES[b % len(BATCHES)]
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    backward(loss) if backward else loss.backward()
    opt.step()


def assert_same_run(net: nn.Module, la: Lookahead, ref_net: nn.Module, ref_la: Lookahead) -> None:
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        assert torch.equal(p, q), name
    assert (la.steps, la.syncs, la.skipped) == (ref_la.steps, ref_la.syncs, ref_la.skipped)
    mine, ref = la.state_dict(), ref_la.state_dict()
    for key in ("fast", "slow", "momentum", "slow_moments"):
        assert mine[key].keys() == ref[key].keys(), key
        for name in ref[key]:
            assert torch.equal(mine[key][name], ref[key][name]), (key, name)


def uninterrupted(variant: str) -> tuple[nn.Module, Lookahead]:
    net, opt, la = build(variant)
    la.attach([opt], net)
    for b in range(TOTAL):
        step(net, opt, b)
    return net, la


@pytest.mark.parametrize("variant", ["keep", "pullback"])
def test_uninterrupted_run_is_lookahead(variant):
    """The reference the resume tests compare against is Lookahead (conftest's plain Algorithm 1)."""
    net, la = uninterrupted(variant)
    opt_name, kwargs = VARIANTS[variant]
    fast, slow = reference_lookahead(opt_name, K, 0.5, TOTAL, inner_state=kwargs.get("inner_state", "keep"))
    assert la.syncs == TOTAL // K
    for p, f, s, mine in zip(net.parameters(), fast, slow, la.tensors()["slow"].values()):
        torch.testing.assert_close(p.detach(), f, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine, s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("saved_holding", ["fast", "slow"])
@pytest.mark.parametrize("order", ["model_first", "lookahead_first"])
def test_plain_loop_resumes_bit_identically(tmp_path, variant, saved_holding, order):
    ref_net, ref_la = uninterrupted(variant)

    net, opt, la = build(variant)
    la.attach([opt], net)
    for b in range(SAVE_AT):
        step(net, opt, b)
    if saved_holding == "slow":
        la.use_slow()  # e.g. saving after an evaluation on the slow weights
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "lookahead": la.state_dict()}
    torch.save(state, tmp_path / "c.pt")
    del net, opt, la  # the run ends here

    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    net, opt, la = build(variant, seed=1)  # other weights in the module until something is loaded
    la.attach([opt], net)
    if order == "model_first":
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        la.load_state_dict(ckpt["lookahead"])
    else:
        la.load_state_dict(ckpt["lookahead"])
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    assert la.swapped == (saved_holding == "slow")  # the module holds what it held at the save
    la.use_fast()  # as the saving run did after its evaluation
    for b in range(SAVE_AT, TOTAL):
        step(net, opt, b)
    assert_same_run(net, la, ref_net, ref_la)


def test_load_while_the_module_holds_the_slow_weights(tmp_path):
    """load_state_dict overwrites whatever the module holds, also while it is swapped."""
    ref_net, ref_la = uninterrupted("momentum")
    net, opt, la = build("momentum")
    la.attach([opt], net)
    for b in range(SAVE_AT):
        step(net, opt, b)
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "lookahead": la.state_dict()}
    torch.save(state, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)

    net, opt, la = build("momentum", seed=1)
    la.attach([opt], net)
    for b in range(4):  # some other training, then an evaluation
        step(net, opt, b)
    la.use_slow()
    la.load_state_dict(ckpt["lookahead"])
    opt.load_state_dict(ckpt["optimizer"])
    assert not la.swapped
    for b in range(SAVE_AT, TOTAL):
        step(net, opt, b)
    assert_same_run(net, la, ref_net, ref_la)


def _fabric_run(variant, path, *, save: bool, attach_wrapped: bool, saved_holding="fast", order="model_first"):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net, opt, la = build(variant, seed=0 if save else 1)
    fnet, fopt = fabric.setup(net, opt)
    la.attach([fopt], fnet if attach_wrapped else net)
    assert any(n.startswith("_forward_module.") for n, _ in fnet.named_parameters())
    if save:
        for b in range(SAVE_AT):
            step(fnet, fopt, b, fabric.backward)
        if saved_holding == "slow":
            la.use_slow()
        fabric.save(path, {"model": fnet, "optimizer": fopt, "lookahead": la})
        return None
    states = {"model": fnet, "optimizer": fopt, "lookahead": la}
    if order == "lookahead_first":
        states = {"lookahead": la, "model": fnet, "optimizer": fopt}
    fabric.load(path, states)
    assert la.swapped == (saved_holding == "slow")
    la.use_fast()
    for b in range(SAVE_AT, TOTAL):
        step(fnet, fopt, b, fabric.backward)
    return net, la


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("saved_holding", ["fast", "slow"])
@pytest.mark.parametrize("order", ["model_first", "lookahead_first"])
def test_fabric_loop_resumes_bit_identically(tmp_path, variant, saved_holding, order):
    """fabric.save / fabric.load with Lookahead as a stateful object; run 1 attaches to the
    Fabric-wrapped module (``_forward_module.`` names), run 2 to the bare one."""
    ref_net, ref_la = uninterrupted(variant)
    path = tmp_path / "fabric.ckpt"
    _fabric_run(variant, path, save=True, attach_wrapped=True, saved_holding=saved_holding)
    saved = torch.load(path, weights_only=True)["lookahead"]
    assert saved["params"] == [[n for n, _ in make_net().named_parameters()]]  # no wrapper prefix
    net, la = _fabric_run(variant, path, save=False, attach_wrapped=False, saved_holding=saved_holding, order=order)
    assert_same_run(net, la, ref_net, ref_la)


def test_fabric_bare_then_wrapped(tmp_path):
    ref_net, ref_la = uninterrupted("pullback")
    path = tmp_path / "fabric.ckpt"
    _fabric_run("pullback", path, save=True, attach_wrapped=False)
    net, la = _fabric_run("pullback", path, save=False, attach_wrapped=True)
    assert_same_run(net, la, ref_net, ref_la)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 4)  # a submodule that happens to be called `module`: its name stays
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.module(x))


def _wrapped_variants(seed: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(what Lookahead is attached to, the model whose parameters it has) per wrapping."""
    out = {}
    for kind in ("bare", "dp_ckpt", "compiled", "fabric"):
        torch.manual_seed(seed)
        inner = _Inner()
        if kind == "bare":
            out[kind] = (inner, inner)
        elif kind == "dp_ckpt":
            inner.head = checkpoint_wrapper(inner.head)
            out[kind] = (nn.DataParallel(inner), inner)
        elif kind == "compiled":
            out[kind] = (torch.compile(inner), inner)  # never called: only the names matter here
        else:
            out[kind] = (L.Fabric(accelerator="cpu", devices=1).setup_module(inner), inner)
    return out


@pytest.mark.parametrize("src", ["bare", "dp_ckpt", "compiled", "fabric"])
def test_names_without_wrapper_prefixes(src):
    """DDP/DataParallel ``module.``, activation checkpointing, ``torch.compile`` and Fabric
    prefixes are dropped, so a state moves between any two wrappings of the same model."""
    wrapper, inner = _wrapped_variants(0)[src]
    opt = torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.9)
    la = Lookahead(k=2, outer_momentum=0.5)
    la.attach([opt], wrapper)
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(1.0)
    la.sync(0)
    state = la.state_dict()
    assert state["params"] == [["module.weight", "module.bias", "head.weight", "head.bias"]]
    for dst, (wrapper2, inner2) in _wrapped_variants(1).items():
        opt2 = torch.optim.SGD(inner2.parameters(), lr=0.1, momentum=0.9)
        la2 = Lookahead(k=2, outer_momentum=0.5)
        la2.attach([opt2], wrapper2)
        la2.load_state_dict(state)
        for p, q in zip(inner.parameters(), inner2.parameters()):
            assert torch.equal(p, q), dst
        for key in ("slow", "momentum"):
            for a, b in zip(la.tensors()[key].values(), la2.tensors()[key].values()):
                assert torch.equal(a, b), (dst, key)


def _attached(net: nn.Module, n_optimizers: int = 1) -> Lookahead:
    params = list(net.parameters())
    split = [params] if n_optimizers == 1 else [params[:2], params[2:]]
    la = Lookahead(k=2)
    la.attach([torch.optim.SGD(ps, lr=0.1) for ps in split], net)
    return la


@pytest.mark.parametrize(
    ("source", "target", "error"),
    [
        (lambda: nn.Sequential(*make_net(), nn.Linear(2, 2)), make_net, "module lacks"),
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), make_net, "shape"),
    ],
    ids=["missing_names", "other_shapes"],
)
def test_a_state_that_does_not_fit_raises_and_changes_nothing(source, target, error):
    la = _attached(source())
    net = target(1)
    la2 = _attached(net)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=error):
        la2.load_state_dict(la.state_dict())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert la2.steps == [0] and not la2.swapped


def test_other_number_of_optimizers_raises():
    state = _attached(make_net(), n_optimizers=2).state_dict()
    with pytest.raises(ValueError, match="saved with 2 optimizer"):
        _attached(make_net()).load_state_dict(state)
    with pytest.raises(ValueError, match="updated by optimizer 0"):  # same count, other split
        _attached(make_net(), n_optimizers=2).load_state_dict(_swap_groups(state))


def _swap_groups(state):
    state = dict(state)
    state["params"] = [state["params"][1], state["params"][0]]
    return state


def test_load_before_attach_raises():
    state = _attached(make_net()).state_dict()
    with pytest.raises(RuntimeError, match="attach"):
        Lookahead(k=2).load_state_dict(state)


def test_counters_only_state_of_0_1_0_still_loads():
    la = _attached(make_net())
    old = {"k": 2, "alpha": 0.5, "inner_state": "keep", "steps": [5], "syncs": 2, "skipped": 0}
    with pytest.warns(DeprecationWarning, match="counters-only"):
        la.load_state_dict(old)
    assert (la.steps, la.syncs) == ([5], 2)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["plain_train.py", "fabric_train.py"])
def test_example_resumes_bit_identically(script):
    """The examples stop mid k-cycle, resume from the file and compare (about 20 s each)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, f"examples/{script}"], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].endswith("bit for bit: True")
