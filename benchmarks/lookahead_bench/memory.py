"""The memory suite: persistent and peak (transient) extra resident bytes of each method's sync
and eval swap, in parameter bytes, read from /proc/self/status in one fresh subprocess (the
entry point's ``--memory-child``) whose glibc mmaps every block >= 64 KiB."""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .config import ENTRY
from .contenders import SWAP_CONTENDERS, SYNC_CONTENDERS, ParamSet
from .harness import log

MEMORY_CASES: tuple[tuple[str, str], ...] = (
    ("ours", "sync"), ("foreach_lerp_copy", "sync"), ("paper_loop", "sync"), ("timm", "sync"),
    ("pytorch_optimizer", "sync"), ("torch_optimizer", "sync"),
    ("ours", "swap"), ("weight_averaging", "swap"), ("pytorch_optimizer", "swap"),
)  # fmt: skip


def _status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(m.group(1))


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_case(method: str, op: str, n_params: int, n_tensors: int) -> dict[str, Any]:
    """Resident bytes ``method`` keeps (persistent) and reaches during one ``op`` (transient), beyond
    the module, its gradients and a stateless SGD; in parameter bytes."""
    ps = ParamSet(n_params, n_tensors)
    make = SYNC_CONTENDERS[method] if op == "sync" else SWAP_CONTENDERS[f"swap_{method}"]
    # ours attaches to a private copy (attaching moves the parameters into its flat buffer); made
    # before the baseline, as a user's model would be, so only what the core adds is counted
    own = copy.deepcopy(ps.module) if method == "ours" else None
    gc.collect()
    base = _status_kb("VmRSS")
    c = make(ps) if own is None else make(ps, own)
    del own
    c.fn()  # first call: lazily created slow copies (timm, torch_optimizer)
    gc.collect()
    held = _status_kb("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs")
    c.fn()
    peak = _status_kb("VmHWM")
    unit = ps.nbytes / 1024
    return {
        "method": method,
        "op": op,
        "param_bytes": ps.nbytes,
        "tensors": n_tensors,
        "persistent_x": (held - base) / unit,
        "transient_x": (peak - held) / unit,
        "peak_extra_x": (peak - base) / unit,
        "counted_held_x": sum(t.numel() * t.element_size() for t in c.held()) / ps.nbytes,
    }


def memory_child(n_params: int, n_tensors: int) -> list[dict[str, Any]]:
    """All memory cases, one after the other in this (fresh) process, after a small run of each
    case so imports and code pages are in place before any baseline is read."""
    torch.set_num_threads(1)
    for method, op in MEMORY_CASES:
        _memory_case(method, op, 4096, 4)
    rows = []
    for method, op in MEMORY_CASES:
        gc.collect()
        rows.append(_memory_case(method, op, n_params, n_tensors))
        gc.collect()
    return rows


def bench_memory(n_params: int, n_tensors: int) -> list[dict[str, Any]]:
    """Run :func:`memory_child` in a fresh interpreter whose glibc mmaps every block >= 64 KiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ENTRY), "--memory-child", f"{n_params}:{n_tensors}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log(f"memory: FAILED {res.stderr.strip()[-500:]}")
        return [{"error": res.stderr.strip().splitlines()[-1:]}]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for r in rows:
        log(f"memory {r['method']} {r['op']}: peak extra {r['peak_extra_x']:.3f}x params")
    return rows
