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

from healthcheck.errors import UsageError, read_utf8
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
    """The known findings of a saved JSON report (one report object, or a list of them).

    The file is checked against the report schema (healthcheck/report/report.schema.json) first, so
    that a wrong, truncated or hand-edited baseline is one clear error, never a crash or a gate that
    quietly knows nothing.
    """
    path = Path(path)
    redo = "save a baseline with --format json -o FILE"
    text = read_utf8(path, f"--baseline {path}", f"so not a JSON report; {redo}")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--baseline {path}: not JSON ({exc.msg} at line {exc.lineno}); {redo}") from None
    except RecursionError:
        raise UsageError(f"--baseline {path}: JSON nested too deeply to be a healthcheck report; {redo}") from None
    reports = data if isinstance(data, list) else [data]
    for index, report in enumerate(reports):
        where = f"--baseline {path}" + (f": report [{index}]" if isinstance(data, list) else "")
        _check_version(report, where, redo)
        problem = schema_problem(report, _report_schema())
        if problem is not None:
            raise UsageError(f"{where}: {problem}, so it is not a healthcheck/1 JSON report; {redo}")
    known: dict[BaselineKey, str] = {}
    for report in reports:
        model = report["model"]["name"]
        for f in [*report.get("findings", []), *report.get("suppressed", [])]:
            if f.get("reason") == "comment":
                continue
            key = (model, f["code"], f["location"]["module"])
            previous = known.get(key)
            if previous is None or SEVERITIES.index(f["severity"]) < SEVERITIES.index(previous):
                known[key] = f["severity"]
    return known


SCHEMA_VERSION = 1


def _check_version(report: Any, where: str, redo: str) -> None:
    schema = report.get("schema") if isinstance(report, dict) else None
    if not isinstance(schema, str) or not schema.startswith("healthcheck/"):
        raise UsageError(f"{where}: not a healthcheck JSON report (no \"schema\": \"healthcheck/1\"); {redo}")
    version = schema.removeprefix("healthcheck/")
    if version.isdigit() and int(version) > SCHEMA_VERSION:
        raise UsageError(f"{where}: written by a newer healthcheck ({schema}); this version reads "
                         f"healthcheck/{SCHEMA_VERSION}: upgrade healthcheck, or {redo} with this version")


@lru_cache(maxsize=1)
def _report_schema() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "report" / "report.schema.json").read_text())


_JSON_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problem(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
                   where: str = "") -> str | None:
    """The first way `value` breaks `schema` ("findings[2].severity is 'fatal', not one of ..."), else None.

    The subset of JSON Schema that report.schema.json uses (type, const, enum, pattern, minimum,
    required, properties, additionalProperties, items, allOf, local $ref), so that jsonschema stays a
    test-only dependency.
    """
    root = root if root is not None else schema
    name = where or "the top level"
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_problem(value, target, root, where)
    for part in schema.get("allOf", []):
        problem = schema_problem(value, part, root, where)
        if problem is not None:
            return problem
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_JSON_TYPES[t](value) for t in types):
            return f"{name} is {_json_kind(value)}, not {' or '.join(types)}"
    if "const" in schema and value != schema["const"]:
        return f"{name} is {_short(value)}, not {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{name} is {_short(value)}, not one of {', '.join(map(str, schema['enum']))}"
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        return f"{name} is {_short(value)}, which does not match {schema['pattern']}"
    if "minimum" in schema and _JSON_TYPES["number"](value) and value < schema["minimum"]:
        return f"{name} is {value}, below {schema['minimum']}"
    if isinstance(value, dict):
        missing = [key for key in schema.get("required", []) if key not in value]
        if missing:
            return f"{name} has no {', '.join(missing)}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problem = schema_problem(value[key], sub, root, f"{where}.{key}" if where else key)
                if problem is not None:
                    return problem
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in schema.get("properties", {}):
                    problem = schema_problem(item, extra, root, f"{where}.{key}" if where else key)
                    if problem is not None:
                        return problem
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problem = schema_problem(item, schema["items"], root, f"{where}[{index}]")
            if problem is not None:
                return problem
    return None


def _json_kind(value: Any) -> str:
    for kind in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[kind](value):
            return {"null": "null", "integer": "an integer", "array": "an array", "object": "an object"}.get(
                kind, f"a {kind}")
    return type(value).__name__


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
