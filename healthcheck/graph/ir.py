"""The one graph form every tracer produces and every analysis pass reads.

A tracer (fx, torch.export, or the recording fallback) turns a model into an `OpGraph`: a list of
`OpNode`s in execution order whose `inputs` name only *data* nodes, i.e. tensors whose values
depend on the model's inputs. Parameters, buffers, constants and shape arithmetic are not data;
they show up only as facts on the node that uses them (`has_param`, `scalar`, `param_operand`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Category(enum.Enum):
    """What an op does, as far as signal propagation is concerned."""

    INPUT = "input"
    WEIGHT = "weight"  # conv, linear, embedding: an op with a learned weight matrix
    NORM = "norm"  # batch/layer/group/RMS norm (all ops inside one norm module)
    ACT = "act"  # pointwise nonlinearity
    ATTENTION = "attention"  # softmax / scaled dot-product attention: nonlinear token mixing
    GATE = "gate"  # product of two data tensors (gating, SE, SwiGLU)
    ADD = "add"
    CONCAT = "concat"
    SCALE = "scale"  # product/quotient with a constant or a parameter
    POOL = "pool"
    RESAMPLE = "resample"  # interpolate / upsample
    TRIVIAL = "trivial"  # dropout, identity, reshape, permute, slicing, dtype casts, padding
    OTHER = "other"


#: Ops a skip path may pass through and still be called a projection (ResNet's 1x1 conv + BN).
PROJECTION_OPS = frozenset({Category.WEIGHT, Category.NORM, Category.POOL, Category.RESAMPLE})
#: Ops that make a branch nonlinear.
NONLINEAR_OPS = frozenset({Category.ACT, Category.ATTENTION, Category.GATE})


@dataclass
class OpNode:
    index: int
    category: Category
    op: str  # normalized op name: "add", "relu", "conv2d", or a leaf module's class name
    inputs: tuple[int, ...] = ()  # data inputs, by node index
    module: str = ""  # qualified name of the innermost enclosing module ("" for the root)
    module_type: str = ""  # class name of that module
    source: str | None = None  # "file:line" of the user's code that issued the op
    has_param: bool = False  # a parameter is among the op's operands
    scalar: float | None = None  # the Python-number operand of mul/div/add, when there is one
    param_operand: bool = False  # mul/div by a parameter tensor (LayerScale, ReZero)
    nonnegative: bool = False  # an activation whose output is never negative (ReLU, sigmoid)
    shape: tuple[int, ...] | None = None
    # False for integer/bool results (ids, masks, indices): such a path carries no signal, so it is
    # never a residual branch or skip (RoBERTa's position ids are computed from input_ids)
    floating: bool = True
    axis: int | None = None  # the (non-negative) axis a concat joins along


@dataclass
class OpGraph:
    nodes: list[OpNode]
    outputs: tuple[int, ...]
    consumers: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.consumers = [[] for _ in self.nodes]
        for node in self.nodes:
            for i in node.inputs:
                self.consumers[i].append(node.index)
        _mark_inline_norms(self.nodes)

    def ancestors(self) -> list[int]:
        """Ancestor sets as bitsets (Python ints): bit j of result[i] is set when j feeds i."""
        result: list[int] = [0] * len(self.nodes)
        for node in self.nodes:
            bits = 0
            for i in node.inputs:
                bits |= result[i] | (1 << i)
            result[node.index] = bits
        return result


#: Reductions whose result normalizes a tensor: x * rsqrt(mean(x^2) + eps), (x - mean) / std.
_NORM_STATISTICS = frozenset({"mean", "var", "std", "norm", "linalg_vector_norm", "var_mean", "std_mean"})
#: Ops that may sit between a reduction and the division/multiplication that applies it.
_STATISTIC_CHAIN = _NORM_STATISTICS | {"pow", "square", "rsqrt", "sqrt", "reciprocal", "add", "sub", "clamp", "clamp_min",
                                       "abs", "to", "_to_copy", "float", "type_as", "getitem", "detach"}


_MUL = frozenset({"mul", "imul", "rmul"})
_MUL_DIV = _MUL | {"div", "truediv", "itruediv"}


def _statistic_chain(nodes: list[OpNode], start: int, target: int) -> list[int] | None:
    """The ops from `start` back to a reduction of `target` (or of the tensor `target` centres),
    when `start` is such a statistic: single-input ops only, a reduction among them."""
    chain, current = [], nodes[start]
    sources = {target, *nodes[target].inputs} if nodes[target].op == "sub" else {target}
    while current.op in _STATISTIC_CHAIN and len(current.inputs) == 1 and current.category is not Category.NORM:
        chain.append(current.index)
        if current.inputs[0] in sources:
            return chain if any(nodes[i].op in _NORM_STATISTICS for i in chain) else None
        current = nodes[current.inputs[0]]
    return None


def _mark_inline_norms(nodes: list[OpNode]) -> None:
    """A normalization written out in ops, outside any norm module (`x * torch.rsqrt(x.pow(2).mean(-1)
    + eps)` in a helper function): the statistic and the op that applies it are a norm, as the same
    ops inside an RMSNorm module are. Softmax's exp(x) / sum(exp(x)) is not one (a sum, no mean)."""
    for node in nodes:
        if node.op not in _MUL_DIV or len(node.inputs) != 2 or node.category is Category.NORM:
            continue
        a, b = node.inputs
        chain = _statistic_chain(nodes, b, a) or (_statistic_chain(nodes, a, b) if node.op in _MUL else None)
        if chain:
            centred = nodes[a] if nodes[a].op == "sub" else None  # (x - mean(x)) / std(x): the centring too
            if centred is not None:
                chain += [centred.index, *(i for i in centred.inputs if nodes[i].op in _NORM_STATISTICS)]
            for i in (*chain, node.index):
                nodes[i].category = Category.NORM
