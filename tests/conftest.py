"""Shared test fixtures: a tiny deterministic regression task, a Lightning module for it, and the
paper's algorithm written out plainly as an independent reference."""

from __future__ import annotations

import os
import sys
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

N_SAMPLES, BATCH = 48, 8  # 6 batches per epoch


def end_spawned_process() -> None:
    """End a process started by torch.multiprocessing once its results are written: leave the process
    group, then skip the interpreter's teardown, where gloo's C++ threads now and then abort on this
    machine ("terminate called without an active exception", SIGABRT) and fail a test whose work is
    done (tests/dist/worker.py does the same)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    y = (x @ torch.randn(6, 2, generator=g)).tanh() + 0.1 * torch.randn(N_SAMPLES, 2, generator=g)
    return TensorDataset(x, y)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def make_optimizer(name: str, params, lr: float | None = None) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr or 0.02)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr or 0.02, weight_decay=0.01)
    raise ValueError(name)


class RegressionModule(L.LightningModule):
    def __init__(self, opt: str = "sgd", lr: float | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(seed)
        self.val_param_snapshots: list[list[torch.Tensor]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_param_snapshots.append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return make_optimizer(self.hparams.opt, self.parameters(), self.hparams.lr)


def loader(seed: int = 0, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(make_data(seed), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@torch.no_grad()
def _sync_reference(params, slow, alpha):
    for p, s in zip(params, slow):
        s.add_(alpha * (p - s))  # phi <- phi + alpha (theta - phi)
        p.copy_(s)  # theta <- phi


def reference_lookahead(
    opt: str,
    k: int,
    alpha: float,
    n_batches: int,
    accumulate: int = 1,
    inner_state: str = "keep",
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = BATCH,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The paper's Algorithm 1, written plainly: returns (fast, slow) parameters after n_batches
    batches of the shuffle-free loader, cycling epochs, with Lightning's accumulation semantics
    (loss / accumulate; the last batch of an epoch forces a step)."""
    net = make_net(seed)
    params = list(net.parameters())
    optim = make_optimizer(opt, params, lr)
    slow = [p.detach().clone() for p in params]
    slow_m: dict[int, torch.Tensor] = {}
    first_moment = "momentum_buffer" if opt == "sgd" else "exp_avg"
    batches = list(loader(seed, batch_size))
    steps = 0
    for b in range(n_batches):
        i = b % len(batches)
        x, y = batches[i]
        (nn.functional.mse_loss(net(x), y) / accumulate).backward()
        if (i + 1) % accumulate == 0 or i + 1 == len(batches):
            optim.step()
            optim.zero_grad()
            steps += 1
            if steps % k == 0:
                _sync_reference(params, slow, alpha)
                with torch.no_grad():
                    for j, p in enumerate(params):
                        state = optim.state[p]
                        if inner_state == "reset":
                            for key, v in state.items():
                                v.zero_()
                        elif inner_state == "pullback":
                            m = state[first_moment]
                            sm = slow_m.setdefault(j, torch.zeros_like(m))
                            sm.add_(alpha * (m - sm))
                            m.copy_(sm)
    return [p.detach() for p in params], slow


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
