"""pytest plugin: assert in your own test suite that a model is healthy at initialization.

    from healthcheck import assert_healthy

    def test_model_trains():
        assert_healthy(build_model(), torch.randn(8, 3, 32, 32))

or, with no import, through the fixture of the same name:

    def test_model_trains(assert_healthy):
        assert_healthy(build_model(), torch.randn(8, 3, 32, 32))

A failure lists each finding with its evidence and the fix. Settings (select, ignore, thresholds)
come from `[tool.healthcheck]` in the pyproject.toml above pytest's root directory; the keyword
arguments of `healthcheck.check` override them. pytest loads this module through the `pytest11`
entry point; it imports torch only when a test calls `assert_healthy`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from healthcheck.records import Report


def assert_healthy(model: Any, example_inputs: Any, *, fail_on: str | None = None, root: str | Path | None = None,
                   **options: Any) -> Report:
    """Fail the calling test when `healthcheck.check(model, example_inputs, **options)` has a finding
    at or above `fail_on` (default: the configured fail-on, "error"). `[tool.healthcheck]` is read from
    the pyproject.toml above `root` (the fixture passes pytest's rootdir; default: the current
    directory) unless `config=` is given. Returns the report."""
    __tracebackhide__ = True
    from healthcheck.api import check
    from healthcheck.config import load_config
    from healthcheck.report.text import findings_text

    config = options.pop("config", None) or load_config(Path(root) if root is not None else Path.cwd())
    report = check(model, example_inputs, config=config, **options)
    level = fail_on or config.fail_on
    if report.fails(level):
        pytest.fail(f"healthcheck: {report.model.name} is not healthy (fail on {level}):\n\n"
                    + findings_text(report), pytrace=False)
    return report


@pytest.fixture(name="assert_healthy")
def assert_healthy_fixture(request: pytest.FixtureRequest) -> Any:
    """`assert_healthy(model, example_inputs, **options)` without an import, configured from the
    pyproject.toml of pytest's rootdir."""
    return functools.partial(assert_healthy, root=request.config.rootpath)
