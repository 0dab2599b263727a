"""Findings that do not count towards the exit code: silenced at their source, or known in a baseline.

At the source, a comment on the line a finding points to (the `file:line` the report shows):

    out = self.block(x) + x  # healthcheck: ignore[HC101]      one rule (or a prefix: HC2)
    out = self.block(x) + x  # healthcheck: ignore[HC101,HC205] several
    out = self.block(x) + x  # healthcheck: ignore              every rule on this line

A baseline is a JSON report saved earlier (`healthcheck model.py --format json -o baseline.json`);
with `--baseline baseline.json` a finding is known when the baseline has the same model, rule and
module at the same or a worse severity. Known findings are listed as suppressed, never hidden.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from healthcheck.errors import UsageError
from healthcheck.records import SEVERITIES, Finding, Report, Suppressed

IGNORE_COMMENT = re.compile(r"#\s*healthcheck:\s*ignore\b(?:\[(?P<codes>[^\]]*)\])?", re.IGNORECASE)

#: (model name, rule code, module path) -> the least severe level the baseline allows
BaselineKey = tuple[str, str, str]


@lru_cache(maxsize=256)
def _lines(path: str, mtime: float) -> tuple[str, ...]:
    try:
        return tuple(Path(path).read_text(errors="replace").splitlines())
    except OSError:
        return ()


def source_line(source: str | None) -> str | None:
    """The text of the line `source` ("file:line") points to, if it can be read."""
    if not source:
        return None
    path, _, line = source.rpartition(":")
    if not line.isdigit():
        return None
    try:
        lines = _lines(path, Path(path).stat().st_mtime)
    except OSError:
        return None
    index = int(line) - 1
    return lines[index] if 0 <= index < len(lines) else None


def ignored_at_source(finding: Finding) -> bool:
    """True when the finding's source line carries `# healthcheck: ignore[...]` naming its code."""
    line = source_line(finding.location.source)
    match = IGNORE_COMMENT.search(line) if line else None
    if match is None:
        return False
    if match.group("codes") is None:
        return True
    codes = [c.strip().upper() for c in match.group("codes").split(",") if c.strip()]
    return any(finding.code.startswith(code) for code in codes)


def suppress(report: Report, baseline: dict[BaselineKey, str] | None = None) -> Report:
    """The report with silenced and known findings moved from `findings` to `suppressed`."""
    kept: list[Finding] = []
    suppressed = list(report.suppressed)
    for finding in report.findings:
        if ignored_at_source(finding):
            suppressed.append(Suppressed(finding, "comment"))
        elif baseline is not None and _known(report.model.name, finding, baseline):
            suppressed.append(Suppressed(finding, "baseline"))
        else:
            kept.append(finding)
    return dataclasses.replace(report, findings=kept, suppressed=suppressed)


def _known(model: str, finding: Finding, baseline: dict[BaselineKey, str]) -> bool:
    allowed = baseline.get((model, finding.code, finding.location.module))
    return allowed is not None and SEVERITIES.index(finding.severity) >= SEVERITIES.index(allowed)


def load_baseline(path: str | Path) -> dict[BaselineKey, str]:
    """The known findings of a saved JSON report (one report object, or a list of them)."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"--baseline {path}: cannot read it: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--baseline {path}: not JSON ({exc.msg} at line {exc.lineno}); save a baseline with "
                         "--format json -o FILE") from None
    reports = data if isinstance(data, list) else [data]
    known: dict[BaselineKey, str] = {}
    for report in reports:
        if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("healthcheck/"):
            raise UsageError(f"--baseline {path}: not a healthcheck JSON report; save one with --format json -o FILE")
        model = report["model"]["name"]
        for f in [*report.get("findings", []), *report.get("suppressed", [])]:
            if f.get("reason") == "comment":
                continue
            key = (model, f["code"], f["location"]["module"])
            previous = known.get(key)
            if previous is None or SEVERITIES.index(f["severity"]) < SEVERITIES.index(previous):
                known[key] = f["severity"]
    return known
