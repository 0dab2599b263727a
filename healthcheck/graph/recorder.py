"""Run a model and record every op on its data: the hooks-only tracer, and the probes' eyes.

A `TorchFunctionMode` sees every torch function and tensor method the model calls, with the real
tensors; forward pre/post hooks keep the module stack. Data flow is followed by tensor identity.
An optional `Observer` sees each recorded op with its operands and output while the model runs
(to take statistics, register gradient hooks, or replace the output, e.g. with a dual tensor).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from healthcheck.graph import taxonomy
from healthcheck.graph.ir import Category, OpGraph, OpNode
from healthcheck.tensors import tensors_of

_DROPOUT_OPS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
                "dropout3d"}


class Observer(Protocol):
    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        """Called after each recorded op with its (node index, tensor) data operands; return a
        replacement output, or None to keep it."""


@dataclass
class Recording:
    graph: OpGraph
    output: Any


class _OpRecorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, observer: Observer | None = None, skip_dropout: bool = False,
                 replacements: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.nodes: list[OpNode] = []
        # id(tensor) -> (weak reference, node index). Weak, so that recording keeps no activation
        # alive; the reference tells a live tensor from a new one that reuses a dead one's id.
        self.data: dict[int, tuple[weakref.ref, int]] = {}
        self.params = {id(p) for p in model.parameters()}
        self.param_derived: dict[int, weakref.ref] = {}
        self.module_stack: list[tuple[str, nn.Module]] = [("", model)]
        self.observer = observer
        self.skip_dropout = skip_dropout
        self.replacements = replacements or {}

    def add_input(self, tensor: torch.Tensor) -> None:
        self._bind(tensor, OpNode(len(self.nodes), Category.INPUT, "input", shape=tuple(tensor.shape)))

    def _bind(self, value: Any, node: OpNode) -> None:
        if node.index == len(self.nodes):
            self.nodes.append(node)
        for t in tensors_of(value):
            self.data[id(t)] = (weakref.ref(t), node.index)

    def node_of(self, value: Any) -> int | None:
        """Index of the node that made this live tensor, or None if it is not model data."""
        entry = self.data.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def _is_param_like(self, value: Any) -> bool:
        if id(value) in self.params:
            return True
        ref = self.param_derived.get(id(value))
        return ref is not None and ref() is value

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = taxonomy.normalize_op_name(getattr(func, "__name__", str(func)))
        operands = _flatten((args, kwargs))
        data_operands = [a for a in operands if isinstance(a, torch.Tensor) and self.node_of(a) is not None]
        if self.skip_dropout and name in _DROPOUT_OPS and data_operands:
            result = args[0]
        elif name in self.replacements and data_operands:
            result = self.replacements[name](*args, **kwargs)
        else:
            result = func(*args, **kwargs)
        data_inputs = tuple(dict.fromkeys(self.node_of(a) for a in data_operands))
        touches_param = any(isinstance(a, torch.Tensor) and self._is_param_like(a) for a in operands)
        out_tensors = tensors_of(result)
        if not data_inputs or name in taxonomy.VALUE_INDEPENDENT_OPS or not out_tensors:
            if touches_param:
                self.param_derived.update((id(t), weakref.ref(t)) for t in out_tensors)
            return result
        path, module = self.module_stack[-1]
        category = taxonomy.categorize(name, len(data_inputs), module, touches_param)
        numbers = [a for a in _flatten(args) if isinstance(a, (int, float)) and not isinstance(a, bool)]
        scalar, param_operand = taxonomy.scale_facts(name, category, numbers, kwargs, touches_param)
        node = OpNode(
            index=len(self.nodes), category=category, op=name, inputs=data_inputs, module=path,
            module_type=type(module).__name__,
            source=_user_source() if category in (Category.ADD, Category.CONCAT) else None,
            has_param=touches_param, scalar=scalar, param_operand=param_operand,
            nonnegative=taxonomy.is_nonnegative_op(name), shape=tuple(out_tensors[0].shape),
        )
        if self.observer is not None:
            replaced = self.observer.on_node(node, result, [(self.node_of(a), a) for a in data_operands])
            if replaced is not None:
                result = replaced
        self._bind(result, node)
        return result


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def _user_source() -> str | None:
    """The op's line in model code; the walk stops at healthcheck's own frames (the caller of the
    model), so a join is never located in the code that called `check`."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and not taxonomy.is_own_frame(frame.f_code.co_filename):
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return taxonomy.pick_source(frames[::-1])


def _enter(stack: list, name: str, module: nn.Module, args: Any) -> None:
    stack.append((name, module))


def _leave(stack: list, module: nn.Module, args: Any, output: Any) -> None:
    stack.pop()


class Session:
    """A recording that starts and stops around a forward the caller does not run itself (the
    training monitor arms one in a root pre-forward hook and ends it in the forward hook)."""

    def __init__(self, model: nn.Module, observer: Observer | None = None, skip_dropout: bool = False,
                 replacements: dict[str, Any] | None = None) -> None:
        self.model = model
        self.recorder = _OpRecorder(model, observer, skip_dropout, replacements)
        self.handles: list[Any] = []

    def start(self, inputs: Any) -> None:
        stack = self.recorder.module_stack
        for name, module in self.model.named_modules():
            if module is not self.model:
                self.handles.append(module.register_forward_pre_hook(partial(_enter, stack, name)))
                self.handles.append(module.register_forward_hook(partial(_leave, stack), always_call=True))
        for t in tensors_of(inputs):
            self.recorder.add_input(t)
        self.recorder.__enter__()

    def stop(self, output: Any) -> Recording:
        self.recorder.__exit__(None, None, None)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        outputs = tuple(dict.fromkeys(i for i in map(self.recorder.node_of, tensors_of(output)) if i is not None))
        return Recording(OpGraph(self.recorder.nodes, outputs), output)


def record(model: nn.Module, args: tuple, kwargs: dict[str, Any], observer: Observer | None = None,
           skip_dropout: bool = False, replacements: dict[str, Any] | None = None) -> Recording:
    """Run `model(*args, **kwargs)` once and record its ops. Grad mode is the caller's."""
    session = Session(model, observer, skip_dropout, replacements)
    session.start((args, kwargs))
    output = None
    try:
        output = model(*args, **kwargs)
    finally:
        recording = session.stop(output)
    return recording
