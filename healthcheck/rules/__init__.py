"""Rules: HC1xx structure, HC2xx forward signal, HC3xx gradients, HC4xx training."""

from healthcheck.rules import measured, optimizer, structure, training  # noqa: F401  - registers the rules
from healthcheck.rules.registry import REGISTRY, Rule, RuleContext, run_rules, selected

__all__ = ["REGISTRY", "Rule", "RuleContext", "run_rules", "selected"]
