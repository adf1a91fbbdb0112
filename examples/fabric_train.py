"""Lookahead in a Lightning Fabric loop, saved in the middle of a k-cycle and resumed exactly.

    python examples/fabric_train.py

Trains a small MLP on sklearn's digits with Fabric on the CPU three times: uninterrupted; stopped
after step 37 (two steps into a k=5 cycle) with ``fabric.save``; resumed with ``fabric.load`` into
fresh objects. ``Lookahead`` is a stateful object to Fabric: it goes into the state dict next to
the model and the optimizer. Prints the slow weights' validation accuracy and whether the resumed
run equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_lookahead import Lookahead

EPOCHS, BATCH, STOP_AT = 4, 64, 37
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning vs. newer torch, harmless


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(ckpt: Path | None = None, resume: bool = False, stop_at: int | None = None):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    x, y, _, _ = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    lookahead = Lookahead(k=5, alpha=0.5)
    lookahead.attach([optimizer], model)  # the Fabric wrappers are fine; names are saved without `_forward_module.`
    state = {"model": model, "optimizer": optimizer, "lookahead": lookahead, "step": 0}
    if resume:
        fabric.load(ckpt, state)  # restores the three objects in place, and state["step"]
    step = state["step"]
    per_epoch = (len(x) + BATCH - 1) // BATCH
    for epoch in range(step // per_epoch, EPOCHS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # replayable
        for i in range(step - epoch * per_epoch, per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))
            optimizer.step()
            step += 1
            if step == stop_at:
                fabric.save(ckpt, {**state, "step": step})
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
        ckpt = Path(tmp) / "checkpoint.ckpt"
        train(ckpt, stop_at=STOP_AT)
        torch.load(ckpt, weights_only=True)  # plain tensors, numbers, strings, lists and dicts
        model, la = train(ckpt, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(full_model.parameters(), model.parameters()))
    slow, full_slow = la.tensors()["slow"].values(), full_la.tensors()["slow"].values()
    same = same and all(torch.equal(a, b) for a, b in zip(full_slow, slow))
    print(f"Fabric (CPU), digits MLP, SGD(momentum=0.9) + Lookahead(k=5, alpha=0.5), {EPOCHS} epochs, {la.syncs} syncs")
    print(f"  uninterrupted                  val_acc={accuracy(full_model, full_la):.4f} (slow weights)")
    print(f"  stopped at step {STOP_AT}, resumed   val_acc={accuracy(model, la):.4f} (slow weights)")
    print(f"  resumed run == uninterrupted run, bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
