"""Lookahead ("k steps forward, 1 step back", Zhang et al. 2019) as a PyTorch Lightning callback.

The core (:class:`Lookahead`, :class:`LookaheadConfig`, :class:`NonFiniteError`,
:class:`RankMismatchError`) needs only torch.
:class:`LookaheadCallback` needs Lightning and is imported on first access (PEP 562), so
``import lightning_lookahead`` works without Lightning installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_lookahead.config import LookaheadConfig
from lightning_lookahead.distributed import RankMismatchError
from lightning_lookahead.lookahead import Lookahead, NonFiniteError

if TYPE_CHECKING:
    from lightning_lookahead.callback import LookaheadCallback

__all__ = ["Lookahead", "LookaheadCallback", "LookaheadConfig", "NonFiniteError", "RankMismatchError"]
__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)


def __getattr__(name: str) -> Any:
    if name == "LookaheadCallback":
        from lightning_lookahead.callback import LookaheadCallback

        globals()[name] = LookaheadCallback  # later lookups skip this function
        return LookaheadCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"LookaheadCallback"})
