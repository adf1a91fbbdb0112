"""The pure-PyTorch sync and the contiguous storage on shapes the Lightning tests do not reach:
tensors spanning cache blocks, non-contiguous and channels-last tensors, mixed dtypes, half
precision, huge finite values, and parameters that users change under Lookahead."""

import pytest
import torch

from lightning_lookahead import slow_weights
from lightning_lookahead.outer import CPU_BLOCK, LerpStep
from lightning_lookahead.slow_weights import SlowWeights


def _params():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * CPU_BLOCK + 17, generator=g)  # spans blocks
    transposed = torch.randn(300, 700, generator=g).t()  # neither contiguous nor channels-last: own storage
    nhwc = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)  # kept channels-last
    small = [torch.randn(5, generator=g) for _ in range(40)]
    double = torch.randn(1000, dtype=torch.float64, generator=g)
    return [torch.nn.Parameter(t) for t in (big, transposed, nhwc, *small, double)]


def _slow_weights(alpha=0.5) -> tuple[list[torch.nn.Parameter], SlowWeights]:
    params = _params()
    return params, SlowWeights([(f"p{i}", p) for i, p in enumerate(params)], outer=LerpStep(alpha))


def _move(params, scale=0.1):
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) * scale)


@pytest.mark.parametrize("measure", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_sync_matches_the_formula_on_blocked_and_odd_tensors(measure, alpha):
    params, sw = _slow_weights(alpha)
    phi = [p.detach().clone() for p in params]
    _move(params)
    theta = [p.detach().clone() for p in params]
    result = sw.sync(measure)
    assert result.applied
    for p, f, s, t in zip(params, sw.slow_tensors().values(), phi, theta):
        assert torch.equal(f, torch.lerp(s, t, alpha))  # the very kernel, per tensor
        assert torch.equal(p.detach(), f)  # theta <- phi
        if alpha == 1.0:
            assert torch.equal(f, t)  # alpha=1 is exact
    if measure:
        d = torch.cat([(t - s).flatten().double() for t, s in zip(theta, phi)]).norm()
        n = torch.cat([s.flatten().double() for s in phi]).norm()
        torch.testing.assert_close(result.rel_distance.double(), d / n, rtol=1e-4, atol=0)
    else:
        assert result.rel_distance is None


def test_parameters_live_in_one_flat_buffer_and_keep_their_strides():
    params, sw = _slow_weights()
    flat = [b for b in sw.buckets if b.flat]
    assert len(flat) == 2  # float32 and float64; the transposed tensor has a bucket of its own
    f32 = next(b for b in flat if b.fast.dtype == torch.float32)
    base = f32.fast.data_ptr()
    for i in f32.idx:
        assert params[i].untyped_storage().data_ptr() == base  # a view of the bucket
    assert params[2].is_contiguous(memory_format=torch.channels_last)
    assert not params[1].is_contiguous()


@pytest.mark.parametrize("measure", [True, False])
def test_nonfinite_anywhere_keeps_phi_and_theta_bit_exact(measure):
    params, sw = _slow_weights()
    before = [t.clone() for t in sw.slow_tensors().values()]
    _move(params)
    with torch.no_grad():
        params[0][2 * CPU_BLOCK + 3] = float("inf")  # in a late block of the big tensor
        params[4][0] = float("nan")
    theta = [p.detach().clone() for p in params]
    assert not sw.sync(measure).applied
    for a, b in zip(before, sw.slow_tensors().values()):
        assert torch.equal(a, b)
    for a, p in zip(theta, params):
        torch.testing.assert_close(p.detach(), a, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype,value", [(torch.float32, 3e19), (torch.float64, 1e20), (torch.float64, 1e300)])
def test_huge_finite_weights_are_not_mistaken_for_inf(dtype, value):
    """The guard reads min and max, not a squared norm that overflows (||theta|| > 1.8e19 in float32)."""
    p = torch.nn.Parameter(torch.full((1000,), value, dtype=dtype))
    sw = SlowWeights([("p", p)], outer=LerpStep(0.5))
    phi = p.detach().clone()
    with torch.no_grad():
        p.mul_(0.5)
    theta = p.detach().clone()
    assert sw.sync().applied
    assert torch.equal(p.detach(), torch.lerp(phi, theta, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_norm_is_not_mistaken_for_overflow(dtype):
    p = torch.nn.Parameter(torch.full((1_000_000,), 100.0, dtype=dtype))  # ||p|| = 1e5 > fp16 max
    sw = SlowWeights([("p", p)], outer=LerpStep(0.5))
    with torch.no_grad():
        p.add_(1.0)
    for measure in (True, False):
        assert sw.sync(measure).applied


def test_swap_repoints_without_copying():
    params, sw = _slow_weights()
    _move(params, 1.0)
    fast_ptrs = [p.data_ptr() for p in params]
    slow = [t.clone() for t in sw.slow_tensors().values()]
    sw.swap()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, slow))
    flat_idx = {i for b in sw.buckets if b.flat for i in b.idx}
    views = {i: v.data_ptr() for b in sw.buckets if b.flat for i, v in zip(b.idx, b.views["slow"])}
    assert all(params[i].data_ptr() == views[i] for i in flat_idx)  # pointed at our slow buffer
    sw.swap()
    assert [p.data_ptr() for p in params] == fast_ptrs


def test_measuring_does_not_change_the_trajectory():
    runs = []
    for measure in (True, False):
        params, sw = _slow_weights()
        _move(params)
        sw.sync(measure)
        runs.append(torch.cat([p.detach().flatten().double() for p in params]))
    assert torch.equal(runs[0], runs[1])


def test_device_side_decision_is_bit_identical_and_skips_without_a_host_read(monkeypatch):
    """The CUDA path (decision as a 0-dim flag, torch.where) run on CPU: same result as the host path."""
    host_params, host = _slow_weights()
    _move(host_params)
    host.sync()
    monkeypatch.setattr(slow_weights, "DEVICE_SIDE", frozenset({"cpu"}))
    params, sw = _slow_weights()
    _move(params)
    result = sw.sync()
    assert isinstance(result.applied, torch.Tensor) and bool(result.applied)
    for a, b in zip(host_params, params):
        assert torch.equal(a.detach(), b.detach())
    before = [t.clone() for t in sw.slow_tensors().values()]
    with torch.no_grad():
        params[5][1] = float("nan")
    theta = [p.detach().clone() for p in params]
    result = sw.sync()
    assert not bool(result.applied)
    assert all(torch.equal(a, b) for a, b in zip(before, sw.slow_tensors().values()))
    for a, p in zip(theta, params):
        torch.testing.assert_close(p.detach(), a, atol=0, rtol=0, equal_nan=True)


def test_group_without_trainable_parameters_syncs_as_a_no_op():
    sw = SlowWeights([], outer=LerpStep(0.5))
    for measure in (True, False):
        assert sw.sync(measure).applied


def test_only_empty_parameters_sync_as_a_no_op():
    """A zero-element parameter (or an empty FSDP2 shard on this rank) still syncs."""
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    sw = SlowWeights([("e", empty)], outer=LerpStep(0.5))
    assert sw.sync(True).applied and sw.sync(False).applied


# ------------------------------------------------------------------ parameters that change under Lookahead
def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _group(net, alpha=0.5):
    return SlowWeights(list(net.named_parameters()), outer=LerpStep(alpha))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtype_change_after_attach_moves_the_slow_weights_along(dtype):
    net = _net()
    sw = _group(net)
    _move(list(net.parameters()))
    sw.sync()
    slow32 = {n: t.clone() for n, t in sw.slow_tensors().items()}
    net.to(dtype)  # the user changes the model's dtype mid-run
    _move(list(net.parameters()))
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert sw.sync().applied
    for n, p in net.named_parameters():
        assert p.dtype == dtype and sw.slow_tensors()[n].dtype == dtype
        assert torch.equal(p.detach(), torch.lerp(slow32[n].to(dtype), theta[n], 0.5))
    sw.swap()  # evaluation on the slow weights works in the new dtype
    net(torch.ones(1, 4, dtype=dtype))
    sw.swap()


def test_replaced_storage_and_channels_last_after_attach_are_followed():
    conv = torch.nn.Conv2d(3, 4, 3)
    sw = SlowWeights(list(conv.named_parameters()), outer=LerpStep(0.5))
    slow = {n: t.clone() for n, t in sw.slow_tensors().items()}
    conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.bias.data = conv.bias.data + 1.0  # p.data = ... : new storage
    theta = {n: p.detach().clone() for n, p in conv.named_parameters()}
    assert sw.sync().applied
    for n, p in conv.named_parameters():
        assert torch.equal(p.detach(), torch.lerp(slow[n], theta[n], 0.5))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_grown_parameter_keeps_the_old_slow_rows_and_warns():
    emb = torch.nn.Embedding(5, 3)
    sw = SlowWeights(list(emb.named_parameters()), outer=LerpStep(0.5))
    with torch.no_grad():
        emb.weight.add_(1.0)
    sw.sync()
    slow = sw.slow_tensors()["weight"].clone()
    with torch.no_grad():
        emb.weight.data = torch.cat([emb.weight.data, torch.zeros(2, 3)])  # grown to 7 rows
    with pytest.warns(RuntimeWarning, match="grew from"):
        sw.sync()
    assert sw.slow_tensors()["weight"].shape == (7, 3)
    assert torch.equal(sw.slow_tensors()["weight"][:5], torch.lerp(slow, slow, 0.5))
    assert torch.equal(sw.slow_tensors()["weight"][5:], torch.zeros(2, 3))


def test_shrunk_parameter_is_a_clear_error():
    lin = torch.nn.Linear(4, 4)
    sw = SlowWeights(list(lin.named_parameters()), outer=LerpStep(0.5))
    lin.weight.data = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="'weight' changed shape from"):
        sw.sync()


def test_release_gives_every_parameter_its_own_storage():
    net = _net()
    sw = _group(net)
    _move(list(net.parameters()))
    sw.sync()
    sw.swap()  # as after fit: the module holds the slow weights
    slow = {n: p.detach().clone() for n, p in net.named_parameters()}
    sw.release()
    for n, p in net.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # torch.save writes just this
        assert torch.equal(p.detach(), slow[n])
    fast = {n: t.clone() for n, t in sw.fast_tensors().items()}
    sw.swap()  # still usable: lays out again from what the parameters hold
    assert all(torch.equal(p.detach(), fast[n]) for n, p in net.named_parameters())
