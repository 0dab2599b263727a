"""Three ways to get an `OpGraph` from a model, tried in order by `trace`.

1. ``fx``: `torch.fx.symbolic_trace` (module-level nodes, the clearest graph);
2. ``export``: non-strict `torch.export` (ATen-level, follows most Python; HF models);
3. ``hooks``: run the model on the real example under a `TorchFunctionMode` that records every
   op, with forward hooks keeping the module stack. It cannot fail on data-dependent control
   flow, because it only records what actually ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from healthcheck.errors import describe
from healthcheck.graph.build import graph_from_fx
from healthcheck.graph.ir import OpGraph
from healthcheck.graph.recorder import record
from healthcheck.tensors import forward_kwargs, tensors_of

TRACE_METHODS = ("fx", "export", "hooks")


@dataclass
class TraceResult:
    graph: OpGraph
    method: str  # "fx" | "export" | "hooks"
    failures: dict[str, str] = field(default_factory=dict)  # method -> why it failed


def _meta_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return tuple(_meta_like(v) for v in value)
    return None


#: torch.nn modules with residual joins inside: fx must trace into them, not keep them as leaves
_COMPOSITE_TORCH_MODULES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                            nn.TransformerDecoder, nn.Transformer)


class _FxTracer(fx.Tracer):
    record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, _COMPOSITE_TORCH_MODULES) and super().is_leaf_module(m, module_qualified_name)


def trace_fx(model: nn.Module, args: tuple, kwargs: dict[str, Any], cheap_forward: bool = False) -> OpGraph:
    tracer = _FxTracer()
    graph = tracer.trace(model)
    module = fx.GraphModule(tracer.root, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    run_args = []
    for i, node in enumerate(placeholders):
        if i < len(args):
            run_args.append(args[i])
        elif node.target in kwargs:
            run_args.append(kwargs[node.target])
        elif node.args:
            run_args.append(node.args[0])
        else:
            raise TypeError(f"no example value for forward argument {node.target!r}")
    values = _propagate(module, run_args, real=cheap_forward)
    params = {n for n in graph.nodes if n.op == "get_attr" and isinstance(_fetch_attr(model, n.target), nn.Parameter)}
    inputs = {n for n in placeholders}
    return graph_from_fx(graph, model, values.get, inputs, params)


def _propagate(module: fx.GraphModule, args: list[Any], real: bool) -> dict[fx.Node, Any]:
    """Which nodes hold tensors (and their shapes). Fake tensors cost no compute but a fixed time
    per op, so a model whose forward is cheap (`real`) is simply run once; fake-tensor ops that
    have no kernel fall back to the real run too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        if real:
            raise NotImplementedError
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        FakeTensorProp(module, mode).propagate(*fake_args)
        return {n: n.meta.get("val") for n in module.graph.nodes}
    except Exception:  # noqa: BLE001
        values: dict[fx.Node, Any] = {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                values[n] = _meta_like(result)
                return result

        with torch.no_grad():
            _Recorder(module).run(*args)
        return values


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class _TensorOutputs(nn.Module):
    """Export needs tensors out: flatten dicts, tuples and ModelOutputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(tensors_of(self.model(*args, **kwargs)))


def trace_export(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> OpGraph:
    from torch.export.graph_signature import InputKind

    wrapper = _TensorOutputs(model)
    program = torch.export.export(wrapper, args, forward_kwargs(model, kwargs), strict=False)
    graph = program.graph_module.graph
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    inputs, params = set(), set()
    for spec in program.graph_signature.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if node is None:
            continue
        if spec.kind == InputKind.USER_INPUT:
            inputs.add(node)
        elif spec.kind == InputKind.PARAMETER:
            params.add(node)
    return graph_from_fx(graph, model, lambda n: n.meta.get("val"), inputs, params, module_prefix="model")


def trace_hooks(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> OpGraph:
    with torch.no_grad():
        return record(model, args, forward_kwargs(model, kwargs)).graph


def trace(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
          methods: tuple[str, ...] = TRACE_METHODS, cheap_forward: bool = False) -> TraceResult:
    """The first method that works. The model must already be in the mode to trace (eval).
    `cheap_forward`: running the model once costs less than fake-tensor propagation."""
    kwargs = kwargs or {}
    tracers = {"fx": partial(trace_fx, cheap_forward=cheap_forward), "export": trace_export, "hooks": trace_hooks}
    failures: dict[str, str] = {}
    for method in methods:
        try:
            graph = tracers[method](model, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure means "try the next tracer"
            failures[method] = describe(exc)
            if method == methods[-1]:
                raise
            continue
        if not graph.outputs:
            failures[method] = "graph has no tensor outputs"
            continue
        return TraceResult(graph, method, failures)
    raise RuntimeError("no tracer could follow the model: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
