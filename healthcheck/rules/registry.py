"""One table of rules: code -> what it checks, its docs, its options and its check function.

Shaped after ruff's registry: every rule documents itself under fixed headings, and select /
ignore, `healthcheck rule CODE` and docs/rules.md all read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from healthcheck.records import Finding, Fix, Location

DOC_HEADINGS = ("What it does", "Why is this bad?", "Source", "Example", "Use instead", "Fix", "Options")


@dataclass(frozen=True)
class RuleContext:
    """What a rule may read. Rules never trace or run the model."""

    architecture: Any  # healthcheck.graph.architecture.Architecture
    measurements: Any = None  # healthcheck.probes.Measurements: init-time probes or a monitor sample
    training: Any = None  # healthcheck.monitor.TrainingSample, on the monitor's sampled steps
    stability: Any = None  # healthcheck.probes.stability.Stability: output scale at init, optimizer checks


@dataclass(frozen=True)
class Rule:
    code: str
    name: str  # kebab-case, like ruff's
    summary: str  # one line
    what: str
    why: str
    source: str  # where the science comes from (science.md row, seed, paper)
    bad_example: str
    good_example: str
    fix_summary: str
    transform: str | None  # name of the fix transform in healthcheck.fixes, if one exists
    fix_safety: str  # "safe" | "unsafe": does the fix change what the model computes?
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[RuleContext, dict[str, Any]], Iterable[Finding]] | None = None

    def finding(self, severity: str, message: str, location: Location, evidence: dict[str, Any],
                fix: tuple[str, str | None] | None = None) -> Finding:
        """A finding of this rule; `fix` = (summary, transform) when the case calls for a specific fix."""
        summary, transform = fix if fix is not None else (self.fix_summary, self.transform)
        return Finding(self.code, severity, message, location, evidence, Fix(summary, transform))

    def docs(self) -> str:
        """Markdown docs under the fixed headings (DOC_HEADINGS)."""
        options = "\n".join(f"- `{k}` (default `{v!r}`)" for k, v in self.options.items()) or "None."
        return "\n".join([
            f"## {self.code} `{self.name}`", "", self.summary, "",
            "### What it does", self.what, "",
            "### Why is this bad?", self.why, "",
            "### Source", self.source, "",
            "### Example", "```python", self.bad_example.strip(), "```", "",
            "### Use instead", "```python", self.good_example.strip(), "```", "",
            "### Fix", f"{self.fix_summary} (transform: `{self.transform or 'none'}`, fix safety: {self.fix_safety})", "",
            "### Options", options, "",
        ])


REGISTRY: dict[str, Rule] = {}


def severity_at(value: float, warn_at: float, error_at: float) -> str | None:
    """The one threshold ladder of the rules: "error" at or above `error_at`, "warning" at or above
    `warn_at`, else None (no finding)."""
    if value >= error_at:
        return "error"
    if value >= warn_at:
        return "warning"
    return None


def register(rule: Rule) -> Rule:
    if rule.code in REGISTRY:
        raise ValueError(f"rule {rule.code} registered twice")
    REGISTRY[rule.code] = rule
    return rule


def selected(code: str, select: Iterable[str], ignore: Iterable[str]) -> bool:
    """ruff-style selection: the longest matching prefix wins; ignore wins ties."""
    best_select = max((len(p) for p in select if code.startswith(p)), default=-1)
    best_ignore = max((len(p) for p in ignore if code.startswith(p)), default=-1)
    return best_select >= 0 and best_select > best_ignore


#: what a rule reads, by code group (design.md): HC1xx the graph, HC2xx/HC3xx the init-time probes,
#: HC4xx training steps (HealthMonitor only), HC5xx the stability measurements (probes.stability)
STAGES = {"HC1": "structure", "HC2": "probes", "HC3": "probes", "HC4": "training", "HC5": "stability"}


def stage(code: str) -> str:
    return STAGES.get(code[:3], "structure")


def evaluated(context: RuleContext, select: Iterable[str] = ("HC",), ignore: Iterable[str] = ()) -> tuple[str, ...]:
    """The codes `run_rules` evaluates on `context`: selected, and with the data their stage needs."""
    available = {"structure": True, "probes": context.measurements is not None, "training": context.training is not None,
                 "stability": context.stability is not None}
    return tuple(code for code, rule in sorted(REGISTRY.items())
                 if rule.check is not None and selected(code, select, ignore) and available[stage(code)])


def run_rules(context: RuleContext, select: Iterable[str] = ("HC",), ignore: Iterable[str] = (),
              options: dict[str, dict[str, Any]] | None = None) -> list[Finding]:
    options = options or {}
    select, ignore = tuple(select), tuple(ignore)
    findings: list[Finding] = []
    for code in evaluated(context, select, ignore):
        rule = REGISTRY[code]
        findings.extend(rule.check(context, {**rule.options, **options.get(code, {})}))
    return findings


def all_docs() -> str:
    from healthcheck.rules import measured, optimizer, structure, training  # noqa: F401  - registers the rules

    head = "# healthcheck rules\n\nGenerated from the rule registry by `python -m healthcheck.rules`; do not edit.\n\n"
    return head + "\n".join(REGISTRY[c].docs() for c in sorted(REGISTRY))
