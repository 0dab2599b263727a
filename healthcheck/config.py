"""Settings: defaults, then `[tool.healthcheck]` in pyproject.toml, then command-line flags."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from healthcheck.errors import UsageError

FAIL_LEVELS = ("error", "warning", "info", "never")
_MODEL_KEYS = {"fail-on", "select", "ignore", "rules", "input-shape", "seed", "trace"}
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
    #: `[tool.healthcheck.models."PATTERN"]`: field changes for the model files PATTERN matches
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None  # the pyproject.toml it came from

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
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read [tool.healthcheck]: {exc}") from exc
    table = data.get("tool", {}).get("healthcheck")
    if table is None:
        return Config()
    return config_from_table(table, path)


def config_from_table(table: dict[str, Any], path: Path | None = None) -> Config:
    where = f"{path}: [tool.healthcheck]" if path else "[tool.healthcheck]"
    changes = _fields(table, where, _KEYS)
    models: dict[str, dict[str, Any]] = {}
    for pattern, model_table in table.get("models", {}).items():
        if not isinstance(model_table, dict):
            raise UsageError(f"{where}: models.{pattern!r} must be a table of settings")
        models[pattern] = _fields(model_table, f"{where}: models.{pattern!r}", _MODEL_KEYS)
    return Config(**changes, models=models, path=path)


def _fields(table: dict[str, Any], where: str, keys: set[str]) -> dict[str, Any]:
    """Config field changes from one (validated) table of `[tool.healthcheck]` settings."""
    from healthcheck.rules import REGISTRY

    unknown = set(table) - keys
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(keys))}")
    changes: dict[str, Any] = {}
    if "fail-on" in table:
        if table["fail-on"] not in FAIL_LEVELS:
            raise UsageError(f"{where}: fail-on must be one of {', '.join(FAIL_LEVELS)}, not {table['fail-on']!r}")
        changes["fail_on"] = table["fail-on"]
    for key in ("select", "ignore"):
        if key in table:
            codes = table[key]
            if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
                raise UsageError(f"{where}: {key} must be a list of rule codes or prefixes such as [\"HC1\", \"HC201\"]")
            bad = [c for c in codes if not any(code.startswith(c.upper()) for code in REGISTRY)]
            if bad:
                raise UsageError(f"{where}: {key}: no rule starts with {', '.join(bad)}")
            changes[key] = tuple(c.upper() for c in codes)
    if "rules" in table:
        rule_options: dict[str, dict[str, Any]] = {}
        for code, options in table["rules"].items():
            rule = REGISTRY.get(code)
            if rule is None:
                raise UsageError(f"{where}: rules.{code}: no such rule")
            converted = {k.replace("-", "_"): v for k, v in options.items()}
            bad_options = set(converted) - set(rule.options)
            if bad_options:
                known = ", ".join(k.replace("_", "-") for k in rule.options) or "none"
                raise UsageError(f"{where}: rules.{code}: unknown option(s) {', '.join(sorted(bad_options))}; "
                                 f"known: {known}")
            rule_options[code] = converted
        changes["rule_options"] = rule_options
    if "input-shape" in table:
        shapes = table["input-shape"]
        if shapes and isinstance(shapes[0], int):
            shapes = [shapes]
        if not shapes or not all(isinstance(s, list) and s and all(isinstance(n, int) and n > 0 for n in s)
                                 for s in shapes):
            raise UsageError(f"{where}: input-shape must be a list of positive integers such as [8, 3, 32, 32] "
                             "(or a list of such lists for several inputs)")
        changes["input_shapes"] = tuple(tuple(s) for s in shapes)
    if "seed" in table:
        changes["seed"] = int(table["seed"])
    if "trace" in table:
        changes["trace"] = table["trace"]
    return changes
