"""Settings: defaults, then `[tool.healthcheck]` in pyproject.toml, then command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from healthcheck.errors import UsageError

FAIL_LEVELS = ("error", "warning", "info", "never")
_KEYS = {"fail-on", "select", "ignore", "rules", "input-shape", "seed", "trace"}


@dataclass(frozen=True)
class Config:
    fail_on: str = "error"
    select: tuple[str, ...] = ("HC",)
    ignore: tuple[str, ...] = ()
    rule_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    seed: int = 0
    trace: str = "auto"
    path: Path | None = None  # the pyproject.toml it came from

    def override(self, **changes: Any) -> Config:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


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
    from healthcheck.rules import REGISTRY

    where = f"{path}: [tool.healthcheck]" if path else "[tool.healthcheck]"
    unknown = set(table) - _KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KEYS))}")
    fail_on = table.get("fail-on", "error")
    if fail_on not in FAIL_LEVELS:
        raise UsageError(f"{where}: fail-on must be one of {', '.join(FAIL_LEVELS)}, not {fail_on!r}")
    rule_options: dict[str, dict[str, Any]] = {}
    for code, options in table.get("rules", {}).items():
        rule = REGISTRY.get(code)
        if rule is None:
            raise UsageError(f"{where}: rules.{code}: no such rule")
        converted = {k.replace("-", "_"): v for k, v in options.items()}
        bad = set(converted) - set(rule.options)
        if bad:
            known = ", ".join(k.replace("_", "-") for k in rule.options) or "none"
            raise UsageError(f"{where}: rules.{code}: unknown option(s) {', '.join(sorted(bad))}; known: {known}")
        rule_options[code] = converted
    shapes = table.get("input-shape", ())
    if shapes and isinstance(shapes[0], int):
        shapes = [shapes]
    return Config(
        fail_on=fail_on,
        select=tuple(table.get("select", ("HC",))),
        ignore=tuple(table.get("ignore", ())),
        rule_options=rule_options,
        input_shapes=tuple(tuple(s) for s in shapes),
        seed=int(table.get("seed", 0)),
        trace=table.get("trace", "auto"),
        path=path,
    )
