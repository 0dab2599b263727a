"""Each structural rule: a model that has the problem, one that does not, thresholds from config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import healthcheck
from healthcheck.config import Config, config_from_table, load_config
from healthcheck.loading import import_file
from healthcheck.report import render
from healthcheck.rules import REGISTRY, selected
from healthcheck.rules.registry import DOC_HEADINGS, all_docs
from tests import zoo
from tests.helpers import EXAMPLES, ROOT


def check_structure(model, x, **options):
    """Structural rules only: these tests are about HC1xx, the probes have their own."""
    return healthcheck.check(model, x, probes=False, **options)


def codes(report, severity=None) -> list[str]:
    return [f.code for f in report.findings if severity is None or f.severity == severity]


@pytest.fixture(scope="module")
def deep_no_norm():
    torch.manual_seed(0)
    module = import_file(EXAMPLES / "deep_resnet_no_norm.py")
    return module.DeepResNet(), torch.randn(2, 3, 16, 16)


def test_hc101_unnormalized_joins(deep_no_norm):
    report = check_structure(*deep_no_norm)
    [finding] = [f for f in report.findings if f.code == "HC101"]
    assert finding.severity == "warning"  # a structural prediction alone is at most a warning
    assert finding.evidence["joins_in_model"] == 16 and finding.evidence["predicted_variance_growth"] == 2.0**16
    assert finding.evidence["joins_in_series"] == 16 and finding.evidence["measured"] is False
    assert finding.location.source.endswith("deep_resnet_no_norm.py:21")
    assert finding.fix.transform == "scale_joins"
    # 1/sqrt(2) scaling, BN in the branch: no HC101
    assert "HC101" not in codes(check_structure(zoo.ScaledResNet(), torch.randn(4, 16)))
    assert "HC101" not in codes(check_structure(import_file(EXAMPLES / "preact_resnet.py").model,
                                                  torch.randn(2, 3, 16, 16)))


def test_hc101_measured_severity_and_thresholds_from_config(deep_no_norm):
    # with the probes (on the example's own batch: 8 images of 32×32), the measured doubling confirms
    # the prediction: an error
    measured = (deep_no_norm[0], torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    [finding] = [f for f in healthcheck.check(*measured).findings if f.code == "HC101"]
    assert finding.severity == "error" and finding.evidence["measured_exponential"] is True
    assert finding.evidence["measured_ratio_per_block"] > 1.5
    assert finding.evidence["predicted_ratio_per_block"] == pytest.approx(finding.evidence["measured_ratio_per_block"],
                                                                          rel=0.3)
    assert codes(healthcheck.check(*measured, rule_options={"HC101": {"error_joins": 32}}, select=["HC101"]),
                 "warning") == ["HC101"]
    assert codes(check_structure(*deep_no_norm, rule_options={"HC101": {"error_joins": 32}}), "error") == []
    assert codes(check_structure(*deep_no_norm, rule_options={"HC101": {"error_joins": 32}}), "warning") == ["HC101"]
    assert codes(check_structure(*deep_no_norm, rule_options={"HC101": {"warn_joins": 20, "error_joins": 32}})) == []


def test_hc102_activation_after_join():
    tv = pytest.importorskip("torchvision")
    report = check_structure(tv.models.resnet18(weights=None), torch.randn(2, 3, 32, 32))
    [finding] = [f for f in report.findings if f.code == "HC102"]
    assert finding.severity == "info" and finding.evidence["count"] == 8
    assert codes(check_structure(tv.models.resnet18(weights=None), torch.randn(2, 3, 32, 32),
                                   rule_options={"HC102": {"warn_joins": 8}}), "warning") == ["HC102"]
    assert "HC102" not in codes(check_structure(import_file(EXAMPLES / "preact_resnet.py").model,
                                                  torch.randn(2, 3, 16, 16)))


def test_hc103_post_ln_at_depth():
    tokens = torch.randint(0, 100, (2, 12))
    deep = zoo.Transformer(zoo.PostLNBlock, layers=6)
    report = check_structure(deep, tokens)
    assert {f.code for f in report.findings} == {"HC103"}
    assert all(f.severity == "warning" and f.evidence["joins_in_model"] == 12 for f in report.findings)
    assert len(report.findings) == 2  # one per line of code: the attention add and the MLP add
    assert codes(check_structure(zoo.Transformer(zoo.PostLNBlock, layers=4), tokens)) == []  # 8 joins < 12
    assert codes(check_structure(zoo.Transformer(zoo.PreLNBlock, layers=6), tokens)) == []
    # at or above error_joins, the structure alone still says warning: an error needs measured gradients
    assert set(codes(check_structure(deep, tokens, rule_options={"HC103": {"error_joins": 12}}), "warning")) == {"HC103"}
    assert codes(check_structure(deep, tokens, rule_options={"HC103": {"error_joins": 12}}), "error") == []


def test_hc104_deep_plain_stack():
    x = torch.randn(16, 32)
    [finding] = check_structure(zoo.PlainStack(depth=24), x).findings
    assert finding.code == "HC104" and finding.severity == "warning"
    assert finding.evidence["plain_depth"] == 24 and finding.evidence["normalized"] is True
    assert finding.evidence["predicted_gradient_growth"] == pytest.approx((torch.pi / (torch.pi - 1)) ** 12)
    [finding] = check_structure(zoo.PlainStack(depth=60, norm=False), x).findings
    assert finding.severity == "warning" and finding.evidence["normalized"] is False  # predicted only
    # measured: the signal collapses to a few directions, which confirms the prediction
    [finding] = [f for f in healthcheck.check(zoo.PlainStack(depth=60, norm=False), x).findings if f.code == "HC104"]
    assert finding.severity == "error" and finding.evidence["measured_min_directions"] <= 2
    assert check_structure(zoo.PlainStack(depth=12), x).findings == []


def test_hc105_branch_ends_in_relu():
    model = torch.nn.Sequential(zoo.ReLUEndBlock(16), zoo.ReLUEndBlock(16))
    [finding] = check_structure(model, torch.randn(4, 16)).findings
    assert finding.code == "HC105" and finding.evidence["count"] == 2
    assert check_structure(zoo.Transformer(zoo.PreLNBlock), torch.randint(0, 100, (2, 8))).findings == []


def test_every_rule_is_documented():
    for code, rule in REGISTRY.items():
        docs = rule.docs()
        for heading in DOC_HEADINGS:
            assert f"### {heading}" in docs, (code, heading)
        assert rule.why and rule.source and rule.bad_example.strip() and rule.good_example.strip(), code
        assert rule.fix_safety in ("safe", "unsafe")
        assert code.startswith("HC") and len(code) == 5


def test_generated_rule_docs_are_up_to_date():
    assert (ROOT / "docs" / "rules.md").read_text() == all_docs(), "run: python -m healthcheck.rules > docs/rules.md"


def test_selection_is_ruff_style():
    assert selected("HC101", ("HC",), ())
    assert not selected("HC101", ("HC",), ("HC1",))
    assert selected("HC101", ("HC101",), ("HC1",))  # the more specific prefix wins
    assert not selected("HC201", ("HC1",), ())


def test_pyproject_config(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.healthcheck]\nfail-on = "warning"\nignore = ["HC102"]\n[tool.healthcheck.rules.HC101]\nerror-joins = 4\n')
    config = load_config(tmp_path / "model.py")
    assert config.fail_on == "warning" and config.ignore == ("HC102",)
    assert config.rule_options == {"HC101": {"error_joins": 4}}
    with pytest.raises(healthcheck.UsageError, match="unknown option"):
        config_from_table({"rules": {"HC101": {"nope": 1}}})
    with pytest.raises(healthcheck.UsageError, match="no such rule"):
        config_from_table({"rules": {"HC999": {}}})
    with pytest.raises(healthcheck.UsageError, match="unknown key"):
        config_from_table({"fail_on": "error"})
    assert Config().fail_on == "error"


def test_json_report_follows_schema(deep_no_norm):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(healthcheck.__file__).parent / "report" / "report.schema.json").read_text())
    for model, x in (deep_no_norm, (zoo.UNet(), torch.randn(2, 3, 16, 16)),
                     (zoo.Transformer(zoo.PostLNBlock, layers=6), torch.randint(0, 100, (2, 8)))):
        data = json.loads(render(healthcheck.check(model, x), "json"))
        jsonschema.validate(data, schema)
        assert data["summary"] == {s: sum(f["severity"] == s for f in data["findings"]) for s in ("error", "warning", "info")}


def test_text_report_groups_joins_by_stage(deep_no_norm):
    text = render(healthcheck.check(*deep_no_norm), "text", width=140)
    assert "blocks │ 16 add" in text.replace("  ", " ").replace("  ", " ") or "blocks" in text
    # 16 joins: one row, not 16 (the rest: profile, output at init, the stability note, 3 findings)
    assert text.count("\n") < 50
    assert "HC101" in text and "fix:" in text
