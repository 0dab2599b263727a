"""Settings: defaults, then `[tool.healthcheck]` in pyproject.toml, then command-line flags.

Every value is validated where it enters (a pyproject key, a flag, a `check()` argument) and a bad
one is a `UsageError` (a ValueError) that names where it came from and what is accepted.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from healthcheck.errors import UsageError, read_utf8

FAIL_LEVELS = ("error", "warning", "info", "never")
TRACES = ("auto", "fx", "export", "hooks")
_MODEL_KEYS = {"fail-on", "select", "ignore", "rules", "input-shape", "seed", "trace", "optimizer", "lr", "momentum"}
_KEYS = _MODEL_KEYS | {"models"}


@dataclass(frozen=True)
class Config:
    fail_on: str = "error"
    select: tuple[str, ...] = ("HC",)
    ignore: tuple[str, ...] = ()
    rule_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    seed: int = 0
    trace: str = "auto"
    #: the optimizer the model will train with, for the stability checks: a name ("sgd", "adam", …) and its
    #: learning rate and momentum (healthcheck.probes.stability.OptimizerSpec.parse); None: not given
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    #: `[tool.healthcheck.models."PATTERN"]`: field changes for the model files PATTERN matches
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None  # the pyproject.toml it came from

    def __post_init__(self) -> None:
        # Every Config is valid, however it was made (pyproject, flags, `check(select="HC101")`):
        # a string of codes is one list, never iterated by character; unknown codes are errors.
        set_field = object.__setattr__
        set_field(self, "fail_on", fail_level(self.fail_on, "fail_on"))
        set_field(self, "select", rule_codes(self.select, "select", allow_empty=False))
        set_field(self, "ignore", rule_codes(self.ignore, "ignore", allow_empty=True))
        set_field(self, "rule_options", rule_options(self.rule_options, "rule_options"))
        set_field(self, "input_shapes", input_shapes(self.input_shapes, "input_shapes", allow_empty=True))
        set_field(self, "seed", seed_value(self.seed, "seed"))
        set_field(self, "trace", trace_method(self.trace, "trace"))
        if self.optimizer is not None:
            set_field(self, "optimizer", optimizer_name(self.optimizer, "optimizer"))
        if self.lr is not None:
            set_field(self, "lr", learning_rate(self.lr, "lr"))
        if self.momentum is not None:
            set_field(self, "momentum", momentum_value(self.momentum, "momentum"))
        if not isinstance(self.models, dict) or not all(isinstance(v, dict) for v in self.models.values()):
            raise UsageError("models must map file patterns to tables of settings")

    def override(self, **changes: Any) -> Config:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def for_target(self, spec: str) -> Config:
        """The settings for the model `FILE[:NAME]`: every `models` table whose pattern matches, in order.

        A pattern is a glob on the file path relative to the pyproject.toml (`models/*.py`), with an
        optional `:NAME` that matches the NAME given as `FILE:NAME`. `ignore` adds to the global
        ignore list (like ruff's per-file-ignores), rule options merge per rule, and every other key
        replaces the global value.
        """
        from healthcheck.loading import split_spec

        path, name = split_spec(spec)
        root = self.path.parent if self.path is not None else Path.cwd()
        resolved = path.resolve()
        relative = resolved.relative_to(root.resolve()).as_posix() if resolved.is_relative_to(root.resolve()) \
            else resolved.as_posix()
        config = self
        for pattern, changes in self.models.items():
            file_pattern, _, name_pattern = pattern.rpartition(":") if ":" in pattern else (pattern, "", "")
            if not (fnmatch.fnmatchcase(relative, file_pattern) or fnmatch.fnmatchcase(path.as_posix(), file_pattern)):
                continue
            if name_pattern and name_pattern != name:
                continue
            merged = dict(changes)
            if "ignore" in merged:
                merged["ignore"] = config.ignore + merged["ignore"]
            if "rule_options" in merged:
                merged["rule_options"] = {**config.rule_options, **{
                    code: {**config.rule_options.get(code, {}), **options}
                    for code, options in merged["rule_options"].items()}}
            config = replace(config, **merged)
        return config


# --- validators: each takes the value and the name to blame ("--select", "pyproject.toml: [tool.healthcheck]
# seed", "select"), and returns the normalized value or raises one UsageError line -----------------------------

def _type_name(value: Any) -> str:
    return {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
            tuple: "a list", dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def fail_level(value: Any, name: str) -> str:
    if not isinstance(value, str) or value not in FAIL_LEVELS:
        raise UsageError(f"{name} must be one of {', '.join(FAIL_LEVELS)}, not {value!r}")
    return value


def trace_method(value: Any, name: str) -> str:
    if not isinstance(value, str) or value not in TRACES:
        raise UsageError(f"{name} must be one of {', '.join(TRACES)}, not {value!r}")
    return value


def seed_value(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise UsageError(f"{name} must be a non-negative integer such as 0, not {value!r}")
    return value


def optimizer_name(value: Any, name: str) -> str:
    """An optimizer's name as OptimizerSpec.parse knows it ("sgd", "adam", "adamw", …), lower-cased."""
    from healthcheck.probes.stability import OPTIMIZER_NAMES

    if not isinstance(value, str) or value.strip().lower() not in OPTIMIZER_NAMES:
        hint = difflib.get_close_matches(value.strip().lower(), OPTIMIZER_NAMES, n=1) if isinstance(value, str) else []
        raise UsageError(f"{name} must be one of {', '.join(OPTIMIZER_NAMES)}, not {value!r}"
                         + (f" (did you mean {hint[0]}?)" if hint else ""))
    return value.strip().lower()


def learning_rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive number such as 0.01, not {value!r}")
    return float(value)


def momentum_value(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(f"{name} must be a number in [0, 1) such as 0.9, not {value!r}")
    return float(value)


def rule_codes(value: Any, name: str, allow_empty: bool) -> tuple[str, ...]:
    """Rule codes or prefixes (`"HC101,HC2"`, `["HC101", "hc2"]`) as an upper-case tuple; each must start
    some rule's code, so a typo (HC1O1) or an unknown code (HC999) is an error, not a gate that is off."""
    from healthcheck.rules import REGISTRY

    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
    else:
        raise UsageError(f"{name} must be a list of rule codes or prefixes such as [\"HC1\", \"HC201\"], "
                         f"not {_type_name(value)}")
    if not all(isinstance(c, str) for c in items):
        raise UsageError(f"{name} must be a list of rule codes or prefixes (strings) such as [\"HC1\", \"HC201\"]")
    codes = tuple(c.strip().upper() for c in items if c.strip())
    if not codes and not allow_empty:
        raise UsageError(f"{name} is empty: it would run no rule; give codes or prefixes such as HC1,HC201 "
                         "(HC selects every rule)")
    unknown = [c for c in codes if not any(code.startswith(c) for code in REGISTRY)]
    if unknown:
        hints = [match for c in unknown for match in difflib.get_close_matches(c, REGISTRY, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise UsageError(f"{name}: no rule starts with {', '.join(unknown)}{hint}; `healthcheck rules` lists "
                         "the codes (a prefix such as HC1 selects a group)")
    return codes


def _option_value(value: Any, default: Any, name: str) -> Any:
    """A rule option of the default's kind: a count stays an integer, a threshold is a finite number >= 0."""
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            raise UsageError(f"{name} must be {_type_name(default)}, not {value!r}")
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int) and not (numeric and isinstance(value, int)):
        raise UsageError(f"{name} must be a non-negative integer such as {default}, not {value!r}")
    if not numeric or not math.isfinite(value):
        raise UsageError(f"{name} must be a non-negative number such as {default}, not {value!r}")
    if value < 0:
        raise UsageError(f"{name} must be non-negative, not {value!r}")
    return float(value) if isinstance(default, float) else value


def rule_options(value: Any, name: str) -> dict[str, dict[str, Any]]:
    """{code: {option: value}} with known codes and options (`-` or `_` in option names) of the right kind."""
    from healthcheck.rules import REGISTRY

    if not isinstance(value, dict):
        raise UsageError(f"{name} must be a table of rule codes, such as [tool.healthcheck.rules.HC101], "
                         f"not {_type_name(value)}")
    out: dict[str, dict[str, Any]] = {}
    for code, options in value.items():
        rule = REGISTRY.get(code.upper()) if isinstance(code, str) else None
        if rule is None:
            raise UsageError(f"{name}.{code}: no such rule; `healthcheck rules` lists the codes")
        if not isinstance(options, dict):
            raise UsageError(f"{name}.{code} must be a table of options such as {{warn-joins = 2}}, "
                             f"not {_type_name(options)}")
        converted = {str(k).replace("-", "_"): v for k, v in options.items()}
        bad_options = set(converted) - set(rule.options)
        if bad_options:
            known = ", ".join(k.replace("_", "-") for k in rule.options) or "none"
            raise UsageError(f"{name}.{code}: unknown option(s) {', '.join(sorted(bad_options))}; known: {known}")
        out[rule.code] = {key: _option_value(v, rule.options[key], f"{name}.{code}.{key.replace('_', '-')}")
                          for key, v in converted.items()}
    return out


def input_shapes(value: Any, name: str, allow_empty: bool = False) -> tuple[tuple[int, ...], ...]:
    """One shape ([8, 3, 32, 32]) or a list of shapes (one per input) of positive integers."""
    shapes = value
    if isinstance(shapes, (list, tuple)) and shapes and all(isinstance(n, int) for n in shapes):
        shapes = [shapes]
    valid = isinstance(shapes, (list, tuple)) and (bool(shapes) or allow_empty) and all(
        isinstance(s, (list, tuple)) and s and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                   for n in s) for s in shapes)
    if not valid:
        raise UsageError(f"{name} must be a list of positive integers such as [8, 3, 32, 32] (or a list of such "
                         f"lists for several inputs), not {value!r}")
    return tuple(tuple(s) for s in shapes)


# --- pyproject.toml ----------------------------------------------------------------------------------------------

def find_pyproject(start: Path) -> Path | None:
    start = start.resolve()
    for directory in [start, *start.parents] if start.is_dir() else [start.parent, *start.parent.parents]:
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(start: Path | None = None) -> Config:
    """Config from the nearest pyproject.toml above `start` (a file or directory), else defaults."""
    path = find_pyproject(start or Path.cwd())
    if path is None:
        return Config()
    text = read_utf8(path, str(path), "TOML files are UTF-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise UsageError(f"{path}: `tool` must be a table ([tool.healthcheck]), not {_type_name(tool)}")
    table = tool.get("healthcheck")
    if table is None:
        return Config()
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool] healthcheck must be a table ([tool.healthcheck] with keys such as "
                         f"fail-on = \"error\"), not {_type_name(table)}")
    return config_from_table(table, path)


def config_from_table(table: dict[str, Any], path: Path | None = None) -> Config:
    where = f"{path}: [tool.healthcheck]" if path else "[tool.healthcheck]"
    changes = _fields(table, where, _KEYS)
    models: dict[str, dict[str, Any]] = {}
    model_tables = table.get("models", {})
    if not isinstance(model_tables, dict):
        raise UsageError(f"{where}: models must be a table of file patterns, such as "
                         f"[tool.healthcheck.models.\"models/*.py\"], not {_type_name(model_tables)}")
    for pattern, model_table in model_tables.items():
        if not isinstance(model_table, dict):
            raise UsageError(f"{where}: models.{pattern!r} must be a table of settings")
        models[pattern] = _fields(model_table, f"{where}: models.{pattern!r}", _MODEL_KEYS)
    return Config(**changes, models=models, path=path)


def _fields(table: dict[str, Any], where: str, keys: set[str]) -> dict[str, Any]:
    """Config field changes from one table of `[tool.healthcheck]` settings, each value validated."""
    unknown = set(table) - keys
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(keys))}")
    changes: dict[str, Any] = {}
    if "fail-on" in table:
        changes["fail_on"] = fail_level(table["fail-on"], f"{where}: fail-on")
    for key in ("select", "ignore"):
        if key in table:
            if not isinstance(table[key], list):
                raise UsageError(f"{where}: {key} must be a list of rule codes or prefixes such as "
                                 f"[\"HC1\", \"HC201\"], not {_type_name(table[key])}")
            changes[key] = rule_codes(table[key], f"{where}: {key}", allow_empty=key == "ignore")
    if "rules" in table:
        changes["rule_options"] = rule_options(table["rules"], f"{where}: rules")
    if "input-shape" in table:
        changes["input_shapes"] = input_shapes(table["input-shape"], f"{where}: input-shape")
    if "seed" in table:
        changes["seed"] = seed_value(table["seed"], f"{where}: seed")
    if "trace" in table:
        changes["trace"] = trace_method(table["trace"], f"{where}: trace")
    if "optimizer" in table:
        changes["optimizer"] = optimizer_name(table["optimizer"], f"{where}: optimizer")
    if "lr" in table:
        changes["lr"] = learning_rate(table["lr"], f"{where}: lr")
    if "momentum" in table:
        changes["momentum"] = momentum_value(table["momentum"], f"{where}: momentum")
    return changes
