"""Rules on a sample, and what a finding does: appear once, clear once, warn / raise / call back.

A sampled statistic carries noise (a dead fraction from one batch, a gradient SNR from four
gradients, an effective rank from a batch of vectors), so a warning appears only once its rule has
fired on `persist` samples in a row (the rule's `persist` option, else DEFAULT_PERSIST) and clears
only after as many samples without it (at least DEFAULT_PERSIST; HC401 after one clean sample). Errors, and HC401 (NaN/Inf) at any severity, appear at the
first sample: their thresholds sit far outside the noise of a run that trains. A finding that
escalates (warning → error) appears again at its new severity. Once the run's sampled loss has
halved, warnings of the init-time rules (HC2xx/HC3xx) are held back: the run refutes them."""

from __future__ import annotations

import math
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
from healthcheck.rules import RuleContext, run_rules, selected
from healthcheck.suppression import ignored_at_source


@dataclass(frozen=True)
class _NoArchitecture:
    joins: tuple = ()
    plain_depth: int = 0
    plain_end: str = ""
    has_norm: bool = False


_EMPTY = _NoArchitecture()

#: samples in a row a warning must be seen before it appears (and missed before it clears), for rules
#: without a `persist` option. Measured (benchmarks/trainability/MONITOR.md): single-sample warnings on
#: runs that train were flickers of a noisy statistic that were gone at the next sample.
DEFAULT_PERSIST = 2

#: codes the monitor reports once per run, whatever tensor or layer is the worst on a sample: their
#: statistic is model-wide (a median over tensors, the worst layer), and a location that moves from
#: sample to sample must not make the finding clear and appear again
_MODEL_WIDE = ("HC401", "HC402", "HC403", "HC404", "HC405")

#: a run whose sampled loss is at or below this fraction of its first sampled loss is training: the
#: warnings of the init-time rules are held back from then on (errors are not)
TRAINING_LOSS_FRACTION = 0.5


class FindingTracker:
    def __init__(self, config: Config, on_finding: str | Callable[[Finding, str], Any], fail_on: str,
                 rank: int) -> None:
        if not (callable(on_finding) or on_finding in ("warn", "raise", "ignore")):
            raise ValueError(f"on_finding must be 'warn', 'raise', 'ignore' or a callable, not {on_finding!r}")
        if fail_on not in SEVERITIES:
            raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
        self.config, self.on_finding, self.fail_on, self.rank = config, on_finding, fail_on, rank
        self.active: dict[tuple[str, str], Finding | None] = {}
        self._seen: dict[tuple[str, str], int] = {}  # samples in a row a finding was present, not yet active
        self._missed: dict[tuple[str, str], int] = {}  # samples in a row an active finding was absent
        self._level: dict[tuple[str, str], int] = {}  # the most severe level reported per active finding
        self._first_loss: float | None = None

    def evaluate(self, model: nn.Module, recording: Recording | None, sample: TrainingSample) -> list[Finding]:
        architecture = architecture_of(model, TraceResult(recording.graph, "hooks")) if recording else None
        if architecture is None and not (sample.nonfinite or sample.loss_scale is not None):
            return []
        context = RuleContext(architecture or _EMPTY, sample.measurements, sample)
        findings = run_rules(context, self.config.select, self.config.ignore, self.config.rule_options)
        findings = [f for f in findings if not ignored_at_source(f)]  # `# healthcheck: ignore[...]`
        if self._loss_has_halved(sample):
            # the init-time rules (HC2xx/HC3xx) predict that training will struggle; a run whose loss
            # has already halved refutes a warning of theirs (measured: on runs that train, their
            # warnings came late, from weights that had learned). Errors and HC4xx still report.
            findings = [f for f in findings if f.code.startswith("HC4") or f.severity == "error"]
        return findings

    def _loss_has_halved(self, sample: TrainingSample) -> bool:
        loss = sample.loss
        if loss is None or not math.isfinite(loss) or sample.nonfinite:
            return False
        if self._first_loss is None:
            self._first_loss = loss
            return False
        return self._first_loss > 0 and loss <= TRAINING_LOSS_FRACTION * self._first_loss

    def late(self, sample: TrainingSample, codes: tuple[str, ...]) -> list[tuple[Finding, str]]:
        """The events of `codes` only, on a sample whose data for them came after it was evaluated
        (the update ratios of the first sample, added by the first after_optimizer_step())."""
        codes = tuple(c for c in codes if selected(c, self.config.select, self.config.ignore))
        if not codes:
            return []
        findings = run_rules(RuleContext(_EMPTY, None, sample), codes, (), self.config.rule_options)
        return self.events([f for f in findings if not ignored_at_source(f)], codes)

    def persist(self, finding: Finding) -> int:
        """Samples in a row `finding` must be seen before it appears."""
        if finding.code == "HC401" or finding.severity == "error":
            return 1
        from healthcheck.rules import REGISTRY

        rule = REGISTRY.get(finding.code)
        options = {**(rule.options if rule else {}), **self.config.rule_options.get(finding.code, {})}
        return max(1, int(options.get("persist", DEFAULT_PERSIST)))

    def _clear_after(self, finding: Finding) -> int:
        """Samples in a row without an active finding before it clears: as many as a warning needs to
        appear (at least DEFAULT_PERSIST, whatever the severity), so that a value near a threshold
        does not flicker; one for a NaN/Inf, which has no noise: a clean sample is a finite run."""
        return 1 if finding.code == "HC401" else max(DEFAULT_PERSIST, self.persist(finding))

    def _keys(self, findings: list[Finding]) -> dict[tuple[str, str], Finding]:
        """Each finding under the key it is tracked by: (code, module), except that a rule reporting
        one worst location per sample keeps its key when that location moves (a collapse seen at
        layer 29, then 31, is one finding, not one cleared and one appeared)."""
        per_code: dict[str, list[Finding]] = {}
        for f in findings:
            per_code.setdefault(f.code, []).append(f)
        keys: dict[tuple[str, str], Finding] = {}
        for code, group in per_code.items():
            if code in _MODEL_WIDE:
                keys[(code, "(root)")] = group[-1]
                continue
            tracked = [k for k in (*self.active, *self._seen) if k[0] == code]
            if len(group) == 1 and len(set(tracked)) == 1:
                keys[tracked[0]] = group[0]
                continue
            keys.update({(code, f.location.module): f for f in group})
        return keys

    def events(self, findings: list[Finding], codes: tuple[str, ...] | None = None) -> list[tuple[Finding, str]]:
        """Appeared/cleared events after one sample's findings (of `codes` only, when given)."""
        current = self._keys(findings)
        events: list[tuple[Finding, str]] = []
        for key, finding in current.items():
            self._missed.pop(key, None)
            level = SEVERITIES.index(finding.severity)
            if key not in self.active:
                self._seen[key] = self._seen.get(key, 0) + 1
                if self._seen[key] >= self.persist(finding):
                    del self._seen[key]
                    self.active[key], self._level[key] = finding, level
                    events.append((finding, "appeared"))
                continue
            if level < self._level.setdefault(key, level):  # escalated (warning → error): once
                self._level[key] = level
                events.append((finding, "appeared"))
            self.active[key] = finding

        def concerned(key: tuple[str, str]) -> bool:
            return key not in current and (codes is None or key[0] in codes)

        for key in [k for k in self._seen if concerned(k)]:
            del self._seen[key]
        for key, finding in list(self.active.items()):
            if not concerned(key):
                continue
            self._missed[key] = self._missed.get(key, 0) + 1
            if finding is None or self._missed[key] >= self._clear_after(finding):
                del self.active[key]
                self._missed.pop(key, None)
                self._level.pop(key, None)
                if finding is not None:
                    events.append((finding, "cleared"))
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
