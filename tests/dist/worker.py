"""A 2-process Lightning run with LookaheadCallback, launched by tests/test_distributed.py.

Each rank writes ``OUT/rank{r}.pt``: its slow and fast tensors (local shards under FSDP2), the
parameters seen at the start of every validation, and the step counters.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_data, make_net  # noqa: E402

from lightning_lookahead import LookaheadCallback  # noqa: E402
from lightning_lookahead.distributed import local  # noqa: E402

warnings.filterwarnings("ignore")


class Module(L.LightningModule):
    def __init__(
        self, fsdp2: bool = False, opt: str = "sgd", root_only: bool = False, poison_rank=None, freeze_first=False
    ) -> None:
        super().__init__()
        self.net = make_net(0)
        self.fsdp2, self.opt, self.root_only, self.poison_rank = fsdp2, opt, root_only, poison_rank
        if freeze_first:  # a frozen first layer that no optimizer updates (fine-tuning a head)
            self.net[0].requires_grad_(False)
        self.val_snapshots: list[dict[str, torch.Tensor]] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.fsdp2 and not isinstance(self.net, FSDPModule):  # configure_model runs per trainer call
            if not self.root_only:  # root_only: every parameter in the root group (never resharded after eval)
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def on_after_backward(self):
        # one rank's fast weights become non-finite at step 4 (k=4 syncs right after it)
        if self.poison_rank == self.global_rank and self.global_step == 3:
            local(next(self.parameters()).grad)[0, 0] = float("inf")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_snapshots.append({n: local(p).detach().clone() for n, p in self.named_parameters()})
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.opt == "adam":
            return torch.optim.Adam(params, lr=0.02)
        if self.opt == "sgd0":  # stateless: local SGD at k=1, alpha=1 equals DDP
            return torch.optim.SGD(params, lr=0.1)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class SkipStepModule(Module):
    """Manual optimisation where one rank skips its optimizer step on one batch (a 'bad batch'
    guard), so that rank's step and sync counters fall behind the others'."""

    def __init__(self, skip_rank: int, **kw) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False
        self.skip_rank = skip_rank

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))  # DDP all-reduces on every rank
        if not (self.global_rank == self.skip_rank and batch_idx == 1):
            opt.step()


class TwoOptimizerModule(Module):
    """Manual optimisation with two optimizers on separate layers, the second stepping every second
    batch (a GAN's critic schedule): their syncs fall on different batches."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False
        self.batches = 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))
        first.step()
        if self.batches % 2 == 1:
            second.step()
        self.batches += 1


class Perturb(Callback):
    """Corrupts one rank's slow weights by one ulp in one element, to show that check_ranks_every
    compares bits (a tolerance would let it pass)."""

    def __init__(self, cb: LookaheadCallback, rank: int) -> None:
        self.cb, self.rank = cb, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and self.cb.lookahead.syncs == 1:
            with torch.no_grad():
                slow = list(self.cb.lookahead.groups[0].slow_tensors().values())
                up = torch.full_like(slow[-1][:1], float("inf"))
                slow[-1][:1] = torch.nextafter(slow[-1][:1], up)  # net.2.bias[0], one ulp: bits must match


class CommCounter(Callback):
    """Counts communication per optimizer step: DDP's gradient all-reduces (a comm hook that does
    DDP's default all-reduce and counts its buckets, unless local SGD registered its own) and every
    Python-level ``torch.distributed.all_reduce`` and ``all_gather_single`` (dtype, numel, the
    group's ranks, in training or not), keyed by ``trainer.global_step`` at the call (inside the
    optimizer step hook and the backward it is the number of completed steps); snapshots the fast
    weights after every sync. Written to ``OUT/comm_rank{r}.pt``."""

    def __init__(self, cb: LookaheadCallback, out: str) -> None:
        self.cb, self.out = cb, out
        self.grad_buckets: dict[int, int] = {}
        self.all_reduces: list[tuple] = []  # (global_step, dtype, numel, group ranks, training)
        self.all_gathers: list[tuple] = []  # the same, for the piece each rank contributes
        self.after_sync: list[dict[str, torch.Tensor]] = []
        self._syncs = 0

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if stage != "fit" or getattr(dist.all_reduce, "_counted", False):
            return

        def ranks(group):
            return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))

        all_reduce, all_gather = dist.all_reduce, dist.all_gather_single

        def counted_reduce(tensor, *args, **kwargs):  # all_reduce(tensor, op, group, async_op)
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            self.all_reduces.append((trainer.global_step, str(tensor.dtype), tensor.numel(), ranks(group), trainer.training))
            return all_reduce(tensor, *args, **kwargs)

        def counted_gather(out, piece, *args, **kwargs):  # all_gather_single(out, piece, group, async_op)
            group = kwargs.get("group", args[0] if args else None)
            self.all_gathers.append((trainer.global_step, str(piece.dtype), piece.numel(), ranks(group), trainer.training))
            return all_gather(out, piece, *args, **kwargs)

        counted_reduce._counted = True
        dist.all_reduce, dist.all_gather_single = counted_reduce, counted_gather

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if getattr(trainer.strategy.model, "_lookahead_hook", False):
            return  # local SGD's own hook: its all-reduces are counted above, with their groups

        def hook(state, bucket):
            step = trainer.global_step
            self.grad_buckets[step] = self.grad_buckets.get(step, 0) + 1
            return allreduce_hook(None, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.cb.lookahead.syncs != self._syncs:
            self._syncs = self.cb.lookahead.syncs
            fast = self.cb.lookahead.tensors()["fast"]
            self.after_sync.append({n: t.detach().clone() for n, t in fast.items()})

    def teardown(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        torch.save(
            {
                "grad_buckets": self.grad_buckets,
                "all_reduces": self.all_reduces,
                "all_gathers": self.all_gathers,
                "after_sync": self.after_sync,
            },
            os.path.join(self.out, f"comm_rank{trainer.global_rank}.pt"),
        )


def _loader(data, rank: int | None, world: int = 2, short: bool = False) -> torch.utils.data.DataLoader:
    from torch.utils.data import DistributedSampler, Subset

    if rank is None:  # ddp_spawn: the rank is only known inside the spawned process
        return _SpawnLoader(data, world)
    sampler = DistributedSampler(data, world, rank, shuffle=False)
    if short:  # this rank's shard one batch shorter than the others'
        return torch.utils.data.DataLoader(Subset(data, list(sampler)[: -(16 // world)]), batch_size=16 // world)
    return torch.utils.data.DataLoader(data, batch_size=16 // world, sampler=sampler)  # a global batch of 16


class _SpawnLoader:
    """Resolves its rank when iterated (inside the spawned worker)."""

    def __init__(self, data, world: int) -> None:
        self.data, self.world = data, world

    def _inner(self):
        import torch.distributed as dist

        return _loader(self.data, dist.get_rank(), self.world)

    def __iter__(self):
        return iter(self._inner())

    def __len__(self) -> int:
        return len(self.data) // 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn", "fsdp2"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--ckpt-dir", default=None, help="save a checkpoint at every epoch end here")
    ap.add_argument("--perturb-rank", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=None)
    ap.add_argument("--inner", default="keep")
    ap.add_argument("--opt", default="sgd")
    ap.add_argument("--csv", action="store_true", help="log to OUT/metrics.csv (CSVLogger)")
    ap.add_argument("--no-validate", action="store_true", help="skip trainer.validate after fit")
    ap.add_argument("--root-only", action="store_true", help="FSDP2: shard only the root module")
    ap.add_argument("--poison-rank", type=int, default=None, help="inf gradient on this rank at step 4")
    ap.add_argument("--full-ckpt", action="store_true", help="FSDP2: single-file (full) checkpoints")
    ap.add_argument("--outer-momentum", type=float, default=0.0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--local-sgd", action="store_true", help="LookaheadCallback(local_sgd=True)")
    ap.add_argument("--ranks-per-worker", default="1", help="an int or 'node'")
    ap.add_argument("--local-sgd-start", type=int, default=0)
    ap.add_argument("--average-precision", default="full")
    ap.add_argument("--devices", type=int, default=2, help="processes per node")
    ap.add_argument("--short-rank", type=int, default=None, help="this rank's training data one batch short")
    ap.add_argument("--two-opt", action="store_true", help="two optimizers, the second every second batch")
    ap.add_argument("--num-nodes", type=int, default=1, help="launch one command per node, NODE_RANK=0..")
    ap.add_argument("--count-comm", action="store_true", help="count all-reduces per step (OUT/comm_rank{r}.pt)")
    ap.add_argument("--freeze-first", action="store_true", help="net.0 frozen and not optimised")
    ap.add_argument("--skip-step-rank", type=int, default=None, help="manual optimisation; this rank skips a step")
    ap.add_argument("--save-main", default=None, help="after fit, trainer.save_checkpoint here in the launching process")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    fsdp2 = args.strategy == "fsdp2"
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not args.full_ckpt
        )
    else:
        strategy = args.strategy
    cb = LookaheadCallback(
        k=args.k,
        alpha=args.alpha,
        inner_state=args.inner,
        check_ranks_every=args.check_every,
        outer_momentum=args.outer_momentum,
        local_sgd=args.local_sgd,
        ranks_per_worker=args.ranks_per_worker if args.ranks_per_worker == "node" else int(args.ranks_per_worker),
        local_sgd_start=args.local_sgd_start,
        average_precision=args.average_precision,
    )
    callbacks: list[Callback] = [cb, Dump(cb, args.out)]
    if args.count_comm:
        callbacks.append(CommCounter(cb, args.out))
    if args.perturb_rank is not None:
        callbacks.append(Perturb(cb, args.perturb_rank))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=CSVLogger(args.out, name="", version="") if args.csv else False,
        log_every_n_steps=1,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        deterministic=True,
        use_distributed_sampler=False,
    )
    kw = dict(fsdp2=fsdp2, opt=args.opt, root_only=args.root_only, poison_rank=args.poison_rank)
    kw["freeze_first"] = args.freeze_first
    if args.two_opt:
        model = TwoOptimizerModule(**kw)
    else:
        model = Module(**kw) if args.skip_step_rank is None else SkipStepModule(args.skip_step_rank, **kw)
    # Explicit in-order sharding: rank r of W sees samples r, r+W, ...; 16/W per rank = a 16-sample
    # global batch equal to the single-process batch of samples 0..15.
    world = args.devices * args.num_nodes
    node = int(os.environ.get("NODE_RANK", 0))
    rank = node * args.devices + int(os.environ.get("LOCAL_RANK", 0)) if args.strategy != "ddp_spawn" else None
    train = _loader(make_data(0), rank, world, short=rank is not None and rank == args.short_rank)
    val = _loader(make_data(1), rank, world)
    trainer.fit(model, train, val, ckpt_path=args.ckpt)
    if args.save_main:  # ddp_spawn: this is the launching process, where no fit hook ran
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.save_checkpoint(args.save_main)
        with open(os.path.join(args.out, "main_warnings.txt"), "w") as f:
            f.write("\n".join(str(w.message) for w in caught))
    if not args.no_validate:
        trainer.validate(model, val, verbose=False)  # after fit: the module holds the slow weights


class Dump(Callback):
    """Writes this rank's view at the end of each stage (inside the worker, so ddp_spawn works too)."""

    def __init__(self, cb: LookaheadCallback, out: str) -> None:
        self.cb, self.out = cb, out

    def teardown(self, trainer, pl_module, stage):
        la = self.cb.lookahead
        if trainer.global_rank == 0:
            stage_name = getattr(stage, "value", stage)
            print(f"{stage_name}: {trainer.world_size} ranks, {trainer.global_step} optimizer steps, Lookahead steps"
                  f" {la.steps}, syncs {la.syncs}, skipped {la.skipped}; tensors of each rank in {self.out}", flush=True)
        tensors = self.cb.lookahead.tensors()
        torch.save(
            {
                "slow": {n: t.detach().clone() for n, t in tensors["slow"].items()},
                "fast": {n: t.detach().clone() for n, t in tensors["fast"].items()},
                "momentum": {n: t.detach().clone() for n, t in tensors["momentum"].items()},
                "slow_moments": {n: local(t).detach().clone() for n, t in tensors["slow_moments"].items()},
                "params": {n: local(p).detach().clone() for n, p in pl_module.named_parameters()},
                "val_snapshots": pl_module.val_snapshots,
                "steps": self.cb.lookahead.steps,
                "syncs": self.cb.lookahead.syncs,
                "skipped": self.cb.lookahead.skipped,
                "stash_numel": sum(t.numel() for g in self.cb.lookahead.groups for t in g.slow_tensors().values()),
                "total_numel": sum(p.numel() for p in pl_module.parameters()),
            },
            os.path.join(self.out, f"{getattr(stage, 'value', stage)}_rank{trainer.global_rank}.pt"),
        )


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's C++ threads occasionally abort there on this machine
    # ("terminate called without an active exception") after all work and output are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
