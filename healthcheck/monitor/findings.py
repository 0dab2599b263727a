"""Rules on a sample, and what a finding does: appear once, clear once, warn / raise / call back."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from healthcheck.config import Config
from healthcheck.graph.architecture import architecture_of
from healthcheck.graph.recorder import Recording
from healthcheck.graph.tracers import TraceResult
from healthcheck.monitor.samples import HealthError, HealthWarning, TrainingSample
from healthcheck.records import SEVERITIES, Finding
from healthcheck.rules import RuleContext, run_rules
from healthcheck.suppression import ignored_at_source


@dataclass(frozen=True)
class _NoArchitecture:
    joins: tuple = ()
    plain_depth: int = 0
    plain_end: str = ""
    has_norm: bool = False


_EMPTY = _NoArchitecture()


class FindingTracker:
    def __init__(self, config: Config, on_finding: str | Callable[[Finding, str], Any], fail_on: str,
                 rank: int) -> None:
        if not (callable(on_finding) or on_finding in ("warn", "raise", "ignore")):
            raise ValueError(f"on_finding must be 'warn', 'raise', 'ignore' or a callable, not {on_finding!r}")
        if fail_on not in SEVERITIES:
            raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
        self.config, self.on_finding, self.fail_on, self.rank = config, on_finding, fail_on, rank
        self.active: dict[tuple[str, str], Finding | None] = {}

    def evaluate(self, model: nn.Module, recording: Recording | None, sample: TrainingSample) -> list[Finding]:
        architecture = architecture_of(model, TraceResult(recording.graph, "hooks")) if recording else None
        if architecture is None and not (sample.nonfinite or sample.loss_scale is not None):
            return []
        context = RuleContext(architecture or _EMPTY, sample.measurements, sample)
        findings = run_rules(context, self.config.select, self.config.ignore, self.config.rule_options)
        return [f for f in findings if not ignored_at_source(f)]  # `# healthcheck: ignore[...]`

    def events(self, findings: list[Finding]) -> list[tuple[Finding, str]]:
        current = {(f.code, f.location.module): f for f in findings}
        events = [(f, "appeared") for key, f in current.items() if key not in self.active]
        events += [(f, "cleared") for key, f in self.active.items() if key not in current and f is not None]
        self.active = dict(current)
        return events

    def act(self, events: list[tuple[Finding, str]], step: int, may_raise: bool = True) -> None:
        if not events or self.on_finding == "ignore":
            return
        if callable(self.on_finding):
            for finding, event in events:
                self.on_finding(finding, event)
            return
        if self.on_finding == "raise" and may_raise:
            level = SEVERITIES.index(self.fail_on)
            bad = [f for f, e in events if e == "appeared" and SEVERITIES.index(f.severity) <= level]
            if bad:
                raise HealthError(bad)
        if self.rank == 0:
            for finding, event in events:
                warnings.warn(f"step {step}: {finding.code} {event}: {finding.message}", HealthWarning,
                              stacklevel=4)
