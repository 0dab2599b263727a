"""HealthMonitor calibration (issue 13, item 5): a NaN/Inf is never missed, whatever path it takes and
however the loop ends; a run that trains stays quiet at the default thresholds; a diverging run is
flagged before its loss goes non-finite. Every case is a real (tiny) training loop on scikit-learn's
digits; the thresholds themselves come from benchmarks/trainability/monitor_study.py (MONITOR.md)."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import textwrap
import warnings
from functools import cache

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from healthcheck.config import Config
from healthcheck.monitor import HealthError, HealthMonitor, HealthWarning
from healthcheck.monitor.findings import FindingTracker
from healthcheck.monitor.samples import DEFAULT_SELECT
from healthcheck.records import Finding, Location
from tests.helpers import ROOT


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def batches(steps: int, size: int = 64, seed: int = 0):
    x, y = digits()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (size,), generator=generator)
        yield x[index], y[index]


def mlp(depth: int = 3, width: int = 32, seed: int = 0) -> nn.Sequential:
    """He-initialized ReLU MLP on the 64 pixels, zero biases (their update ratio is not a weight's)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


class Seen:
    """on_finding callback: (code, severity, event) of everything the monitor reported."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, finding: Finding, event: str) -> None:
        self.events.append((finding.code, finding.severity, event))

    def codes(self, at_least: str = "warning") -> set[str]:
        levels = ("error",) if at_least == "error" else ("error", "warning")
        return {code for code, severity, event in self.events if event == "appeared" and severity in levels}


# -- 1. a NaN/Inf is never missed ------------------------------------------------------------------

def poison_loss(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")


def nan_gradient_hook(model: nn.Module) -> None:
    """A NaN that appears only in backward (the loss stays finite): a NaN in the head's gradient."""
    model[-1].weight.register_hook(lambda grad: grad * float("nan"))


@pytest.mark.parametrize("path", ["loss", "gradient_only", "weights_only", "loss_not_given"])
@pytest.mark.parametrize("after", [False, True], ids=["step_only", "after_optimizer_step"])
def test_a_nan_on_an_unsampled_last_step_is_reported_when_the_loop_stops(path, after):
    """The hardest case: the NaN comes on a step the monitor does not sample and the loop ends right
    after it (the user's loop breaks on the NaN, or it was the last step), so no later sample or
    loss shows it; close() must."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = Seen()
    monitor = HealthMonitor(model, every=10, on_finding=seen)
    for step, (x, y) in enumerate(batches(14)):
        last = step == 13  # not a sampled step (every=10)
        if last and path == "gradient_only":
            nan_gradient_hook(model)
        loss = F.cross_entropy(model(x), y)
        if last and path == "loss":
            loss = poison_loss(loss)
        loss.backward()
        monitor.step(None if path == "loss_not_given" else loss)
        if last and path in ("weights_only", "loss_not_given"):
            optimizer.param_groups[0]["lr"] = float("nan")  # the step itself makes the weights NaN
        optimizer.step()
        optimizer.zero_grad()
        if after:
            monitor.after_optimizer_step()
        assert "HC401" not in seen.codes(), f"HC401 before the NaN (step {step})"
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the NaN reached the weights
    monitor.close()
    assert ("HC401", "error", "appeared") in seen.events
    where = monitor.history[-1].nonfinite
    assert "weights" in where and (path != "loss" or "loss" in where)


def test_a_nan_is_reported_when_the_loop_breaks_without_stepping_and_raises_with_raise():
    """The loop sees the NaN loss itself and breaks before optimizer.step(): weights are finite, the
    loss (and gradients) are not; `with HealthMonitor(..., on_finding="raise")` raises HC401 at exit."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(HealthError, match="HC401"):
        with HealthMonitor(model, every=10, on_finding="raise") as monitor:
            for step, (x, y) in enumerate(batches(30)):
                loss = F.cross_entropy(model(x), y)
                if step == 17:
                    loss = poison_loss(loss)
                loss.backward()
                monitor.step(loss)
                if not torch.isfinite(loss):
                    break
                optimizer.step()
                optimizer.zero_grad()
    assert monitor.history[-1].nonfinite[:2] == ["loss", "gradients"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_is_reported_at_the_next_sample_when_the_loop_stops_calling_after_optimizer_step():
    """After a NaN at an unsampled step the loop keeps calling step() but no longer after_optimizer_step()
    (it skips its optimizer on non-finite losses): the next sample reports it, before close()."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = Seen()
    monitor = HealthMonitor(model, every=5, on_finding=seen)
    for step, (x, y) in enumerate(batches(12)):
        loss = F.cross_entropy(model(x), y)
        if step >= 7:
            loss = poison_loss(loss)
        loss.backward()
        monitor.step(loss)
        if torch.isfinite(loss):
            optimizer.step()
            monitor.after_optimizer_step()
        optimizer.zero_grad()
        if step == 11:
            assert ("HC401", "error", "appeared") in seen.events  # at the sample of step 10
    monitor.close()
    assert [s.step for s in monitor.history if s.nonfinite] == [10]  # step 11 is read with sample 10


def test_a_run_that_ends_without_close_reports_its_nan_at_interpreter_exit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch.nn import functional as F
        from healthcheck.monitor import HealthMonitor

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = HealthMonitor(model, every=10)
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        for step in range(14):
            loss = F.cross_entropy(model(x), y) * (float("nan") if step == 12 else 1.0)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
        print("done")  # the script returns: no close(), no `with`
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
    assert "HC401 appeared" in result.stderr and "NaN or Inf" in result.stderr, result.stderr[-2000:]


def test_overflow_steps_a_grad_scaler_skips_are_not_reported_even_on_the_last_step():
    """With scaler=, Inf gradients on a step the scaler skips are the scaler working (not a NaN),
    also when that step is the last one and close() looks at the gradients."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen = Seen()
    with HealthMonitor(model, every=10, on_finding=seen, scaler=scaler) as monitor:
        for step, (x, y) in enumerate(batches(14)):
            loss = F.cross_entropy(model(x), y)
            if step in (5, 13):  # unsampled steps whose scaled gradients overflow float32
                loss = loss * 1e35
            scaler.scale(loss).backward()
            monitor.step(loss)
            scaler.step(optimizer)
            scaler.update()
            if step < 13:
                optimizer.zero_grad()
    assert not torch.isfinite(model[-1].weight.grad).all()  # the last step's Inf is still there
    assert seen.events == [] and all(s.nonfinite == [] for s in monitor.history)
    assert scaler.get_scale() == 2.0**14  # both overflow steps were skipped


# -- 2. runs that train stay quiet; a diverging run is flagged before it diverges -------------------

class PreNormBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: HealthMonitor, steps: int) -> list[float]:
    losses = []
    for x, y in batches(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


@pytest.mark.parametrize("case", ["mlp_sgd_momentum", "residual_preln_adam"])
def test_a_run_that_trains_raises_nothing_at_the_default_thresholds(case):
    if case == "mlp_sgd_momentum":  # the study's recipe: SGD, momentum 0.9, lr 0.05
        model = mlp(depth=4, width=64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), *[PreNormBlock(64) for _ in range(4)], nn.Linear(64, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with HealthMonitor(model, every=10, on_finding="raise", fail_on="warning", figure_every=0) as monitor:
        losses = train(model, optimizer, monitor, 200)
    assert losses[-1] < 0.3 * losses[0]  # it did train
    assert len(monitor.history) == 20


def test_a_diverging_run_is_flagged_before_its_loss_goes_non_finite():
    """A He-initialized ReLU MLP (every init-time measurement healthy) at a learning rate it cannot
    take (SGD 0.5, momentum 0.9): the updates move the weights by over 5% per step on consecutive
    samples (HC403) several steps before the loss overflows."""
    model = mlp(depth=4, width=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    seen = Seen()
    flagged_at = None
    losses = []
    with HealthMonitor(model, every=5, on_finding=seen, figure_every=0) as monitor:
        for step, (x, y) in enumerate(batches(30)):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
            monitor.after_optimizer_step()
            if flagged_at is None and "HC403" in seen.codes():
                flagged_at = step
            losses.append(loss.item())
    first_nonfinite = next(step for step, value in enumerate(losses) if not math.isfinite(value))
    assert flagged_at is not None and flagged_at < first_nonfinite, (flagged_at, first_nonfinite, seen.events)
    assert "HC401" in seen.codes("error")


# -- 3. how a finding appears: persistence, escalation, one identity per model-wide finding ------------

def finding(code: str, severity: str, module: str = "(root)") -> Finding:
    return Finding(code, severity, f"{code} {severity}", Location(module))


def test_a_warning_must_persist_an_error_appears_at_once_and_an_escalation_is_reported():
    tracker = FindingTracker(Config(select=DEFAULT_SELECT), "ignore", "error", rank=0)
    assert tracker.events([finding("HC404", "warning")]) == []  # one sample: a flicker of the batch
    assert tracker.events([]) == []
    assert tracker.events([finding("HC404", "warning")]) == []
    appeared = tracker.events([finding("HC404", "warning", "body.3")])  # the worst layer moved: same finding
    assert [(f.code, f.severity, e) for f, e in appeared] == [("HC404", "warning", "appeared")]
    assert [e for _, e in tracker.events([finding("HC404", "error")])] == ["appeared"]  # escalated
    assert tracker.events([finding("HC404", "warning")]) == []  # back to a warning: nothing new
    assert tracker.events([]) == []  # one sample without it does not clear it
    assert [e for _, e in tracker.events([])] == ["cleared"]
    assert [e for _, e in tracker.events([finding("HC403", "error")])] == ["appeared"]
    assert [e for _, e in tracker.events([finding("HC401", "error")])] == ["appeared"]  # HC403 is kept
    assert [(f.code, e) for f, e in tracker.events([finding("HC401", "error")])] == [("HC403", "cleared")]


# -- 4. a loss that does not move (HC405) ------------------------------------------------------------

def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: HealthMonitor, steps: int,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, batch: int = 64) -> list[float]:
    losses = []
    for x, y in batches(steps, size=batch):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


def test_a_run_whose_loss_does_not_move_gets_hc405():
    """SGD at lr 1e-5 on a healthy MLP: the weights barely move and the loss sits at its initial
    value; HC405 appears once the window has passed (step ≥ 50, persist 2 → the sample of step 60)."""
    model = mlp(depth=3, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    seen = Seen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        with HealthMonitor(model, every=10, on_finding=seen, figure_every=0) as monitor:
            losses = train_loop(model, optimizer, monitor, 80)
    assert abs(losses[-1] - losses[0]) < 0.1 * losses[0]  # it did not train
    assert ("HC405", "warning", "appeared") in seen.events, seen.events
    with warnings.catch_warnings():  # the same run, judged before the window has passed: nothing
        warnings.simplefilter("ignore", HealthWarning)
        early = Seen()
        model = mlp(depth=3, width=32)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        with HealthMonitor(model, every=10, on_finding=early, figure_every=0) as monitor:
            train_loop(model, optimizer, monitor, 55)
    assert "HC405" not in early.codes()


def test_a_long_warm_up_from_lr_zero_is_waited_out():
    """A healthy MLP whose learning rate warms up linearly from 0 over 5000 steps: after 120 steps the
    loss has not moved, but the update size is still growing, so HC405 waits. The same run with the
    warm-up guard turned off (growing_updates=1e9) is reported: the guard is what holds it back."""
    def run(options: dict) -> tuple[Seen, list[float]]:
        model = mlp(depth=4, width=64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 5000))
        seen = Seen()
        config = Config(select=DEFAULT_SELECT, rule_options={"HC405": options})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HealthWarning)  # "no parameter changed" at lr 0
            with HealthMonitor(model, every=10, on_finding=seen, figure_every=0, config=config) as monitor:
                losses = train_loop(model, optimizer, monitor, 120, scheduler)
        return seen, losses

    seen, losses = run({})
    assert "HC405" not in seen.codes(), seen.events
    unguarded, _ = run({"growing_updates": 1e9})
    assert "HC405" in unguarded.codes(), unguarded.events


def test_a_noisy_but_decreasing_loss_is_not_reported():
    """Batches of 4 make the sampled loss jump by ±1 from sample to sample while it falls in trend:
    the fall's uncertainty is measured from that noise, and a fall that may be real is not reported."""
    model = mlp(depth=3, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen = Seen()
    with HealthMonitor(model, every=10, on_finding=seen, figure_every=0) as monitor:
        losses = train_loop(model, optimizer, monitor, 200, batch=4)
    sampled = [s.loss for s in monitor.history]
    jumps = [abs(b - a) for a, b in zip(sampled, sampled[1:])]
    assert statistics.median(jumps) > 0.2  # noisy
    assert statistics.mean(losses[-50:]) < 0.7 * statistics.mean(losses[:10])  # and decreasing
    assert "HC405" not in seen.codes(), seen.events


def test_hc405_reads_the_noise_of_the_loss_not_a_fixed_tolerance():
    """The rule itself on a synthetic trend: a flat loss with tiny noise is reported; the same mean
    fall buried in noise of ±0.5 is not (uncertain), nor a steady fall of 3% per sample (a trend,
    not noise: its successive differences are equal)."""
    from healthcheck.monitor.samples import LossPoint, TrainingSample
    from healthcheck.rules.registry import RuleContext
    from healthcheck.rules.training import HC405

    def fires(losses: list[float]) -> bool:
        trend = [LossPoint(10 * k, value, 1e-3) for k, value in enumerate(losses)]
        sample = TrainingSample(step=trend[-1].step, previous_step=trend[-2].step, measurements=None,
                                loss=losses[-1], loss_trend=trend)
        context = RuleContext(None, None, sample)
        return bool(list(HC405.check(context, HC405.options)))

    generator = torch.Generator().manual_seed(0)
    flat = (2.3 + 0.01 * torch.randn(8, generator=generator)).tolist()
    noisy = (2.2 + 0.5 * torch.randn(8, generator=generator)).tolist()
    steady = [2.3 * 0.97 ** k for k in range(8)]
    assert fires(flat)
    assert not fires(noisy)
    assert not fires(steady)
