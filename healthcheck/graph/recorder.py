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
# Random ops (names as `taxonomy.normalize_op_name` gives them) and what the probes see instead.
# A probe compares passes (and rows of one pass) with each other, so every random draw must be the
# same in all of them, and should be the draw that leaves the signal as it is:
# - uniform draws (`torch.rand`, `uniform_`) become the middle of their range (0.5). Stochastic
#   depth, LayerDrop and hand-written dropout decide with `u < p_drop` / `u >= p_drop` (drop) or
#   `u < p_keep` (keep); with p_drop < ½ < p_keep, as these regularizers are configured, the middle
#   value keeps every unit and layer, like `floor(p_keep + u)` does;
# - Bernoulli draws (`bernoulli_(p_keep)`: timm's drop_path, dropout masks) become their mean p:
#   `x / p_keep * mask` is then exactly x, the function eval mode computes (a mask of ones would
#   scale the branch by 1/p_keep); a mask used as a boolean keeps everything;
# - normal draws (noise injection, reparameterization) and the rest (randint, randperm,
#   multinomial, ...) are drawn from a private RNG seeded by the call's position in the forward:
#   the same values in every pass, and, for a line of inputs, the same values in every row.
# The global RNG (CPU and CUDA) is forked around each draw, so the caller's stream is untouched.
_UNIFORM_OPS = {"rand", "rand_like", "uniform"}
_BERNOULLI_OPS = {"bernoulli"}
_SEEDED_RANDOM_OPS = {"randn", "randn_like", "normal", "randint", "randint_like", "randperm", "multinomial",
                      "poisson", "binomial", "exponential", "geometric", "cauchy", "log_normal", "random",
                      "standard_gamma", "dirichlet"}
_RANDOM_OPS = _UNIFORM_OPS | _BERNOULLI_OPS | _SEEDED_RANDOM_OPS


class Observer(Protocol):
    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        """Called after each recorded op with its (node index, tensor) data operands; return a
        replacement output, or None to keep it. An observer may also define
        `before_inplace(operands)`: called before an in-place op (`x += y`, `add_`) overwrites its
        first operand, with the same (node index, tensor) pairs, to read them while they still hold
        their values."""


@dataclass
class Recording:
    graph: OpGraph
    output: Any


class _OpRecorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, observer: Observer | None = None, skip_dropout: bool = False,
                 replacements: dict[str, Any] | None = None, random_seed: int = 0,
                 shared_rows: int | None = None) -> None:
        super().__init__()
        # skip_dropout: the probes' deterministic mode, every stochastic op neutral (see _RANDOM_OPS)
        self.neutral = _NeutralDraws(random_seed, shared_rows)
        self.before_inplace = getattr(observer, "before_inplace", None)
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
        self._bind(tensor, OpNode(len(self.nodes), Category.INPUT, "input", shape=tuple(tensor.shape),
                                  floating=tensor.is_floating_point() or tensor.is_complex()))

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
        if self.skip_dropout and name == "scaled_dot_product_attention":
            args, kwargs = _without_attention_dropout(args, kwargs)
        if self.before_inplace is not None and len(data_operands) >= 2 and _is_inplace(func, kwargs):
            self.before_inplace([(self.node_of(a), a) for a in data_operands])
        if self.skip_dropout and name in _DROPOUT_OPS and (args or "input" in kwargs):
            result = args[0] if args else kwargs["input"]
        elif self.skip_dropout and name in _RANDOM_OPS:
            result = self.neutral.draw(func, name, args, kwargs)
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
            **taxonomy.value_facts(name, args, kwargs, out_tensors[0]),
        )
        if self.observer is not None:
            replaced = self.observer.on_node(node, result, [(self.node_of(a), a) for a in data_operands])
            if replaced is not None:
                result = replaced
        self._bind(result, node)
        return result


class _NeutralDraws:
    """Random ops drawn so that every pass and every row sees the same values (see _RANDOM_OPS);
    in-place draws (`uniform_`, `bernoulli_`) still fill their tensor. A draw's seed is its position
    among the forward's random calls, so the same forward gives the same draws."""

    def __init__(self, seed: int, shared_rows: int | None) -> None:
        self.seed = seed
        self.calls = 0
        self.shared_rows = shared_rows  # a seeded draw with this many rows repeats its first row

    def draw(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        self.calls += 1
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            # seed only the generators fork_rng restores: torch.manual_seed would also queue a lazy CUDA
            # seed that replaces the user's own when CUDA is initialized later
            seed = self.seed * 100_003 + self.calls
            torch.default_generator.manual_seed(seed)
            for device in devices:
                torch.cuda.default_generators[device].manual_seed(seed)
            result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor) or isinstance(result, nn.Parameter):
            return result  # a parameter initialized in forward (LazyLinear): seeded, but a real init
        with torch.no_grad():
            if name in _UNIFORM_OPS:
                low, high = _uniform_range(name, args, kwargs)
                result.fill_((low + high) / 2 if result.is_floating_point() else 0)
            elif name in _BERNOULLI_OPS:
                mean = _bernoulli_mean(func, args, kwargs)
                if isinstance(mean, torch.Tensor):
                    result.copy_(mean.expand_as(result))
                else:
                    result.fill_(mean)
            elif self.shared_rows is not None and result.dim() >= 1 and result.shape[0] == self.shared_rows:
                result.copy_(result[:1].clone().expand_as(result))
        return result


def _bernoulli_mean(func: Any, args: tuple, kwargs: dict) -> float | torch.Tensor:
    """p of a Bernoulli draw: `x.bernoulli_(p)` and `torch.bernoulli(x, p)` give it, else the
    probabilities are the input's values (`torch.bernoulli(probs)`); 0.5 is bernoulli_'s default."""
    inplace = getattr(func, "__name__", "").endswith("_")
    p = kwargs.get("p", args[1] if len(args) > 1 else None)
    if p is None:
        return 0.5 if inplace else args[0].detach()
    return p.detach() if isinstance(p, torch.Tensor) else float(p)


def _uniform_range(name: str, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(low, high) of a uniform draw: `uniform_(from, to)` gives them, rand draws from [0, 1)."""
    if name != "uniform":
        return 0.0, 1.0
    low = kwargs.get("from", args[1] if len(args) > 1 else 0.0)
    high = kwargs.get("to", args[2] if len(args) > 2 else 1.0)
    return float(low), float(high)


def _without_attention_dropout(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """scaled_dot_product_attention's arguments with dropout_p = 0 (Hugging Face passes the
    attention dropout there in train mode)."""
    if "dropout_p" in kwargs:
        return args, {**kwargs, "dropout_p": 0.0}
    if len(args) > 4:
        return (*args[:4], 0.0, *args[5:]), kwargs
    return args, kwargs


def _is_inplace(func: Any, kwargs: dict) -> bool:
    """`x += y`, `x.add_(y)`, `torch.add(x, y, out=x)`: the op overwrites a tensor it reads."""
    raw = getattr(func, "__name__", "")
    return raw in _AUGMENTED_ASSIGNMENTS or (raw.endswith("_") and not raw.endswith("__")) or kwargs.get("out") is not None


_AUGMENTED_ASSIGNMENTS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow",
                                                   "matmul", "and", "or", "xor", "lshift", "rshift")}


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
                 replacements: dict[str, Any] | None = None, random_seed: int = 0,
                 shared_rows: int | None = None) -> None:
        self.model = model
        self.recorder = _OpRecorder(model, observer, skip_dropout, replacements, random_seed, shared_rows)
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
           skip_dropout: bool = False, replacements: dict[str, Any] | None = None, random_seed: int = 0,
           shared_rows: int | None = None) -> Recording:
    """Run `model(*args, **kwargs)` once and record its ops. Grad mode is the caller's.

    `skip_dropout`: the probes' deterministic mode: dropout (also attention's `dropout_p`) is
    skipped and every random op gives the same neutral draw in every pass (see _RANDOM_OPS),
    seeded by `random_seed`; seeded draws with `shared_rows` rows repeat their first row."""
    session = Session(model, observer, skip_dropout, replacements, random_seed, shared_rows)
    session.start((args, kwargs))
    output = None
    try:
        output = model(*args, **kwargs)
    finally:
        recording = session.stop(output)
    return recording
