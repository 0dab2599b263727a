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


def render_json(report: Report) -> str:
    return json.dumps(_finite(report.to_json()), indent=2) + "\n"
