"""Local SGD with worker groups (LookaheadCallback(local_sgd=True, ranks_per_worker=...)): real
4-process runs (gloo on CPU), one of them launched as two "nodes" through Lightning's multi-node
path, against an independent simulation written out below.

Five launches in all, shared between tests by module-scoped fixtures. The worker is
tests/dist/worker.py: rank r of W trains on samples r, r+W, ... in batches of 16/W (48 samples: 3
steps per epoch, a 16-sample global batch).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import end_spawned_process, make_data, make_net
from test_distributed import NAMES, WORKER, _free_port, load, run_worker
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_lookahead import LookaheadCallback, local_sgd
from lightning_lookahead.config import LocalSGDConfig

pytestmark = pytest.mark.slow
N_PARAMS = sum(p.numel() for p in make_net().parameters())  # 146 float32 values, no buffers


# ----------------------------------------------------------------------------- the simulation
def simulate(
    opt: str,
    k: int,
    alpha: float,
    mu: float,
    n_steps: int,
    world: int,
    per_worker: int,
    start: int = 0,
    bf16: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Worker groups written out plainly: one model copy per worker (world / per_worker of them),
    each with its own optimizer. Every step each copy takes the mean of its ranks' gradients (rank
    r: its DistributedSampler shard); during the first ``start`` steps the mean over all ranks
    instead (ordinary DDP). Every k steps: average the copies (nothing to average while only
    warm-up steps ran: they are equal), or with ``bf16`` take phi + mean of bfloat16(copy - phi)
    summed in float32; then the outer step on phi (Lookahead, or Nesterov SGD mu on phi - mean) and
    every copy := phi. Returns (each rank's fast weights, phi) by parameter name."""
    workers = world // per_worker
    nets = [make_net(0) for _ in range(workers)]
    if opt == "adam":
        opts = [torch.optim.Adam(net.parameters(), lr=0.02) for net in nets]
    else:
        opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in nets]
    data = make_data(0)
    shards = [
        list(DataLoader(data, batch_size=16 // world, sampler=DistributedSampler(data, world, r, shuffle=False)))
        for r in range(world)
    ]
    phi = [p.detach().clone() for p in nets[0].parameters()]
    buf = [torch.zeros_like(p) for p in phi]
    for step in range(n_steps):
        for w, (net, o) in enumerate(zip(nets, opts)):
            ranks = range(world) if step < start else range(w * per_worker, (w + 1) * per_worker)
            grads = []
            for r in ranks:
                x, y = shards[r][step % len(shards[r])]
                net.zero_grad()
                nn.functional.mse_loss(net(x), y).backward()
                grads.append([p.grad.clone() for p in net.parameters()])
            for i, p in enumerate(net.parameters()):
                p.grad = sum(g[i] / len(grads) for g in grads)  # DDP: each divided by the group size, summed
            o.step()
        if (step + 1) % k:
            continue
        with torch.no_grad():
            for i, ps in enumerate(zip(*(net.parameters() for net in nets))):
                if step + 1 <= start:
                    mean = ps[0].clone()  # warm-up only: every copy is the same
                elif bf16:
                    mean = phi[i] + sum((p - phi[i]).bfloat16().float() for p in ps) / workers
                else:
                    mean = sum(ps[1:], ps[0].clone()) / workers
                if mu == 0:
                    phi[i] += alpha * (mean - phi[i])
                else:
                    s = phi[i] - mean
                    buf[i] = mu * buf[i] + s
                    phi[i] -= alpha * (s + mu * buf[i])
                for p in ps:
                    p.copy_(phi[i])
    fast = [{n: p.detach().clone() for n, p in zip(NAMES, nets[r // per_worker].parameters())} for r in range(world)]
    return fast, dict(zip(NAMES, phi))


def assert_matches_simulation(out: Path, world: int, **sim) -> None:
    fast, slow = simulate(world=world, **sim)
    for rank in range(world):
        fit = load(out, "fit", rank)
        for n in NAMES:
            # 1e-6: the same float32 operations, but the collectives sum in their own order
            torch.testing.assert_close(fit["fast"][n], fast[rank][n], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(fit["slow"][n], slow[n], atol=1e-6, rtol=1e-6)


def comm(out: Path, rank: int) -> dict:
    return torch.load(out / f"comm_rank{rank}.pt", weights_only=False)


# ----------------------------------------------------------------------------- launches
def run_nodes(out: Path, nodes: int, *args: str, timeout: int = 300) -> None:
    """Lightning's multi-node path on one machine: one command per node (NODE_RANK=0..), each
    launching its own local processes, meeting at MASTER_ADDR:MASTER_PORT."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = []
    for node in range(nodes):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env["NODE_RANK"] = str(node)
        cmd = [sys.executable, str(WORKER), "--out", str(out), "--num-nodes", str(nodes), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        if p.returncode != 0:
            raise AssertionError(f"node {node} failed ({p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")


@pytest.fixture(scope="module")
def node_runs(tmp_path_factory):
    """2 "nodes" x 2 processes, ranks_per_worker="node": 2 workers of 2 ranks. SGD (momentum 0.9)
    + Lookahead (alpha 0.5), k=4, 12 steps (syncs after 4, 8, 12), validated after fit; then
    resumed (again as 2 nodes) from the epoch-0 checkpoint: step 3, mid-round."""
    root = tmp_path_factory.mktemp("worker_groups_nodes")
    common = ("--devices", "2", "--local-sgd", "--ranks-per-worker", "node", "--opt", "sgd", "--k", "4", "--epochs", "4")
    run_nodes(root / "full", 2, *common, "--ckpt-dir", str(root / "ck"), "--csv", "--count-comm")
    run_nodes(root / "resumed", 2, *common, "--ckpt", str(root / "ck" / "epoch=0.ckpt"), "--no-validate")
    return root


@pytest.fixture(scope="module")
def diloco_warmup_run(tmp_path_factory):
    """4 processes, 2 workers of 2: Adam + the DiLoCo outer step (alpha 0.7, Nesterov 0.9), k=3,
    9 steps, the first 4 of them ordinary DDP over all 4 ranks (local_sgd_start=4: the sync after
    step 3 has nothing to average, the one after step 6 does); ranks checked after every sync."""
    out = tmp_path_factory.mktemp("worker_groups_diloco")
    run_worker(
        out, "--devices", "4", "--local-sgd", "--ranks-per-worker", "2", "--local-sgd-start", "4", "--opt", "adam",
        "--k", "3", "--alpha", "0.7", "--outer-momentum", "0.9", "--epochs", "3", "--check-every", "1",
        "--count-comm", "--no-validate",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """4 processes, 2 workers of 2, SGD + Lookahead, k=4, 12 steps, bfloat16 pseudo-gradients across."""
    out = tmp_path_factory.mktemp("worker_groups_bf16")
    run_worker(
        out, "--devices", "4", "--local-sgd", "--ranks-per-worker", "2", "--average-precision", "bf16",
        "--opt", "sgd", "--k", "4", "--epochs", "4", "--count-comm", "--no-validate",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory):
    """2 processes, ranks_per_worker=2: one worker, i.e. DDP + Lookahead. SGD, k=4, 6 steps."""
    out = tmp_path_factory.mktemp("worker_groups_one")
    run_worker(out, "--local-sgd", "--ranks-per-worker", "2", "--opt", "sgd", "--k", "4", "--epochs", "2", "--no-validate")
    return out


# ----------------------------------------------------------------------------- equivalences
def test_two_nodes_of_two_ranks_equal_the_simulation(node_runs):
    fit = load(node_runs / "full", "fit", 0)
    assert fit["steps"] == [12] and fit["syncs"] == 3
    assert_matches_simulation(node_runs / "full", 4, opt="sgd", k=4, alpha=0.5, mu=0.0, n_steps=12, per_worker=2)


def test_adam_diloco_with_a_ddp_warm_up_equals_the_simulation(diloco_warmup_run):
    fit = load(diloco_warmup_run, "fit", 0)
    assert fit["steps"] == [9] and fit["syncs"] == 3 and fit["momentum"]
    sim = {"opt": "adam", "k": 3, "alpha": 0.7, "mu": 0.9, "n_steps": 9, "per_worker": 2}
    assert_matches_simulation(diloco_warmup_run, 4, start=4, **sim)
    # the warm-up changed the result: without it the simulation ends elsewhere
    _, without = simulate(world=4, **sim)
    assert not torch.allclose(fit["slow"]["net.0.weight"], without["net.0.weight"], atol=1e-4)


def test_bf16_average_equals_the_simulation_with_bf16_pseudo_gradients(bf16_run):
    assert_matches_simulation(bf16_run, 4, opt="sgd", k=4, alpha=0.5, mu=0.0, n_steps=12, per_worker=2, bf16=True)
    _, exact = simulate("sgd", 4, 0.5, 0.0, 12, world=4, per_worker=2)
    slow = load(bf16_run, "fit", 0)["slow"]
    assert max((slow[n] - exact[n]).abs().max().item() for n in NAMES) > 1e-6  # the rounding shows


def test_one_worker_of_every_rank_is_ddp_plus_lookahead(one_worker_run):
    fit = load(one_worker_run, "fit", 0)
    assert fit["steps"] == [6] and fit["syncs"] == 1
    # world=2, per_worker=2: one copy whose gradient is the mean over both ranks, i.e. DDP
    assert_matches_simulation(one_worker_run, 2, opt="sgd", k=4, alpha=0.5, mu=0.0, n_steps=6, per_worker=2)
    from test_distributed import assert_matches_single_process

    assert_matches_single_process(fit["slow"], "sgd", epochs=2)  # and DDP + Lookahead equals one process


# ----------------------------------------------------------------------------- communication
def _crosses(ranks: list[int], per_worker: int = 2) -> bool:
    return len({r // per_worker for r in ranks}) > 1


def test_nothing_crosses_between_workers_except_the_slice_at_syncs(node_runs):
    width = math.ceil(N_PARAMS / 2)  # each rank's slice: half of the flattened weights
    for rank in range(4):
        c = comm(node_runs / "full", rank)
        # in training, without the per-epoch control messages: Lightning's 1-element int64 stop
        # decision (world-wide in any DDP run) and our 2-float64 batch-count check at epoch starts
        control = [x for x in c["all_reduces"] if x[4] and (x[1] == "torch.int64" or (x[1], x[2]) == ("torch.float64", 2))]
        assert len(control) <= 4 * 3  # a few per epoch, not per step
        train_reduces = [x for x in c["all_reduces"] if x[4] and x not in control]
        across = [(step, dtype, n, ranks) for step, dtype, n, ranks, _ in train_reduces if _crosses(ranks)]
        # global_step inside a step = completed steps: the syncs after steps 4, 8, 12 show as 3, 7, 11
        assert across == [(s, "torch.float32", width, [rank % 2, rank % 2 + 2]) for s in (3, 7, 11)], across
        mine = [2 * (rank // 2), 2 * (rank // 2) + 1]
        grads = [step for step, dtype, n, ranks, _ in train_reduces if ranks == mine]
        assert sorted(set(grads)) == list(range(12))  # the worker's gradient all-reduce, every step
        gathers = [(step, n, ranks) for step, _, n, ranks, training in c["all_gathers"] if training]
        assert gathers == [(s, width, mine) for s in (3, 7, 11)]


def test_inter_and_intra_bytes_are_logged(node_runs):
    rows = [r for r in csv.DictReader(open(node_runs / "full" / "metrics.csv")) if r.get("lookahead/inter_bytes")]
    width = math.ceil(N_PARAMS / 2)
    assert [int(r["step"]) for r in rows] == [3, 7, 11]
    # across: a 73-float slice per sync every k=4 steps (plain local SGD would send all 146)
    assert {float(r["lookahead/inter_bytes_per_step"]) for r in rows} == {width * 4 / 4}
    # inside: the 146-float gradient all-reduce every step, plus the slice all-gather per sync
    assert {float(r["lookahead/intra_bytes_per_step"]) for r in rows} == {N_PARAMS * 4 + width * 4 / 4}


def test_warm_up_steps_all_reduce_over_the_world_then_inside_the_worker(diloco_warmup_run):
    for rank in range(4):
        grads = [(s, tuple(ranks)) for s, dtype, n, ranks, tr in comm(diloco_warmup_run, rank)["all_reduces"]
                 if tr and dtype == "torch.float32" and n == N_PARAMS]  # fmt: skip
        mine = (2 * (rank // 2), 2 * (rank // 2) + 1)
        assert grads == [(s, (0, 1, 2, 3)) for s in range(4)] + [(s, mine) for s in range(4, 9)]


# ----------------------------------------------------------------------------- replication, evaluation, resume
def test_every_rank_identical_after_each_sync(node_runs, bf16_run):
    for out in (node_runs / "full", bf16_run):
        snaps = [comm(out, r)["after_sync"] for r in range(4)]
        assert all(len(s) == 3 for s in snaps)
        for i in range(3):
            for n in NAMES:
                assert all(torch.equal(snaps[0][i][n], snaps[r][i][n]) for r in (1, 2, 3)), (out, i, n)


def test_validation_sees_the_slow_weights(node_runs):
    for rank in range(4):
        fit, after = load(node_runs / "full", "fit", rank), load(node_runs / "full", "validate", rank)
        for n in NAMES:  # the last validation in fit and trainer.validate after fit both saw phi
            assert torch.equal(fit["val_snapshots"][-1][n], fit["slow"][n])
            assert torch.equal(after["val_snapshots"][-1][n], fit["slow"][n])


def test_checkpoint_records_the_grouping_and_the_resume_is_bit_identical(node_runs):
    entry = torch.load(node_runs / "ck" / "epoch=0.ckpt", weights_only=True)["lookahead"]
    assert entry["ranks_per_worker"] == 2 and len(entry["per_rank"]) == 4
    fast = [entry["per_rank"][r]["fast"]["net.0.weight"] for r in range(4)]
    assert torch.equal(fast[0], fast[1]) and torch.equal(fast[2], fast[3])  # a worker is one replica
    assert not torch.equal(fast[0], fast[2])  # mid-round: the workers differ
    for rank in range(4):
        full, resumed = load(node_runs / "full", "fit", rank), load(node_runs / "resumed", "fit", rank)
        assert resumed["steps"] == full["steps"] and resumed["syncs"] == full["syncs"]
        for kind in ("slow", "fast"):
            for n in NAMES:
                assert torch.equal(full[kind][n], resumed[kind][n]), (rank, kind, n)


# ----------------------------------------------------------------------------- settings, layout, checkpoints
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ranks_per_worker": 2}, "ranks_per_worker` needs local_sgd=True"),
        ({"local_sgd_start": 10}, "local_sgd_start` needs local_sgd=True"),
        ({"average_precision": "bf16"}, "average_precision` needs local_sgd=True"),
        ({"local_sgd": True, "ranks_per_worker": 0}, "int >= 1 or 'node'"),
        ({"local_sgd": True, "ranks_per_worker": "nodes"}, "int >= 1 or 'node'"),
        ({"local_sgd": True, "ranks_per_worker": True}, "int >= 1 or 'node'"),
        ({"local_sgd": True, "local_sgd_start": -1}, "int >= 0"),
        ({"local_sgd": True, "average_precision": "fp16"}, "one of \\['full', 'bf16'\\]"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookaheadCallback(**kwargs)


def test_node_resolves_to_the_devices_per_node():
    assert LocalSGDConfig(True, "node").ranks_per_worker_for(devices_per_node=8) == 8
    assert LocalSGDConfig(True, 2).ranks_per_worker_for(devices_per_node=8) == 2


def _layout(monkeypatch, world: int, rank: int, per_worker: int):
    made = []
    monkeypatch.setattr(local_sgd, "world_size", lambda: world)
    monkeypatch.setattr(local_sgd, "rank", lambda: rank)
    monkeypatch.setattr(local_sgd.dist, "new_subgroups_by_enumeration", lambda groups: (made.append(groups), ([], []))[1])
    return local_sgd.Workers(per_worker), made


def test_workers_are_contiguous_and_slices_cross_by_position(monkeypatch):
    workers, made = _layout(monkeypatch, world=8, rank=5, per_worker=4)
    assert (workers.size, workers.count, workers.index, workers.position, workers.first_rank()) == (4, 2, 1, 1, 4)
    assert made == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]]]


def test_a_grouping_that_does_not_divide_the_world_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="ranks_per_worker=3 does not divide the 4 processes"):
        _layout(monkeypatch, world=4, rank=0, per_worker=3)


def test_changed_grouping_continues_each_worker_from_its_first_rank_with_a_warning(monkeypatch):
    states = [{"fast": {"w": torch.full((1,), float(r))}} for r in range(4)]
    workers, _ = _layout(monkeypatch, world=4, rank=3, per_worker=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert local_sgd.rank_state(states, workers, saved_grouping=2) is states[3]  # unchanged: its own
    monkeypatch.setattr(local_sgd, "rank", lambda: 0)  # the warning comes from rank 0
    workers, _ = _layout(monkeypatch, world=4, rank=0, per_worker=2)
    with pytest.warns(RuntimeWarning, match="saved with ranks_per_worker=1, this run has 2; each worker continues"):
        assert local_sgd.rank_state(states, workers, saved_grouping=None) is states[0]
    workers, _ = _layout(monkeypatch, world=4, rank=3, per_worker=2)
    assert local_sgd.rank_state(states, workers, saved_grouping=1) is states[2]  # rank 3: its worker starts at 2


def _route_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    config = LocalSGDConfig(True, start=5)  # a warm-up: the hook is registered although one rank is a worker
    first, second = (local_sgd.WeightAverager(config, local_sgd.Workers(1)) for _ in range(2))
    first.wrap(ddp)
    second.wrap(ddp)  # a new core after a mid-fit restore: it must get the hook's traffic
    second.prepare(ddp, steps=0)
    ddp(torch.randn(4, 3)).sum().backward()
    second.prepare(ddp, steps=10)  # after the warm-up, all ranks still one worker: DDP's buffer broadcast stays
    flags = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync, ddp.broadcast_buffers)
    torch.save({"first": first.intra_bytes + first.inter_bytes, "second": second.intra_bytes, "flags": flags},
               f"{out}/route.pt")  # fmt: skip
    end_spawned_process()


def test_a_replacing_averager_takes_over_the_gradient_hook(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_route_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    counted = torch.load(tmp_path / "route.pt")
    assert counted == {"first": 0, "second": (3 * 2 + 2) * 4, "flags": (True, True, True)}


def _hierarchical_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_lookahead import Lookahead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    workers = local_sgd.Workers(2)
    results = {}
    for precision in ("full", "bf16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
        model[2].double()  # a second dtype; 49 float32 weights: an odd count, padded to 2 x 25
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing; its sync averages
        averager = local_sgd.WeightAverager(LocalSGDConfig(True, 2, average_precision=precision), workers)
        la = Lookahead(k=1, alpha=1.0, before_sync=averager)
        la.attach([opt], model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (1 + workers.index) * torch.arange(p.numel(), dtype=p.dtype).view_as(p))  # per worker
            model[1].running_mean.copy_(torch.randn(7, generator=torch.Generator().manual_seed(rank)))  # per rank
        before = {n: t.clone() for n, t in model.state_dict().items()}
        opt.step()
        results[precision] = {"before": before, "after": {n: t.clone() for n, t in model.state_dict().items()},
                              "inter": averager.inter_bytes, "intra": averager.intra_bytes}  # fmt: skip
    torch.save(results, f"{out}/hier_rank{rank}.pt")
    end_spawned_process()


def test_hierarchical_average_of_weights_and_per_rank_statistics(tmp_path):
    """Pure PyTorch, 4 processes, 2 workers of 2: weights (two dtypes, an odd count) become the mean
    over workers, BatchNorm statistics (different on every rank) the mean over all 4 ranks, every
    rank ends identical; each rank sends half of each dtype's values across (padded), with bf16
    pseudo-gradients half of that again."""
    import torch.multiprocessing as mp

    mp.start_processes(_hierarchical_worker, args=(_free_port(), str(tmp_path)), nprocs=4, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"hier_rank{r}.pt") for r in range(4)]
    for precision in ("full", "bf16"):
        runs = [r[precision] for r in ranks]
        for name, t in runs[0]["after"].items():
            assert all(torch.equal(t, run["after"][name]) for run in runs), (precision, name)
        b = [run["before"] for run in runs]
        for name in ("1.running_mean", "1.running_var"):
            expected = ((b[0][name] + b[1][name]) / 2 + (b[2][name] + b[3][name]) / 2) / 2
            torch.testing.assert_close(runs[0]["after"][name], expected, atol=0, rtol=0)
        for name in ("0.weight", "0.bias", "2.weight", "2.bias", "1.weight"):
            phi = b[0][name] - 0.01 * torch.arange(b[0][name].numel(), dtype=b[0][name].dtype).view_as(b[0][name])
            if precision == "full":
                expected = (b[0][name] + b[2][name]) / 2
            else:
                expected = phi + ((b[0][name] - phi).bfloat16().float() + (b[2][name] - phi).bfloat16().float()).to(phi.dtype) / 2
            torch.testing.assert_close(runs[0]["after"][name], expected, atol=1e-7, rtol=1e-7)
        assert runs[0]["after"]["1.num_batches_tracked"] == 0
        # the statistics (running mean and var) are summed in float64: one all-reduce of 14 inside the
        # worker, then sliced in two (7) across; the weights per dtype, sliced in two
        buffers = 14 * 8
        if precision == "full":  # float32 weights 49 -> 25 (padded), float64 24 -> 12
            inter = gathered = 7 * 8 + 25 * 4 + 12 * 8
        else:  # pseudo-gradients cross as bf16, the worker gathers the averaged slices in their dtype
            inter, gathered = 7 * 8 + 25 * 2 + 12 * 2, 7 * 8 + 25 * 4 + 12 * 8
        assert (runs[1]["inter"], runs[1]["intra"]) == (inter, buffers + gathered)


def test_sync_batchnorm_between_workers_is_named(monkeypatch):
    workers, _ = _layout(monkeypatch, world=4, rank=0, per_worker=2)
    note = local_sgd.sync_batchnorm_note(nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3)), workers)
    assert note is not None and "SyncBatchNorm layers, which exchange batch statistics at every forward" in note
    assert local_sgd.sync_batchnorm_note(nn.Sequential(nn.BatchNorm1d(3)), workers) is None
    one, _ = _layout(monkeypatch, world=4, rank=0, per_worker=4)  # one worker: it is DDP
    assert local_sgd.sync_batchnorm_note(nn.Sequential(nn.SyncBatchNorm(3)), one) is None
