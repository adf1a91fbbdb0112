"""The slow weights of one optimizer's parameters: the sync, the eval swap, and their tensors.

Tensor work runs under ``no_grad`` and only at syncs. The slow weights of the contiguous parameters
of each (device, dtype) bucket live in one flat buffer (our own storage; each parameter's slow
tensor is a view of it), so a sync gathers theta per cache block with one ``torch.cat``, runs the
guard, the distance and the update as a few flat ops and writes theta back with one
``torch._foreach_copy_``: two per-tensor operations per sync instead of one per op. Other
parameters (non-contiguous ones, e.g. channels_last) and the outer-momentum path use
``torch._foreach_*`` per (device, dtype) bucket. Sharded (DTensor) parameters are handled through their local shards,
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
        """Start slow weights for more parameters: ``slow[name]`` where given (e.g. from the group of
        an optimizer that was replaced), else their current values; always copied into our own storage.
        Their outer momentum buffers (if this group has them) are ``momentum[name]`` or zeros."""
        assert not self.swapped
        slow, momentum = slow or {}, momentum or {}
        first = len(self.params)
        self.names += [n for n, _ in named_params]
        self.params += [p for _, p in named_params]
        # the values phi starts from; _layout() copies them into our own storage
        self.stash += [slow[n] if n in slow else local(p).detach() for n, p in named_params]
        self._layout(first)
        new = self.stash[first:]
        if self.momentum is not None or momentum:
            if self.momentum is None:
                self.momentum = [torch.zeros_like(t) for t in self.stash[:first]]
            self.momentum += [momentum[n] if n in momentum else torch.zeros_like(t) for (n, _), t in zip(named_params, new)]

    def _layout(self, first: int) -> None:
        """Group by (device, dtype); give the slow weights of contiguous parameters one flat buffer
        per bucket (entries from ``first`` on are not ours yet: copied, never aliased)."""
        self.buckets = group_indices_by_device_dtype([local(p) for p in self.params])
        self.sharded = [is_sharded(p) for p in self.params]
        self.flat: list[_FlatBucket] = []
        self.loose: list[list[int]] = []
        for idx in self.buckets:
            flat_idx = [i for i in idx if local(self.params[i]).is_contiguous()]
            loose = [i for i in idx if i not in set(flat_idx)]
            for i in loose:
                theta = local(self.params[i])
                if i >= first or self.stash[i].stride() != theta.stride():
                    # our own storage with the parameter's strides, so a pointer swap is shape-exact
                    self.stash[i] = torch.empty_like(theta).copy_(self.stash[i])
            self.loose.append(loose)
            if flat_idx:
                self.flat.append(_FlatBucket(flat_idx, self.stash))

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
        measures ``||theta - phi|| / ||phi||`` (and, with momentum, the outer step's norm) for an
        applied sync. Memory traffic in parameter bytes (4x is the floor: read theta and phi, write
        both; momentum reads and writes ``b`` too). The guard must read all of theta before anything
        is written; after it, on CPU each cache block is read once from memory and every later op
        of that block (the distance temporary, the norms, the update, the copy) works on what is in
        cache. (On GPU the blocks only bound the temporary: each op streams its block from memory.)

        ===========  ===================================================  =======
        path         passes                                               traffic
        ===========  ===================================================  =======
        lean         ||theta|| guard; per block lerp_, copy_              5x
        stats        the same guard; per block theta - phi (temporary),   5x
                     its norm, ||phi||, then the same lerp_ and copy_
        momentum     the same guard; per block s (temporary), b, phi,     7x
                     copy_ (and the norms with stats)
        ===========  ===================================================  =======

        All paths of one setting apply the identical update, so a run's trajectory does not depend
        on whether the distance is measured. ``alpha == 1`` without momentum copies theta into phi
        and never writes theta, so ``k=1, alpha=1`` is bit-for-bit plain training.
        """
        assert not self.swapped, "sync while the slow weights are swapped in"
        if not self.buckets:  # an optimizer whose parameters are all frozen (for now)
            return SyncStats(applied=True)
        if any(not local(self.params[i]).is_contiguous() for fb in self.flat for i in fb.idx):
            self._layout(len(self.params))  # e.g. model.to(memory_format=channels_last) after attach
        if momentum:
            return self._sync_momentum(alpha, momentum, nesterov, stats)
        return self._sync_plain(alpha, stats)

    def _all_finite(self, total: Tensor) -> bool:
        """The one host read of a sync step. With shards, every rank must decide alike."""
        if any(self.sharded):
            total = all_reduce_sum(total.clone())
        return bool(torch.isfinite(total))

    def _pairs(self):
        for idx in self.buckets:
            yield self._fast(idx), [self.stash[i] for i in idx]

    def _loose_blocks(self):
        for idx in self.loose:
            if idx:
                yield from _cache_blocks(self._fast(idx), [self.stash[i] for i in idx])

    def _theta_finite(self) -> bool:
        # one guard for every path (float32 norms of theta), so they always decide alike
        return self._all_finite(_total([_sq_norm(theta) for theta, _ in self._pairs()]))

    def _sync_plain(self, alpha: float, stats: bool) -> SyncStats:
        """Lookahead's sync in two passes: the guard reads all of theta (nothing may be written
        before it), then each cache block is read once and everything else happens in cache."""
        blocks = [(fb, pieces, lo, hi) for fb in self.flat for pieces, lo, hi in fb.theta_blocks(self.params)]
        # the guard reads the views in place (no gathered copy: that would add a write and a read)
        guard = [_sq_norm(pieces) for _, pieces, _, _ in blocks]
        guard += [_sq_norm(theta) for theta, _ in self._loose_blocks()]
        if not self._all_finite(_total(guard, self._device())):
            return SyncStats(applied=False)  # nothing written; a distance to inf means nothing
        d_sq, phi_sq = [], []
        for fb, pieces, lo, hi in blocks:
            theta = fb.gather(pieces, lo, hi)
            phi = fb.flat[lo:hi]
            if stats:  # on data the block just brought into cache: compute, not traffic
                d_sq.append(_sq_norm([fb.difference(theta, phi)]))
                phi_sq.append(_sq_norm([phi]))
            if alpha == 1.0:
                phi.copy_(theta)  # phi <- theta exactly; theta untouched
                continue
            phi.lerp_(theta, alpha)  # phi + alpha (theta - phi): the same kernel as the per-tensor path
            torch._foreach_copy_(pieces, fb.phi_pieces(lo))
        for theta, phi in self._loose_blocks():
            if stats:
                d_sq.append(_sq_norm(torch._foreach_sub(theta, phi)))
                phi_sq.append(_sq_norm(phi))
            _update(theta, phi, alpha)
        return SyncStats.measured(self._device(), d_sq, phi_sq) if stats else SyncStats(applied=True)

    def _device(self) -> torch.device:
        return local(self.params[0]).device

    def _sync_momentum(self, alpha: float, mu: float, nesterov: bool, stats: bool) -> SyncStats:
        if not self._theta_finite():  # decided before anything is written: b is guarded like phi
            return SyncStats(applied=False)
        if self.momentum is None:
            self.momentum = [torch.zeros_like(t) for t in self.stash]
        d_sq, phi_sq, step_sq = [], [], []
        for idx in self.buckets:
            theta, phi, buf = self._fast(idx), [self.stash[i] for i in idx], [self.momentum[i] for i in idx]
            # In place, CPU foreach rounds a Python scalar to a half-precision list's dtype first
            # (0.9 -> 0.8984375 in bfloat16); a float32 scalar tensor multiplies exactly like SGD.
            decay = torch.tensor(mu, device=phi[0].device) if phi[0].dtype in _HALF else mu
            for t, p, b in _cache_blocks(theta, phi, buf):
                s = torch._foreach_sub(p, t)  # the pseudo-gradient, in a block-sized temporary
                if stats:
                    d_sq.append(_sq_norm(s))
                    phi_sq.append(_sq_norm(p))
                # torch.optim.SGD's foreach momentum step, op for op (dampening 0)
                torch._foreach_mul_(b, decay)
                torch._foreach_add_(b, s)
                if nesterov:
                    torch._foreach_add_(s, b, alpha=mu)
                step = s if nesterov else b
                if stats:
                    step_sq.append(_sq_norm(step) * (alpha * alpha))
                torch._foreach_add_(p, step, alpha=-alpha)
                torch._foreach_copy_(t, p)
        return SyncStats.measured(self._device(), d_sq, phi_sq, step_sq) if stats else SyncStats(applied=True)

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


class _FlatBucket:
    """The slow weights of contiguous parameters of one (device, dtype) bucket as views of one flat
    buffer, and the cut of that buffer into cache blocks (a tensor larger than a block spans
    several). ``stash[i]`` becomes a view of the buffer for every ``i`` in ``idx``."""

    def __init__(self, idx: list[int], stash: list[Tensor]) -> None:
        self.idx = idx
        sizes = [stash[i].numel() for i in idx]
        first = stash[idx[0]]
        self.flat = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        offsets, off = [], 0
        for i, n in zip(idx, sizes):
            view = self.flat[off : off + n]
            view.copy_(stash[i].reshape(-1))
            stash[i] = view.view(stash[i].shape)
            offsets.append(off)
            off += n
        limit = CPU_BLOCK if first.device.type == "cpu" else DEVICE_BLOCK
        # per block: pieces (position in idx, start, stop within that tensor) and the flat range
        self.blocks: list[tuple[list[tuple[int, int, int]], int, int]] = []
        pieces: list[tuple[int, int, int]] = []
        lo = 0
        for k, (n, o) in enumerate(zip(sizes, offsets)):
            start = 0
            while start < n:
                stop = min(n, start + limit - (o + start - lo))
                pieces.append((k, start, stop))
                start = stop
                if o + stop - lo >= limit:
                    self.blocks.append((pieces, lo, o + stop))
                    pieces, lo = [], o + stop
        if pieces:
            self.blocks.append((pieces, lo, off))
        self._phi = {lo: [self.flat[o + a : o + b] for k, a, b in ps for o in (offsets[k],)] for ps, lo, _ in self.blocks}
        self._scratch: Tensor | None = None

    def theta_blocks(self, params: list[Tensor]):
        """Per block: 1-D views of the fast weights (resolved now: FSDP2 may re-point shards)."""
        theta = [local(params[i]).view(-1) for i in self.idx]
        for pieces, lo, hi in self.blocks:
            yield [theta[k] if a == 0 and b == theta[k].numel() else theta[k][a:b] for k, a, b in pieces], lo, hi

    def phi_pieces(self, lo: int) -> list[Tensor]:
        """The slow-weight views matching the pieces of the block starting at ``lo``."""
        return self._phi[lo]

    def _buffer(self, slot: int, n: int) -> Tensor:
        # On CPU two block-sized buffers are kept and reused: a fresh 512 KB temporary per block
        # is an mmap'd allocation whose pages fault in on first touch, which measured ~5x slower
        # than the arithmetic itself. Elsewhere the caching allocator makes temporaries cheap.
        if self.flat.device.type != "cpu":
            return torch.empty(n, dtype=self.flat.dtype, device=self.flat.device)
        if self._scratch is None:
            self._scratch = torch.empty(2, min(CPU_BLOCK, self.flat.numel()), dtype=self.flat.dtype)
        return self._scratch[slot, :n]

    def gather(self, pieces: list[Tensor], lo: int, hi: int) -> Tensor:
        """One block of theta as one tensor: the view itself when the block is one piece, else a copy."""
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, out=self._buffer(0, hi - lo))

    def difference(self, theta: Tensor, phi: Tensor) -> Tensor:
        """theta - phi for one block, in scratch memory."""
        return torch.sub(theta, phi, out=self._buffer(1, theta.numel()))


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


_HALF = (torch.float16, torch.bfloat16)


def _update(theta: list[Tensor], phi: list[Tensor], alpha: float) -> None:
    """``phi <- phi + alpha (theta - phi); theta <- phi`` for one block (the one update of every path)."""
    if alpha == 1.0:
        torch._foreach_copy_(phi, theta)  # phi <- theta exactly; theta untouched
    else:
        torch._foreach_lerp_(phi, theta, alpha)  # phi + alpha (theta - phi)
        torch._foreach_copy_(theta, phi)


def _sq_norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Sum of squares, as a float32 scalar on the tensors' device (no host sync).

    Half-precision norms accumulate and return in float32: a float16 norm overflows at 65504.
    """
    low = tensors[0].dtype in _HALF
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)
    return torch.stack(norms).float().square().sum()


def _total(parts: list[Tensor], device: torch.device | None = None) -> Tensor:
    """The sum of float32 scalars (zero when there are none: e.g. only empty tensors on this rank)."""
    if not parts:
        return torch.zeros((), device=device)
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

    @classmethod
    def measured(
        cls, device: torch.device, d_sq: list[Tensor], phi_sq: list[Tensor], step_sq: list[Tensor] | None = None
    ) -> SyncStats:
        """An applied sync's stats from per-block squared norms (zeros where this rank has none)."""
        total_d, total_phi = _total(d_sq, device), _total(phi_sq, device)
        rel = total_d.sqrt() / total_phi.sqrt().clamp_min(1e-30)
        step = _total(step_sq, device) if step_sq is not None else None
        return cls(applied=True, rel_distance=rel, d_sq=total_d, phi_sq=total_phi, step_sq=step)

    @property
    def rel_step(self) -> Tensor | None:
        """||phi_new - phi|| / ||phi|| of a momentum outer step (None without momentum or stats)."""
        if self.step_sq is None or self.phi_sq is None:
            return None
        return self.step_sq.sqrt() / self.phi_sq.sqrt().clamp_min(1e-30)
