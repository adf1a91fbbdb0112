"""The slow weights of one optimizer's parameters, in contiguous storage: the sync, the swap, the layout.

At attach the trained parameters of each (device, dtype) move into one flat buffer: ``p.data``
becomes a view of it (the Parameter objects, the optimizer and DDP's reducer stay the same), and
the slow weights ``phi`` are one flat tensor with the same layout. A sync is then a handful of ops
on flat tensors whatever the tensor count, and the eval swap re-points the parameters at the other
buffer (no copy). Parameters that cannot be views of ours (FSDP2's sharded DTensors, which FSDP2
reads from its own storage, and tensors that are neither contiguous nor channels-last) keep their
storage and go through ``torch._foreach_*`` per (device, dtype).

Users change parameters under us (``model.double()``, ``.to(device)``, ``channels_last``,
``p.data = ...``, layers grown by hand): each sync and swap first checks, one pointer comparison
per parameter, that every parameter still lives where we put it, and lays everything out anew
from the values the parameters now hold if not, with the slow weights following the new dtype,
device and shape. :meth:`SlowWeights.release` gives every parameter its own storage back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_lookahead._grouping import group_indices_by_device_dtype
from lightning_lookahead.distributed import all_reduce_sum, is_sharded, local, local_from_saved
from lightning_lookahead.outer import HALF_DTYPES, LerpStep, OuterStep, blocks, sq_norm

DEVICE_SIDE = frozenset({"cuda"})  # device types where the skip-or-apply decision stays on the device


class Bucket:
    """The parameters of one (device, dtype) of a :class:`SlowWeights` group and their slow weights.

    ``flat``: the parameters are views of ``self.fast`` (one 1-D tensor) and phi is ``self.slow``,
    laid out alike. Otherwise the parameters keep their storage and ``self.other[j]`` holds the
    weights that are not in parameter ``j`` right now (phi, or theta while swapped).
    """

    def __init__(
        self, params: list[Tensor], idx: list[int], flat: bool, fast: list[Tensor], slow: list[Tensor], role: str
    ) -> None:
        self.params, self.idx, self.flat = params, idx, flat
        self.stats: list[Tensor] | None = None  # [||theta - phi||^2 parts, ||phi||^2 parts] while measuring
        self.sharded = [is_sharded(params[i]) for i in idx]
        # whose storage each sync checks (FSDP2 re-points its shards itself; they keep their storage)
        self.checked = [params[i] for i, sharded in zip(idx, self.sharded) if not sharded]
        if flat:
            shapes = [t.shape for t in fast]
            strides = [local(params[i]).stride() for i in idx]
            sizes = [t.numel() for t in fast]
            self.fast = torch.empty(sum(sizes), dtype=fast[0].dtype, device=fast[0].device)
            self.slow = torch.empty_like(self.fast)
            self.views: dict[str, list[Tensor]] = {"fast": [], "slow": []}
            off = 0
            for shape, stride, n, f, s in zip(shapes, strides, sizes, fast, slow):
                for r, buf, value in (("fast", self.fast, f), ("slow", self.slow, s)):
                    view = buf.as_strided(shape, stride, off)  # the parameter's own strides (channels-last)
                    view.copy_(value)
                    self.views[r].append(view)
                off += n
            self.point(role)
        else:  # the parameters hold ``role`` already; our own storage for the other weights
            kept = slow if role == "fast" else fast
            self.other = [torch.empty_like(local(params[i])).copy_(t) for i, t in zip(idx, kept)]
            self.role = role
            self._remember()

    # ------------------------------------------------------------------ layout
    def point(self, role: str) -> None:
        """Put the ``role`` weights ("fast" or "slow") into the parameters."""
        if self.flat:
            for i, view in zip(self.idx, self.views[role]):
                self.params[i].data = view
        elif self.role != role:
            scratch: Tensor | None = None
            for j, i in enumerate(self.idx):
                p = self.params[i]
                if self.sharded[j]:  # FSDP2 reads its shard storage: exchange the values in place
                    shard = local(p)
                    if scratch is None or scratch.numel() < shard.numel():
                        scratch = torch.empty(shard.numel(), dtype=shard.dtype, device=shard.device)
                    tmp = scratch[: shard.numel()].view_as(shard).copy_(shard)
                    shard.copy_(self.other[j])
                    self.other[j].copy_(tmp)
                else:
                    p.data, self.other[j] = self.other[j], p.data
        self.role = role
        self._remember()

    def _remember(self) -> None:
        self.ptrs = list(map(Tensor.data_ptr, self.checked))
        self.views_at = list(map(_where, self.checked))

    def moved(self, exact: bool) -> bool:
        """Whether a parameter left the storage we put it in (a pointer comparison each: enough for a
        sync, whose flat ops read the memory, not the views), or with ``exact`` also its view (shape,
        strides), which a swap would otherwise put back."""
        if exact:
            return list(map(_where, self.checked)) != self.views_at
        return list(map(Tensor.data_ptr, self.checked)) != self.ptrs

    def release(self) -> None:
        """Give the parameters their own storage (copies of what they hold) and drop our buffer of it."""
        if self.flat:
            for i in self.idx:
                self.params[i].data = self.params[i].data.clone()
            setattr(self, self.role, torch.empty(0))
            self.views[self.role] = []

    def values(self, role: str) -> list[Tensor]:
        """The ``role`` weights of each parameter (local shards), wherever they are now."""
        if role == self.role:
            return [local(self.params[i]) for i in self.idx]
        return self.views[role] if self.flat else self.other

    # ------------------------------------------------------------------ sync parts
    def parts(self) -> Iterable[tuple[list[Tensor], list[Tensor]]]:
        """(theta, phi) tensor lists to update: cache-sized blocks of the flat buffers, or the per-parameter lists."""
        if self.flat:
            for theta, phi in blocks(self.fast, self.slow):
                yield [theta], [phi]
        else:
            yield self.values("fast"), self.other

    def tensors(self, role: str = "fast") -> list[Tensor]:
        """The ``role`` weights as tensors with elements: the flat buffer, or the per-parameter tensors."""
        if self.flat:
            found = [self.fast if role == "fast" else self.slow]
        else:
            found = self.values(role)
        return [torch.view_as_real(t) if t.is_complex() else t for t in found if t.numel()]

    def finite(self, role: str = "fast") -> Tensor | None:
        """Exactly whether the ``role`` weights are all finite, as a 0-dim bool on their device (None:
        no elements), from min and max: nan and inf propagate and nothing overflows (a sum would)."""
        ends = [m for t in self.tensors(role) for m in torch.aminmax(t)]
        return torch.isfinite(torch.stack(ends)).all() if ends else None

    def measure(self, theta: list[Tensor], phi: list[Tensor]) -> None:
        if self.stats is not None:  # on the block just brought into cache
            self.stats[0] += sq_norm(list(torch._foreach_sub(theta, phi)))
            self.stats[1] += sq_norm(phi)

    def pseudo_gradients(self) -> list[Tensor]:
        """Per parameter, ``phi - theta`` (computed into theta's storage where it is ours)."""
        if self.flat:
            for theta, phi in self.parts():
                self.measure(theta, phi)
                torch.sub(phi[0], theta[0], out=theta[0])
            return self.views["fast"]
        theta, phi = self.values("fast"), self.other
        self.measure(theta, phi)
        return list(torch._foreach_sub(phi, theta))

    def copy_phi_to_theta(self) -> None:
        if self.flat:
            self.fast.copy_(self.slow)
        else:
            torch._foreach_copy_(self.values("fast"), self.other)


class SlowWeights:
    """Slow copy ``phi`` of a list of named parameters ``theta``, and the outer step that moves it.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> sw = SlowWeights([("w", p)], outer=LerpStep(0.5))
        >>> with torch.no_grad():
        ...     _ = p.add_(1.0)  # the inner optimizer moves the fast weights
        >>> bool(sw.sync().applied)
        True
        >>> p.tolist(), sw.slow_tensors()["w"].tolist()
        ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        slow: Mapping[str, Tensor] | None = None,
        outer: OuterStep | None = None,
    ) -> None:
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.outer = outer if outer is not None else LerpStep(0.5)
        self.buckets: list[Bucket] = []
        self.swapped = False  # True: the parameters hold phi
        self.add(named_params, slow)

    @property
    def sharded(self) -> list[bool]:
        return [is_sharded(p) for p in self.params]

    @property
    def any_sharded(self) -> bool:
        """Whether some parameter is a shard (then every rank must take the same branch): from the buckets."""
        return any(any(b.sharded) for b in self.buckets)

    @torch.no_grad()
    def add(self, named_params: Sequence[tuple[str, Tensor]], slow: Mapping[str, Tensor] | None = None) -> None:
        """Start slow weights for more parameters: ``slow[name]`` where given (e.g. from the group of
        an optimizer that was replaced), else their current values."""
        assert not self.swapped
        slow = slow or {}
        fast_values, slow_values = self._values()
        for name, p in named_params:
            self.names.append(name)
            self.params.append(p)
            fast_values.append(local(p))
            slow_values.append(local_from_saved(p, slow[name]) if name in slow else local(p))
        self._lay_out(fast_values, slow_values)

    # ------------------------------------------------------------------ layout
    def _values(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per parameter, the fast and the slow weights as they are now (views; copy before freeing)."""
        fast: list[Tensor] = [torch.empty(0)] * len(self.params)
        slow: list[Tensor] = [torch.empty(0)] * len(self.params)
        for b in self.buckets:
            for i, f, s in zip(b.idx, b.values("fast"), b.values("slow")):
                fast[i], slow[i] = f, s
        return fast, slow

    @torch.no_grad()  # our buffers and views must carry no autograd history (attach may run with grad on)
    def _lay_out(self, fast: list[Tensor], slow: list[Tensor]) -> None:
        """Build the buckets from per-parameter values. The values the parameters hold win: the other
        role follows their dtype and device, and their shape where it grew (new entries start equal)."""
        _refuse_overlaps(self.names, self.params)
        held, other = (slow, fast) if self.swapped else (fast, slow)
        for i, p in enumerate(self.params):
            now = local(p)
            held[i] = now
            other[i] = _follow(self.names[i], now, other[i])
        buckets = []
        for idx in group_indices_by_device_dtype([local(p) for p in self.params]):
            ours = [i for i in idx if _can_be_view(self.params[i])]
            theirs = [i for i in idx if i not in set(ours)]
            for part, flat in ((ours, True), (theirs, False)):
                if part:
                    values = [fast[i] for i in part], [slow[i] for i in part]
                    buckets.append(Bucket(self.params, part, flat, *values, "slow" if self.swapped else "fast"))
        self.buckets = buckets
        self.outer.rebind(self.names, self._values()[1])

    def check_layout(self, exact: bool = True) -> None:
        """Lay out anew if a parameter left our storage (dtype, device, ``p.data = ...``) or, with
        ``exact``, its view (a same-address reshape); one pointer comparison per parameter otherwise."""
        if any(b.moved(exact) for b in self.buckets):
            self._lay_out(*self._values())

    @torch.no_grad()
    def release(self) -> None:
        """Give every parameter its own storage (a copy of what it holds), e.g. when fit ends, so
        nothing of the flat layout leaks into ``torch.save(module.weight)`` or exports. The next
        sync or swap lays out anew from the parameters' values."""
        for b in self.buckets:
            b.release()

    # ------------------------------------------------------------------ views
    def fast_tensors(self) -> dict[str, Tensor]:
        """Name -> the fast weights (local shards for sharded parameters), whatever the swap state."""
        return dict(zip(self.names, self._values()[0]))

    def slow_tensors(self) -> dict[str, Tensor]:
        """Name -> the slow weights (local shards for sharded parameters), whatever the swap state."""
        return dict(zip(self.names, self._values()[1]))

    # ------------------------------------------------------------------ sync
    @torch.no_grad()
    def sync(self, measure: bool = False, device_side: bool = True) -> SyncStats:
        """The outer step on the pseudo-gradient ``phi - theta``, then ``theta <- phi``; nothing is
        written when theta holds inf/nan.

        The guard reads theta once (min and max: exact for any finite magnitude) before anything is
        written; then the step works block by block (on CPU each cache block is read from memory
        once). Traffic in parameter bytes, Lookahead: 5x (guard, then read theta and phi, write
        both); 4x is the floor. ``measure`` also records ``||theta - phi|| / ||phi||`` (and a step's
        norm) on the blocks while they are in cache. On CUDA with the Lerp step the decision stays on
        the device (``SyncStats.applied`` is then a 0-dim tensor); elsewhere it is one host read.
        """
        if self.swapped:
            raise RuntimeError("Lookahead: a sync while the slow weights are swapped in; call use_fast() first")
        self.check_layout(exact=False)  # the flat ops read memory; a same-address reshape is caught at the swap
        if not self.buckets:  # an optimizer whose parameters are all frozen (for now)
            return SyncStats(applied=True)
        device = local(self.params[0]).device
        if measure:
            for b in self.buckets:
                b.stats = [torch.zeros((), device=device), torch.zeros((), device=device)]
        if device_side and self.outer.device_side and device.type in DEVICE_SIDE:
            ok = self._finite(device)
            self.outer.apply_masked(self.buckets, ok)
            return self._stats(ok, None)
        if not self._probably_finite(device) and not bool(self._finite(device)):  # host reads
            for b in self.buckets:
                b.stats = None
            return SyncStats(applied=False)
        step = self.outer.apply(self.buckets)
        return self._stats(True, step)

    def _probably_finite(self, device: torch.device) -> bool:
        """True only if theta is all finite: a finite sum has finite terms (inf and nan propagate).
        One cheap reduction and one host read; a non-finite sum (a real inf/nan, or an overflow of
        huge finite values) is decided exactly by :meth:`_finite`."""
        theta = [t for b in self.buckets for t in b.tensors()]
        if any(t.dtype in HALF_DTYPES for t in theta):
            return False  # a half-precision sum overflows at ordinary sizes: decide exactly at once
        sums = [t.sum() for t in theta]  # in the tensor's dtype: a float64 accumulation measured 10x slower
        total = sums[0] if len(sums) == 1 else torch.stack([s.to(device, torch.float64) for s in sums]).sum() if sums else None
        if self.any_sharded:  # every rank must take the same branch (a rank may hold empty shards only)
            total = all_reduce_sum(total if total is not None else torch.zeros((), dtype=torch.float64, device=device))
        return total is None or math.isfinite(total.item())

    def _finite(self, device: torch.device) -> Tensor:
        """Exactly whether theta is all finite, a 0-dim bool on ``device`` (all-reduced with shards)."""
        parts = [ok.to(device) for b in self.buckets if (ok := b.finite()) is not None]
        ok = parts[0] if len(parts) == 1 else torch.stack(parts).all() if parts else torch.ones((), dtype=torch.bool, device=device)
        if self.any_sharded:
            ok = all_reduce_sum((~ok).float()) == 0
        return ok

    def _stats(self, applied: bool | Tensor, step: Tensor | None) -> SyncStats:
        measured = [b.stats for b in self.buckets if b.stats is not None]
        for b in self.buckets:
            b.stats = None
        if not measured:
            return SyncStats(applied)
        d_sq = torch.stack([m[0].to(measured[0][0].device) for m in measured]).sum()
        phi_sq = torch.stack([m[1].to(measured[0][0].device) for m in measured]).sum()
        return SyncStats(applied, d_sq, phi_sq, step)

    # ------------------------------------------------------------------ swap
    @torch.no_grad()
    def swap(self) -> None:
        """Exchange fast and slow weights in the parameters, bit-exactly: our views are re-pointed
        (no copy); sharded parameters exchange values in place."""
        self.check_layout()
        role = "fast" if self.swapped else "slow"
        for b in self.buckets:
            b.point(role)
        self.swapped = not self.swapped

    # ------------------------------------------------------------------ restore
    @torch.no_grad()
    def load(self, role: str, values: Mapping[str, Tensor]) -> None:
        """Overwrite the ``role`` weights ("fast" or "slow") from a name -> tensor map (moving devices)."""
        assert not self.swapped
        self.check_layout()
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"Lookahead state lacks {role} weights for parameters {missing[:5]}")
        current = self.fast_tensors() if role == "fast" else self.slow_tensors()
        for name, p in zip(self.names, self.params):
            current[name].copy_(local_from_saved(p, values[name]))


def _where(p: Tensor) -> tuple:
    return p.data_ptr(), p.shape, p.stride()


def _refuse_overlaps(names: list[str], params: list[Tensor]) -> None:
    """Distinct parameters that share memory cannot get separate slow weights (they would be decoupled)."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, p in zip(names, params):
        t = local(p)
        if t.numel():
            start = int(t.storage_offset())
            end = start + sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride())) + 1
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, end, name))
    for ranges in spans.values():
        ranges.sort()
        reach, a = -1, ""  # the furthest end so far, and whose
        for start, end, b in ranges:
            if start < reach:
                raise ValueError(
                    f"Lookahead: parameters {a!r} and {b!r} overlap in memory; each trained element must belong"
                    " to one parameter (tie them as one Parameter object instead)."
                )
            if end > reach:
                reach, a = end, b


def _can_be_view(p: Tensor) -> bool:
    """Whether ``p`` can live in our flat buffer with its own strides (dense: contiguous or channels-last)."""
    if is_sharded(p):
        return False
    return (
        p.is_contiguous()
        or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
        or (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d))
    )


def _follow(name: str, now: Tensor, kept: Tensor) -> Tensor:
    """Our copy ``kept`` of a parameter's other weights, made to match what the parameter holds now."""
    if kept.shape != now.shape:
        if kept.dim() != now.dim() or any(a > b for a, b in zip(kept.shape, now.shape)):
            raise ValueError(
                f"Lookahead: parameter {name!r} changed shape from {tuple(kept.shape)} to {tuple(now.shape)}"
                " during training; only growing along existing dimensions is followed. Re-create the callback"
                " (or call Lookahead.attach again) after replacing parameters."
            )
        grown = local(now).detach().clone()
        grown[tuple(slice(0, n) for n in kept.shape)] = kept.to(grown.dtype)
        warnings.warn(
            f"Lookahead: parameter {name!r} grew from {tuple(kept.shape)} to {tuple(now.shape)}; the new entries'"
            " slow weights start from their current values.",
            RuntimeWarning,
            stacklevel=4,
        )
        return grown
    return kept.to(device=now.device, dtype=now.dtype)


class SyncStats:
    """Outcome of one sync. Tensors stay on the device: reading them is the caller's choice.

    ``applied`` is a bool, or a 0-dim bool tensor where the decision stayed on the device (CUDA).
    """

    __slots__ = ("applied", "d_sq", "phi_sq", "step_sq")

    def __init__(
        self,
        applied: bool | Tensor,
        d_sq: Tensor | None = None,
        phi_sq: Tensor | None = None,
        step_sq: Tensor | None = None,
    ) -> None:
        self.applied = applied
        self.d_sq = d_sq  # ||theta - phi||^2 before the sync (this rank's part); None: not measured
        self.phi_sq = phi_sq  # ||phi||^2 before the sync (this rank's part)
        self.step_sq = step_sq  # ||phi_new - phi||^2 of an optimizer outer step (this rank's part)

    @property
    def rel_distance(self) -> Tensor | None:
        """||theta - phi|| / ||phi|| before the sync (None: not measured)."""
        if self.d_sq is None or self.phi_sq is None:
            return None
        return self.d_sq.sqrt() / self.phi_sq.sqrt().clamp_min(1e-30)

    @property
    def rel_step(self) -> Tensor | None:
        """||phi_new - phi|| / ||phi|| of an optimizer outer step (None for Lookahead or unmeasured)."""
        if self.step_sq is None or self.phi_sq is None:
            return None
        return self.step_sq.sqrt() / self.phi_sq.sqrt().clamp_min(1e-30)
