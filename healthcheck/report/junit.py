"""JUnit XML for CI test-report views: one test suite per model, one test case per rule.

A rule's test case fails when the model has a finding of that rule at or above `fail_on`; findings
below it and suppressed ones go to the case's system-out; rules that were not evaluated (not
selected, probes skipped, training-time rules) are skipped with the reason.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from healthcheck.records import Finding, Report, at_or_above
from healthcheck.report.text import evidence_text
from healthcheck.rules.registry import stage

SKIP_REASONS = {"probes": "init-time probes were not run (--no-probes)",
                "training": "training-time rule: evaluated by HealthMonitor during training",
                "stability": "stability measurements were not run (--no-probes)"}


def _finding_line(f: Finding) -> str:
    where = f.location.module or "(root)"
    if f.location.source:
        where += f" ({f.location.source})"
    fix = f"\n    fix: {f.fix.summary}" if f.fix else ""
    return f"{f.severity} {f.code} at {where}: {f.message}\n    evidence: {evidence_text(f.evidence)}{fix}"


def _skip_reason(report: Report, code: str) -> str:
    rule_stage = stage(code)
    if rule_stage == "training" or (rule_stage == "probes" and report.measurements is None) or (
            rule_stage == "stability" and report.stability is None):
        return SKIP_REASONS[rule_stage]
    return "not selected (select/ignore)"


def _testcase(suite: ET.Element, report: Report, code: str, fail_on: str) -> tuple[bool, bool]:
    """Add rule `code`'s case; returns (failed, skipped)."""
    from healthcheck.rules import REGISTRY

    rule = REGISTRY[code]
    case = ET.SubElement(suite, "testcase", classname=f"healthcheck.{report.model.name}",
                         name=f"{code} {rule.name}", time="0")
    findings = [f for f in report.findings if f.code == code]
    failing = [f for f in findings if at_or_above(f.severity, fail_on)]
    skipped = code not in report.rules
    if failing:
        failure = ET.SubElement(case, "failure", type=code,
                                message=f"{len(failing)} finding(s): {failing[0].message}")
        failure.text = "\n".join(_finding_line(f) for f in failing)
    elif skipped:
        ET.SubElement(case, "skipped", message=_skip_reason(report, code))
    rest = [_finding_line(f) for f in findings if f not in failing]
    rest += [f"suppressed ({s.reason}): " + _finding_line(s.finding) for s in report.suppressed if s.finding.code == code]
    if rest:
        ET.SubElement(case, "system-out").text = "\n".join(rest)
    return bool(failing), skipped and not failing


def render_junit(reports: list[Report], fail_on: str = "error") -> str:
    from healthcheck.rules import REGISTRY

    root = ET.Element("testsuites", name="healthcheck")
    totals = {"tests": 0, "failures": 0, "time": 0.0}
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    for report in reports:
        suite = ET.SubElement(root, "testsuite", name=f"healthcheck {report.model.name}",
                              timestamp=timestamp, hostname=socket.gethostname(), time=f"{report.seconds:.3f}")
        properties = ET.SubElement(suite, "properties")
        for name, value in (("model", report.model.name), ("parameters", report.model.parameters),
                            ("trace", report.model.trace), ("source", report.model.source or ""),
                            ("fail-on", fail_on)):
            ET.SubElement(properties, "property", name=name, value=str(value))
        failures = skipped = 0
        for code in sorted(REGISTRY):
            failed, was_skipped = _testcase(suite, report, code, fail_on)
            failures += failed
            skipped += was_skipped
        suite.set("tests", str(len(REGISTRY)))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", str(skipped))
        totals["tests"] += len(REGISTRY)
        totals["failures"] += failures
        totals["time"] += report.seconds
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("errors", "0")
    root.set("time", f"{totals['time']:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
