from __future__ import annotations

import json
import math
from typing import Any

from healthcheck.records import Report


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null (strict parsers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def render_json(report: Report, fixes: list | None = None) -> str:
    data = report.to_json()
    if fixes is not None:
        data["fixes"] = [{"transform": f.transform, "summary": f.summary, "verified": f.verified, "joins": f.joins,
                          "before": f.before_numbers, "after": f.after_numbers} for f in fixes]
    return json.dumps(_finite(data), indent=2) + "\n"
