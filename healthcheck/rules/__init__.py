"""Rules: HC1xx structure, HC2xx forward signal, HC3xx gradients, HC4xx training."""

from healthcheck.rules import structure  # noqa: F401  - registers HC1xx
from healthcheck.rules.registry import REGISTRY, Rule, RuleContext, run_rules, selected

__all__ = ["REGISTRY", "Rule", "RuleContext", "run_rules", "selected"]
