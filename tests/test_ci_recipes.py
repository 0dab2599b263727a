"""The CI recipes run as written: the GitHub Actions gate step, the pre-commit hooks, and the
packaging they rely on (console script, plugins installed as healthcheck.plugins)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import healthcheck
from tests.helpers import ROOT
from tests.test_gate import SICK

yaml = pytest.importorskip("yaml")
BIN = Path(sys.executable).parent


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sick.py").write_text(SICK)
    (tmp_path / "models" / "small.py").write_text(SICK.replace("depth=12", "depth=1"))
    return tmp_path


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", "-e", "-c", command], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_github_workflow_gate_step(user_project):
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "healthcheck.yml").read_text())
    steps = workflow["jobs"]["healthcheck"]["steps"]
    gate = next(s for s in steps if s.get("name") == "Check the models")["run"]
    models = workflow["env"]["MODELS"]
    result = shell(gate, user_project, MODELS=models)
    assert result.returncode == 1, result.stderr  # the sick model fails the pull request
    sarif = json.loads((user_project / "healthcheck.sarif").read_text())
    assert {"HC101", "HC201"} <= {r["ruleId"] for r in sarif["runs"][0]["results"]}  # predicted and measured
    assert (user_project / "healthcheck.md").read_text().startswith("### healthcheck: ❌ 1 of 2 models fails")
    # HC101, HC201, and HC504: the variance the stack multiplies reaches the output (loss ≫ ln C)
    assert ET.parse(user_project / "healthcheck.xml").getroot().get("failures") == "3"
    # the baseline command from the workflow's header makes today's findings known: the gate passes
    baseline_command = re.search(r"baseline:\s+(healthcheck .*)$", (ROOT / "examples/ci/healthcheck.yml").read_text(),
                                 re.MULTILINE).group(1)
    assert shell(baseline_command, user_project, MODELS=models).returncode == 1
    result = shell(gate, user_project, MODELS=models)
    assert result.returncode == 0, result.stderr
    assert "suppressed" in (user_project / "healthcheck.md").read_text()


def test_several_outputs_need_known_suffixes(user_project):
    result = shell("healthcheck models/small.py --no-probes -o a.sarif -o b.html", user_project)
    assert result.returncode == 2 and "b.html" in result.stderr and ".sarif (sarif)" in result.stderr
    assert not (user_project / "a.sarif").exists()


def test_pre_commit_hooks(user_project):
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    user_config = yaml.safe_load((ROOT / "examples" / "ci" / "pre-commit-config.yaml").read_text())
    used = user_config["repos"][0]["hooks"][0]
    assert used["id"] in {h["id"] for h in hooks}
    for hook in hooks:
        assert {"id", "name", "entry", "language"} <= set(hook)
        files = re.compile(hook["files"])
        assert files.search("models/net.py") and files.search("src/nets/vit.py") and not files.search("train.py")
        # pre-commit runs `entry args FILE...` with the staged files that match
        staged = [f for f in ["models/small.py", "README.md"] if re.search(used["files"], f)]
        command = " ".join([hook["entry"], *used["args"], *staged])
        assert shell(command, user_project).returncode == 0
        command = " ".join([hook["entry"], *used["args"], "models/small.py", "models/sick.py"])
        result = shell(command, user_project)
        assert result.returncode == 1 and "HC101" in result.stdout


def test_every_package_is_installed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"healthcheck"} | {f"healthcheck.{p.parent.name}" for p in (ROOT / "healthcheck").glob("*/__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"healthcheck.plugins"}
    assert setuptools["package-dir"] == {"healthcheck.plugins": "plugins"}


def test_package_exports_resolve():
    assert set(healthcheck.__all__) == set(healthcheck._EXPORTS) | {"__version__"}
    for name in healthcheck.__all__:
        assert getattr(healthcheck, name) is not None
    assert (BIN / "healthcheck").exists()  # the console script the recipes call
