"""healthcheck: will signal and gradients propagate well through your PyTorch model?

Names are imported on first use, so that `import healthcheck` (and the pytest plugin that pytest
loads in every session) does not import torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "check": "healthcheck.api", "check_file": "healthcheck.api", "Config": "healthcheck.config",
    "UsageError": "healthcheck.errors", "fix": "healthcheck.fixes", "HealthError": "healthcheck.monitor",
    "HealthMonitor": "healthcheck.monitor", "HealthWarning": "healthcheck.monitor", "Finding": "healthcheck.records",
    "Fix": "healthcheck.records", "Location": "healthcheck.records", "Report": "healthcheck.records",
    "assert_healthy": "healthcheck.plugins.pytest_plugin",
}
__all__ = [
    "Config", "Finding", "Fix", "HealthError", "HealthMonitor", "HealthWarning", "Location", "Report", "UsageError",
    "assert_healthy", "check", "check_file", "fix", "__version__",
]

if TYPE_CHECKING:
    from healthcheck.api import check, check_file
    from healthcheck.config import Config
    from healthcheck.errors import UsageError
    from healthcheck.fixes import fix
    from healthcheck.monitor import HealthError, HealthMonitor, HealthWarning
    from healthcheck.plugins.pytest_plugin import assert_healthy
    from healthcheck.records import Finding, Fix, Location, Report


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'healthcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
