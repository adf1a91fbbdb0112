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


class LookaheadCLI(LightningCLI):
    """LightningCLI that reports a bad LookaheadCallback value the way jsonargparse reports a type
    error: the usage, then one ``error:`` line naming the argument and its allowed values, exit 2.

    A plain LightningCLI instantiates ``trainer.callbacks`` as a Union and ends the output with
    jsonargparse's "Does not validate against any of the Union subtypes", the callback's own
    message (the same one) buried under "Errors:". Copy this class into your own entry point.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            message = lookahead_error(err)
            if message is None:
                raise
            parser = self._subcommand_parsers.get(self.subcommand or "", self.parser)
            parser.error(f'Parser key "trainer.callbacks": LookaheadCallback: {message}')


def lookahead_error(err: BaseException) -> str | None:
    """The LookaheadCallback's own ``ValueError`` message inside jsonargparse's error, if any."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:  # jsonargparse chains the failing subtype's error
        seen.add(id(cause))
        if isinstance(cause, ValueError) and str(cause).startswith("Lookahead `"):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    for line in str(err).splitlines():  # else its message lists every subtype's error
        if line.strip().startswith("- Lookahead `"):
            return line.strip()[2:]
    return None


def main() -> None:
    LookaheadCLI(LitCNN, MNISTDataModule, seed_everything_default=42, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
