"""Turn a torch.fx graph (from symbolic_trace or torch.export) into an `OpGraph`."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from healthcheck.graph import taxonomy
from healthcheck.graph.ir import Category, OpGraph, OpNode


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _flat_nodes(args: Any) -> Iterable[Any]:
    if isinstance(args, (list, tuple)):
        for a in args:
            yield from _flat_nodes(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _flat_nodes(a)
    elif isinstance(args, slice):
        yield from _flat_nodes((args.start, args.stop, args.step))
    else:
        yield args


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(s) for s in value.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


def _module_of(meta: dict, root: nn.Module, prefix: str) -> tuple[str, str, nn.Module | None]:
    stack = meta.get("nn_module_stack")
    if not stack:
        return "", type(root).__name__, root
    path, module_type = list(stack.values())[-1]
    path = _clean_path(str(path), prefix)
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError:
        module = None
    type_name = module_type if isinstance(module_type, str) else module_type.__name__
    return path, type_name.rsplit(".", 1)[-1], module


def _clean_path(path: str, prefix: str) -> str:
    # torch.export writes "L['self'].layer1[0]" style paths in some versions
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        path = path[len(prefix) + 1:]
    return path.strip(".")


def _mutates(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(str(node.target)), "inplace", False))
    if node.op in ("call_function", "call_method") and not isinstance(node.target, torch._ops.OpOverload):
        return taxonomy.is_inplace(_target_name(node), node.kwargs)
    return False  # torch.export graphs are functional


def graph_from_fx(
    graph: fx.Graph,
    root: nn.Module,
    value_of: Callable[[fx.Node], Any],
    input_nodes: set[fx.Node],
    param_nodes: set[fx.Node],
    module_prefix: str = "",
) -> OpGraph:
    """Data-flow `OpGraph` of an fx graph.

    `value_of(node)` gives a real or fake value for the node (used only to tell tensors from
    shapes); `input_nodes` are the model's own inputs, `param_nodes` the nodes that are
    parameters (placeholders under export, get_attr under symbolic_trace).
    """
    nodes: list[OpNode] = []
    data_index: dict[fx.Node, int] = {}
    param_derived: set[fx.Node] = set(param_nodes)
    outputs: list[int] = []

    for node in graph.nodes:
        if node.op == "placeholder":
            if node in input_nodes and _holds_tensor(value_of(node)):
                data_index[node] = len(nodes)
                nodes.append(OpNode(len(nodes), Category.INPUT, node.name, shape=_shape(value_of(node)),
                                    **taxonomy.value_facts("input", (), {}, value_of(node))))
            continue
        if node.op == "output":
            outputs = [data_index[a] for a in _flat_nodes(node.args) if a in data_index]
            continue
        if node.op == "get_attr":
            continue
        operands = [a for a in _flat_nodes((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        data_inputs = tuple(dict.fromkeys(data_index[a] for a in operands if a in data_index))
        touches_param = any(a in param_derived for a in operands)
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            name = type(module).__name__
            category = taxonomy.classify_module(module)
            has_param = any(True for _ in module.parameters())
            nonnegative = taxonomy.is_nonnegative_module(module)
        else:
            name = taxonomy.normalize_op_name(_target_name(node))
            has_param = touches_param
            nonnegative = taxonomy.is_nonnegative_op(name)
        if not data_inputs or name in taxonomy.VALUE_INDEPENDENT_OPS or not _holds_tensor(value_of(node)):
            if touches_param:
                param_derived.add(node)
            continue
        path, module_type, module = _module_of(node.meta, root, module_prefix)
        if node.op != "call_module":
            category = taxonomy.categorize(name, len(data_inputs), module, touches_param)
        constants = [a for a in _flat_nodes(node.args) if isinstance(a, numbers.Number) and not isinstance(a, bool)]
        scalar, param_operand = taxonomy.scale_facts(name, category, constants, node.kwargs, touches_param)
        op = OpNode(
            index=len(nodes),
            category=category,
            op=name,
            inputs=data_inputs,
            module=path,
            module_type=module_type,
            source=taxonomy.source_from_stack_trace(node.meta.get("stack_trace") or node.stack_trace),
            has_param=has_param,
            scalar=scalar,
            param_operand=param_operand,
            nonnegative=nonnegative,
            shape=_shape(value_of(node)),
            **taxonomy.value_facts(name, node.args, node.kwargs, value_of(node)),
        )
        data_index[node] = op.index
        nodes.append(op)
        # fx records `out.add_(x)` or `F.relu_(out)` without rebinding `out`: later uses of the
        # mutated operand must read this op's result
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first in data_index and _mutates(node, root):
            data_index[first] = op.index
    return OpGraph(nodes, tuple(outputs))
