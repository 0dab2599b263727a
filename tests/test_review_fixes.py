"""Regression tests for problems found in the review of issues 12, 13 and 15."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from healthcheck import check
from healthcheck.probes.stability import OptimizerSpec, Trial


def _trial(losses: tuple[float, ...]) -> Trial:
    return Trial(len(losses) - 1, losses, None, {}, {}, (), "loss_fn")


def test_trial_ratios_read_a_loss_that_starts_below_zero():
    # a falling loss below zero (Gaussian NLL) is a fall, not a divergence; a positive start is unchanged
    assert _trial((-0.7, -1.0, -1.8)).end_ratio < 1
    assert _trial((-0.7, -1.0, -1.8)).growth == pytest.approx(1.0)
    assert _trial((-1.0, 2.0, 5.0)).end_ratio == pytest.approx(7.0)
    assert _trial((2.0, 4.0, 1.0)).end_ratio == pytest.approx(0.5)
    assert _trial((2.0, 4.0, 1.0)).growth == pytest.approx(2.0)
    assert _trial((2.0, float("inf"))).end_ratio == float("inf")


def test_negative_nll_that_falls_is_not_reported_as_diverging():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    x, target = torch.randn(64, 8), 0.05 * torch.randn(64)

    def nll(out: torch.Tensor) -> torch.Tensor:  # learned variance: the loss starts below zero
        return F.gaussian_nll_loss(out[:, 0], target, out[:, 1].exp() * 0.01)

    report = check(model, x, optimizer="adam", lr=1e-3, loss_fn=nll)
    trial = report.stability.trial
    assert trial.losses[0] < 0 and trial.losses[-1] < trial.losses[0]
    assert not [f for f in report.findings if f.code == "HC502"]


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch without Adafactor")
def test_optimizer_with_tuple_eps_is_read_not_crashed_on():
    # Adafactor's eps is a tuple (None, 1e-3): reading it raised TypeError out of check() and the callbacks
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.01)
    spec = OptimizerSpec.from_optimizer(optimizer)
    assert spec.kind == "adafactor" and spec.lr == 0.01 and spec.eps == 1e-8
    report = check(model, torch.randn(16, 8), optimizer=optimizer)
    assert report.stability.trial is not None and report.stability.trial.steps > 0
    assert not optimizer.state  # read, never stepped


def test_one_cycle_schedule_is_judged_at_its_peak_lr():
    # OneCycleLR sets lr = initial_lr = max_lr/25 and keeps the peak as the group's max_lr
    from healthcheck.api import optimizer_spec
    from healthcheck.config import Config

    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=100)
    assert optimizer_spec(model, optimizer, Config()).lr == pytest.approx(1.0)
    warm = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.optim.lr_scheduler.LinearLR(warm, start_factor=0.1, total_iters=10)
    assert optimizer_spec(model, warm, Config()).lr == pytest.approx(0.5)


def test_final_relu_fitted_to_surrogate_targets_is_not_a_killed_layer():
    # a non-negative regression head (Linear → ReLU as the output) under the surrogate MSE: half the random
    # targets are negative, so its one unit can turn off in the trial (seed 2 did); that was an HC503 error
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.ReLU())
    report = check(model, torch.randn(64, 8), optimizer="adam", lr=1e-2)
    dead = report.stability.trial.dead
    assert [d.at_output for d in dead] == [False, True]
    assert dead[1].dead_after == 1  # the output unit did turn off: the case is still exercised
    assert not [f for f in report.findings if f.code == "HC503"]


def test_stability_checks_queue_no_cuda_seed():
    # torch.manual_seed seeds every CUDA device, or queues a lazy seed_all that a later CUDA initialization
    # applies to the user's generators: the stability checks must seed only what fork_rng restores
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or torch.cuda.is_initialized():
        pytest.skip("needs torch's lazy CUDA seed tracker, CUDA not yet initialized")
    before = tracker.get_calls()
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 4))
    check(model, torch.randn(8, 8), optimizer="sgd", lr=0.1)
    assert tracker.get_calls() == before


def test_hidden_states_of_a_backbone_are_not_read_as_class_logits():
    # a residual stream after the last block (no final norm) is large at init, but it is not logits:
    # there is no uniform guess to compare it with, so no HC504; the same width through a head is read
    from healthcheck.probes.stability import assess_stability

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
    backbone = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    x = 3.0 * torch.randn(4, 16, 64)
    hidden = assess_stability(backbone, (x,), {}, None)
    assert hidden.output.kind == "values" and hidden.output.excess is None
    assert not [f for f in check(backbone, x).findings if f.code == "HC504"]
    head = nn.Linear(64, 64)
    nn.init.normal_(head.weight, std=1.0)
    classifier = nn.Sequential(backbone, head)
    logits = assess_stability(classifier, (x,), {}, None)
    assert logits.output.kind == "classes" and logits.output.excess > 2


def test_an_optimizer_with_probes_off_is_a_usage_error_as_on_the_command_line():
    from healthcheck.errors import UsageError

    model = nn.Linear(4, 2)
    with pytest.raises(UsageError, match="probes=False"):
        check(model, torch.randn(8, 4), optimizer="sgd", lr=0.1, probes=False)


def test_measured_in_place_the_numbers_equal_the_copys_and_the_model_comes_back():
    # on a GPU (and for models that cannot be deep-copied) the trial steps run on the model itself and
    # its state is put back from a host copy: the numbers must equal those measured on a copy
    import copy
    import threading

    from healthcheck.probes.stability import assess_stability

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(16, 16)
    spec = OptimizerSpec.parse("sgd", 0.5, 0.9)
    copied = assess_stability(model, (x,), {}, spec)
    state = copy.deepcopy(model.state_dict())
    model.lock = threading.Lock()  # deepcopy refuses: the in-place path
    in_place = assess_stability(model, (x,), {}, spec)
    assert "copy" in in_place.skipped and "copy" not in copied.skipped
    assert in_place.trial.losses == copied.trial.losses
    assert in_place.sharpness.value == pytest.approx(copied.sharpness.value, rel=1e-5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
