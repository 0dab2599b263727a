"""Which ops and modules are norms, activations, weights, ...: one table for every tracer."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from healthcheck.graph.ir import Category

_ACT_OPS = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "prelu", "rrelu", "glu",
    "logsigmoid", "softsign", "threshold", "tanhshrink", "swish", "quick_gelu", "gelu_new",
}
_NONNEGATIVE_ACTS = {"relu", "relu6", "sigmoid", "hardsigmoid", "softplus", "threshold"}
_ATTENTION_OPS = {
    "softmax", "log_softmax", "scaled_dot_product_attention", "multi_head_attention_forward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
    "flex_attention",
}
_WEIGHT_OPS = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "embedding", "embedding_bag", "bilinear", "addmm",
}
_NORM_OPS = {
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "native_layer_norm",
    "native_batch_norm", "native_group_norm", "local_response_norm", "cudnn_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_fused_rms_norm",
}
_TRIVIAL_OPS = {
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout",
    "dropout1d", "dropout2d", "dropout3d", "identity", "view", "reshape", "_unsafe_view",
    "permute", "transpose", "t", "contiguous", "clone", "to", "_to_copy", "type", "float",
    "half", "bfloat16", "double", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "expand_as", "getitem", "slice", "select", "narrow", "pad", "constant_pad_nd",
    "reflection_pad1d", "reflection_pad2d", "replication_pad2d", "lift_fresh_copy", "alias",
    "detach", "stochastic_depth", "roll", "movedim", "swapaxes", "view_as", "reshape_as",
    "chunk", "split", "split_with_sizes", "unbind", "tensor_split", "channel_shuffle",
    "pixel_unshuffle", "drop_path", "type_as", "cpu", "cuda", "_assert_tensor_metadata",
    "dropout_", "center_crop", "crop",
}
_POOL_RE = re.compile(r"(max|avg|lp)_pool|adaptive_(max|avg)_pool|max_pool\d?d_with_indices|^am(ax|in)$")
_RESAMPLE_OPS = {"interpolate", "upsample", "pixel_shuffle", "grid_sample"}
_ADD_OPS = {"add", "iadd", "radd"}
_MUL_OPS = {"mul", "imul", "rmul"}
_DIV_OPS = {"div", "truediv", "itruediv"}
_CAT_OPS = {"cat", "concat", "concatenate"}
#: Ops whose output does not depend on the values of their tensor operands (only on shape,
#: dtype or device): data flow stops there.
VALUE_INDEPENDENT_OPS = {
    "size", "sym_size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full",
    "new_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "arange", "shape", "dtype", "device", "is_floating_point", "sym_numel",
    "sym_stride", "stride", "get_device", "__get__", "is_contiguous", "data_ptr", "element_size",
    "storage_offset", "scalar_tensor", "zeros", "ones", "empty", "full", "tensor", "bernoulli",
    "bernoulli_", "empty_strided", "_assert_async", "_assert", "eq_shape",
}


#: Ops that take part of a tensor (a channel or token range, one chunk of a split).
SLICING_OPS = frozenset({"getitem", "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind",
                         "tensor_split"})
#: Elementwise ops: with a parameter operand they are a gain, shift or clamp, never a weight layer
#: (timm's GlobalResponseNorm computes `addcmul(bias, weight, x * n)`).
_ELEMENTWISE_OPS = {
    "addcmul", "addcdiv", "lerp", "sub", "rsub", "where", "clamp", "clip", "maximum", "minimum", "pow", "exp",
    "neg", "abs", "sqrt", "rsqrt", "reciprocal", "square", "sign", "masked_fill", "fmod", "remainder", "floor",
    "round", "log", "mean", "sum", "norm", "linalg_vector_norm", "var", "std", "var_mean", "std_mean", "erf",
}


def normalize_op_name(name: str) -> str:
    """'__iadd__' -> 'add', 'aten.relu_.default' -> 'relu', 'upsample_nearest2d' -> 'upsample'."""
    name = name.rsplit(".", 1)[-1] if name.startswith("aten.") else name
    if name.startswith("aten."):
        name = name[5:]
    if name.startswith("__") and name.endswith("__") and name != "__get__":
        name = name[2:-2]
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]
    if name.startswith("upsample_") or name.startswith("_upsample_"):
        return "upsample"
    return name


def classify_op(name: str, data_arity: int) -> Category:
    """Category of a function/method/ATen op, given how many data tensors it reads."""
    if name in _ADD_OPS:
        return Category.ADD if data_arity >= 2 else Category.SCALE
    if name in _MUL_OPS:
        return Category.GATE if data_arity >= 2 else Category.SCALE
    if name in _DIV_OPS:
        return Category.OTHER if data_arity >= 2 else Category.SCALE
    if name in _CAT_OPS:
        return Category.CONCAT if data_arity >= 2 else Category.TRIVIAL
    if name in _ACT_OPS:
        return Category.ACT
    if name in _ATTENTION_OPS:
        return Category.ATTENTION
    if name in _WEIGHT_OPS:
        return Category.WEIGHT
    if name in _NORM_OPS:
        return Category.NORM
    if name in _TRIVIAL_OPS:
        return Category.TRIVIAL
    if _POOL_RE.search(name):
        return Category.POOL
    if name in _RESAMPLE_OPS:
        return Category.RESAMPLE
    return Category.OTHER


def categorize(name: str, data_arity: int, enclosing: nn.Module | None, touches_param: bool) -> Category:
    """Category of a function/method/ATen op as every tracer records it: by name, overridden by an
    enclosing norm or activation module, and a weight layer when it takes a parameter but is
    otherwise unknown (a wrapped attention function, x @ self.W)."""
    category = override_by_enclosing(enclosing, classify_op(name, data_arity))
    weighted = touches_param and category is Category.OTHER and name not in _ELEMENTWISE_OPS
    return Category.WEIGHT if weighted else category


def value_facts(name: str, args: tuple, kwargs: dict, value: Any) -> dict[str, Any]:
    """`floating` and `axis` of an `OpNode`, from the op's arguments and (real or fake) result."""
    first = value[0] if isinstance(value, (list, tuple)) and value else value
    floating = not isinstance(first, torch.Tensor) or first.is_floating_point() or first.is_complex()
    axis = None
    if name in _CAT_OPS and isinstance(first, torch.Tensor) and first.dim() > 0:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if isinstance(dim, int) and not isinstance(dim, bool):
            axis = dim % first.dim()
    return {"floating": floating, "axis": axis}


def scale_facts(name: str, category: Category, numbers: list[float], kwargs: dict, touches_param: bool
                ) -> tuple[float | None, bool]:
    """(constant factor, multiplied by a parameter?) of a mul/div — or add's `alpha`.

    Adding a number or a bias parameter is a shift, not a scale: neither is reported.
    """
    if category is Category.ADD:
        alpha = kwargs.get("alpha")
        return (float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None), False
    if category is not Category.SCALE or name not in _MUL_OPS | _DIV_OPS:
        return None, False
    scalar = float(numbers[0]) if numbers else None
    if scalar is not None and name in _DIV_OPS:
        scalar = 1.0 / scalar if scalar != 0 else None
    return scalar, touches_param


def is_inplace(target_name: str, kwargs: dict) -> bool:
    """`x.add_(y)`, `F.relu_(x)`, `F.relu(x, inplace=True)`: the first operand is overwritten."""
    return (target_name.endswith("_") and not target_name.endswith("__")) or kwargs.get("inplace") is True


def is_nonnegative_op(name: str) -> bool:
    return name in _NONNEGATIVE_ACTS


_TORCH_NORMS = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Norm classes by name: RMSNorm, timm's RmsNorm/LayerNorm2d/GroupNorm1/BatchNormAct2d/GlobalResponseNorm,
#: FrozenBatchNorm2d, LlamaRMSNorm, T5LayerNorm, LayerNormGeneral, RMSNormGated, ... ("Normalize",
#: "NormedLinear" name other things). A module that holds weight layers of its own (PreNorm(fn),
#: NormMlp) is not one, nor a weight layer named after its weight normalization (NormLinear).
_NORM_NAME = re.compile(r"(?i:norm)(?:[A-Z0-9]\w*)?$")
_WEIGHT_NAME = re.compile(r"(Linear|Conv\w*|Embedding|Attention|Mlp)$", re.IGNORECASE)
_TORCH_ACTS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.PReLU,
    nn.RReLU, nn.GLU, nn.LogSigmoid, nn.Softsign, nn.Threshold, nn.Tanhshrink,
)
_ACT_NAME = re.compile(r"(GELU|ReLU|SiLU|Swish|Activation|Sigmoid|Tanh|Mish)$")
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_WEIGHT_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.Bilinear,
    nn.modules.rnn.RNNBase,
)
_TRIVIAL_MODULES = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.ChannelShuffle, nn.PixelUnshuffle,
)
_POOL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)


def is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS):
        return True
    name = type(module).__name__
    return bool(_NORM_NAME.search(name)) and not _WEIGHT_NAME.search(name) and not any(
        True for child in module.children() for _ in child.parameters())


def is_activation_module(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_ACTS):
        return True
    return (
        bool(_ACT_NAME.search(type(module).__name__))
        and not any(True for _ in module.children())
        and not any(True for _ in module.parameters(recurse=False))
    )


def classify_module(module: nn.Module) -> Category:
    """Category of a leaf module called as one op (fx call_module)."""
    if is_norm_module(module):
        return Category.NORM
    if is_activation_module(module):
        return Category.ACT
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention)):
        return Category.ATTENTION
    if isinstance(module, _WEIGHT_MODULES):
        return Category.WEIGHT
    if isinstance(module, _TRIVIAL_MODULES):
        return Category.TRIVIAL
    if isinstance(module, _POOL_MODULES):
        return Category.POOL
    if isinstance(module, (nn.Upsample, nn.PixelShuffle)):
        return Category.RESAMPLE
    if any(True for _ in module.parameters()):
        return Category.WEIGHT
    return Category.OTHER


def is_nonnegative_module(module: nn.Module) -> bool:
    return isinstance(module, _NONNEGATIVE_MODULES)


def override_by_enclosing(module: nn.Module | None, category: Category) -> Category:
    """Every op inside a norm (or activation) module is that norm: RMSNorm decomposes into
    pow/mean/rsqrt/mul under torch.export, but it is one normalization."""
    if module is None or category in (Category.ADD, Category.CONCAT):
        return category
    if is_norm_module(module):
        return Category.NORM
    if is_activation_module(module):
        return Category.ACT
    return category


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


_TORCH_MODULES_DIR = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_TORCH_MACHINERY = {os.path.join(_TORCH_MODULES_DIR, name) for name in ("module.py", "container.py")}


def is_user_frame(filename: str) -> bool:
    """A frame of model code: the user's, torchvision's, transformers', or torch.nn's own layers
    (nn.TransformerEncoderLayer makes joins too) — not torch's machinery and not healthcheck."""
    if filename.startswith(_TORCH_MODULES_DIR):
        return filename not in _TORCH_MACHINERY
    return not (filename.startswith(_TORCH_DIR) or filename.startswith(_OWN_DIR) or filename.startswith("<"))


def is_own_frame(filename: str) -> bool:
    return filename.startswith(_OWN_DIR)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def pick_source(frames: list[tuple[str, int, str]]) -> str | None:
    """'file:line' for an op, from (file, line, function) frames, innermost last.

    The innermost model-code frame inside a `forward` wins — the line of the block that makes the
    join, even when the add itself sits in a helper (BLOOM's dropout_add, DenseNet's bn_function)
    — else the innermost model-code frame. torch.export records only forward frames; this rule
    gives the same answer for all three tracers.
    """
    user = [(f, n, fn) for f, n, fn in frames if is_user_frame(f)]
    for filename, line, function in reversed(user):
        if function == "forward":
            return f"{filename}:{line}"
    return f"{user[-1][0]}:{user[-1][1]}" if user else None


def source_from_stack_trace(stack_trace: str | None) -> str | None:
    if not stack_trace:
        return None
    return pick_source([(f, int(n), fn) for f, n, fn in _FRAME.findall(stack_trace)])
