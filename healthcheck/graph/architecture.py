"""`analyze`: trace a model and collect the structural facts rules and reports read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from healthcheck.graph import taxonomy
from healthcheck.graph.ir import OpGraph
from healthcheck.graph.joins import Join, find_joins, plain_depth, weight_depth
from healthcheck.graph.tracers import TRACE_METHODS, TraceResult, trace


@dataclass(frozen=True)
class Architecture:
    joins: tuple[Join, ...]
    depth: int  # weight layers on the longest path
    plain_depth: int  # longest run of weight layers with no join along it
    plain_end: str  # module where that run ends
    norm_layers: dict[str, int]
    trace: str
    trace_failures: dict[str, str] = field(default_factory=dict)
    graph: OpGraph | None = field(default=None, compare=False, repr=False)

    @property
    def has_norm(self) -> bool:
        return bool(self.norm_layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "joins": [j.to_json() for j in self.joins],
            "depth": self.depth,
            "plain_depth": self.plain_depth,
            "norm_layers": dict(self.norm_layers),
        }


def norm_layer_counts(model: nn.Module) -> dict[str, int]:
    return dict(Counter(type(m).__name__ for m in model.modules() if taxonomy.is_norm_module(m)))


def architecture_of(model: nn.Module, result: TraceResult) -> Architecture:
    graph = result.graph
    joins = find_joins(graph)
    run, end = plain_depth(graph, joins)
    return Architecture(
        joins=tuple(joins),
        depth=weight_depth(graph),
        plain_depth=run,
        plain_end=graph.nodes[end].module if end is not None else "",
        norm_layers=norm_layer_counts(model),
        trace=result.method,
        trace_failures=result.failures,
        graph=graph,
    )


def analyze(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
            methods: tuple[str, ...] = TRACE_METHODS, cheap_forward: bool = False) -> Architecture:
    """Trace (first method that works) and find joins. The caller guards the model's state."""
    return architecture_of(model, trace(model, args, kwargs or {}, methods, cheap_forward))
