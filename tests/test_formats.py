"""SARIF, JUnit and Markdown: validated against the SARIF 2.1.0 JSON schema and the JUnit XSD that
Jenkins uses (tests/data), parsed by a JUnit consumer, and checked for what each format must carry."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from healthcheck.rules import REGISTRY
from tests.test_cli import run
from tests.test_gate import SICK

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(sick, healthy): a 12-join unnormalized residual MLP (HC101 and HC201 errors when measured), and a
    3-block one whose join line silences HC101."""
    root = tmp_path_factory.mktemp("project")
    sick, healthy = root / "sick.py", root / "healthy.py"
    sick.write_text(SICK)
    healthy.write_text(SICK.replace("depth=12", "depth=3").replace("# JOIN", "# healthcheck: ignore[HC101]"))
    return sick, healthy


def join_line(path: Path) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "return x + self.fc2" in line)


def report(fmt: str, *targets: Path, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    code, out, err = run(*map(str, targets), "--format", fmt, *extra)
    assert code in (0, 1), err
    return code, out


def test_sarif_is_valid_and_points_at_the_users_line(models, monkeypatch):
    sick, healthy = models
    monkeypatch.chdir(sick.parent)  # results are relative to %SRCROOT% = the current directory
    code, out = report("sarif", sick, healthy)
    assert code == 1
    log = json.loads(out)
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    jsonschema.validate(log, schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    run_ = log["runs"][0]
    rules = run_["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted(REGISTRY)
    active = [r for r in run_["results"] if "suppressions" not in r]
    suppressed = [r for r in run_["results"] if "suppressions" in r]
    assert {r["ruleId"] for r in active} >= {"HC101", "HC201"}  # the structural finding and its measurement
    result = next(r for r in active if r["ruleId"] == "HC101")
    assert result["level"] == "error" and rules[result["ruleIndex"]]["id"] == "HC101"
    physical = result["locations"][0]["physicalLocation"]
    assert physical["artifactLocation"] == {"uri": "sick.py", "uriBaseId": "%SRCROOT%"}
    assert physical["region"]["startLine"] == join_line(sick)
    assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == "Net.blocks.0"
    assert "fix:" in result["message"]["text"] and result["properties"]["evidence"]["count"] == 12
    # the healthy model's HC101 (one join: a warning) is silenced at its line: a SARIF in-source suppression
    assert [(r["ruleId"], r["suppressions"][0]["kind"]) for r in suppressed] == [("HC101", "inSource")]
    assert suppressed[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "healthy.py"
    # fingerprints follow model, rule and module, not the line: stable when code above moves
    assert result["partialFingerprints"] == next(r for r in json.loads(report("sarif", sick)[1])["runs"][0]["results"]
                                                 if r["ruleId"] == "HC101")["partialFingerprints"]


def test_sarif_model_wide_findings_point_at_the_model_definition(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain.py"
    plain.write_text("import torch\nfrom torch import nn\n\n"
                     "model = nn.Sequential(*[m for _ in range(24) for m in (nn.Linear(16, 16), nn.Tanh())])\n"
                     "example_input = torch.randn(8, 16)\n")
    log = json.loads(report("sarif", plain, extra=("--no-probes",))[1])
    results = {r["ruleId"]: r for r in log["runs"][0]["results"]}
    assert "HC104" in results  # a deep plain stack: a finding about the whole model
    location = results["HC104"]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "plain.py" and location["region"]["startLine"] == 4


def test_junit_is_valid_and_has_one_case_per_rule_per_model(models, tmp_path):
    xmlschema = pytest.importorskip("xmlschema")
    junitparser = pytest.importorskip("junitparser")
    sick, healthy = models
    path = tmp_path / "healthcheck.xml"
    code, _, _ = run(str(sick), str(healthy), "--format", "junit", "-o", str(path))
    assert code == 1
    xmlschema.XMLSchema(DATA / "junit-10.xsd").validate(path)
    suites = list(junitparser.JUnitXml.fromfile(str(path)))
    assert [s.name for s in suites] == ["healthcheck Net", "healthcheck Net"]
    sick_suite, healthy_suite = suites
    for suite in suites:
        assert [case.name.split()[0] for case in suite] == sorted(REGISTRY)
        assert suite.tests == len(REGISTRY)
    results = {case.name.split()[0]: case.result for case in sick_suite}
    # HC101, the measured HC201, and HC504: its output at init is far above a uniform guess (loss ≈ 875 vs ln 4)
    assert sick_suite.failures == 3 and results["HC101"][0].type == "HC101"
    assert isinstance(results["HC504"][0], junitparser.Failure)
    assert isinstance(results["HC101"][0], junitparser.Failure)
    assert "fix:" in results["HC101"][0].text and "sick.py:" in results["HC101"][0].text
    assert all(isinstance(results[c][0], junitparser.Skipped) for c in REGISTRY if c.startswith("HC4"))
    assert isinstance(results["HC201"][0], junitparser.Failure)  # measured and failed
    assert all(results[c] == [] for c in REGISTRY if c[:3] == "HC3")  # measured and passed
    assert healthy_suite.failures == 0
    hc101 = next(case for case in healthy_suite if case.name.startswith("HC101"))
    assert hc101.is_passed and "suppressed (comment)" in hc101.system_out


def test_junit_marks_what_was_not_run(models):
    sick, _ = models
    root = ET.fromstring(report("junit", sick, extra=("--no-probes", "--ignore", "HC102"))[1].encode())
    skipped = {case.get("name").split()[0]: case.find("skipped").get("message")
               for case in root.iter("testcase") if case.find("skipped") is not None}
    assert "not selected" in skipped["HC102"]
    assert "--no-probes" in skipped["HC201"]
    assert "HealthMonitor" in skipped["HC401"]


def test_junit_fail_on_follows_the_gate(models):
    sick, _ = models
    root = ET.fromstring(report("junit", sick, extra=("--no-probes", "--fail-on", "never"))[1].encode())
    assert root.get("failures") == "0"


def test_markdown_summary_findings_and_fix_numbers(models):
    sick, healthy = models
    code, out = report("markdown", sick, healthy, extra=("--fix",))
    assert code == 1
    assert out.startswith("### healthcheck: ❌ 1 of 2 models fails")
    lines = out.splitlines()
    rows = [line for line in lines if line.startswith("| Net |")]
    assert len(rows) == 2 and "❌ fails" in rows[0]
    suppressed_column = lines[2].split("|").index(" suppressed ")
    assert rows[1].split("|")[suppressed_column].strip() == "1"  # the healthy model's silenced HC101
    assert any(line.startswith("| 🔴 error | HC101 |") and "sick.py:" in line for line in lines)
    before_after = next(line for line in lines if line.startswith("| variance growth"))
    assert before_after.count("|") >= 4  # before, then one column per fix tried
    assert "| verified | | ✅ yes" in out
    assert len(out) < 65_536  # a GitHub comment


def test_several_models_json_is_a_list(models):
    sick, healthy = models
    data = json.loads(report("json", sick, healthy, extra=("--no-probes",))[1])
    # structure alone: HC101 is a warning (a prediction), the healthy model's is silenced
    assert isinstance(data, list) and [d["summary"]["warning"] for d in data] == [1, 0]
    assert data[1]["suppressed"][0]["code"] == "HC101"
