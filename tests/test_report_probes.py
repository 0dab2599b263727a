"""The depth profile in each output: JSON, text and TensorBoard (read back with its own reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import healthcheck
from healthcheck.cli import main
from healthcheck.loading import import_file
from healthcheck.report import render
from healthcheck.report.tensorboard import PROFILE_TAGS, write_tensorboard
from tests.helpers import EXAMPLES


@pytest.fixture(scope="module")
def sick_report():
    torch.manual_seed(0)
    model = import_file(EXAMPLES / "deep_resnet_no_norm.py").DeepResNet()
    return healthcheck.check(model, torch.randn(8, 3, 16, 16))


def test_json_profile_in_forward_order(sick_report):
    data = json.loads(render(sick_report, "json"))
    profile = data["measurements"]["profile"]
    assert [p["id"] for p in profile] == [j["id"] for j in data["architecture"]["joins"]]
    assert [p["depth"] for p in profile] == list(range(1, 17))
    assert all(p["at"] == "join" for p in profile)
    for p in profile:
        for key in ("var", "var_ratio", "residual_ratio", "grad_norm", "effective_rank", "sensitivity"):
            assert isinstance(p[key], float) and p[key] > 0, (key, p)
    assert 0 <= data["measurements"]["grad_correlation"] <= 1


def test_text_report_shows_compact_profile(sick_report):
    text = render(sick_report, "text", width=120)
    assert "Depth profile (16 blocks" in text
    for label in ("variance E[y²]", "residual ratio", "gradient RMS", "effective rank", "sensitivity χ"):
        assert label in text
    assert "▁" in text and "█" in text  # sparklines
    assert "gradient correlation between neighbouring inputs" in text


def test_tensorboard_events_read_back(sick_report, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tensorboard(sick_report, tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"init/{name}" for name in ("var", "var_ratio", "residual_ratio", "grad_rms", "effective_rank",
                                         "sensitivity")} <= scalars
    assert set(PROFILE_TAGS) >= {t.split("/", 1)[1] for t in scalars if t.count("/") == 1 and t != "init/grad_correlation"}
    var = events.Scalars("init/var")
    assert [e.step for e in var] == list(range(1, 17))
    expected = [p.var for p in sick_report.measurements.profile]
    assert [e.value for e in var] == pytest.approx(expected, rel=1e-6)
    assert events.Scalars("init/findings/error")[0].value == sick_report.count("error")
    assert "init/findings/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("init/findings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "HC201" in text


def test_cli_tensorboard_and_no_probes(tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(main, [str(EXAMPLES / "deep_resnet_no_norm.py"), "--tensorboard", str(tmp_path / "tb"),
                                  "--format", "json"])
    assert result.exit_code == 1
    assert list(Path(tmp_path / "tb").glob("events.out.tfevents.*"))
    result = runner.invoke(main, [str(EXAMPLES / "deep_resnet_no_norm.py"), "--no-probes", "--format", "json"])
    data = json.loads(result.stdout)
    assert data["measurements"]["profile"] == [] and {f["code"] for f in data["findings"]} == {"HC101"}


def test_token_model_is_probed_from_its_embedding():
    from tests import zoo

    torch.manual_seed(0)
    report = healthcheck.check(zoo.Transformer(zoo.PreLNBlock, layers=4), torch.randint(0, 100, (8, 16)))
    m = report.measurements
    assert len(m.profile) == 8 and m.failures == {}
    assert all(p.sensitivity is not None and p.grad_rms is not None for p in m.profile)
    assert m.grad_correlation is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probes_on_cuda():
    from tests import zoo

    model = zoo.Transformer(zoo.PreLNBlock, layers=4).cuda()
    report = healthcheck.check(model, torch.randint(0, 100, (8, 16), device="cuda"))
    assert report.measurements.failures == {} and len(report.measurements.profile) == 8
