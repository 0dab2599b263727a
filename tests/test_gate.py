"""The CI gate: config select/ignore/thresholds/per-model settings, `# healthcheck: ignore` at the
source, and --baseline, each through the CLI's exit code as README documents it."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import jsonschema
import pytest

import healthcheck
from tests.helpers import RESIDUAL_MLP
from tests.test_cli import run

#: 12 unnormalized residual joins: HC101, found by the structure pass alone, so these tests run with
#: --no-probes; a structural prediction alone is a warning, so they gate at --fail-on warning (the
#: measured error, and error-joins, need the probes: `measured_gate`)
SICK = RESIDUAL_MLP + """

model = Net()
example_input = torch.randn(16, 32)
"""


@pytest.fixture
def project(tmp_path: Path):
    """A user project: sick.py and a pyproject.toml with [tool.healthcheck] written by `configure`."""
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "sick.py"
    model.write_text(SICK)

    def configure(body: str) -> Path:
        (tmp_path / "pyproject.toml").write_text("[tool.healthcheck]\n" + textwrap.dedent(body))
        return model

    return configure


def gate(model: Path, *flags: str) -> tuple[int, str, str]:
    return run(str(model), "--no-probes", "--fail-on", "warning", *flags)


def measured_gate(model: Path, *flags: str) -> tuple[int, str, str]:
    """With the probes, HC101 alone: the measured growth makes it an error (at error-joins)."""
    return run(str(model), "--select", "HC101", *flags)


def test_default_config_fails_on_the_error(project):
    code, out, _ = gate(project(""))
    assert code == 1 and "HC101" in out


def test_ignore_by_code_and_by_prefix(project):
    assert gate(project('ignore = ["HC101"]'))[0] == 0
    assert gate(project('ignore = ["HC1"]'))[0] == 0
    assert gate(project('ignore = ["HC2"]'))[0] == 1


def test_select_runs_only_the_selected_rules(project):
    assert gate(project('select = ["HC102", "HC103"]'))[0] == 0
    assert gate(project('select = ["HC10"]'))[0] == 1
    # ruff-style: a longer select prefix beats a shorter ignore one
    assert gate(project('select = ["HC101"]\nignore = ["HC1"]'))[0] == 1


def test_flags_win_over_the_config(project):
    model = project('ignore = ["HC101"]')
    assert gate(model, "--ignore", "HC2")[0] == 1  # --ignore replaces the configured list
    assert gate(project('fail-on = "never"'), "--fail-on", "warning")[0] == 1


def test_per_rule_threshold_changes_the_severity(project):
    assert measured_gate(project(""))[0] == 1
    code, out, _ = measured_gate(project("[tool.healthcheck.rules.HC101]\nerror-joins = 20\n"))
    assert code == 0 and "warning" in out and "HC101" in out
    assert measured_gate(project("fail-on = \"warning\"\n[tool.healthcheck.rules.HC101]\nerror-joins = 20\n"))[0] == 1
    assert measured_gate(project("[tool.healthcheck.rules.HC101]\nwarn-joins = 13\nerror-joins = 20\n"))[0] == 0


def test_per_model_settings_apply_to_matching_files_only(project):
    model = project("""
        [tool.healthcheck.models."models/*.py"]
        ignore = ["HC101"]
        [tool.healthcheck.models."other/*.py"]
        fail-on = "never"
    """)
    assert gate(model)[0] == 0
    model = project("""
        [tool.healthcheck.models."other/*.py"]
        ignore = ["HC101"]
    """)
    assert gate(model)[0] == 1


def test_per_model_name_and_input_shape(project):
    model = project("""
        [tool.healthcheck.models."models/sick.py:model"]
        input-shape = [4, 7]
    """)
    code, _, err = run(f"{model}:model", "--no-probes")
    assert code == 2 and "[4, 7]" in err  # the configured shape reached the model (which wants 32 features)
    assert gate(model)[0] == 1  # the pattern names NAME: it matches `FILE:model`, not plain `FILE`
    model = project("""
        [tool.healthcheck.models."models/sick.py:other"]
        input-shape = [4, 7]
    """)
    assert run(f"{model}:model", "--no-probes", "--fail-on", "warning")[0] == 1


@pytest.mark.parametrize("body, message", [
    ('select = ["XX1"]', "no rule starts with XX1"),
    ('ignore = "HC101"', "ignore must be a list"),
    ('[tool.healthcheck.models."m.py"]\nnope = 1', "unknown key(s) nope"),
    ('[tool.healthcheck.models."m.py"]\ninput-shape = [0, 3]', "input-shape must be"),
    ("[tool.healthcheck.rules.HC101]\nerror_count = 3", "unknown option(s) error_count"),
])
def test_bad_config_is_a_usage_error(project, body, message):
    code, _, err = gate(project(body))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("comment, exit_code", [
    ("# healthcheck: ignore[HC101]", 0),
    ("# healthcheck: ignore[HC1]", 0),
    ("# healthcheck: ignore[hc101, HC205]", 0),
    ("# healthcheck: ignore", 0),
    ("# healthcheck: ignore[HC102]", 1),
    ("# not a suppression", 1),
])
def test_suppression_comment_at_the_source_line(project, comment, exit_code):
    model = project("")
    model.write_text(SICK.replace("# JOIN", comment))
    code, out, _ = gate(model)
    assert code == exit_code, out
    if exit_code == 0:
        assert "suppressed: 1 by # healthcheck: ignore" in out
        data = json.loads(gate(model, "--format", "json")[1])
        jsonschema.validate(data, json.loads((Path(healthcheck.__file__).parent / "report" / "report.schema.json").read_text()))
        assert data["findings"] == [] and [s["code"] for s in data["suppressed"]] == ["HC101"]
        assert data["suppressed"][0]["reason"] == "comment"


def test_baseline_passes_known_findings_and_fails_new_ones(project, tmp_path):
    model = project("")
    baseline = tmp_path / "baseline.json"
    assert gate(model, "--format", "json", "-o", str(baseline))[0] == 1
    code, out, _ = gate(model, "--baseline", str(baseline))
    assert code == 0 and "suppressed: 1 by baseline" in out
    # a baseline written under a baseline keeps the known findings
    rewritten = tmp_path / "baseline2.json"
    gate(model, "--baseline", str(baseline), "--format", "json", "-o", str(rewritten))
    assert gate(model, "--baseline", str(rewritten))[0] == 0
    # a new finding (an activation after the join: HC102, info) fails; the known HC101 still does not
    model.write_text(SICK.replace("return x + self.fc2(torch.relu(self.fc1(x)))",
                                  "return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))"))
    code, out, _ = gate(model, "--baseline", str(baseline), "--fail-on", "info")  # HC102 is info
    assert code == 1 and "HC102" in out
    data = json.loads(gate(model, "--baseline", str(baseline), "--format", "json")[1])
    assert "HC101" not in {f["code"] for f in data["findings"]}
    assert {s["code"] for s in data["suppressed"]} == {"HC101"}


def test_baseline_does_not_hide_a_worse_severity(project, tmp_path):
    model = project("[tool.healthcheck.rules.HC101]\nerror-joins = 20\n")
    baseline = tmp_path / "baseline.json"
    assert measured_gate(model, "--format", "json", "-o", str(baseline))[0] == 0  # HC101 is a warning here
    model = project("")  # now it is an error again: worse than the baseline knew
    assert measured_gate(model, "--baseline", str(baseline))[0] == 1


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ('{"findings": []}', "not a healthcheck JSON report"),
])
def test_bad_baseline_is_a_usage_error(project, tmp_path, content, message):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(content)
    code, _, err = gate(project(""), "--baseline", str(baseline))
    assert code == 2 and message in err
    code, _, err = gate(project(""), "--baseline", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_several_files_one_exit_code(project, tmp_path):
    sick = project("")
    healthy = tmp_path / "models" / "healthy.py"
    shutil.copy(sick, healthy)
    healthy.write_text(SICK.replace("depth=12", "depth=1"))
    assert gate(healthy)[0] == 0
    code, out, _ = gate(healthy, str(sick))
    assert code == 1 and out.count("Net ·") == 2
    code, out, err = gate(healthy, str(tmp_path / "missing.py"))
    assert code == 2 and "Net ·" in out and "missing.py: no such file" in err
