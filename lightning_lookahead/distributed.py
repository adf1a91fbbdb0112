"""Rank- and shard-awareness: local views of sharded parameters and cross-rank checks (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is how FSDP2 / ModelParallelStrategy expose parameter shards.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # a dependency of torch


def is_sharded(t: Tensor) -> TypeIs[DTensor]:
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


def full(param: Tensor, local_tensor: Tensor) -> Tensor:
    """The whole tensor behind ``local_tensor`` (a collective for a sharded ``param``: call on all ranks)."""
    whole = like(param, local_tensor)
    return whole.full_tensor() if is_sharded(whole) else local_tensor


def local_from_saved(param: Tensor, saved: Tensor) -> Tensor:
    """This rank's part of a saved tensor for ``param``: a DTensor's own shard, or a full tensor
    re-sharded like ``param`` (a collective for sharded parameters: call on all ranks)."""
    if is_sharded(saved):
        return saved.to_local()
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved.to(local(param).device), param.device_mesh, param.placements).to_local()
    return saved


def reshard_like(template: Tensor, saved: Tensor) -> Tensor:
    """``saved`` laid out like ``template``: a DTensor with its placements if ``template`` is one."""
    if is_sharded(template) and not is_sharded(saved):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved.to(local(template).device), template.device_mesh, template.placements)
    return saved.to(local(template).device)


def load_sharded(path: str, templates: dict[str, Tensor], prefix: str = "state_dict") -> dict[str, Tensor]:
    """Load the entries of ``templates`` (DTensors) that exist in a distributed checkpoint directory."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = {k: v for k, v in templates.items() if f"{prefix}.{k}" in saved}
    if wanted:
        dcp.load({prefix: wanted}, checkpoint_id=path)
    return wanted


def saved_names(path: str, prefix: str) -> list[str]:
    """The names after ``prefix`` of the entries of a distributed checkpoint directory."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]


def reshard(module: torch.nn.Module) -> None:
    """Free FSDP2's gathered parameters so the next forward all-gathers from the shards.

    FSDP2 keeps the root group unsharded after a no-grad forward; without this, a swap that
    rewrites the shards would be invisible to the next forward (it would reuse stale values).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (returns ``t`` itself in a single process)."""
    if world_size() > 1:
        on = t.to(_collective_device(t))
        dist.all_reduce(on, op=dist.ReduceOp.SUM)
        t = on.to(t.device)
    return t


class RankMismatchError(RuntimeError):
    """Lookahead's replicated state (slow weights, outer momentum, step and sync counters) differs
    between ranks: something broke the data-parallel invariant."""


@torch.no_grad()
def check_replicated(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Raise :class:`RankMismatchError` unless replicated tensors are bit-identical across ranks.

    One collective: every rank contributes ``[c, -c]`` per tensor (``c`` two int64 checksums of
    the tensor's bits: their sum and a position-weighted sum, so a 1-ulp change anywhere or two
    swapped values show; complex tensors as their real and imaginary parts) to a MAX all-reduce,
    so all ranks learn the max and min of each and raise together (no hang).
    """
    if world_size() == 1 or not tensors:
        return
    lo, hi = min_max(torch.stack([_bits_checksum(t) for t in tensors]), _collective_device(tensors[0]))
    bad = (hi != lo).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise RankMismatchError(
            f"Lookahead state differs across {world_size()} ranks; first differing entry: {names[bad[0]]!r};"
            f" {len(bad)} of {len(tensors)} entries differ: {[names[i] for i in bad[:6]]}."
            " Ranks must run identical updates."
        )


def min_max(t: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The elementwise minimum and maximum of ``t`` over all ranks, on every rank: one MAX all-reduce
    of ``[t, -t]`` (on ``device``, default: where the backend wants ``t``), so all ranks can decide
    together, e.g. raise together instead of leaving the others waiting."""
    both = torch.cat([t.flatten(), -t.flatten()]).to(device or _collective_device(t))
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = t.numel()
    return -both[n:].view_as(t).to(t.device), both[:n].view_as(t).to(t.device)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_checksum(t: Tensor) -> Tensor:
    t = t.detach().cpu().contiguous()
    if t.is_complex():
        t = torch.view_as_real(t).contiguous()
    bits = t.flatten().view(_INT_OF_SIZE[t.element_size()]).long()
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.long) % 1_000_003  # positions matter
    return torch.stack([bits.sum(), (bits * weights).sum()])  # int64 wraps around deterministically


def _collective_device(t: Tensor) -> torch.device:
    # NCCL needs CUDA tensors (also for CPU-offloaded shards); gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
