"""Three ways to get an `OpGraph` from a model, tried in order by `trace`.

1. ``fx``: `torch.fx.symbolic_trace` (module-level nodes, the clearest graph);
2. ``export``: non-strict `torch.export` (ATen-level, follows most Python; HF models);
3. ``hooks``: run the model on the real example under a `TorchFunctionMode` that records every
   op, with forward hooks keeping the module stack. It cannot fail on data-dependent control
   flow, because it only records what actually ran.
"""

from __future__ import annotations

import inspect
from functools import partial
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from healthcheck.graph import taxonomy
from healthcheck.graph.build import graph_from_fx
from healthcheck.graph.ir import Category, OpGraph, OpNode

TRACE_METHODS = ("fx", "export", "hooks")


@dataclass
class TraceResult:
    graph: OpGraph
    method: str  # "fx" | "export" | "hooks"
    failures: dict[str, str] = field(default_factory=dict)  # method -> why it failed


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


def forward_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ask models that cache (HF decoders) not to: a cache is not a tensor output."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def _meta_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return tuple(_meta_like(v) for v in value)
    return None


class _FxTracer(fx.Tracer):
    record_stack_traces = True


def trace_fx(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> OpGraph:
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
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n] = _meta_like(result)
            return result

    with torch.no_grad():
        _Recorder(module).run(*run_args)
    params = {n for n in graph.nodes if n.op == "get_attr" and isinstance(_fetch_attr(model, n.target), nn.Parameter)}
    inputs = {n for n in placeholders}
    return graph_from_fx(graph, model, values.get, inputs, params)


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


class _OpRecorder(TorchFunctionMode):
    """Records every torch function call whose operands include model data."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.nodes: list[OpNode] = []
        self.data: dict[int, int] = {}  # id(tensor) -> node index
        self.keep: list[Any] = []  # keeps recorded tensors alive so ids stay unique
        self.params = {id(p) for p in model.parameters()}
        self.param_derived: set[int] = set()
        self.module_stack: list[tuple[str, nn.Module]] = [("", model)]

    def add_input(self, tensor: torch.Tensor) -> None:
        self._bind(tensor, OpNode(len(self.nodes), Category.INPUT, "input", shape=tuple(tensor.shape)))

    def _bind(self, value: Any, node: OpNode) -> None:
        if node.index == len(self.nodes):
            self.nodes.append(node)
        for t in tensors_of(value):
            self.data[id(t)] = node.index
            self.keep.append(t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = taxonomy.normalize_op_name(getattr(func, "__name__", str(func)))
        operands = _flatten((args, kwargs))
        data_inputs = tuple(dict.fromkeys(self.data[id(a)] for a in operands if isinstance(a, torch.Tensor) and id(a) in self.data))
        touches_param = any(isinstance(a, torch.Tensor) and (id(a) in self.params or id(a) in self.param_derived) for a in operands)
        out_tensors = tensors_of(result)
        if not data_inputs or name in taxonomy.VALUE_INDEPENDENT_OPS or not out_tensors:
            if touches_param:
                self.param_derived.update(id(t) for t in out_tensors)
                self.keep.extend(out_tensors)
            return result
        path, module = self.module_stack[-1]
        category = taxonomy.override_by_enclosing(module, taxonomy.classify_op(name, len(data_inputs)))
        if touches_param and category is Category.OTHER:
            category = Category.WEIGHT
        scalar = None
        if category is Category.SCALE:
            nums = [a for a in operands if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if nums:
                scalar = float(nums[0])
                if name in ("div", "truediv", "itruediv", "rtruediv") and scalar != 0:
                    scalar = 1.0 / scalar
        source = _user_source() if category in (Category.ADD, Category.CONCAT) else None
        node = OpNode(
            index=len(self.nodes), category=category, op=name, inputs=data_inputs, module=path,
            module_type=type(module).__name__, source=source, has_param=touches_param,
            scalar=scalar, param_operand=category is Category.SCALE and touches_param,
            nonnegative=taxonomy.is_nonnegative_op(name), shape=tuple(out_tensors[0].shape),
        )
        self._bind(result, node)
        return result


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def _user_source() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if taxonomy.is_user_frame(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _enter(stack: list, name: str, module: nn.Module, args: Any) -> None:
    stack.append((name, module))


def _leave(stack: list, module: nn.Module, args: Any, output: Any) -> None:
    stack.pop()


def trace_hooks(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> OpGraph:
    recorder = _OpRecorder(model)
    handles = []
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(partial(_enter, recorder.module_stack, name)))
        handles.append(module.register_forward_hook(partial(_leave, recorder.module_stack)))
    for t in tensors_of((args, kwargs)):
        recorder.add_input(t)
    try:
        with torch.no_grad(), recorder:
            output = model(*args, **forward_kwargs(model, kwargs))
    finally:
        for h in handles:
            h.remove()
    outputs = tuple(dict.fromkeys(recorder.data[id(t)] for t in tensors_of(output) if id(t) in recorder.data))
    return OpGraph(recorder.nodes, outputs)


def trace(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
          methods: tuple[str, ...] = TRACE_METHODS) -> TraceResult:
    """The first method that works. The model must already be in the mode to trace (eval)."""
    kwargs = kwargs or {}
    tracers = {"fx": trace_fx, "export": trace_export, "hooks": trace_hooks}
    failures: dict[str, str] = {}
    for method in methods:
        try:
            graph = tracers[method](model, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure means "try the next tracer"
            failures[method] = f"{type(exc).__name__}: {_first_line(exc)}"
            if method == methods[-1]:
                raise
            continue
        if not graph.outputs:
            failures[method] = "graph has no tensor outputs"
            continue
        return TraceResult(graph, method, failures)
    raise RuntimeError("no tracer could follow the model: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
