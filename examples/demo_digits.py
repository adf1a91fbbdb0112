"""Short demo: the same MLP trained on real handwritten digits (sklearn's load_digits), plain vs Lookahead.

    python examples/demo_digits.py [--epochs 15] [--lrs 0.05 0.5] [--threads 1] [--verbose]

For each learning rate (a sensible one and a deliberately too large one), trains the same
initialisation with SGD(momentum=0.9) twice, plain and with ``LookaheadCallback(k=5, alpha=0.5)``,
and prints the validation loss and accuracy of both (the Lookahead run is validated on its slow
weights). Quiet by default: only the table (``--verbose`` also shows Lightning's progress bars and
logs, and the time each fit took on stderr). Torch runs on one thread (``--threads``), so the table
does not depend on the number of cores (the README quotes it; another CPU model can still differ
in the last digits).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lookahead import LookaheadCallback


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1400], perm[1400:]
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True, generator=g),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def run(lookahead: bool, epochs: int, lr: float, verbose: bool = False) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(lr)
    callbacks = [LookaheadCallback(k=5, alpha=0.5)] if lookahead else []
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=verbose,
    )
    train, val = digits_loaders()
    trainer.fit(model, train, val)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.5], help="SGD learning rates to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the numbers depend on it)")
    parser.add_argument("--verbose", action="store_true", help="show Lightning's progress bars, messages and timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6's own pytree helper builds torch's deprecated LeafSpec (not this package's code)
    warnings.filterwarnings(
        "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities"
    )
    if not args.verbose:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"load_digits, MLP, SGD(momentum=0.9), {args.epochs} epochs, 397 validation images, {threads}")
    for lr in args.lrs:
        for name, la in (("plain SGD", False), ("Lookahead(k=5, alpha=0.5)", True)):
            t0 = time.perf_counter()
            m = run(la, args.epochs, lr, args.verbose)
            print(f"  lr={lr:<6g} {name:<27} val_loss={m['val_loss']:.4f}  val_acc={m['val_acc']:.4f}", flush=True)
            if args.verbose:
                print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
