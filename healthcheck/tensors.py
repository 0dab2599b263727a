"""Small helpers for the values models take and return."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output: tensors, tuples, dicts, HF ModelOutput, dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    if is_dataclass(value) and not isinstance(value, type):
        return [t for f in fields(value) for t in tensors_of(getattr(value, f.name, None))]
    return []


def first_float(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return next((t for t in tensors if t.is_floating_point()), None)


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor moved to `device`: tensors, tuples, lists, dicts and mappings such
    as HF BatchEncoding (returned as plain dicts)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value) if type(value) in (list, tuple) else value
    return value


def forward_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ask models that cache (HF decoders) not to: a cache is not a tensor output."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs
