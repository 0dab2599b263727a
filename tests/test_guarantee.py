"""check() never changes the user's model or global state (design.md, Guarantees)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import healthcheck
from tests import zoo


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else (id(p.grad), p.grad.clone()) for p in model.parameters()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
        "py_rng": random.getstate(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        a, b = before["state"][key], after["state"][key]
        assert a.dtype == b.dtype and torch.equal(a, b), key  # byte-identical, incl. num_batches_tracked
    assert before["ids"] == after["ids"]
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert g0[0] == g1[0] and torch.equal(g0[1], g1[1])
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["py_rng"] == after["py_rng"]
    assert before["grad_enabled"] == after["grad_enabled"]


def prepared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A model as users have it mid-project: train mode, some grads, a frozen layer, a hook."""
    model.train()
    model(x).sum().backward()
    next(model.parameters()).requires_grad_(False)
    list(model.modules())[1].register_forward_hook(lambda m, a, o: None)
    return model


@pytest.mark.parametrize("build", [
    lambda: (zoo.UNet(), torch.randn(4, 3, 16, 16)),
    lambda: (zoo.GatedResNet(), torch.randn(4, 16)),  # hooks tracer
    lambda: (zoo.Transformer(zoo.PostLNBlock), torch.randint(0, 100, (2, 12))),
])
def test_check_leaves_model_and_global_state_unchanged(build):
    torch.manual_seed(0)
    model, x = build()
    model = prepared(model, x)
    before = snapshot(model)
    report = healthcheck.check(model, x)
    assert report.architecture.joins
    assert_same(before, snapshot(model))


def test_export_path_leaves_batchnorm_stats_unchanged():
    torch.manual_seed(0)
    model, x = zoo.UNet(), torch.randn(4, 3, 16, 16)
    model = prepared(model, x)
    before = snapshot(model)
    healthcheck.check(model, x, trace="export")
    assert_same(before, snapshot(model))


class FailsHalfway(nn.Module):
    """Changes its own buffer and mode, then raises, on the second forward (during tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls.item() >= 1:
            self.train()
            raise RuntimeError("second call")
        self.calls += 1
        return x + self.fc(torch.relu(self.fc(x)))


def test_state_restored_when_check_fails_halfway():
    model, x = FailsHalfway().eval(), torch.randn(2, 4)
    before = snapshot(model)
    with pytest.raises(healthcheck.UsageError):
        healthcheck.check(model, x, trace="hooks")
    assert_same(before, snapshot(model))


def test_bad_input_leaves_model_unchanged():
    torch.manual_seed(0)
    model, x = zoo.ScaledResNet(), torch.randn(2, 7)
    before = snapshot(model)
    with pytest.raises(healthcheck.UsageError, match="forward raised"):
        healthcheck.check(model, x)
    assert_same(before, snapshot(model))
