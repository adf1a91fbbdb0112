"""Local SGD study: ordinary DDP vs local SGD with an outer step, accuracy against bytes all-reduced.

Two real processes on CPU over gloo, MNIST-5k (examples/mnist.py's split and CNN), each rank
training on its own DistributedSampler shard (global batch 64 = 2 x 32), SGD(lr 0.05, momentum
0.9) as the inner optimizer, the same number of optimizer steps for every run. Methods:

* ``ddp``: DistributedDataParallel's gradient all-reduce at every step (bytes measured with a
  DDP comm hook that counts each bucket it all-reduces);
* ``avg``: local SGD with plain averaging (``Lookahead(before_sync=WeightAverager())`` with alpha=1: no outer step);
* ``lookahead``: local SGD, then the Lookahead slow step (alpha=0.5);
* ``diloco``: local SGD, then DiLoCo's outer step (alpha=0.7, Nesterov momentum 0.9);

the local-SGD ones at k in {1, 4, 16, 64}. The local-SGD runs use the library's core
(``lightning_lookahead.local_sgd``) around the same DDP wrapper with its gradient sync turned off,
as the Lightning callback does, in a plain PyTorch loop (one process group for the whole grid,
instead of one Lightning launch per run). Bytes are all-reduce payload per optimizer step, not
wire traffic. Final validation on the slow (replicated) weights after a sync (the step count is a
multiple of every k).

    python studies/local_sgd_study.py            # 3 seeds, 13 configurations, 320 steps each
    python studies/local_sgd_study.py --quick    # smoke run: 1 seed, 32 steps, k in {1, 4}

Writes docs/local_sgd_study.csv (one row per seed and configuration) and docs/local_sgd_study.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # mnist.py
from mnist import LitCNN, MNISTDataModule  # noqa: E402

from lightning_lookahead import Lookahead  # noqa: E402
from lightning_lookahead.local_sgd import WeightAverager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # name: (alpha, outer momentum); None: ordinary DDP
    "ddp": None,
    "avg": (1.0, 0.0),
    "lookahead": (0.5, 0.0),
    "diloco": (0.7, 0.9),
}
FIELDS = ["method", "k", "seed", "steps", "val_loss", "val_acc", "allreduce_bytes", "bytes_per_step", "seconds"]


def _batches(loader: DataLoader, sampler: DistributedSampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def _evaluate(model: nn.Module, val: DataLoader) -> tuple[float, float]:
    model.eval()
    loss = correct = n = 0.0
    for x, y in val:
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train()
    return loss / n, correct / n


def run_one(method: str, k: int, seed: int, steps: int, dm: MNISTDataModule, world: int) -> dict:
    torch.manual_seed(seed)
    net = LitCNN().net  # the CNN only (no torchmetrics)
    ddp = DistributedDataParallel(net)  # broadcasts rank 0's initial weights
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    counted = [0]
    la = None
    if METHODS[method] is None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            buf = bucket.buffer()
            counted[0] += buf.numel() * buf.element_size()
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)
    else:
        alpha, mu = METHODS[method]
        la = Lookahead(k=k, alpha=alpha, outer_momentum=mu, before_sync=WeightAverager())
        la.attach([opt], net)
    sampler = DistributedSampler(dm.train_set, world, dist.get_rank(), shuffle=True, seed=seed)
    batches = _batches(DataLoader(dm.train_set, batch_size=32, sampler=sampler), sampler)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        if la is not None:
            la.before_sync.prepare(ddp, la.steps[0])  # DDP's gradient all-reduce off
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    seconds = time.perf_counter() - start
    if la is not None:
        assert la.steps == [steps] and la.syncs == steps // k
        la.detach()
        la.use_slow()  # phi, replicated; equal to the fast weights right after the last sync
        assert isinstance(la.before_sync, WeightAverager)
        counted[0] = la.before_sync.inter_bytes
    val_loss, val_acc = _evaluate(net, DataLoader(dm.val_set, batch_size=500))
    return dict(
        method=method, k=k if la is not None else 1, seed=seed, steps=steps, val_loss=round(val_loss, 5),
        val_acc=round(val_acc, 5), allreduce_bytes=counted[0], bytes_per_step=counted[0] / steps,
        seconds=round(seconds, 2),
    )  # fmt: skip


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = MNISTDataModule("mnist", batch_size=32)
    dm.setup("fit")
    configs = [("ddp", 1)] + [(m, k) for m in METHODS if m != "ddp" for k in args.ks]
    rows = []
    for seed in args.seeds:
        for method, k in configs:
            row = run_one(method, k, seed, args.steps, dm, world)
            rows.append(row)
            if rank == 0:
                print(
                    f"seed {seed} {method:9s} k={row['k']:3d}  val_loss={row['val_loss']:.4f}"
                    f" val_acc={row['val_acc']:.4f}  bytes/step={row['bytes_per_step']:10.0f}  {row['seconds']:.1f}s",
                    flush=True,
                )
    if rank == 0:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
    dist.barrier()
    dist.destroy_process_group()


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in zip(METHODS, "osD^"):
        mine = [r for r in rows if r["method"] == method]
        ks = sorted({int(r["k"]) for r in mine})
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            xs, ys, es = [], [], []
            for k in ks:
                sel = [r for r in mine if int(r["k"]) == k]
                vals = np.array([float(r[key]) for r in sel])
                xs.append(np.mean([float(r["bytes_per_step"]) for r in sel]))
                ys.append(vals.mean())
                es.append(vals.std())
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=method if method == "ddp" else f"{method} (k={ks})")
            if method != "ddp":
                for x, y, k in zip(xs, ys, ks):
                    ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # diverged runs (mean accuracy below 0.9) would flatten the rest: the axes show 0.9.. and log loss
    axes[0].set_ylim(0.9, max(0.975, max(float(r["val_acc"]) for r in rows) + 0.005))
    axes[1].set_yscale("log")
    off = sorted({(r["method"], int(r["k"])) for r in rows if float(r["val_acc"]) < 0.9})
    if off:
        axes[0].text(0.02, 0.02, "below the axis (accuracy < 0.9 in some seed):\n" + ", ".join(f"{m} k={k}" for m, k in off),
                     transform=axes[0].transAxes, fontsize=7)  # fmt: skip
    for ax, key in zip(axes, ("validation accuracy", "validation loss (log)")):
        ax.set_xscale("log")
        ax.set_xlabel("all-reduce payload per optimizer step (bytes, log)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"MNIST-5k, 2 CPU processes (gloo), {rows[0]['steps']} steps, mean ± std over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=320, help="optimizer steps per run (a multiple of every k)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--csv", type=Path, default=ROOT / "docs" / "local_sgd_study.csv")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "local_sgd_study.png")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = ap.parse_args()
    if args.plot_only:
        plot(args.csv, args.png)
        return
    if args.quick:
        args.seeds, args.steps, args.ks = [0], 32, [1, 4]
        args.csv, args.png = Path("/tmp/local_sgd_study_quick.csv"), Path("/tmp/local_sgd_study_quick.png")
    bad = [k for k in args.ks if args.steps % k]
    if bad:
        raise SystemExit(f"--steps {args.steps} must be a multiple of every k (not of {bad})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)
    plot(args.csv, args.png)
    print(f"wrote {args.csv} and {args.png} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
