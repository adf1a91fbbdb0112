"""Rank- and shard-awareness: local views of sharded parameters and cross-rank checks (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is how FSDP2 / ModelParallelStrategy expose parameter shards.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor (a parameter whose storage on this rank is only a shard)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank actually stores: the local shard of a DTensor, else ``t`` itself.

    The result shares storage with ``t``, so in-place updates reach the parameter.
    """
    return t.to_local() if is_sharded(t) else t


def like(template: Tensor, local_tensor: Tensor) -> Tensor:
    """Wrap ``local_tensor`` the way ``template`` is wrapped (a DTensor shard with the same layout)."""
    if not is_sharded(template):
        return local_tensor
    return DTensor.from_local(
        local_tensor,
        template.device_mesh,
        template.placements,
        run_check=False,
        shape=template.shape,
        stride=template.stride(),
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RankMismatchError(RuntimeError):
    """The slow weights differ between ranks: something broke the data-parallel invariant."""


@torch.no_grad()
def check_replicated(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Raise :class:`RankMismatchError` if replicated tensors differ across ranks.

    One collective: every rank contributes ``[c, -c]`` per tensor (``c`` a float64 checksum) to
    a MAX all-reduce, so all ranks learn ``max(c)`` and ``min(c)`` and raise together (no hang).
    """
    if world_size() == 1 or not tensors:
        return
    sums = torch.stack([t.detach().double().sum() for t in tensors])
    sq = torch.stack([t.detach().double().square().sum() for t in tensors])
    checksum = sums + sq  # two moments: a single flipped value changes at least one
    both = torch.cat([checksum, -checksum])
    backend_device = _collective_device(tensors[0])
    both = both.to(backend_device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[: len(tensors)], -both[len(tensors) :]
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        first = names[bad[0]]
        raise RankMismatchError(
            f"Lookahead slow weights differ across {world_size()} ranks; first differing parameter:"
            f" {first!r} (checksums range {lo[bad[0]].item():.17g}..{hi[bad[0]].item():.17g});"
            f" {len(bad)} of {len(tensors)} parameters differ. Ranks must run identical updates."
        )


def _collective_device(t: Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo takes CPU ones.
    backend = dist.get_backend()
    return t.device if backend == "nccl" else torch.device("cpu")
