"""Local SGD (LookaheadCallback(local_sgd=True)): real 2-process runs (gloo on CPU) against an
independent simulation (tests/test_worker_groups.py's, with one rank per worker), against ordinary
DDP, with communication counted per step.

The 2-process runs are shared between tests by module-scoped fixtures. The worker is
tests/dist/worker.py (rank r trains on samples r, r+2, ...: 24 samples, 3 batches of 8 per epoch).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from conftest import end_spawned_process, make_net
from test_distributed import NAMES, load, run_worker
from test_worker_groups import assert_matches_simulation  # one copy per worker; here a worker is a rank
from torch import nn

from lightning_lookahead import Lookahead, local_sgd

pytestmark = pytest.mark.slow
N_PARAMS = sum(p.numel() for p in make_net().parameters())  # 146 float32 values, no buffers


def comm(out: Path, rank: int) -> dict:
    return torch.load(out / f"comm_rank{rank}.pt", weights_only=False)


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory):
    """SGD(momentum 0.9) + plain Lookahead (alpha 0.5), k=4, 12 steps (syncs after 4, 8, 12), and
    its resume from the epoch-0 checkpoint (step 3: mid-round, fast weights differ per rank)."""
    root = tmp_path_factory.mktemp("local_sgd_sgd")
    common = ("--strategy", "ddp", "--local-sgd", "--opt", "sgd", "--k", "4", "--alpha", "0.5", "--epochs", "4")
    run_worker(root / "full", *common, "--ckpt-dir", str(root / "ck"), "--csv", "--count-comm", "--check-every", "1", "--no-validate")
    run_worker(root / "resumed", *common, "--ckpt", str(root / "ck" / "epoch=0.ckpt"), "--no-validate")
    return root


@pytest.fixture(scope="module")
def diloco_runs(tmp_path_factory):
    """Adam + the DiLoCo outer step (alpha 0.7, Nesterov mu 0.9), k=3, 9 steps, under ddp_spawn;
    resumed (under ddp) from the epoch-0 checkpoint, at step 3: a sync boundary."""
    root = tmp_path_factory.mktemp("local_sgd_diloco")
    common = ("--local-sgd", "--opt", "adam", "--k", "3", "--alpha", "0.7", "--outer-momentum", "0.9", "--epochs", "3")
    run_worker(root / "full", "--strategy", "ddp_spawn", *common, "--ckpt-dir", str(root / "ck"), "--count-comm", "--no-validate")
    run_worker(root / "resumed", "--strategy", "ddp", *common, "--ckpt", str(root / "ck" / "epoch=0.ckpt"), "--no-validate")
    return root


@pytest.fixture(scope="module")
def k1_runs(tmp_path_factory):
    """Stateless SGD, k=1, alpha=1: local SGD and ordinary DDP (with Lookahead at k=1, alpha=1,
    which is plain training), both with the communication counter."""
    root = tmp_path_factory.mktemp("local_sgd_k1")
    common = ("--strategy", "ddp", "--opt", "sgd0", "--k", "1", "--alpha", "1", "--epochs", "2", "--count-comm", "--no-validate")
    run_worker(root / "local", *common, "--local-sgd")
    run_worker(root / "ddp", *common)
    return root


@pytest.fixture(scope="module")
def pullback_runs(tmp_path_factory):
    """Adam + inner_state="pullback", k=2, 6 steps, resumed from the epoch-0 checkpoint (step 3: after
    the first sync, mid-round): each rank's pullback slow moments are its own (they follow its own
    first moments)."""
    root = tmp_path_factory.mktemp("local_sgd_pullback")
    common = ("--strategy", "ddp", "--local-sgd", "--opt", "adam", "--inner", "pullback", "--k", "2", "--epochs", "2")
    run_worker(root / "full", *common, "--ckpt-dir", str(root / "ck"), "--no-validate")
    run_worker(root / "resumed", *common, "--ckpt", str(root / "ck" / "epoch=0.ckpt"), "--no-validate")
    return root


# ----------------------------------------------------------------------------- equivalences
def test_sgd_plain_lookahead_equals_simulation(sgd_runs):
    fit = load(sgd_runs / "full", "fit", 0)
    assert fit["steps"] == [12] and fit["syncs"] == 3
    assert_matches_simulation(sgd_runs / "full", 2, opt="sgd", k=4, alpha=0.5, mu=0.0, n_steps=12, per_worker=1)


def test_adam_diloco_outer_step_equals_simulation(diloco_runs):
    fit = load(diloco_runs / "full", "fit", 0)
    assert fit["steps"] == [9] and fit["syncs"] == 3 and fit["momentum"]
    assert_matches_simulation(diloco_runs / "full", 2, opt="adam", k=3, alpha=0.7, mu=0.9, n_steps=9, per_worker=1)


def test_k1_alpha1_local_sgd_equals_ordinary_ddp(k1_runs):
    """Averaging the weights after one SGD step from identical weights is averaging the gradients."""
    for rank in (0, 1):
        local, ddp = load(k1_runs / "local", "fit", rank), load(k1_runs / "ddp", "fit", rank)
        assert local["steps"] == ddp["steps"] == [6]
        for n in NAMES:
            # tolerance 1e-6: mean(theta - lr g_r) vs theta - lr mean(g_r), float32 rounding only
            torch.testing.assert_close(local["fast"][n], ddp["fast"][n], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(local["slow"][n], ddp["slow"][n], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- communication
def test_no_gradient_all_reduce_and_one_weight_all_reduce_per_sync(sgd_runs, diloco_runs, k1_runs):
    # the counter works: ordinary DDP all-reduces gradients at every one of its 6 steps
    assert sorted(comm(k1_runs / "ddp", 0)["grad_buckets"]) == list(range(6))
    for out, k, steps in ((sgd_runs / "full", 4, 12), (diloco_runs / "full", 3, 9), (k1_runs / "local", 1, 6)):
        for rank in (0, 1):
            c = comm(out, rank)
            assert c["grad_buckets"] == {}, (out, rank)  # not one gradient all-reduce, sync steps included
            # the weight averages: one float32 all-reduce of all 146 parameters, at sync steps only
            # (global_step inside the step hook = completed steps = step - 1); the rank check's
            # float64 checksums and validation's 1-element logging are the other all-reduces
            weights = [step for step, dtype, n, *_ in c["all_reduces"] if dtype == "torch.float32" and n == N_PARAMS]
            assert weights == [s - 1 for s in range(k, steps + 1, k)], (out, rank, c["all_reduces"])


def test_bytes_per_step_are_logged(sgd_runs):
    rows = [r for r in csv.DictReader(open(sgd_runs / "full" / "metrics.csv")) if r.get("lookahead/inter_bytes")]
    assert [(int(r["step"]), float(r["lookahead/inter_bytes"])) for r in rows] == [(3, 584.0), (7, 1168.0), (11, 1752.0)]
    # 146 float32 = 584 bytes every k=4 steps: 146 bytes per step, DDP's gradient all-reduce moves 584
    assert {float(r["lookahead/inter_bytes_per_step"]) for r in rows} == {146.0}
    assert {float(r["lookahead/intra_bytes_per_step"]) for r in rows} == {0.0}  # one rank per worker


# ----------------------------------------------------------------------------- replication
@pytest.mark.parametrize("runs", ["sgd_runs", "diloco_runs"])
def test_ranks_identical_after_every_sync_and_slow_weights_always(runs, request):
    out = request.getfixturevalue(runs) / "full"
    a, b = comm(out, 0)["after_sync"], comm(out, 1)["after_sync"]
    assert len(a) == len(b) == 3
    for snap_a, snap_b in zip(a, b):
        for n in NAMES:
            assert torch.equal(snap_a[n], snap_b[n]), n
    r0, r1 = load(out, "fit", 0), load(out, "fit", 1)
    for n in NAMES:
        assert torch.equal(r0["slow"][n], r1["slow"][n])


def test_fast_weights_differ_between_syncs(sgd_runs):
    """The epoch-0 checkpoint (step 3, mid-round) holds both ranks' own fast weights, and they differ."""
    ckpt = torch.load(sgd_runs / "ck" / "epoch=0.ckpt", weights_only=True)
    per_rank = ckpt["lookahead"]["per_rank"]
    assert len(per_rank) == 2
    assert not torch.equal(per_rank[0]["fast"]["net.0.weight"], per_rank[1]["fast"]["net.0.weight"])
    assert torch.equal(per_rank[0]["fast"]["net.0.weight"], ckpt["lookahead"]["fast"]["net.0.weight"])
    m0 = per_rank[0]["optimizers"][0]["state"][0]["momentum_buffer"]
    m1 = per_rank[1]["optimizers"][0]["state"][0]["momentum_buffer"]
    assert not torch.equal(m0, m1)  # the inner optimizer state is per rank too


# ----------------------------------------------------------------------------- resume
def test_pullback_slow_moments_are_per_rank_and_resume_exactly(pullback_runs):
    per_rank = torch.load(pullback_runs / "ck" / "epoch=0.ckpt", weights_only=False)["lookahead"]["per_rank"]
    saved = [per_rank[r]["slow_moments"]["net.0.weight"] for r in (0, 1)]
    assert not torch.equal(saved[0], saved[1])  # so rank 0's moments on rank 1 would show below
    full = [load(pullback_runs / "full", "fit", r) for r in (0, 1)]
    resumed = [load(pullback_runs / "resumed", "fit", r) for r in (0, 1)]
    assert full[0]["slow_moments"] and set(full[0]["slow_moments"]) == set(full[1]["slow_moments"])
    for rank in (0, 1):
        for kind in ("slow", "fast", "slow_moments"):
            for n, t in full[rank][kind].items():
                assert torch.equal(resumed[rank][kind][n], t), (rank, kind, n)


def test_another_number_of_ranks_continues_from_rank_0_with_a_warning(monkeypatch):
    monkeypatch.setattr(local_sgd, "world_size", lambda: 3)
    states = [{"fast": {"w": torch.zeros(1)}}, {"fast": {"w": torch.ones(1)}}]
    with pytest.warns(RuntimeWarning, match="holds the state of 2 ranks, this run has 3"):
        assert local_sgd.rank_state(states, local_sgd.Workers(1), 1) is None  # the caller keeps rank 0's state

@pytest.mark.parametrize("runs", ["sgd_runs", "diloco_runs"])
def test_resume_is_bit_identical_mid_round_and_at_a_sync_boundary(runs, request):
    root = request.getfixturevalue(runs)
    for rank in (0, 1):
        full, resumed = load(root / "full", "fit", rank), load(root / "resumed", "fit", rank)
        assert resumed["steps"] == full["steps"] and resumed["syncs"] == full["syncs"]
        for kind in ("slow", "fast", "momentum"):
            for n in full[kind]:
                assert torch.equal(full[kind][n], resumed[kind][n]), (rank, kind, n)


# ----------------------------------------------------------------------------- refusals
class _Trainer:
    def __init__(self, strategy, world_size=2, scaler=None, callbacks=()):
        self.strategy, self.world_size, self.callbacks = strategy, world_size, list(callbacks)
        self.precision_plugin = type("P", (), {"scaler": scaler})()
        self.checkpoint_callbacks = []


def _setup(cb, strategy, **kw):
    cb.setup(_Trainer(strategy, callbacks=[cb], **kw), None, "fit")


def test_fsdp2_is_refused_at_setup():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_lookahead import LookaheadCallback

    with pytest.raises(ValueError, match="does not support ModelParallelStrategy.*shards"):
        _setup(LookaheadCallback(local_sgd=True), ModelParallelStrategy.__new__(ModelParallelStrategy))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(static_graph=True), "static_graph"),
        (dict(ddp_comm_hook=lambda state, bucket: None), "communication hook.*ddp_comm_hook"),
        (dict(model_averaging_period=4), "model_averaging_period"),
    ],
)
def test_ddp_static_graph_and_comm_hooks_are_refused(kwargs, match):
    from lightning.pytorch.strategies import DDPStrategy

    with pytest.raises(ValueError, match=match):
        local_sgd.check_strategy(DDPStrategy(**kwargs), world=2)


def test_grad_scaler_and_other_strategies_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    with pytest.raises(ValueError, match="GradScaler"):
        local_sgd.check_strategy(DDPStrategy(), world=2, scaler=object())
    with pytest.raises(ValueError, match="supports DDPStrategy"):
        local_sgd.check_strategy(SingleDeviceStrategy.__new__(SingleDeviceStrategy), world=2)
    assert local_sgd.check_strategy(DDPStrategy(), world=2) is True


def test_single_process_is_plain_lookahead_with_one_warning():
    from conftest import RegressionModule, loader, trainer

    from lightning_lookahead import LookaheadCallback

    def fit(local: bool):
        model = RegressionModule("sgd")
        cb = LookaheadCallback(k=3, alpha=0.5, local_sgd=local)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=1, callbacks=[cb]).fit(model, loader())
        return [p.detach() for p in model.parameters()], [str(w.message) for w in caught], cb

    plain, _, _ = fit(False)
    local, messages, cb = fit(True)
    assert sum("local_sgd=True in a single process is plain Lookahead" in m for m in messages) == 1
    assert cb.lookahead.before_sync is None
    for a, b in zip(plain, local):
        assert torch.equal(a, b)


def test_averager_is_a_no_op_in_a_single_process():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    averager = local_sgd.WeightAverager()
    la = Lookahead(k=1, alpha=1.0, before_sync=averager)
    la.attach([opt], model)
    before = [p.detach().clone() for p in model.parameters()]
    averager(la, 0)
    assert averager.averaged == averager.inter_bytes == averager.intra_bytes == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- the core, without Lightning
def _average_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].double()  # a second dtype: two all-reduces per sync
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    averager = local_sgd.WeightAverager()
    la = Lookahead(k=2, alpha=0.5, before_sync=averager)
    la.attach([opt], model)
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda t, *a, **kw: (calls.append((str(t.dtype), t.numel())), original(t, *a, **kw))[1]
    torch.manual_seed(1 + rank)  # each rank its own data
    snapshots = []
    for step in range(2):
        x = torch.randn(16, 4)
        opt.zero_grad()
        model[2](model[1](model[0](x)).double()).square().mean().backward()
        if step == 1:  # just before the sync: this rank's own weights and statistics
            snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        opt.step()  # the second step syncs
    snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    snapshots.append({"slow": {n: t.clone() for n, t in la.tensors()["slow"].items()}, "calls": calls,
                      "bytes": averager.inter_bytes})  # fmt: skip
    dist.all_reduce = original
    torch.save(snapshots, f"{out}/avg_rank{rank}.pt")
    end_spawned_process()


def test_sync_averages_weights_and_batchnorm_statistics_in_one_all_reduce_per_dtype(tmp_path):
    """Pure PyTorch, 2 processes: the BatchNorm running statistics are averaged too (integer
    num_batches_tracked is not), summed in float64; the weights in one all-reduce per dtype
    (float32, float64)."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_average_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    (pre0, post0, info0), (pre1, post1, info1) = (torch.load(tmp_path / f"avg_rank{r}.pt") for r in (0, 1))
    statistics, weights32, weights64 = ("torch.float64", 8 + 8), ("torch.float32", 8 * 4 + 8 + 8 + 8), ("torch.float64", 18)
    assert info0["calls"] == info1["calls"] == [statistics, weights32, weights64]
    assert info0["bytes"] == 16 * 8 + 56 * 4 + 18 * 8
    assert not torch.equal(pre0["1.running_mean"], pre1["1.running_mean"])  # the ranks saw different data
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(post0[name], (pre0[name] + pre1[name]) / 2, atol=0, rtol=0)
        assert torch.equal(post0[name], post1[name])
    assert post0["1.num_batches_tracked"] == post1["1.num_batches_tracked"] == 2
    for name in post0:  # weights and buffers identical on both ranks after the sync
        assert torch.equal(post0[name], post1[name]), name
    for name, slow in info0["slow"].items():
        assert torch.equal(slow, info1["slow"][name])


def test_local_sgd_checkpoint_resumed_in_one_process_says_whose_state_continues(tmp_path):
    """A checkpoint with the per-rank states of 2 local-SGD ranks, resumed in one process: rank 0's
    fast weights continue, and a warning says so (never a silent drop)."""
    from conftest import RegressionModule, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_lookahead import LookaheadCallback

    ck = ModelCheckpoint(dirpath=tmp_path, filename="run", save_top_k=-1)
    trainer(max_epochs=1, callbacks=[LookaheadCallback(k=4), ck], enable_checkpointing=True).fit(
        RegressionModule("sgd"), loader()
    )
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=True)
    entry = ckpt["lookahead"]
    entry["per_rank"] = [{"fast": entry["fast"], "slow_moments": {}, "optimizers": [], "buffers": {}}] * 2
    torch.save(ckpt, tmp_path / "run.ckpt")
    with pytest.warns(UserWarning, match="local-SGD state of 2 ranks; this run .* continues from rank 0"):
        trainer(max_epochs=2, callbacks=[LookaheadCallback(k=4)]).fit(
            RegressionModule("sgd"), loader(), ckpt_path=tmp_path / "run.ckpt"
        )


def _buffers_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    la = Lookahead(k=100, before_sync=local_sgd.WeightAverager())
    la.attach([opt], model)
    torch.manual_seed(1 + rank)
    model(torch.randn(16, 4) * (1 + rank))  # each rank's own running statistics, mid-round
    own = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    per_rank = local_sgd.gather_rank_states(la, [opt])
    everyone = [per_rank]
    dist.broadcast_object_list(everyone, src=0)  # as every rank reads rank 0's checkpoint
    with torch.no_grad():
        for b in model.buffers():
            b.zero_()
    local_sgd.load_buffers(model, local_sgd.rank_state(everyone[0], local_sgd.Workers(1), 1)["buffers"])
    torch.save({"own": own, "restored": dict(model.named_buffers())}, f"{out}/buffers_rank{rank}.pt")
    end_spawned_process()


def test_per_rank_checkpoint_entries_carry_each_ranks_batchnorm_statistics(tmp_path):
    """Each rank gets its own running statistics back from the per-rank checkpoint entries (before,
    a mid-round resume gave every rank rank 0's)."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_buffers_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    saved = [torch.load(tmp_path / f"buffers_rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(saved[0]["own"]["1.running_mean"], saved[1]["own"]["1.running_mean"])
    for s in saved:
        for name, value in s["own"].items():
            assert torch.equal(s["restored"][name], value), name


def test_unequal_batch_counts_fail_on_every_rank_before_training(tmp_path):
    """Rank 1's loader is one batch shorter: without the check the syncs fall on different steps and
    the run hangs at the end (measured: past a 120 s timeout); with it every rank raises at the
    first epoch start."""
    proc = run_worker(tmp_path, "--local-sgd", "--k", "4", "--epochs", "2", "--short-rank", "1", "--no-validate", ok=False, timeout=120)
    assert proc.returncode != 0
    for rank, mine in ((0, 3), (1, 2)):
        assert f"[rank{rank}]: ValueError: Lookahead local SGD: the ranks' training data loaders have different lengths" \
            f" this epoch (2 to 3 batches; this rank: {mine})" in proc.stderr  # fmt: skip


def test_a_second_optimizer_syncing_later_is_averaged_after_the_warm_up(tmp_path):
    """Two optimizers, the second stepping every second batch, local_sgd_start=2, k=2: the second's
    first sync (its step 2, batch 4) comes after local steps although its own count is within the
    warm-up; it must average (before, each rank kept its own: RankMismatchError from the check)."""
    run_worker(tmp_path, "--local-sgd", "--two-opt", "--k", "2", "--local-sgd-start", "2", "--check-every", "1",
               "--epochs", "3", "--no-validate")  # fmt: skip
    r0, r1 = load(tmp_path, "fit", 0), load(tmp_path, "fit", 1)
    assert r0["steps"] == [9, 4] and r0["syncs"] == 4 + 2
    for n in r0["slow"]:  # (the fast weights of the first differ again after its local 9th step)
        assert torch.equal(r0["slow"][n], r1["slow"][n]), n


def _constant_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model.register_buffer("table", torch.randn(4096), persistent=False)  # a constant, e.g. a position table
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    la = Lookahead(k=1, alpha=1.0, before_sync=local_sgd.WeightAverager())
    la.attach([opt], model)
    before = model.table.clone()
    torch.manual_seed(1 + rank)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()  # k=1: every step syncs, averaging the weights and the table over 3 workers
    torch.save({"unchanged": torch.equal(model.table, before)}, f"{out}/const_rank{rank}.pt")
    end_spawned_process()


def test_constant_buffers_survive_averaging_over_three_workers(tmp_path):
    """The float32 mean of 3 equal values is not always that value (656 of 4096 elements moved by an
    ulp per sync before); buffers are summed in float64 now."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_constant_worker, args=(_free_port(), str(tmp_path)), nprocs=3, join=True, start_method="spawn")
    assert all(torch.load(tmp_path / f"const_rank{r}.pt")["unchanged"] for r in range(3))
