"""Hydra app: train the example CNN from configs/train.yaml, with LookaheadCallback on by default.

    python examples/train.py                                  # MNIST-5k, SGD(momentum), Lookahead k=5 alpha=0.5
    python examples/train.py callbacks/lookahead=none         # same run without Lookahead (= callbacks=no_lookahead)
    python examples/train.py callbacks/lookahead=snoo         # SNOO preset (= callbacks=snoo); other callbacks kept
    python examples/train.py -m callbacks.lookahead.k=5,10 callbacks.lookahead.alpha=0.5,0.8
    python examples/train.py -m callbacks/lookahead=default,snoo,none   # presets and off, same checkpointing
    python examples/train.py data=digits optimizer=adam       # sklearn digits, Adam

See docs/hydra.md for the Hydra forms (presets, off switch, sweeps, your own app).

The last line printed is the validation loss/accuracy of the final (slow, with Lookahead) weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from lightning_lookahead import LookaheadCallback

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))  # read by configs/paths/default.yaml
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning vs. newer torch, harmless
log = logging.getLogger(__name__)


def instantiate(cfg: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces the target's own argument error (e.g. the
    callback's ValueError for ``k=0``) instead of Hydra's InstantiationException wrapper."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise err.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group node (``callbacks``, ``logger``) that has a ``_target_``;
    entries set to null (``callbacks/lookahead=none``, ``callbacks=no_lookahead``) or deleted
    (``~callbacks.lookahead``) are skipped."""
    nodes = (group or {}).values()
    return [instantiate(node) for node in nodes if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_loggers(group: DictConfig | None) -> list[Logger]:
    """The ``logger`` group, minus TensorBoard when it is not installed (it is optional)."""
    if group and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        group = DictConfig({k: v for k, v in group.items() if not str(v.get("_target_")).endswith("TensorBoardLogger")})
        log.warning("tensorboard is not installed: TensorBoard logging skipped (CSV logs are still written)")
    return instantiate_group(group)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate everything from the config; a bad value raises the component's own ValueError."""
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks: list[Callback] = instantiate_group(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(cfg.get("logger")))
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then validate the final weights; returns the final validation metrics."""
    L.seed_everything(cfg.seed, workers=True)
    try:
        datamodule, model, trainer = build(cfg)
    except (ValueError, TypeError) as err:  # a bad value or key: one clear line, not a Hydra traceback
        sys.exit(f"Invalid configuration: {err}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    # after fit the module holds the slow weights (LookaheadCallback.on_fit_end): validate those
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    lookahead = any(isinstance(c, LookaheadCallback) for c in trainer.callbacks)
    weights = "slow weights" if lookahead else "weights, no Lookahead"
    print(f"Final validation ({weights}): val/loss={metrics['val/loss']:.4f} val/acc={metrics['val/acc']:.4f}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float:
    return train(cfg)["val/acc"]  # for sweepers that optimise a returned value


if __name__ == "__main__":
    main()
