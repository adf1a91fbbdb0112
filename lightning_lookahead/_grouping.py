"""Grouping of tensors by (device, dtype) so each group goes through one ``torch._foreach_*`` call."""

from __future__ import annotations

import torch
from torch import Tensor


def group_indices_by_device_dtype(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped so each group can go through one ``torch._foreach_*`` call."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def group_by_device_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    return [[tensors[i] for i in idx] for idx in group_indices_by_device_dtype(tensors)]
