"""The pure-PyTorch sync on shapes the Lightning tests do not reach: tensors split into cache
blocks, non-contiguous tensors, mixed dtypes, half precision with large norms."""

import pytest
import torch

from lightning_lookahead.slow_weights import CPU_BLOCK, SlowWeights


def _params():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * CPU_BLOCK + 17, generator=g)  # split into views across blocks
    transposed = torch.randn(300, 700, generator=g).t()  # non-contiguous: kept whole
    small = [torch.randn(5, generator=g) for _ in range(40)]
    double = torch.randn(1000, dtype=torch.float64, generator=g)
    return [torch.nn.Parameter(t) for t in (big, transposed, *small, double)]


def _slow_weights() -> tuple[list[torch.nn.Parameter], SlowWeights]:
    params = _params()
    return params, SlowWeights([(f"p{i}", p) for i, p in enumerate(params)])


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_sync_matches_the_formula_on_blocked_and_odd_tensors(stats, alpha):
    params, sw = _slow_weights()
    phi = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # the inner optimizer's k steps
    theta = [p.detach().clone() for p in params]
    result = sw.sync(alpha, stats=stats)
    assert result.applied
    for p, f, s, t in zip(params, sw.slow_tensors().values(), phi, theta):
        expected = s + alpha * (t - s)
        torch.testing.assert_close(f, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(p.detach(), f)  # theta <- phi
        if alpha == 1.0:
            assert torch.equal(f, t)  # alpha=1 is exact
    if stats:
        d = torch.cat([(t - s).flatten().double() for t, s in zip(theta, phi)]).norm()
        n = torch.cat([s.flatten().double() for s in phi]).norm()
        torch.testing.assert_close(result.rel_distance.double(), d / n, rtol=1e-4, atol=0)


@pytest.mark.parametrize("stats", [True, False])
def test_nonfinite_anywhere_keeps_phi_bit_exact(stats):
    params, sw = _slow_weights()
    before = [t.clone() for t in sw.slow_tensors().values()]
    with torch.no_grad():
        params[0][2 * CPU_BLOCK + 3] = float("inf")  # in a late block of the big tensor
    assert not sw.sync(0.5, stats=stats).applied
    for a, b in zip(before, sw.slow_tensors().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_norm_is_not_mistaken_for_overflow(dtype):
    p = torch.nn.Parameter(torch.full((1_000_000,), 100.0, dtype=dtype))  # ||p|| = 1e5 > fp16 max
    sw = SlowWeights([("p", p)])
    with torch.no_grad():
        p.add_(1.0)
    for stats in (True, False):
        assert sw.sync(0.5, stats=stats).applied


def test_swap_is_a_pointer_exchange():
    params, sw = _slow_weights()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    fast_ptrs = [p.data_ptr() for p in params]
    slow_ptrs = [t.data_ptr() for t in sw.stash]
    sw.swap()
    assert [p.data_ptr() for p in params] == slow_ptrs  # no copy, no allocation
    sw.swap()
    assert [p.data_ptr() for p in params] == fast_ptrs


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_both_sync_paths_apply_the_identical_update(alpha):
    """Measuring the distance must not change the trajectory (resume with another logger setup)."""
    runs = []
    for stats in (True, False):
        params, sw = _slow_weights()
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) * 0.1)
        sw.sync(alpha, stats=stats)
        runs.append(torch.cat([p.detach().flatten().double() for p in params]))
    assert torch.equal(runs[0], runs[1])


def test_skipped_sync_leaves_theta_bit_exact():
    params, sw = _slow_weights()
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
        params[3][0] = float("nan")
    before = [p.detach().clone() for p in params]
    assert not sw.sync(0.5, stats=True).applied
    for a, b in zip(before, params):
        torch.testing.assert_close(b.detach(), a, atol=0, rtol=0, equal_nan=True)


def test_group_without_trainable_parameters_syncs_as_a_no_op():
    sw = SlowWeights([])
    for stats in (True, False):
        assert sw.sync(0.5, stats=stats).applied


def test_only_empty_parameters_sync_as_a_no_op():
    """A zero-element parameter (or an empty FSDP2 shard on this rank) still takes part in the
    guard, with a zero, instead of failing (every rank must reach the guard's all-reduce)."""
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    sw = SlowWeights([("e", empty)])
    assert sw.sync(0.5, stats=True).applied and sw.sync(0.5, stats=False).applied
    assert sw.sync(0.5, stats=True, momentum=0.9).applied
