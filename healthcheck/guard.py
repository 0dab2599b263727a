"""`preserved(model)`: whatever happens inside, the model and global state come out as they went in.

This is the Guarantee in design.md: parameters, buffers, train/eval mode, requires_grad, .grad,
registered hooks and the global RNG state are restored, also when the body raises.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_hooks", "_load_state_dict_pre_hooks",
)


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    param_data = [p.data for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    hooks = [(m, name, dict(getattr(m, name))) for m in model.modules() for name in _HOOK_DICTS if hasattr(m, name)]
    tensor_hooks = [(p, dict(p._backward_hooks)) if p._backward_hooks is not None else (p, None) for p in params]
    rng = _rng_state()
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_enabled)
        _set_rng_state(rng)
        for module, training in modes:
            module.training = training
        for p, flag, grad, data in zip(params, requires_grad, grads, param_data):
            p.requires_grad_(flag)
            p.grad = grad
            if p.data is not data:
                p.data = data
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        for module, name, saved in hooks:
            live = getattr(module, name)
            if dict(live) != saved:
                live.clear()
                live.update(saved)
        for p, saved in tensor_hooks:
            if saved is None:
                p._backward_hooks = None
            elif dict(p._backward_hooks or {}) != saved:
                p._backward_hooks.clear()
                p._backward_hooks.update(saved)


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
