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

    def ancestors(self) -> list[int]:
        """Ancestor sets as bitsets (Python ints): bit j of result[i] is set when j feeds i."""
        result: list[int] = [0] * len(self.nodes)
        for node in self.nodes:
            bits = 0
            for i in node.inputs:
                bits |= result[i] | (1 << i)
            result[node.index] = bits
        return result
