"""The one core behind the training-framework callbacks (`healthcheck.plugins.lightning`,
`healthcheck.plugins.huggingface`): a check of the model before the first step, then a
`HealthMonitor` for the steps that follow. An adapter only turns its framework's hooks into these
calls and finds the framework's TensorBoard writer; no adapter measures anything itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthcheck.config import FAIL_LEVELS, Config, load_config
from healthcheck.errors import UsageError
from healthcheck.monitor import HealthError, HealthMonitor, HealthWarning
from healthcheck.records import Report
from healthcheck.report.tensorboard import log_report
from healthcheck.report.text import findings_text
from healthcheck.tensors import to_device


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def training_optimizer(model: nn.Module, optimizers: Any) -> Any:
    """The optimizer among a framework's `optimizers` that trains `model` (a GAN's second optimizer may
    train another part), unwrapped from the framework's wrapper; one optimizer or spec as it is."""
    from healthcheck.api import unwrapped_optimizer

    if optimizers is None or not isinstance(optimizers, (list, tuple)):
        return optimizers
    own = {id(p) for p in model.parameters()}
    for optimizer in map(unwrapped_optimizer, optimizers):
        if isinstance(optimizer, torch.optim.Optimizer) and any(
                id(p) in own for group in optimizer.param_groups for p in group["params"]):
            return optimizer
    return None


@dataclass
class TrainingHealth:
    """What a training callback does, framework-free.

    check: run `healthcheck.check` on the model before the first step, log it (`init/*` tags) and
        warn with its findings; with `fail_on` ("error", "warning", "info") a finding at or above
        that severity raises `HealthError` before any training step. A check that cannot run (the
        example does not fit the model, say) is a warning, and training goes on.
    every, config, monitor_options: passed to `HealthMonitor` (sampling period, rules, on_finding, …).
    """

    check: bool = True
    fail_on: str | None = None
    every: int = 100
    config: Config | None = None
    monitor_options: dict[str, Any] = field(default_factory=dict)
    report: Report | None = field(default=None, init=False)  # the check's, once it has run
    monitor: HealthMonitor | None = field(default=None, init=False)
    _warned_no_forward: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.fail_on is not None and self.fail_on not in FAIL_LEVELS:
            raise ValueError(f"fail_on must be one of {', '.join(FAIL_LEVELS)} or None, not {self.fail_on!r}")
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1, not {self.every}")

    def check_model(self, model: nn.Module, example_inputs: Any, *, writer: Any = None,
                    main_process: bool = True, optimizer: Any = None) -> Report | None:
        """The check before training: on the model's device, logged through `writer`, findings
        warned once (main process), `HealthError` if one is at or above `fail_on` (every process,
        so that all ranks stop together). `optimizer`: the framework's optimizer (or a list of them:
        the first that trains `model` is used; or an OptimizerSpec) for the stability checks; it is
        read, never stepped."""
        if not self.check:
            return None
        if example_inputs is None:
            if main_process:
                warnings.warn("healthcheck: no example input, so no check before training "
                              "(pass example_input=...)", HealthWarning, stacklevel=3)
            return None
        from healthcheck.api import check, optimizer_spec

        config = self.config or load_config(Path.cwd())
        try:
            spec = optimizer_spec(model, training_optimizer(model, optimizer), config)
        except UsageError as exc:  # an optimizer the checks cannot read: the rest of the check still runs
            spec = None
            if main_process:
                warnings.warn(f"healthcheck: stability under the optimizer not assessed: {exc}", HealthWarning,
                              stacklevel=3)
        try:
            report = check(model, to_device(example_inputs, model_device(model)), config=config, optimizer=spec)
        except UsageError as exc:  # a check that cannot run must not stop training: say why, go on
            if main_process:
                warnings.warn(f"healthcheck: no check before training: {exc}", HealthWarning, stacklevel=3)
            return None
        self.report = report
        if writer is not None:
            log_report(report, writer)
            writer.flush()
        failing = self.fail_on is not None and report.fails(self.fail_on)
        if failing:
            raise HealthError(report.findings, f"healthcheck: {report.model.name} is not healthy at initialization "
                                               f"(fail_on={self.fail_on!r}):\n\n{findings_text(report)}")
        if report.findings and main_process:
            warnings.warn(f"healthcheck: {report.model.name} at initialization:\n\n{findings_text(report)}",
                          HealthWarning, stacklevel=3)
        return report

    def start(self, model: nn.Module, *, writer: Any = None, step: int = 0, scaler: Any = None) -> HealthMonitor:
        """A monitor on `model` that logs through `writer` (None: rules only) from training step `step`;
        `scaler`: the framework's GradScaler under mixed precision (monitor_options may name another)."""
        self.close()
        options = dict(self.monitor_options)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        if self.config is not None:
            options.setdefault("config", self.config)
        self.monitor = HealthMonitor(model, every=self.every, writer=writer, **options)
        self.monitor.load_state_dict({"step": step})
        self._warned_no_forward = False
        return self.monitor

    def step(self, loss: torch.Tensor | None = None) -> None:
        """After the backward pass(es) of a training step, before the optimizer steps."""
        if self.monitor is None:
            return
        self.monitor.step(loss)
        history = self.monitor.history
        if (not self._warned_no_forward and history and history[0].measurements is None
                and self.monitor.rank == 0):
            self._warned_no_forward = True
            warnings.warn(f"healthcheck: {type(self.monitor.model).__name__}.forward did not run during the "
                          "sampled training step, so activations are not measured (gradients are); "
                          "pass module= the submodule that the training step calls", HealthWarning, stacklevel=3)

    def after_optimizer_step(self) -> None:
        if self.monitor is not None:
            self.monitor.after_optimizer_step()

    def close(self) -> None:
        """Remove the monitor's hooks and flush its writer (a framework's writer stays open)."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


class HealthView:
    """What a framework callback shows of its `TrainingHealth` (mixed into each callback class)."""

    health: TrainingHealth

    @property
    def report(self) -> Report | None:
        """The report of the check before training (None before it ran, or when it was skipped)."""
        return self.health.report

    @property
    def monitor(self) -> HealthMonitor | None:
        """The monitor while training runs (None before and after)."""
        return self.health.monitor
