"""Structure without weights: `check(probes=False)` and `--no-probes` trace on fake tensors.

The structural rules need the graph (joins, depth, norms), never a weight's value. So the tracers run
with `fake=True` (healthcheck.graph.tracers): fx propagates fake tensors, torch.export fakes the
parameters itself, and the hooks recorder runs the forward under `FakeTensorMode`. No kernel
computes, nothing is allocated for activations, and a model whose weights were never materialized
(built under `torch.device("meta")`, or from a config on meta) is traced like one built for real:
its example inputs are moved to the meta device, where every shape still follows.

Where fake tensors cannot follow a model with real weights (an op with no fake kernel, a forward
that reads a value: `.item()`, `if mask.all():`), `structure_without_weights` says why and the caller
runs the real forward as before. A model on meta has no values to fall back on: one clear UsageError.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

from healthcheck.errors import UsageError, describe
from healthcheck.graph.architecture import Architecture, architecture_of
from healthcheck.graph.tracers import NeedsRealForward, fake_values, trace
from healthcheck.loading import expected_input
from healthcheck.tensors import forward_kwargs, tensors_of, to_device

#: the key under which ModelInfo.trace_failures says why the real forward ran after all
FAKE_FAILURE_KEY = "fake tensors"


@dataclass
class FakeStructure:
    architecture: Architecture | None  # None: fake tensors could not follow the model (see `reason`)
    reason: str | None = None  # why the model must run on real tensors


def on_meta_device(model: nn.Module) -> bool:
    """Whether some parameter or buffer of the model is on the meta device (has no values)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def structure_without_weights(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                              methods: tuple[str, ...]) -> FakeStructure:
    """The architecture, traced on fake tensors (the caller guards the model's state and sets eval).
    On a model with real weights that fake tensors cannot follow, FakeStructure(None, why)."""
    meta = on_meta_device(model)
    if any(isinstance(t, UninitializedTensorMixin) for t in itertools.chain(model.parameters(), model.buffers())):
        if meta:
            raise UsageError("the model has both lazy modules (LazyLinear, ...) and weights on the meta device; "
                             "give the lazy modules their shapes first")
        return FakeStructure(None, "lazy modules take their shapes from a real forward")
    if meta:  # the user's real token ids or images: on meta only their shapes and dtypes remain
        args, kwargs = to_device(args, torch.device("meta")), to_device(kwargs, torch.device("meta"))
    try:
        result = trace(model, args, kwargs, methods, fake=True)
    except NeedsRealForward as exc:
        return FakeStructure(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - the last tracer's failure: say what the forward does
        if not meta:
            return FakeStructure(None, f"no tracer could follow the model on fake tensors: {describe(exc)}")
        validate_fake_forward(model, args, kwargs)
        raise UsageError(f"could not trace the model ({', '.join(methods)}) with its weights on the meta device: "
                         f"{describe(exc)}") from exc
    return FakeStructure(architecture_of(model, result))


def validate_fake_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """`validate_forward` on fake tensors: a failure of the forward as one clear UsageError (values,
    NaN among them, are not there to check)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = " and ".join(str(list(t.shape)) for t in tensors_of((args, kwargs))) or "no tensors"
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fake_args, fake_kwargs = fake_values(mode, (args, kwargs))
        with mode, torch.no_grad():
            output = model(*fake_args, **forward_kwargs(model, fake_kwargs))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises is the user's to see
        if _reads_values(exc):
            raise UsageError(f"the model's forward reads tensor values ({describe(exc)}), which weights on the "
                             "meta device do not have: build the model on the CPU (a config with fewer layers "
                             "keeps the structure) to check its structure") from exc
        raise UsageError(f"the model's forward raised {describe(exc)} — on example input of shape {shapes} "
                         f"({expected_input(model)})") from exc
    if not any(t.is_floating_point() for t in tensors_of(output)):
        raise UsageError("the model's forward returned no floating-point tensor")


def _reads_values(exc: BaseException) -> bool:
    """A data-dependent op: `.item()`, `bool(t)`, nonzero, or a meta tensor asked for its data."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException)):
        return True
    text = str(exc)
    return "meta tensor" in text or "data-dependent" in text.lower() or "item()" in text


def weights_used(model: nn.Module, fake: FakeStructure | None) -> str:
    """ModelInfo.weights: "real" (the model ran on them), "unread" (traced on fake tensors) or "not
    materialized" (on the meta device)."""
    if fake is None or fake.architecture is None:
        return "real"
    return "not materialized" if on_meta_device(model) else "unread"
