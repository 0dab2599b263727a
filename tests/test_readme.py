"""README's integration snippets run as written: each ```python block under "## Integrations" is
run in a fresh directory (blocks that define tests run under pytest, the others under python)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def integration_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Integrations\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_there_are_snippets():
    assert len(integration_snippets()) >= 1


@pytest.mark.parametrize("index", range(len(integration_snippets())))
def test_snippet_runs_as_written(index, tmp_path):
    snippet = integration_snippets()[index]
    if "def test_" in snippet:
        (tmp_path / "test_snippet.py").write_text(snippet)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"]
    else:
        (tmp_path / "snippet.py").write_text(snippet)
        command = [sys.executable, "snippet.py"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_model_you_cannot_load_snippet_runs_as_written(tmp_path):
    """The 70B meta-device snippet: structure only, never a weight allocated, within the promised budget."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Checking a model you cannot load\n", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(snippets) == 1
    (tmp_path / "snippet.py").write_text(snippets[0])
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.split()[:3] == ["not", "materialized", "160"]  # 80 layers × 2 joins, weights never real
