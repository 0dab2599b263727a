"""SARIF 2.1.0 for GitHub code scanning and other SARIF viewers: one run, one result per finding.

Each result points at the `file:line` the finding comes from (the model's definition for
model-wide findings), relative to the current directory (`%SRCROOT%`) when the file lies under it,
so that code scanning annotates the user's block. Suppressed findings carry a SARIF suppression
(`inSource` for `# healthcheck: ignore`, `external` for the baseline).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from healthcheck.records import Finding, Report, Suppressed
from healthcheck.report.json import finite

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
SUPPRESSION_KINDS = {"comment": "inSource", "baseline": "external"}


def _rule_descriptor(rule: Any) -> dict[str, Any]:
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.what},
        "help": {"text": f"{rule.fix_summary} (see `healthcheck rule {rule.code}`)", "markdown": rule.docs()},
        "properties": {"fixSafety": rule.fix_safety, "transform": rule.transform},
    }


def _location(source: str | None, root: Path) -> dict[str, Any] | None:
    if not source:
        return None
    path_text, _, line = source.rpartition(":")
    if not line.isdigit():
        return None
    path = Path(path_text).resolve()
    if path.is_relative_to(root):
        artifact = {"uri": path.relative_to(root).as_posix(), "uriBaseId": "%SRCROOT%"}
    else:
        artifact = {"uri": path.as_uri()}
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": max(int(line), 1)}}}


def _fingerprint(report: Report, finding: Finding) -> str:
    """Stable across runs and line moves: model, rule and module (what the baseline matches on too)."""
    key = f"{report.model.name}|{finding.code}|{finding.location.module}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _result(report: Report, finding: Finding, index: dict[str, int], root: Path,
            suppressed: Suppressed | None = None) -> dict[str, Any]:
    message = finding.message + (f" — fix: {finding.fix.summary}" if finding.fix else "")
    location = _location(finding.location.source, root) or _location(report.model.source, root)
    module = finding.location.module or "(root)"
    logical = {"name": module, "fullyQualifiedName": f"{report.model.name}.{module}" if finding.location.module
               else report.model.name}
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "level": LEVELS[finding.severity],
        "message": {"text": message},
        "locations": [{**(location or {}), "logicalLocations": [logical]}],
        "partialFingerprints": {"healthcheck/v1": _fingerprint(report, finding)},
        "properties": finite({"model": report.model.name, "severity": finding.severity,
                              "evidence": finding.evidence,
                              "fix": finding.to_json()["fix"]}),
    }
    if finding.code in index:
        result["ruleIndex"] = index[finding.code]
    if suppressed is not None:
        result["suppressions"] = [{"kind": SUPPRESSION_KINDS[suppressed.reason],
                                   "justification": "# healthcheck: ignore at the source line"
                                   if suppressed.reason == "comment" else "known in the --baseline report"}]
    return result


def render_sarif(reports: list[Report], root: Path | None = None) -> str:
    from healthcheck import __version__
    from healthcheck.rules import REGISTRY

    root = (root or Path.cwd()).resolve()
    codes = sorted(REGISTRY)
    index = {code: i for i, code in enumerate(codes)}
    results = []
    for report in reports:
        results += [_result(report, f, index, root) for f in report.findings]
        results += [_result(report, s.finding, index, root, s) for s in report.suppressed]
    run = {
        "tool": {"driver": {"name": "healthcheck", "version": __version__, "semanticVersion": __version__,
                            "rules": [_rule_descriptor(REGISTRY[c]) for c in codes]}},
        "originalUriBaseIds": {"%SRCROOT%": {"uri": root.as_uri() + "/"}},
        "invocations": [{"executionSuccessful": True}],
        "results": results,
        "properties": {"models": [{"name": r.model.name, "trace": r.model.trace, "source": r.model.source,
                                   "summary": r.summary()} for r in reports]},
    }
    return json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}, indent=2) + "\n"
