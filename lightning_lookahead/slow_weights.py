"""The slow weights of one optimizer's parameters: the sync, the eval swap, and their tensors.

Tensor work is one ``torch._foreach_*`` call per (device, dtype) bucket under ``no_grad``; nothing
here runs on non-sync steps. Sharded (DTensor) parameters are handled through their local shards,
so the slow copy is itself a shard and the update is shard-local; only the skip-or-apply decision
for non-finite weights is all-reduced (one scalar), so every rank takes the same branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_lookahead._grouping import group_indices_by_device_dtype
from lightning_lookahead.distributed import all_reduce_sum, is_sharded, local, local_from_saved


class SlowWeights:
    """Slow copy ``phi`` of a list of named parameters ``theta``.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> sw = SlowWeights([("w", p)])
        >>> with torch.no_grad():
        ...     _ = p.add_(1.0)  # the inner optimizer moves the fast weights
        >>> sw.sync(alpha=0.5).applied
        True
        >>> p.tolist(), sw.slow_tensors()["w"].tolist()
        ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    """

    def __init__(self, named_params: Sequence[tuple[str, Tensor]], slow: Mapping[str, Tensor] | None = None) -> None:
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.stash: list[Tensor] = []
        self.swapped = False  # True: params hold phi and ``stash`` holds theta
        self.add(named_params, slow)

    def add(self, named_params: Sequence[tuple[str, Tensor]], slow: Mapping[str, Tensor] | None = None) -> None:
        """Start slow weights for more parameters: ``slow[name]`` where given (taken over, not
        copied: e.g. from the group of an optimizer that was replaced), else their current values."""
        assert not self.swapped
        slow = slow or {}
        self.names += [n for n, _ in named_params]
        self.params += [p for _, p in named_params]
        # Our own storage, never an alias: clone() keeps strides so a pointer swap is shape-exact.
        self.stash += [slow[n] if n in slow else local(p).detach().clone() for n, p in named_params]
        self.buckets = group_indices_by_device_dtype([local(p) for p in self.params])
        self.sharded = [is_sharded(p) for p in self.params]

    # ---------------------------------------------------------------- views
    def _fast(self, idx: list[int]) -> list[Tensor]:
        # Resolved each time: FSDP2 may re-point a parameter's local shard after lazy init.
        return [local(self.params[i]) for i in idx]

    def fast_tensors(self) -> dict[str, Tensor]:
        """Name -> the fast weights (local shards for sharded parameters), whatever the swap state."""
        src = self.stash if self.swapped else [local(p) for p in self.params]
        return dict(zip(self.names, src))

    def slow_tensors(self) -> dict[str, Tensor]:
        """Name -> the slow weights (local shards for sharded parameters), whatever the swap state."""
        src = [local(p) for p in self.params] if self.swapped else self.stash
        return dict(zip(self.names, src))

    # ---------------------------------------------------------------- sync
    @torch.no_grad()
    def sync(self, alpha: float, stats: bool = True) -> SyncStats:
        """``phi <- phi + alpha (theta - phi); theta <- phi`` unless theta holds inf/nan.

        One host read per call (the finiteness decision), none otherwise. ``stats=True`` also
        measures ``||theta - phi|| / ||phi||``, which costs two more passes over the parameters.
        Memory traffic in parameter bytes (4x is the floor: read theta and phi, write both):

        ===========  ==================================================  =======
        path         passes                                              traffic
        ===========  ==================================================  =======
        lean         ||theta|| guard, lerp_(phi, theta), copy_(theta)    6x
        stats        the same guard, ||theta - phi|| (block temporary),  8x + d
                     ||phi||, then the same lerp_ and copy_
        ===========  ==================================================  =======

        Both paths apply the identical update, so a run's trajectory does not depend on whether
        the distance is measured. Nothing is written when theta is not finite. ``alpha == 1``
        copies theta into phi and never writes theta, so ``k=1, alpha=1`` is bit-for-bit plain
        training.
        """
        assert not self.swapped, "sync while the slow weights are swapped in"
        if not self.buckets:  # an optimizer whose parameters are all frozen (for now)
            return SyncStats(applied=True)
        return self._sync_stats(alpha) if stats else self._sync_lean(alpha)

    def _all_finite(self, total: Tensor) -> bool:
        """The one host read of a sync step. With shards, every rank must decide alike."""
        if any(self.sharded):
            total = all_reduce_sum(total.clone())
        return bool(torch.isfinite(total))

    def _pairs(self):
        for idx in self.buckets:
            yield self._fast(idx), [self.stash[i] for i in idx]

    def _blocks(self):
        for theta, phi in self._pairs():
            yield from _cache_blocks(theta, phi)

    def _theta_finite(self) -> bool:
        # one guard for both paths (float32 norms of theta), so they always decide alike
        return self._all_finite(_total([_sq_norm(theta) for theta, _ in self._pairs()]))

    def _sync_lean(self, alpha: float) -> SyncStats:
        ok = self._theta_finite()
        if ok:
            self._apply(alpha)
        return SyncStats(applied=ok)

    def _sync_stats(self, alpha: float) -> SyncStats:
        ok = self._theta_finite()
        d_sq, phi_sq = [], []
        for theta, phi in self._blocks():
            # d lives in a block-sized temporary (cache-resident on CPU, bounded on GPU): theta
            # is never written before the update, which is the lean path's own
            d_sq.append(_sq_norm(torch._foreach_sub(theta, phi)))
            phi_sq.append(_sq_norm(phi))
        total_d, total_phi = _total(d_sq), _total(phi_sq)
        if ok:
            self._apply(alpha)
        rel = total_d.sqrt() / total_phi.sqrt().clamp_min(1e-30)
        return SyncStats(applied=ok, rel_distance=rel, d_sq=total_d, phi_sq=total_phi)

    def _apply(self, alpha: float) -> None:
        for theta, phi in self._blocks():  # lerp and copy of a block share the cache
            if alpha == 1.0:
                torch._foreach_copy_(phi, theta)  # phi <- theta exactly; theta untouched
            else:
                torch._foreach_lerp_(phi, theta, alpha)  # phi + alpha (theta - phi)
                torch._foreach_copy_(theta, phi)

    # ---------------------------------------------------------------- swap
    @torch.no_grad()
    def swap(self) -> None:
        """Exchange fast and slow weights in the parameters, bit-exactly.

        Unsharded parameters swap storage pointers (no copy, no extra memory). Sharded ones are
        read by FSDP from their shard storage, so their values are exchanged in place through one
        scratch buffer the size of the largest shard.
        """
        scratch: Tensor | None = None
        for i, p in enumerate(self.params):
            if self.sharded[i]:
                shard = local(p)
                if scratch is None or scratch.numel() < shard.numel() or scratch.dtype != shard.dtype:
                    scratch = torch.empty(shard.numel(), dtype=shard.dtype, device=shard.device)
                tmp = scratch[: shard.numel()].view_as(shard)
                tmp.copy_(shard)
                shard.copy_(self.stash[i])
                self.stash[i].copy_(tmp)
            else:
                p.data, self.stash[i] = self.stash[i], p.data
        self.swapped = not self.swapped

    # ---------------------------------------------------------------- restore
    @torch.no_grad()
    def copy_parameters_to_slow(self) -> None:
        """phi <- the parameters' current values (e.g. a checkpoint's slow weights just loaded)."""
        assert not self.swapped
        for theta, phi in self._pairs():
            torch._foreach_copy_(phi, theta)

    @torch.no_grad()
    def load_fast(self, fast: dict[str, Tensor]) -> None:
        """Overwrite theta from a name -> tensor map (e.g. a checkpoint), moving devices."""
        assert not self.swapped
        missing = [n for n in self.names if n not in fast]
        if missing:
            raise KeyError(f"Lookahead checkpoint lacks fast weights for parameters {missing[:5]}")
        for i, name in enumerate(self.names):
            local(self.params[i]).copy_(local_from_saved(self.params[i], fast[name]))


CPU_BLOCK = 1 << 17  # elements per cache block: theta + phi of a float32 block fit a 1 MiB L2
DEVICE_BLOCK = 1 << 24  # elsewhere (GPU): only bounds the distance temporary (64 MiB of float32)


def _cache_blocks(theta: list[Tensor], phi: list[Tensor]):
    """Split a bucket into blocks of about ``CPU_BLOCK`` elements on CPU (``DEVICE_BLOCK``
    elsewhere); tensors larger than a block are split into views.

    On CPU each ``torch._foreach_*`` op is a loop over its tensors, so running every op over the
    whole model streams it through memory once per op; per block, the second op reads what the
    first left in cache. (Measured: lerp + copy at 1e7-1e8 parameters goes from ~1.3x to ~1.05x
    the bare foreach pair.) GPUs have multi-tensor kernels; there the large blocks only bound the
    distance temporary.
    """
    limit = CPU_BLOCK if theta[0].device.type == "cpu" else DEVICE_BLOCK
    block_t: list[Tensor] = []
    block_p: list[Tensor] = []
    size = 0
    for t, p in zip(theta, phi):
        if t.numel() > limit and t.is_contiguous() and p.is_contiguous():
            for a, b in zip(t.view(-1).split(limit), p.view(-1).split(limit)):
                yield [a], [b]
            continue
        block_t.append(t)
        block_p.append(p)
        size += t.numel()
        if size >= limit:
            yield block_t, block_p
            block_t, block_p, size = [], [], 0
    if block_t:
        yield block_t, block_p


def _sq_norm(tensors: list[Tensor]) -> Tensor:
    """Sum of squares, as a float32 scalar on the tensors' device (no host sync).

    Half-precision norms accumulate and return in float32: a float16 norm overflows at 65504.
    """
    low = tensors[0].dtype in (torch.float16, torch.bfloat16)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)
    return torch.stack(norms).float().square().sum()


def _total(parts: list[Tensor]) -> Tensor:
    return torch.stack([p.to(parts[0].device) for p in parts]).sum()


class SyncStats:
    """Outcome of one sync. Tensors stay on device: reading them is the caller's choice."""

    __slots__ = ("applied", "rel_distance", "d_sq", "phi_sq")

    def __init__(
        self,
        applied: bool,
        rel_distance: Tensor | None = None,
        d_sq: Tensor | None = None,
        phi_sq: Tensor | None = None,
    ) -> None:
        self.applied = applied
        self.rel_distance = rel_distance  # ||theta - phi|| / ||phi|| before the sync (this rank's part); None: not measured
        self.d_sq = d_sq
        self.phi_sq = phi_sq
