"""Three ways to get an `OpGraph` from a model, tried in order by `trace`.

1. ``fx``: `torch.fx.symbolic_trace` (module-level nodes, the clearest graph);
2. ``export``: non-strict `torch.export` (ATen-level, follows most Python; HF models);
3. ``hooks``: run the model on the real example under a `TorchFunctionMode` that records every
   op, with forward hooks keeping the module stack. It cannot fail on data-dependent control
   flow, because it only records what actually ran.

`fake=True` (structure only, healthcheck.graph.fake): no tracer runs the model on real tensors. fx
propagates fake tensors, export fakes everything itself, and hooks records a forward under
`FakeTensorMode`. Where that cannot follow a model with real weights, `NeedsRealForward` stops the
trace, so the caller can run today's real-forward path (and say why) rather than fall to another
tracer whose graph would differ from the one a real forward gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


class NeedsRealForward(Exception):
    """Fake tensors cannot follow this model (a data-dependent op, an op without a fake kernel)."""


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


def trace_fx(model: nn.Module, args: tuple, kwargs: dict[str, Any], cheap_forward: bool = False,
             fake: bool = False) -> OpGraph:
    tracer = _FxTracer()
    graph = tracer.trace(model)
    params = {n for n in graph.nodes if n.op == "get_attr" and isinstance(_fetch_attr(model, n.target), nn.Parameter)}
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with parameters_faked(model, mode):  # the GraphModule takes the fake parameters
            values = _fx_values(fx.GraphModule(tracer.root, graph), args, kwargs, cheap_forward=False,
                                real_fallback=_on_meta(model), mode=mode)
    else:
        values = _fx_values(fx.GraphModule(tracer.root, graph), args, kwargs, cheap_forward)
    inputs = {n for n in graph.nodes if n.op == "placeholder"}
    return graph_from_fx(graph, model, values.get, inputs, params)


def _fx_values(module: fx.GraphModule, args: tuple, kwargs: dict[str, Any], cheap_forward: bool,
               real_fallback: bool = True, mode: Any = None) -> dict[fx.Node, Any]:
    graph = module.graph
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
    # fake (not `real_fallback`): a real run may not replace fake propagation, unless the weights are on
    # the meta device (there a "real" run is a run on meta tensors: no value is read or written)
    return _propagate(module, run_args, real=cheap_forward, real_fallback=real_fallback, mode=mode)


def _propagate(module: fx.GraphModule, args: list[Any], real: bool, real_fallback: bool = True,
               mode: Any = None) -> dict[fx.Node, Any]:
    """Which nodes hold tensors (and their shapes). Fake tensors cost no compute but a fixed time
    per op, so a model whose forward is cheap (`real`) is simply run once; fake-tensor ops that
    have no kernel fall back to the real run too (unless not `real_fallback`: NeedsRealForward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        if real:
            raise NotImplementedError
        mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():  # as the real run: shapes need no autograd (`w.clamp_()` on a leaf is fine)
            FakeTensorProp(module, mode).propagate(*fake_args)
        return {n: n.meta.get("val") for n in module.graph.nodes}
    except Exception as exc:  # noqa: BLE001
        if not real and not real_fallback:
            raise NeedsRealForward(f"fake tensors could not follow the fx graph: {describe(exc)}") from exc
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


def trace_hooks(model: nn.Module, args: tuple, kwargs: dict[str, Any], fake: bool = False) -> OpGraph:
    if not fake:
        with torch.no_grad():
            return record(model, args, forward_kwargs(model, kwargs)).graph
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the recorder's TorchFunctionMode sits above FakeTensorMode: it sees the model's own parameters
    # (identity tells parameters from data) while every kernel runs on fake tensors
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fake_args, fake_kwargs = fake_values(mode, (args, kwargs))
        with parameters_faked(model, mode), mode, torch.no_grad():
            return record(model, fake_args, forward_kwargs(model, fake_kwargs)).graph
    except Exception as exc:
        if _on_meta(model):
            raise
        raise NeedsRealForward(f"a forward on fake tensors failed: {describe(exc)}") from exc


def fake_values(mode: Any, value: Any) -> Any:
    """`value` (tensors in tuples, lists and dicts) with every tensor a fake tensor of `mode`."""
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, dict):
        return {k: fake_values(mode, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(fake_values(mode, v) for v in value)
    return value


@contextmanager
def parameters_faked(model: nn.Module, mode: Any) -> Iterator[None]:
    """The model's parameters replaced by fake copies for the duration. Under FakeTensorMode an op whose
    operands are all real tensors runs for real, so `w.data.clamp_()` in a forward would write the
    weights; a fake copy holds no data (tied weights stay tied: the mode gives one fake per tensor).
    Buffers stay real: the caller's guard copies their (small) values and puts them back."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and not param.is_meta:
                    swapped.append((module, name, param))
                    module._parameters[name] = mode.from_tensor(param)
        yield
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def trace(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
          methods: tuple[str, ...] = TRACE_METHODS, cheap_forward: bool = False, fake: bool = False) -> TraceResult:
    """The first method that works. The model must already be in the mode to trace (eval).
    `cheap_forward`: running the model once costs less than fake-tensor propagation. `fake`: never
    run the model on real tensors (see the module's doc; the inputs are on the weights' device)."""
    kwargs = kwargs or {}
    tracers = {"fx": partial(trace_fx, cheap_forward=cheap_forward, fake=fake), "export": trace_export,
               "hooks": partial(trace_hooks, fake=fake)}
    failures: dict[str, str] = {}
    for method in methods:
        try:
            graph = tracers[method](model, args, kwargs)
        except NeedsRealForward:
            raise
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
