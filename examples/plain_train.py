"""Lookahead in a plain PyTorch loop, saved in the middle of a k-cycle and resumed exactly.

    python examples/plain_train.py

Trains a small MLP on sklearn's digits three times: uninterrupted; stopped after step 37 (two
steps into a k=5 cycle) with a checkpoint; resumed from that file with fresh objects. It prints
the validation accuracy of the slow weights and whether the resumed run equals the
uninterrupted one bit for bit. No Lightning needed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_lookahead import Lookahead

EPOCHS, BATCH, STOP_AT = 4, 64, 37


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def build() -> tuple[nn.Module, torch.optim.Optimizer, Lookahead]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lookahead = Lookahead(k=5, alpha=0.5)
    lookahead.attach([optimizer], model)  # counts optimizer.step() calls; syncs every k-th
    return model, optimizer, lookahead


def train(ckpt: Path | None = None, resume: bool = False, stop_at: int | None = None) -> tuple[nn.Module, Lookahead]:
    x, y, _, _ = data()
    model, optimizer, lookahead = build()
    step = 0
    if resume:
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lookahead.load_state_dict(state["lookahead"])  # fast and slow weights, counters, buffers
        step = state["step"]
    per_epoch = (len(x) + BATCH - 1) // BATCH
    for epoch in range(step // per_epoch, EPOCHS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # replayable
        for i in range(step - epoch * per_epoch, per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            step += 1
            if step == stop_at:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save({**state, "lookahead": lookahead.state_dict(), "step": step}, ckpt)
                return model, lookahead
    return model, lookahead


def accuracy(model: nn.Module, lookahead: Lookahead) -> float:
    _, _, x_val, y_val = data()
    lookahead.use_slow()  # evaluate the slow weights
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    lookahead.use_fast()
    return acc


def main() -> int:
    full_model, full_la = train()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint.pt"
        train(ckpt, stop_at=STOP_AT)
        model, la = train(ckpt, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(full_model.parameters(), model.parameters()))
    slow, full_slow = la.tensors()["slow"].values(), full_la.tensors()["slow"].values()
    same = same and all(torch.equal(a, b) for a, b in zip(full_slow, slow))
    print(f"PyTorch, digits MLP, SGD(momentum=0.9) + Lookahead(k=5, alpha=0.5), {EPOCHS} epochs, {la.syncs} syncs")
    print(f"  uninterrupted                  val_acc={accuracy(full_model, full_la):.4f} (slow weights)")
    print(f"  stopped at step {STOP_AT}, resumed   val_acc={accuracy(model, la):.4f} (slow weights)")
    print(f"  resumed run == uninterrupted run, bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
