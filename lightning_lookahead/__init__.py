"""Lookahead ("k steps forward, 1 step back", Zhang et al. 2019) as a PyTorch Lightning callback."""

from lightning_lookahead.callback import LookaheadCallback
from lightning_lookahead.distributed import RankMismatchError
from lightning_lookahead.lookahead import Lookahead, NonFiniteError

__all__ = ["Lookahead", "LookaheadCallback", "NonFiniteError", "RankMismatchError"]
__version__ = "0.1.0"
