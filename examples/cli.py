"""LightningCLI entry point for the example CNN (same LitCNN/MNISTDataModule as the Hydra app).

    python examples/cli.py fit --trainer.callbacks+=lightning_lookahead.LookaheadCallback \
        --trainer.callbacks.k=5 --trainer.callbacks.alpha=0.5 --trainer.max_epochs=3
    python examples/cli.py fit --config examples/cli_config.yaml --model.optimizer=adam --model.lr=0.003
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from mnist import LitCNN, MNISTDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning vs. newer torch, harmless


def main() -> None:
    LightningCLI(LitCNN, MNISTDataModule, seed_everything_default=42, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
