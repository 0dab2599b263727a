"""Cross-rank reduction and the one host copy of a sampled step.

Every value of a sample is an `Entry` with a rank-independent key. Under torch.distributed the
ranks first agree on the union of their keys (a small exchange of host objects), so that ranks
whose recorded graphs differ (LayerDrop, MoE routing, early exit) still reduce tensors of one
layout: a key a rank lacks is a zero with count 0 there. One all-reduce (sum) carries the values
and their counts; then everything, reduced and rank-local, is copied to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

#: how an entry combines over ranks
MEAN, ANY, LOCAL = "mean", "any", "local"


@dataclass
class Entry:
    key: Hashable  # the same on every rank for the same quantity
    value: torch.Tensor  # 1-d float32, on the sample's device
    how: str  # MEAN over the ranks that have it, ANY (> 0 on some rank), LOCAL (this rank's value)


def distributed() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def to_host(entries: list[Entry], device: torch.device, collective: bool) -> dict[Hashable, list[float]]:
    """The entries' values on the host, reduced over ranks when `collective` (every rank must call
    this at the same sampled step then). One device-to-host copy."""
    entries = [Entry(e.key, e.value.detach().float().reshape(-1).to(device), e.how) for e in entries]
    shared = [e for e in entries if e.how != LOCAL]
    local = [e for e in entries if e.how == LOCAL]
    if collective:
        layout, reduced = _all_reduce(shared, device)
    else:
        layout = [(e.key, e.value.numel(), e.how) for e in shared]
        reduced = [e.value for e in shared]
    layout += [(e.key, e.value.numel(), e.how) for e in local]
    parts = reduced + [e.value for e in local]
    flat = torch.cat(parts).tolist() if parts else []  # the one host copy of this sampled step
    mine = {e.key for e in entries}
    host: dict[Hashable, list[float]] = {}
    offset = 0
    for key, numel, _ in layout:
        if key in mine:
            host[key] = flat[offset:offset + numel]
        offset += numel
    return host


def _all_reduce(shared: list[Entry], device: torch.device) -> tuple[list[tuple[Hashable, int, str]], list[torch.Tensor]]:
    world = torch.distributed.get_world_size()
    local_layout = [(e.key, e.value.numel(), e.how) for e in shared]
    gathered: list[list[tuple[Hashable, int, str]] | None] = [None] * world
    torch.distributed.all_gather_object(gathered, local_layout)
    union = {(key, numel, how) for layout in gathered for key, numel, how in (layout or [])}
    layout = sorted(union, key=repr)  # the same order on every rank
    mine = {(e.key, e.value.numel(), e.how): e.value for e in shared}
    values, counts, any_mask = [], [], []
    for slot in layout:
        numel = slot[1]
        value = mine.get(slot)
        values.append(value if value is not None else torch.zeros(numel, device=device))
        counts.append(torch.full((numel,), 1.0 if value is not None else 0.0, device=device))
        any_mask.append(torch.full((numel,), slot[2] == ANY, dtype=torch.bool, device=device))
    if not layout:
        return [], []
    total = sum(slot[1] for slot in layout)
    flat = torch.cat(values + counts)
    torch.distributed.all_reduce(flat)
    sums, count = flat[:total], flat[total:]
    result = torch.where(torch.cat(any_mask), (sums > 0).float(), sums / count.clamp(min=1))
    # the rows of keys this rank lacks are returned too (and dropped by the caller)
    return layout, list(result.split([slot[1] for slot in layout]))
