"""The records every part of healthcheck passes around. Reporters read them, never compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")
SCHEMA = "healthcheck/1"


def at_or_above(severity: str, fail_on: str) -> bool:
    """True when a finding of `severity` fails a gate at `fail_on` ("error", "warning", "info", "never")."""
    return fail_on != "never" and SEVERITIES.index(severity) <= SEVERITIES.index(fail_on)


@dataclass(frozen=True)
class Location:
    module: str
    source: str | None = None


@dataclass(frozen=True)
class Fix:
    summary: str
    transform: str | None = None
    verified: dict[str, Any] | None = None  # {"before": {...}, "after": {...}}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    message: str
    location: Location
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: Fix | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "message": self.message,
            "location": {"module": self.location.module, "source": self.location.source},
            "evidence": self.evidence,
            "fix": None if self.fix is None else {
                "summary": self.fix.summary, "transform": self.fix.transform, "verified": self.fix.verified},
        }


@dataclass(frozen=True)
class ModelInfo:
    name: str
    parameters: int
    trace: str  # "fx" | "export" | "hooks"
    trace_failures: dict[str, str] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    source: str | None = None  # "file:line" where the model is defined: the home of model-wide findings
    # "real": the model ran on its weights; "unread": structure traced on fake tensors (no real forward);
    # "not materialized": the weights are on the meta device (structure traced on fake tensors)
    weights: str = "real"


@dataclass(frozen=True)
class Suppressed:
    """A finding that does not count: silenced at its source line, or already in the baseline."""

    finding: Finding
    reason: str  # "comment" | "baseline"


@dataclass
class Report:
    model: ModelInfo
    architecture: Any  # healthcheck.graph.architecture.Architecture
    findings: list[Finding]
    measurements: Any = None  # healthcheck.probes.Measurements, or None when probes were skipped
    seconds: float = 0.0
    suppressed: list[Suppressed] = field(default_factory=list)
    fixes: list[Any] | None = None  # healthcheck.fixes.FixResult of each fix tried (None: not asked for)
    rules: tuple[str, ...] = ()  # the codes that were evaluated (selected, and measurable in this run)
    stability: Any = None  # healthcheck.probes.stability.Stability, or None when probes were skipped

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def summary(self) -> dict[str, int]:
        return {s: self.count(s) for s in SEVERITIES}

    def fails(self, fail_on: str) -> bool:
        """True when a finding is at or above `fail_on` ("error", "warning", "info" or "never")."""
        return any(at_or_above(f.severity, fail_on) for f in self.findings)

    def _measurements_json(self) -> dict[str, Any]:
        m = self.measurements
        if m is None:
            return {"profile": [], "grad_correlation": None}
        return {"profile": [p.to_json() for p in m.profile], "grad_correlation": m.grad_correlation,
                "at": m.at, "input_var": m.input_var, "failures": m.failures, "seconds": m.seconds}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": {"name": self.model.name, "parameters": self.model.parameters, "trace": self.model.trace,
                      "trace_failures": self.model.trace_failures,
                      "input_shapes": [list(s) for s in self.model.input_shapes], "source": self.model.source,
                      "weights": self.model.weights},
            "architecture": self.architecture.to_json(),
            "measurements": self._measurements_json(),
            "stability": None if self.stability is None else self.stability.to_json(),
            "findings": [f.to_json() for f in self.findings],
            "summary": self.summary(),
            "suppressed": [{**s.finding.to_json(), "reason": s.reason} for s in self.suppressed],
        }
