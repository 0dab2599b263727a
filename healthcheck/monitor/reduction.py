"""Cross-rank reduction and the one host copy of a sampled step.

Every value of a sample is an `Entry` with a rank-independent key. Under torch.distributed the
ranks first agree on the union of their keys (a small exchange of host objects), so that ranks
whose recorded graphs differ (LayerDrop, MoE routing, early exit) still reduce tensors of one
layout: a key a rank lacks is a zero with count 0 there. One all-reduce (sum) carries the values
and their counts; then everything, reduced and rank-local, is copied to the host in one transfer.

Sharded parameters (FSDP2's DTensors) are measured on this rank's shard only (`local_part`), never
gathered: a norm is carried as `Squares`, each rank's share of the tensor's squared norm, summed over
ranks inside the same all-reduce. Every collective here runs on every rank at every sampled step
whatever the values are (a NaN only changes numbers, not which collectives run), so that no rank
waits in one the others skip.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch

#: how an entry combines over ranks
MEAN, ANY, LOCAL, SUM = "mean", "any", "local", "sum"


@dataclass
class Entry:
    key: Hashable  # the same on every rank for the same quantity
    value: torch.Tensor  # 1-d float32, on the sample's device
    how: str  # MEAN over the ranks that have it, ANY (> 0 on some rank), LOCAL (this rank's value), SUM
    count: torch.Tensor | None = None  # MEAN: per element, whether this rank has it (default: all of it)


def distributed() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def to_host(entries: list[Entry], device: torch.device, collective: bool) -> dict[Hashable, list[float]]:
    """The entries' values on the host, reduced over ranks when `collective` (every rank must call
    this at the same sampled step then). One device-to-host copy."""
    entries = [Entry(e.key, e.value.detach().float().reshape(-1).to(device), e.how,
                     None if e.count is None else e.count.detach().float().reshape(-1).to(device)) for e in entries]
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
    mine = {(e.key, e.value.numel(), e.how): e for e in shared}
    values, counts, any_mask, sum_mask = [], [], [], []
    for slot in layout:
        numel = slot[1]
        entry = mine.get(slot)
        values.append(entry.value if entry is not None else torch.zeros(numel, device=device))
        if entry is not None and entry.count is not None:
            counts.append(entry.count)
        else:
            counts.append(torch.full((numel,), 1.0 if entry is not None else 0.0, device=device))
        any_mask.append(torch.full((numel,), slot[2] == ANY, dtype=torch.bool, device=device))
        sum_mask.append(torch.full((numel,), slot[2] == SUM, dtype=torch.bool, device=device))
    if not layout:
        return [], []
    total = sum(slot[1] for slot in layout)
    flat = torch.cat(values + counts)
    torch.distributed.all_reduce(flat)
    sums, count = flat[:total], flat[total:]
    result = torch.where(torch.cat(any_mask), (sums > 0).float(),
                         torch.where(torch.cat(sum_mask), sums, sums / count.clamp(min=1)))
    # the rows of keys this rank lacks are returned too (and dropped by the caller)
    return layout, list(result.split([slot[1] for slot in layout]))


# -- sharded parameters (FSDP2) ----------------------------------------------------------------------

def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if _is_dtensor(tensor) and callable(to_local) else tensor


def _is_dtensor(tensor: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor split over ranks (FSDP2's parameters and their gradients)."""
    return _is_dtensor(tensor) and any(p.is_shard() for p in tensor.placements)


def _share(tensor: torch.Tensor) -> float:
    """The weight of this rank's shard in a sum over all ranks: 1 / (ranks holding the same shard),
    so that HSDP's replicated shards (Replicate on one mesh dimension) are counted once."""
    shards = 1
    for size, placement in zip(tensor.device_mesh.shape, tensor.placements):
        if placement.is_shard():
            shards *= size
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else shards
    return shards / world


def local_coordinates(param: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Positions in the flattened local shard of `param` of the flat global `coordinates` this rank
    holds (sorted), so that the ranks' subsets together are the single-process subset. Shards split
    along dim 0 (FSDP2's default) are contiguous in the flattened tensor; for other placements the
    subset is drawn on the shard itself, in the same proportion (an estimate either way)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape[1:]) == tuple(param.shape[1:]) and all(o == 0 for o in offset[1:]):
        row = local[0].numel() if local.dim() > 0 and local.shape[0] > 0 else 0
        start = offset[0] * row if local.dim() > 0 else 0
        inside = coordinates[(coordinates >= start) & (coordinates < start + local.numel())]
        return (inside - start).sort().values.to(local.device)
    count = max(1, round(coordinates.numel() * local.numel() / max(param.numel(), 1)))
    generator = torch.Generator().manual_seed(int(coordinates[:1].sum()) + sum(offset))
    return torch.randperm(local.numel(), generator=generator)[:min(count, local.numel())].sort().values.to(local.device)


@dataclass
class Squares:
    """Per-tensor squared norms of a rank-independent list of tensors (the watched parameters, in
    the same order on every rank), as this rank's contribution: for a sharded tensor its shard's
    squared norm (summed over ranks: the whole tensor's, without a gather), for a replicated tensor
    its squared norm (averaged over the ranks that have it: under DDP every rank holds the same)."""

    squares: torch.Tensor  # 1-d, float32 (float64 where the squares of scaled gradients may overflow)
    present: torch.Tensor  # 1-d, 1.0 where this rank has the tensor (a gradient may be None)
    sharded: tuple[bool, ...]  # the same on every rank: from the model, not the values

    @classmethod
    def of(cls, tensors: list[torch.Tensor | None], device: torch.device, divide: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> Squares:
        """The squared norms of `tensors` (None: absent on this rank), divided by `divide`² (a
        loss scale; `dtype` wide enough for the scaled norm). One fused norm kernel."""
        held = [i for i, t in enumerate(tensors) if t is not None]
        locals_ = [local_part(tensors[i]).detach() for i in held]
        if dtype is None:
            locals_ = [t.float() for t in locals_]
        norms = torch.stack(torch._foreach_norm(locals_, dtype=dtype) if dtype is not None
                            else torch._foreach_norm(locals_)) if locals_ else torch.zeros(0, device=device)
        if divide is not None:
            norms = norms / divide.to(norms.dtype)
        sharded = tuple(t is not None and is_sharded(t) for t in tensors)
        share = torch.tensor([_share(tensors[i]) if sharded[i] else 1.0 for i in held], dtype=norms.dtype,
                             device=norms.device)
        squares = torch.zeros(len(tensors), dtype=norms.dtype, device=norms.device)
        present = torch.zeros(len(tensors), device=norms.device)
        if held:
            index = torch.tensor(held, device=norms.device)
            squares = squares.index_put((index,), norms.pow(2) * share)
            present = present.index_put((index,), torch.ones(len(held), device=norms.device))
        return cls(squares, present, sharded)

    @classmethod
    def of_norms(cls, norms: torch.Tensor, sharded: tuple[bool, ...], shares: list[float]) -> Squares:
        """From per-tensor norms of local parts already computed (every tensor present)."""
        share = torch.tensor(shares, dtype=norms.dtype, device=norms.device)
        return cls(norms.pow(2) * share, torch.ones_like(norms, dtype=torch.float32), sharded)

    def nonfinite(self) -> torch.Tensor:
        return ~torch.isfinite(self.squares).all()

    def entries(self, key: Hashable) -> list[Entry]:
        """Sharded rows summed over ranks, replicated rows averaged over the ranks that have them,
        and how many ranks have each row (which rows exist at all)."""
        mask = torch.tensor(self.sharded, dtype=torch.bool, device=self.squares.device)
        squares = self.squares.float() if self.squares.dtype == torch.float64 else self.squares
        return [Entry((key, "sharded"), torch.where(mask, squares, torch.zeros_like(squares)), SUM),
                Entry((key, "replicated"), torch.where(mask, torch.zeros_like(squares), squares), MEAN,
                      count=self.present),
                Entry((key, "present"), self.present, SUM)]

    def read(self, host: dict[Hashable, list[float]], key: Hashable) -> list[float | None]:
        """The reduced squared norm of each tensor (None where no rank has it)."""
        sharded, replicated, present = (host[(key, part)] for part in ("sharded", "replicated", "present"))
        return [None if n <= 0 else (s if is_sharded_row else r)
                for s, r, n, is_sharded_row in zip(sharded, replicated, present, self.sharded)]


def shares(tensors: list[torch.Tensor]) -> tuple[tuple[bool, ...], list[float]]:
    """Which tensors are sharded, and the weight of this rank's shard of each (1.0 if replicated)."""
    sharded = tuple(is_sharded(t) for t in tensors)
    return sharded, [_share(t) if s else 1.0 for t, s in zip(tensors, sharded)]


# -- host side: the per-tensor numbers from reduced squares ------------------------------------------

def norms(names: list[str], squares: Squares, host: dict[Hashable, list[float]], key: Hashable) -> dict[str, float]:
    """‖t‖ per tensor some rank has."""
    return {n: math.sqrt(max(s, 0.0)) if math.isfinite(s) else s
            for n, s in zip(names, squares.read(host, key)) if s is not None}


def ratios(names: list[str], delta: Squares, base: Squares, host: dict[Hashable, list[float]]) -> tuple[dict[str, float], bool]:
    """‖Δw‖/‖w‖ per tensor that changed, and whether no tensor changed at all."""
    changes, bases = delta.read(host, "update_delta"), base.read(host, "update_base")
    measured = {n: math.sqrt(d / b) for n, d, b in zip(names, changes, bases)
                if d is not None and b is not None and b > 0 and d != 0}
    return measured, bool(names) and all(d == 0 for d in changes if d is not None)


def signal_to_noise(names: list[str], mean: Squares, second: Squares, window: int,
                    host: dict[Hashable, list[float]]) -> dict[str, float]:
    """The gradient SNR ‖E g‖² / (E‖g‖² − ‖E g‖²)·(k−1)/k of each tensor over a window of k steps."""
    result = {}
    for name, m, s in zip(names, mean.read(host, "snr_mean"), second.read(host, "snr_second")):
        if m is None or s is None:
            continue
        snr = m / max((s - m) * window / (window - 1), 1e-30)
        if math.isfinite(snr):
            result[name] = snr
    return result
