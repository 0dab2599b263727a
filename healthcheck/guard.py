"""`preserved(model)`: whatever happens inside, the model and global state come out as they went in.

This is the Guarantee in design.md: parameters, buffers, train/eval mode, requires_grad, .grad,
registered hooks and the global RNG state are restored, also when the body raises.

What a forward may change, and how each is undone:
- the module's attributes (`self.count = self.count + 1` on a buffer, `self.cache = {...}`, a
  submodule swapped, weight_norm's recomputed `weight`, a LazyModule's `in_features`, hook handles,
  `training`): every module's `__dict__`, and the contents of its dicts/lists/sets (`_parameters`,
  `_buffers`, `_modules`, hook dicts, user containers), are restored by object identity;
- the module's class (a LazyModule becomes its `cls_to_become`; parametrize swaps classes) and a
  parameter's class (`UninitializedParameter` is materialized in place): restored, so a lazy model
  comes back still lazy and a later forward materializes it as usual;
- tensor values changed in place (BatchNorm running stats, `Embedding(max_norm=…)` renormalising
  rows, `w.data.clamp_()`, spectral_norm's `u`/`v`, EMA buffers): every parameter, buffer and plain
  tensor attribute is copied by value on entry and copied back where it differs (`.data.copy_`, so
  the tensor object, its storage and its version counter stay the user's); a `.data = …` reassignment
  gets its original storage back;
- `.grad` objects are taken off the parameters for the duration, so nothing inside can accumulate
  into them, and put back; `requires_grad`, tensor hooks, module-global hooks, grad mode and the
  torch/Python/NumPy/CUDA RNG states are restored.

Cost: one copy of the state's values (parameters, buffers, tensor attributes); for tensors on an
accelerator the copy lives in host memory, so the device's peak memory does not grow.

`copy_inputs(value)` gives the model's example inputs as fresh tensors (same containers), so that an
in-place op on the input inside forward (`x.mul_(2)`, `relu(x, inplace=True)`) never reaches the
caller's tensors.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

#: torch's own module-global hook registries (`register_module_forward_hook` and friends)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs", "_global_module_registration_hooks",
    "_global_parameter_registration_hooks", "_global_buffer_registration_hooks",
)
#: the attributes every nn.Module has (parameters, buffers, submodules, hook dicts, training)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: how deep tensors are looked for inside plain container attributes (`self.cache = {"k": [t]}`)
_CONTAINER_DEPTH = 3


@dataclass
class _TensorState:
    """One tensor the model holds (parameter, buffer or plain attribute), as it was on entry."""

    tensor: torch.Tensor
    cls: type
    data: torch.Tensor | None  # `tensor.data` on entry: a view of the original storage, to undo `.data = …`
    value: torch.Tensor | None  # copy by value; None for uninitialized (lazy) or data-less tensors
    requires_grad: bool
    grad: torch.Tensor | None
    hooks: dict | None  # tensor.register_hook
    post_accumulate_hooks: dict | None


@dataclass
class _ModuleState:
    module: nn.Module
    cls: type
    attributes: dict[str, Any]
    # contents of the module's mutable containers (its own dicts and user ones), keyed by attribute
    contents: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Snapshot:
    modules: list[_ModuleState]
    tensors: list[_TensorState]
    global_hooks: list[tuple[dict, dict]]
    rng: dict
    grad_enabled: bool

    def copy_values(self) -> None:
        """Copy the values of the tensors taken without them, to be restored on exit."""
        for state in self.tensors:
            if state.value is None:
                state.value = _value_of(state.tensor)


@contextmanager
def preserved(model: nn.Module, copy_parameters: bool = True) -> Iterator[_Snapshot]:
    """`copy_parameters=False`: the parameters' values are not copied on entry (buffers and other tensors
    still are): a body that traces on fake tensors never writes them (healthcheck.graph.tracers swaps
    them for fake copies), and copying a large model's weights costs seconds and its size in memory.
    The body calls `snapshot.copy_values()` before anything that may write them."""
    snapshot = _take(model, copy_parameters)
    try:
        yield snapshot
    except BaseException:
        _restore(snapshot, raise_failure=False)  # the body's exception is the one the caller needs
        raise
    _restore(snapshot)


# --- snapshot -----------------------------------------------------------------------------------

def _take(model: nn.Module, copy_parameters: bool = True) -> _Snapshot:
    modules = [_module_state(m) for m in model.modules()]
    tensors: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        tensors.setdefault(id(t), t)
    for state in modules:  # plain tensor attributes, also inside containers (`self.cache = {"k": t}`)
        for name, value in state.attributes.items():
            if name not in _MODULE_INTERNALS:
                for t in _tensors_in(value, _CONTAINER_DEPTH):
                    tensors.setdefault(id(t), t)
    parameters = {id(p) for p in model.parameters()}
    tensor_states = [_tensor_state(t, copy_parameters or id(t) not in parameters) for t in tensors.values()]
    module_globals = vars(nn.modules.module)
    global_hooks = [(module_globals[n], dict(module_globals[n])) for n in _GLOBAL_HOOK_DICTS
                    if isinstance(module_globals.get(n), dict)]
    snapshot = _Snapshot(modules, tensor_states, global_hooks, _rng_state(), torch.is_grad_enabled())
    # last, once nothing above can fail and lose them: nothing inside may accumulate into the user's .grad
    for state in tensor_states:
        if state.grad is not None:
            state.tensor.grad = None
    return snapshot


def _module_state(module: nn.Module) -> _ModuleState:
    attributes = dict(vars(module))
    contents = {name: _contents(value) for name, value in attributes.items() if _is_mutable_container(value)}
    return _ModuleState(module, type(module), attributes, contents)


def _is_mutable_container(value: Any) -> bool:
    return isinstance(value, (dict, list, set))


def _contents(container: Any) -> Any:
    if isinstance(container, dict):
        return list(container.items())
    return list(container)


def _tensors_in(value: Any, depth: int) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, Mapping):
        for item in list(value.values()):
            yield from _tensors_in(item, depth - 1)
    elif depth > 0 and isinstance(value, (list, tuple, set)):
        for item in list(value):
            yield from _tensors_in(item, depth - 1)


def _value_of(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of the tensor's value; None for lazy and meta tensors (no value) and exotic subclasses."""
    if isinstance(t, UninitializedTensorMixin) or t.is_meta:
        return None
    try:
        return t.detach().to("cpu", copy=True) if t.device.type != "cpu" else t.detach().clone()
    except (RuntimeError, NotImplementedError, TypeError):  # exotic subclasses: identity is still restored
        return None


def _tensor_state(t: torch.Tensor, copy_value: bool = True) -> _TensorState:
    lazy = isinstance(t, UninitializedTensorMixin)
    data = None
    try:
        # a lazy tensor's data is an empty tensor (an UninitializedBuffer's .data is lazy itself)
        data = torch.empty(0, dtype=t.dtype, device=t.device) if lazy else t.data
    except (RuntimeError, NotImplementedError, TypeError):  # exotic subclasses: identity is still restored
        pass
    value = _value_of(t) if copy_value else None
    hooks = getattr(t, "_backward_hooks", None)
    post = getattr(t, "_post_accumulate_grad_hooks", None)
    grad = t.grad if t.is_leaf and not lazy else None  # .grad of a non-leaf: always None, and warns
    return _TensorState(t, type(t), data, value, t.requires_grad, grad, None if hooks is None else dict(hooks),
                        None if post is None else dict(post))


# --- restore ------------------------------------------------------------------------------------

def _restore(snapshot: _Snapshot, raise_failure: bool = True) -> None:
    """Undo everything; each step is independent, so that one failure does not leave the rest changed.
    The first failure is raised at the end."""
    failures: list[BaseException] = []

    def attempt(step: Any, *args: Any) -> None:
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - keep restoring; report after
            failures.append(exc)

    attempt(torch.set_grad_enabled, snapshot.grad_enabled)
    attempt(_set_rng_state, snapshot.rng)
    for state in snapshot.modules:
        attempt(_restore_module, state)
    for state in snapshot.tensors:
        attempt(_restore_tensor, state)
    for live, saved in snapshot.global_hooks:
        attempt(_restore_container, live, list(saved.items()))
    if failures and raise_failure:
        raise RuntimeError(f"healthcheck could not restore the model's state: {failures[0]}") from failures[0]


def _restore_module(state: _ModuleState) -> None:
    module = state.module
    if type(module) is not state.cls:
        module.__class__ = state.cls
    live = vars(module)
    for name in [n for n in live if n not in state.attributes]:
        del live[name]
    for name, value in state.attributes.items():
        if live.get(name, _MISSING) is not value:
            live[name] = value
    for name, contents in state.contents.items():
        _restore_container(state.attributes[name], contents)


_MISSING = object()


def _restore_container(container: Any, contents: list) -> None:
    """Put `contents` back into `container` in place (compared by identity: values may be tensors)."""
    if isinstance(container, dict):
        now = list(container.items())
        if len(now) != len(contents) or any(k1 is not k2 and k1 != k2 or v1 is not v2
                                            for (k1, v1), (k2, v2) in zip(now, contents)):
            container.clear()
            container.update(contents)
    elif isinstance(container, list):
        if len(container) != len(contents) or any(a is not b for a, b in zip(container, contents)):
            container[:] = contents
    elif isinstance(container, set):
        if container != set(contents):
            container.clear()
            container.update(contents)


def _restore_tensor(state: _TensorState) -> None:
    t = state.tensor
    if issubclass(state.cls, UninitializedTensorMixin):
        if type(t) is not state.cls:  # materialized inside: empty data back first, then lazy again
            t.grad = None
            if state.data is not None:
                t.data = state.data
            t.__class__ = state.cls
    else:
        if state.data is not None and not _same_storage(t, state.data):
            t.data = state.data
        if type(t) is not state.cls:
            t.__class__ = state.cls
    if state.value is not None:
        saved = state.value.to(t.device) if state.value.device != t.device else state.value
        if not _bitwise_equal(t.detach(), saved):
            with torch.no_grad():
                t.data.copy_(saved)
    if t.requires_grad != state.requires_grad:
        t.requires_grad_(state.requires_grad)
    if t.is_leaf and not isinstance(t, UninitializedTensorMixin) and t.grad is not state.grad:
        t.grad = state.grad
    for name, saved_hooks in (("_backward_hooks", state.hooks), ("_post_accumulate_grad_hooks",
                                                                 state.post_accumulate_hooks)):
        live = getattr(t, name, None)
        if saved_hooks is None:
            if live is not None:
                setattr(t, name, None)
        elif live is None:
            setattr(t, name, type(saved_hooks)(saved_hooks))
        else:
            _restore_container(live, list(saved_hooks.items()))


def _same_storage(t: torch.Tensor, data: torch.Tensor) -> bool:
    try:
        return (t.dtype == data.dtype and t.device == data.device and t.shape == data.shape
                and t.stride() == data.stride() and t.data_ptr() == data.data_ptr())
    except (RuntimeError, NotImplementedError):
        return t.dtype == data.dtype and t.shape == data.shape


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored (a NaN equals itself; -0.0 is not 0.0): torch.equal on the raw bytes where possible."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        try:
            integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.contiguous().view(integer), b.contiguous().view(integer))
        except (KeyError, RuntimeError):
            pass
    try:
        return torch.equal(a, b)
    except (RuntimeError, NotImplementedError, TypeError):  # cannot compare: copy back, to be sure
        return False


# --- inputs -------------------------------------------------------------------------------------

def copy_inputs(value: Any) -> Any:
    """`value` (tensors in tuples, lists, dicts, mappings, named tuples, dataclasses) with every tensor
    replaced by a fresh copy: detached from the caller's graph (a probe's backward never reaches
    the caller's `.grad`), same `requires_grad`, same strides."""
    if isinstance(value, torch.Tensor):
        try:
            copied = value.detach().clone()
        except (RuntimeError, NotImplementedError):
            return value
        if value.requires_grad and (copied.is_floating_point() or copied.is_complex()):
            copied.requires_grad_(True)
        return copied
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(copy_inputs(v) for v in value))
    if isinstance(value, (list, tuple)):
        items = [copy_inputs(v) for v in value]
        try:
            return type(value)(items)
        except TypeError:
            return list(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        items = {k: copy_inputs(v) for k, v in value.items()}
        try:
            return type(value)(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return dataclasses.replace(value, **{f.name: copy_inputs(getattr(value, f.name))
                                                 for f in dataclasses.fields(value) if f.init})
        except (TypeError, ValueError):
            return value
    return value


# --- global RNG ---------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
