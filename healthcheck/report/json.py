from __future__ import annotations

import json
import math
from typing import Any

from healthcheck.records import Report


def finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null (strict parsers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def report_json(report: Report) -> dict[str, Any]:
    data = report.to_json()
    if report.fixes is not None:
        data["fixes"] = [{"transform": f.transform, "summary": f.summary, "verified": f.verified, "joins": f.joins,
                          "before": f.before_numbers, "after": f.after_numbers} for f in report.fixes]
    return finite(data)


def render_json(reports: list[Report]) -> str:
    """One report object (the schema in README), or a list of them when several models were checked."""
    data = report_json(reports[0]) if len(reports) == 1 else [report_json(r) for r in reports]
    return json.dumps(data, indent=2) + "\n"
