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

    def __init__(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        slow: Mapping[str, Tensor] | None = None,
        momentum: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.stash: list[Tensor] = []
        self.momentum: list[Tensor] | None = None  # outer momentum buffers, created at the first sync with mu > 0
        self.swapped = False  # True: params hold phi and ``stash`` holds theta
        self.add(named_params, slow, momentum)

    def add(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        slow: Mapping[str, Tensor] | None = None,
        momentum: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Start slow weights for more parameters: ``slow[name]`` where given (taken over, not
        copied: e.g. from the group of an optimizer that was replaced), else their current values.
        Their outer momentum buffers (if this group has them) are ``momentum[name]`` or zeros."""
        assert not self.swapped
        slow, momentum = slow or {}, momentum or {}
        self.names += [n for n, _ in named_params]
        self.params += [p for _, p in named_params]
        # Our own storage, never an alias: clone() keeps strides so a pointer swap is shape-exact.
        new = [slow[n] if n in slow else local(p).detach().clone() for n, p in named_params]
        self.stash += new
        if self.momentum is not None or momentum:
            if self.momentum is None:
                self.momentum = [torch.zeros_like(t) for t in self.stash[: len(self.stash) - len(new)]]
            self.momentum += [momentum[n] if n in momentum else torch.zeros_like(t) for (n, _), t in zip(named_params, new)]
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

    def momentum_tensors(self) -> dict[str, Tensor]:
        """Name -> the outer momentum buffer (local shards); empty before the first sync with mu > 0."""
        return dict(zip(self.names, self.momentum)) if self.momentum is not None else {}

    # ---------------------------------------------------------------- sync
    @torch.no_grad()
    def sync(self, alpha: float, stats: bool = True, momentum: float = 0.0, nesterov: bool = True) -> SyncStats:
        """The outer step on the pseudo-gradient ``s = phi - theta``, then ``theta <- phi``; nothing
        is written when theta holds inf/nan.

        ``momentum == 0`` is Lookahead: ``phi <- phi + alpha (theta - phi)``. With momentum ``mu``
        and a buffer ``b`` (zeros at first): ``b <- mu b + s``, then ``phi <- phi - alpha (s + mu b)``
        (``nesterov``, SNOO / DiLoCo's outer step) or ``phi <- phi - alpha b`` (heavy ball,
        SlowMo), i.e. ``torch.optim.SGD(lr=alpha, momentum=mu, nesterov=...)`` stepped on ``phi``
        with gradient ``s``, op for op.

        One host read per call (the finiteness decision), none otherwise. ``stats=True`` also
        measures ``||theta - phi|| / ||phi||`` (and, with momentum, the outer step's norm), which
        costs more passes. Memory traffic in parameter bytes (4x is the floor: read theta and phi,
        write both; momentum reads and writes ``b`` too):

        ===========  ==================================================  =======
        path         passes                                              traffic
        ===========  ==================================================  =======
        lean         ||theta|| guard, lerp_(phi, theta), copy_(theta)    6x
        stats        the same guard, ||theta - phi|| (block temporary),  8x + d
                     ||phi||, then the same lerp_ and copy_
        momentum     guard, s (block temporary), b, phi, copy_(theta)    8x + d
        ===========  ==================================================  =======

        All paths of one setting apply the identical update, so a run's trajectory does not depend
        on whether the distance is measured. ``alpha == 1`` without momentum copies theta into phi
        and never writes theta, so ``k=1, alpha=1`` is bit-for-bit plain training.
        """
        assert not self.swapped, "sync while the slow weights are swapped in"
        if not self.buckets:  # an optimizer whose parameters are all frozen (for now)
            return SyncStats(applied=True)
        if momentum:
            return self._sync_momentum(alpha, momentum, nesterov, stats)
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
        # one guard for every path (float32 norms of theta), so they always decide alike
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

    def _sync_momentum(self, alpha: float, mu: float, nesterov: bool, stats: bool) -> SyncStats:
        ok = self._theta_finite()  # decided before anything is written: b is guarded like phi
        if self.momentum is None:
            self.momentum = [torch.zeros_like(t) for t in self.stash]
        d_sq, phi_sq, step_sq = [], [], []
        for idx in self.buckets:
            theta, phi, buf = self._fast(idx), [self.stash[i] for i in idx], [self.momentum[i] for i in idx]
            for t, p, b in _cache_blocks(theta, phi, buf):
                s = torch._foreach_sub(p, t)  # the pseudo-gradient, in a block-sized temporary
                if stats:
                    d_sq.append(_sq_norm(s))
                    phi_sq.append(_sq_norm(p))
                if not ok:
                    continue
                # torch.optim.SGD's foreach momentum step, op for op (dampening 0)
                torch._foreach_mul_(b, mu)
                torch._foreach_add_(b, s)
                if nesterov:
                    torch._foreach_add_(s, b, alpha=mu)
                step = s if nesterov else b
                if stats:
                    step_sq.append(_sq_norm(step) * (alpha * alpha))
                torch._foreach_add_(p, step, alpha=-alpha)
                torch._foreach_copy_(t, p)
        if not stats:
            return SyncStats(applied=ok)
        total_d, total_phi = _total(d_sq), _total(phi_sq)
        rel = total_d.sqrt() / total_phi.sqrt().clamp_min(1e-30)
        total_step = _total(step_sq) if step_sq else torch.zeros_like(total_d)
        return SyncStats(applied=ok, rel_distance=rel, d_sq=total_d, phi_sq=total_phi, step_sq=total_step)

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
    def load_fast(self, fast: dict[str, Tensor]) -> None:
        """Overwrite theta from a name -> tensor map (e.g. a checkpoint), moving devices."""
        assert not self.swapped
        missing = [n for n in self.names if n not in fast]
        if missing:
            raise KeyError(f"Lookahead checkpoint lacks fast weights for parameters {missing[:5]}")
        for i, name in enumerate(self.names):
            local(self.params[i]).copy_(local_from_saved(self.params[i], fast[name]))

    @torch.no_grad()
    def load_slow(self, slow: dict[str, Tensor]) -> None:
        """Overwrite phi from a name -> tensor map, like :meth:`load_fast` (phi keeps its own layout)."""
        assert not self.swapped
        missing = [n for n in self.names if n not in slow]
        if missing:
            raise KeyError(f"Lookahead state lacks slow weights for parameters {missing[:5]}")
        for i, name in enumerate(self.names):
            self.stash[i].copy_(local_from_saved(self.params[i], slow[name]))

    @torch.no_grad()
    def load_momentum(self, momentum: dict[str, Tensor]) -> None:
        """Outer momentum buffers from a name -> tensor map (a missing name: zeros; an empty map:
        no buffers yet, as before the first sync)."""
        if not momentum:
            self.momentum = None
            return
        self.momentum = [
            local_from_saved(p, momentum[n]).to(self.stash[i].device).clone()
            if n in momentum
            else torch.zeros_like(self.stash[i])
            for i, (n, p) in enumerate(zip(self.names, self.params))
        ]


CPU_BLOCK = 1 << 17  # elements per cache block: theta + phi of a float32 block fit a 1 MiB L2
DEVICE_BLOCK = 1 << 24  # elsewhere (GPU): only bounds the distance temporary (64 MiB of float32)


def _cache_blocks(*lists: list[Tensor]):
    """Split aligned tensor lists (theta, phi, ...) into blocks of about ``CPU_BLOCK`` elements on
    CPU (``DEVICE_BLOCK`` elsewhere); tensors larger than a block are split into views.

    On CPU each ``torch._foreach_*`` op is a loop over its tensors, so running every op over the
    whole model streams it through memory once per op; per block, the second op reads what the
    first left in cache. (Measured: lerp + copy at 1e7-1e8 parameters goes from ~1.3x to ~1.05x
    the bare foreach pair.) GPUs have multi-tensor kernels; there the large blocks only bound the
    distance temporary.
    """
    limit = CPU_BLOCK if lists[0][0].device.type == "cpu" else DEVICE_BLOCK
    block: list[list[Tensor]] = [[] for _ in lists]
    size = 0
    for ts in zip(*lists):
        if ts[0].numel() > limit and all(t.is_contiguous() for t in ts):
            yield from ([[piece] for piece in pieces] for pieces in zip(*(t.view(-1).split(limit) for t in ts)))
            continue
        for dst, t in zip(block, ts):
            dst.append(t)
        size += ts[0].numel()
        if size >= limit:
            yield block
            block, size = [[] for _ in lists], 0
    if block[0]:
        yield block


def _sq_norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
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

    __slots__ = ("applied", "d_sq", "phi_sq", "rel_distance", "step_sq")

    def __init__(
        self,
        applied: bool,
        rel_distance: Tensor | None = None,
        d_sq: Tensor | None = None,
        phi_sq: Tensor | None = None,
        step_sq: Tensor | None = None,
    ) -> None:
        self.applied = applied
        self.rel_distance = rel_distance  # ||theta - phi|| / ||phi|| before the sync (this rank's part); None: not measured
        self.d_sq = d_sq  # ||theta - phi||^2 (this rank's part)
        self.phi_sq = phi_sq  # ||phi||^2 before the sync (this rank's part)
        self.step_sq = step_sq  # ||phi_new - phi||^2 of a momentum outer step (this rank's part); else None

    @property
    def rel_step(self) -> Tensor | None:
        """||phi_new - phi|| / ||phi|| of a momentum outer step (None without momentum or stats)."""
        if self.step_sq is None or self.phi_sq is None:
            return None
        return self.step_sq.sqrt() / self.phi_sq.sqrt().clamp_min(1e-30)
