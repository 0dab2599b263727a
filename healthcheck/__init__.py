"""healthcheck: will signal and gradients propagate well through your PyTorch model?"""

from healthcheck.api import check, check_file
from healthcheck.config import Config
from healthcheck.errors import UsageError
from healthcheck.fixes import fix
from healthcheck.monitor import HealthError, HealthMonitor, HealthWarning
from healthcheck.records import Finding, Fix, Location, Report

__version__ = "0.1.0"
__all__ = [
    "Config", "Finding", "Fix", "HealthError", "HealthMonitor", "HealthWarning", "Location", "Report", "UsageError",
    "check", "check_file", "fix", "__version__",
]
