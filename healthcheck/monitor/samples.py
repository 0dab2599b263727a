"""What the monitor hands its users: the sample record, the warning and the error."""

from __future__ import annotations

from dataclasses import dataclass, field

from healthcheck.probes.measure import Measurements
from healthcheck.records import Finding

#: rules the monitor evaluates by default: forward signal, gradients, training
DEFAULT_SELECT = ("HC201", "HC202", "HC203", "HC205", "HC301", "HC302", "HC4")


class HealthWarning(UserWarning):
    """A health finding appeared or cleared during training (on_finding="warn")."""


class HealthError(RuntimeError):
    """Raised on a finding at or above `fail_on`: by the monitor when on_finding="raise", by the
    training callbacks' check before the first step."""

    def __init__(self, findings: list[Finding], message: str | None = None) -> None:
        super().__init__(message or "; ".join(f"{f.code} {f.message}" for f in findings))
        self.findings = findings


@dataclass
class LossPoint:
    """One sample's loss and median update ratio over the weight matrices (HC405 reads the trend)."""

    step: int
    loss: float
    update_ratio: float | None = None


@dataclass
class TrainingSample:
    """What the monitor measured on one sampled step (host values)."""

    step: int
    previous_step: int
    measurements: Measurements | None  # depth profile of the sampled forward
    grad_norm: dict[str, float] = field(default_factory=dict)  # per parameter tensor (unscaled under AMP)
    weight_norm: dict[str, float] = field(default_factory=dict)
    update_ratio: dict[str, float] = field(default_factory=dict)  # ‖Δw‖/‖w‖ (the latest measured step)
    tensor_ndim: dict[str, int] = field(default_factory=dict)  # dimensions per watched tensor (HC403 reads matrices)
    grad_snr: dict[str, float] = field(default_factory=dict)  # from the last completed SNR window
    dead_fraction: dict[str, float] = field(default_factory=dict)  # per non-negative activation
    nonfinite: list[str] = field(default_factory=list)  # where NaN/Inf was seen since the last sample
    loss: float | None = None
    # with a GradScaler: its scale on this step, whether the scaler skips this step (its gradients
    # overflowed: by design, not a NaN), and at how many samples in a row the scale has fallen
    loss_scale: float | None = None
    skipped_step: bool = False
    loss_scale_falls: int = 0
    # every sample so far with a finite loss, this one included (one list shared by the run's samples,
    # only appended to: a rule reads the points up to its sample's step)
    loss_trend: list[LossPoint] = field(default_factory=list)
