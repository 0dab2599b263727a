"""Stability under the optimizer (healthcheck/probes/stability.py, rules HC501-HC504): the sharpness is
the top Hessian eigenvalue, the limits are where the optimizer's steps stop converging, a step size
that diverges is an error and one that trains is silent, and the user's model and inputs are never
changed."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from healthcheck.errors import UsageError
from healthcheck.probes.stability import NOT_ASSESSED, TRIAL_STEPS, OptimizerSpec, assess_stability
from healthcheck.rules import RuleContext, run_rules


def findings(stability) -> dict[str, str]:
    """code -> severity of the HC5xx findings on these measurements."""
    return {f.code: f.severity for f in run_rules(RuleContext(None, stability=stability), select=("HC5",))}


def regression_data(n: int = 64, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with one dominant direction (a clear spectral gap: power iteration converges fast)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g) * torch.tensor([4.0] + [1.0] * (d - 1))
    return x, torch.randn(n, 1, generator=g)


def test_sharpness_of_linear_regression_is_the_top_hessian_eigenvalue():
    x, y = regression_data()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1)
    loss_fn = lambda out: ((out - y) ** 2).mean()  # noqa: E731 - H = 2/n · [x 1]ᵀ[x 1]
    features = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    hessian = 2 * features.T @ features / len(x)
    top = torch.linalg.eigvalsh(hessian)[-1].item()
    spec = OptimizerSpec.parse("sgd", 0.01)
    result = assess_stability(model, (x,), {}, spec, loss_fn=loss_fn)
    assert result.sharpness.value == pytest.approx(top, rel=1e-4)
    assert result.sharpness.value <= top * (1 + 1e-5)  # a Rayleigh quotient: a lower bound
    assert result.sharpness.converged and not result.sharpness.preconditioned
    assert result.sharpness.ratio == pytest.approx(top / (2 / 0.01), rel=1e-4)
    assert result.sharpness.stable_lr == pytest.approx(2 / top, rel=1e-4)

    # without loss_fn, the surrogate for a one-value output: MSE against seeded unit-variance targets,
    # whose Hessian is the same 2/n·[x 1]ᵀ[x 1] whatever the targets
    surrogate = assess_stability(model, (x,), {}, spec)
    assert surrogate.sharpness.loss == "mse"
    assert surrogate.sharpness.value == pytest.approx(top, rel=1e-4)


@pytest.mark.parametrize("budget", [2, 3, 20])
def test_the_ritz_residual_is_the_uncertainty_of_the_sharpness(monkeypatch, budget):
    """Kaniel-Paige: some eigenvalue of H lies within the residual of the top Ritz value whatever the
    budget; with the default budget the Ritz interval [value, upper] holds λ_max (a crowded spectrum:
    12 input directions of scales 3 → 1, no big gap)."""
    import healthcheck.probes.stability as stability

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 12, generator=g) * torch.linspace(3, 1, 12)
    y = torch.randn(64, 1, generator=g)
    features = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    eigenvalues = torch.linalg.eigvalsh(2 * features.T @ features / len(x))
    monkeypatch.setattr(stability, "SHARPNESS_PRODUCTS", budget)
    for seed in range(3):
        torch.manual_seed(0)
        sharp = assess_stability(nn.Linear(12, 1), (x,), {}, OptimizerSpec.parse("sgd", 0.01), seed=seed,
                                 loss_fn=lambda out: ((out - y) ** 2).mean(), trial_steps=1).sharpness
        assert sharp.value <= eigenvalues[-1].item() * (1 + 1e-5)  # a Rayleigh quotient
        assert (eigenvalues - sharp.value).abs().min().item() <= sharp.residual * (1 + 1e-4) + 1e-6
        assert sharp.upper == pytest.approx(sharp.value + sharp.residual)
        assert sharp.to_json()["upper_ratio"] == pytest.approx(sharp.upper / sharp.limit)
        if budget == 20:  # the default budget
            assert sharp.value <= eigenvalues[-1].item() <= sharp.upper * (1 + 1e-5)
    if budget == 2:
        assert not sharp.converged and sharp.residual > 0


def test_preconditioned_sharpness_for_adam_is_the_top_eigenvalue_of_p_inverse_h():
    x, y = regression_data()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1, bias=False)
    loss_fn = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    xd = x.double()
    hessian = 2 * xd.T @ xd / len(x)

    def top_of(second_moment: torch.Tensor) -> float:
        scale = (second_moment.double().sqrt().flatten() + 1e-8).rsqrt()  # P = √v̂ + ε
        return torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1].item()

    spec = OptimizerSpec.parse("adam", 1e-3)
    # no trial steps: v̂ = g², Adam's after its first step
    gradient = 2 * xd.T @ (xd @ model.weight.detach().double().T - y.double()) / len(x)
    first = assess_stability(model, (x,), {}, spec, loss_fn=loss_fn, trial_steps=0)
    assert first.sharpness.preconditioner == "first step"
    assert first.sharpness.value == pytest.approx(top_of(gradient.square()), rel=1e-3)
    assert first.sharpness.limit == pytest.approx(38 / 1e-3)

    # with trial steps: v̂ of the same Adam after them, and H at the initial weights
    twin = copy.deepcopy(model)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3)
    for _ in range(TRIAL_STEPS):
        adam.zero_grad()
        loss_fn(twin(x)).backward()
        adam.step()
    state = adam.state[twin.weight]
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** state["step"].item())
    after = assess_stability(model, (x,), {}, spec, loss_fn=loss_fn)
    assert after.sharpness.preconditioner == "trial"
    assert after.sharpness.value == pytest.approx(top_of(v_hat), rel=1e-3)


def _quadratic_run(curvature: float, optimizer: torch.optim.Optimizer, w: torch.Tensor, steps: int = 400) -> float:
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * w.square().sum()).backward()
        optimizer.step()
    return w.detach().abs().max().item()


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.5, False), (0.9, True)])
def test_sgd_stability_limit_is_where_steps_on_a_quadratic_stop_converging(momentum, nesterov):
    lr = 0.1
    spec = OptimizerSpec("sgd", lr, momentum=momentum, nesterov=nesterov)
    limit = spec.stability_limit()
    expected = (2 / lr if momentum == 0 else 2 * (1 + momentum) / ((1 + 2 * momentum) * lr) if nesterov
                else 2 * (1 + momentum) / lr)
    assert limit == pytest.approx(expected)
    for factor, converges in ((0.97, True), (1.03, False)):
        w = torch.ones(1, requires_grad=True)
        final = _quadratic_run(factor * limit, spec.build([w]), w)
        assert (final < 1.0) is converges, (factor, final)


def test_adam_and_rmsprop_limits():
    assert OptimizerSpec.parse("adam", 1e-3).stability_limit() == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-3))
    assert OptimizerSpec.parse("adamw", 2e-3, momentum=0.8).stability_limit() == pytest.approx(3.6 / (0.2 * 2e-3))
    assert OptimizerSpec.parse("rmsprop", 0.01, momentum=0.5).stability_limit() == pytest.approx(3.0 / 0.01)
    assert math.isnan(OptimizerSpec.parse("adagrad", 0.01).stability_limit())


def test_from_optimizer_reads_the_hyper_parameters_and_rebuilds_the_same_class():
    w = nn.Parameter(torch.zeros(3))
    spec = OptimizerSpec.from_optimizer(torch.optim.SGD([w], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4))
    assert (spec.kind, spec.lr, spec.momentum, spec.nesterov, spec.weight_decay) == ("sgd", 0.05, 0.9, True, 1e-4)
    adam = OptimizerSpec.from_optimizer(torch.optim.AdamW([w], lr=3e-4, betas=(0.8, 0.95)))
    assert (adam.kind, adam.betas, adam.momentum) == ("adamw", (0.8, 0.95), 0.0)
    rebuilt = adam.build([nn.Parameter(torch.zeros(2))])
    assert type(rebuilt) is torch.optim.AdamW and rebuilt.param_groups[0]["betas"] == (0.8, 0.95)


def mlp(depth: int = 6, width: int = 64, classes: int = 10, head_std: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(32 if i == 0 else width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    head = nn.Linear(width, classes)
    if head_std is not None:
        nn.init.normal_(head.weight, std=head_std)
    return nn.Sequential(*layers, head)


def test_a_step_size_that_diverges_is_an_error_and_one_that_trains_is_silent():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    model = mlp()
    fine = assess_stability(model, (x,), {}, OptimizerSpec.parse("sgd", 0.01, 0.9))
    assert fine.trial.loss_end < fine.trial.loss_start and fine.sharpness.ratio < 1
    assert findings(fine) == {}

    diverging = assess_stability(model, (x,), {}, OptimizerSpec.parse("sgd", 2.0, 0.9))
    assert diverging.sharpness.ratio > 1
    found = findings(diverging)
    assert "error" in found.values(), found
    assert found.get("HC502") == "error" or found.get("HC503") == "error"


def test_output_scale_at_init_a_huge_head_is_an_error_a_large_one_info_a_zero_one_a_uniform_guess():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    huge = assess_stability(mlp(head_std=10.0), (x,), {}, None)
    assert huge.output.excess > 20 and huge.output.head == "12"
    assert findings(huge) == {"HC504": "error"}
    large = assess_stability(mlp(head_std=3.0), (x,), {}, None)
    assert 2 < large.output.excess < 20 and findings(large) == {"HC504": "info"}

    model = mlp()
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    zero = assess_stability(model, (x,), {}, None)
    assert zero.output.expected_loss == pytest.approx(math.log(10), rel=1e-6)
    assert zero.output.excess == pytest.approx(1.0, rel=1e-6)
    assert findings(zero) == {}
    # without an optimizer: no sharpness, no trial, and one note that says so
    assert zero.sharpness is None and zero.trial is None and zero.note == NOT_ASSESSED
    assert "not assessed" in zero.to_json()["note"]


def test_model_inputs_grads_and_rng_are_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    model.eval()
    x = torch.randn(16, 16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    x_before, rng = x.clone(), torch.get_rng_state()
    result = assess_stability(model, (x,), {}, OptimizerSpec.parse("adam", 0.1))
    assert result.trial is not None and result.sharpness is not None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    # deterministic: the same numbers again
    again = assess_stability(model, (x,), {}, OptimizerSpec.parse("adam", 0.1))
    assert again.to_json() | {"seconds": 0} == result.to_json() | {"seconds": 0}


class _RefusesSecondOrder(torch.autograd.Function):
    """Identity whose backward refuses to run: what a kernel without a double backward does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("the double backward of this fused kernel is not implemented")


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated (like some fused kernels). (torch's
    `once_differentiable` would not do: it cuts the second-order graph silently instead of raising.)"""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _RefusesSecondOrder.apply(grad * (1 - y * y))


class _FusedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(_NoDoubleBackward.apply(self.a(x)))


def test_sharpness_is_skipped_with_its_reason_when_double_backward_fails_and_the_rest_stands():
    torch.manual_seed(0)
    result = assess_stability(_FusedNet(), (torch.randn(8, 8),), {}, OptimizerSpec.parse("sgd", 0.1))
    assert result.sharpness is None
    assert "double backward" in result.skipped["sharpness"]
    assert result.trial is not None and result.trial.steps > 0 and result.output is not None


@pytest.mark.parametrize("optimizer, lr, momentum, needle", [
    ("adamm", 0.1, None, "did you mean adam"),
    ("sgd", None, None, "learning rate"),
    ("sgd", -0.1, None, "lr"),
    ("sgd", float("nan"), None, "lr"),
    ("sgd", 0.0, None, "lr"),
    ("sgd", 0.1, 1.0, "momentum"),
    ("sgd", 0.1, -0.5, "momentum"),
    (None, None, 0.9, "momentum"),
    ("", 0.1, None, "optimizer"),
])
def test_parse_rejects_bad_input_with_one_line(optimizer, lr, momentum, needle):
    with pytest.raises(UsageError, match=needle) as err:
        OptimizerSpec.parse(optimizer, lr, momentum)
    assert "\n" not in str(err.value)


def test_parse_defaults():
    assert OptimizerSpec.parse(None, None) is None
    sgd = OptimizerSpec.parse(None, 0.05)
    assert (sgd.kind, sgd.momentum) == ("sgd", 0.0)  # like torch.optim.SGD(params, lr=0.05)
    adam = OptimizerSpec.parse("Adam", 1e-3, 0.8)
    assert (adam.kind, adam.betas[0], adam.momentum) == ("adam", 0.8, 0.0)


@dataclasses.dataclass
class _Output:
    loss: torch.Tensor
    logits: torch.Tensor


class _WithLabels(nn.Module):
    """Returns its own loss when given labels, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x, labels):
        logits = self.net(x)
        return _Output(nn.functional.cross_entropy(logits, labels), logits)


def test_the_outputs_own_loss_is_the_training_loss_and_logits_are_found_by_name():
    torch.manual_seed(0)
    x, labels = torch.randn(16, 8), torch.randint(0, 5, (16,))
    result = assess_stability(_WithLabels(), (), {"x": x, "labels": labels}, OptimizerSpec.parse("sgd", 0.1))
    assert result.sharpness.loss == "output.loss" and result.trial.loss == "output.loss"
    assert result.output.classes == 5 and result.output.head == "net.2"


def test_without_an_optimizer_the_output_scale_runs_on_the_model_and_its_statistics_and_mode_come_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    stats = [b.clone() for b in model.buffers()]
    x = torch.randn(16, 8) * 5 + 3
    result = assess_stability(model, (x,), {}, None)
    assert result.output is not None and result.skipped == {}
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers())) and not model.training
