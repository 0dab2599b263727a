"""Structure without running the model: `probes=False` / `--no-probes` trace on fake tensors, and a model
built on the meta device (weights never materialized) gets the structural report of the same model
built for real."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import healthcheck
from healthcheck.cli import main
from healthcheck.errors import UsageError
from healthcheck.report import render
from tests import zoo

transformers = pytest.importorskip("transformers")


def _structure(report: healthcheck.Report) -> dict:
    """What a structural report claims: architecture, findings, trace, parameter count."""
    data = report.to_json()
    return {"architecture": data["architecture"], "findings": data["findings"], "trace": data["model"]["trace"],
            "parameters": data["model"]["parameters"]}


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _llama_config():
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64)


def test_meta_llama_gets_the_structure_of_the_real_one():
    config = _llama_config()
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(config)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    ids = torch.randint(1, 64, (2, 8))
    real_report = healthcheck.check(real, ids, probes=False)
    meta_report = healthcheck.check(meta, ids, probes=False)
    assert len(meta_report.architecture.joins) == 2 * config.num_hidden_layers  # attention and MLP joins
    assert _structure(meta_report) == _structure(real_report)
    assert meta_report.model.weights == "not materialized" and real_report.model.weights == "unread"
    assert _all_meta(meta)  # nothing was materialized, nor left behind


def test_meta_plain_module_gets_the_structure_of_the_real_one():
    torch.manual_seed(0)
    real = zoo.Transformer(zoo.PreLNBlock)
    with torch.device("meta"):
        meta = zoo.Transformer(zoo.PreLNBlock)
    x = torch.randint(0, 100, (2, 6))
    real_report, meta_report = healthcheck.check(real, x, probes=False), healthcheck.check(meta, x, probes=False)
    assert meta_report.architecture.joins and meta_report.model.trace == "fx"
    assert _structure(meta_report) == _structure(real_report)
    assert _all_meta(meta)
    assert "weights not materialized" in render(meta_report, "text", width=120)


#: the type of every input _SeesTensors's forward was called with (outside the model: the guard restores its state)
SEEN: list[type] = []


class _SeesTensors(nn.Module):
    """A residual MLP that notes the type of every input its forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(type(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("trace", ["auto", "export", "hooks"])
def test_real_model_without_probes_never_runs_on_real_tensors(trace):
    model = _SeesTensors()
    weight = model.fc1.weight
    SEEN.clear()
    report = healthcheck.check(model, torch.randn(4, 16), probes=False, trace=trace)
    assert report.model.weights == "unread" and len(report.architecture.joins) == 1
    assert SEEN and torch.Tensor not in SEEN  # fx proxies, fake tensors: never a real tensor
    assert model.fc1.weight is weight and model.training


class _WritesItsState(nn.Module):
    """A forward that writes a weight and a buffer in place (a clamp, a step counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.clamp_(-0.01, 0.01)
        self.steps += 1
        return x + self.fc(x)


@pytest.mark.parametrize("trace", ["fx", "hooks"])
def test_structure_on_fake_tensors_writes_nothing(trace):
    # under FakeTensorMode an op on real tensors only runs for real: the parameters are swapped for fake
    # copies (they are not copied by value), the buffers copied and restored
    model = _WritesItsState()
    weight = model.fc.weight.detach().clone()
    report = healthcheck.check(model, torch.randn(4, 16), probes=False, trace=trace)
    assert report.model.weights == "unread" and report.model.trace == trace
    assert torch.equal(model.fc.weight, weight) and model.steps.item() == 0


def test_data_dependent_forward_real_falls_back_and_says_why_meta_is_refused():
    torch.manual_seed(0)
    report = healthcheck.check(zoo.GatedResNet(), torch.randn(4, 16), probes=False)
    assert report.model.trace == "hooks" and report.model.weights == "real"  # today's path: a real forward
    assert "fake tensors" in report.model.trace_failures  # ... and why
    with torch.device("meta"):
        meta = zoo.GatedResNet()
    with pytest.raises(UsageError, match="reads tensor values"):
        healthcheck.check(meta, torch.randn(4, 16), probes=False)


META_FILE = """
    import torch
    from tests import zoo

    with torch.device("meta"):
        model = zoo.ScaledResNet(blocks=4)
    example_input = torch.randn(4, 16)
"""


def test_cli_no_probes_on_a_meta_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    path = tmp_path / "meta_model.py"
    path.write_text(textwrap.dedent(META_FILE))
    result = CliRunner().invoke(main, [str(path), "--no-probes", "--format", "json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output  # per the findings, not a usage error
    data = json.loads(result.stdout)
    report = data["reports"][0] if "reports" in data else data
    assert report["model"]["weights"] == "not materialized" and len(report["architecture"]["joins"]) == 4


def test_meta_model_with_a_wrong_input_shape_is_one_clear_error():
    with torch.device("meta"):
        model = zoo.ScaledResNet()
    with pytest.raises(UsageError, match=r"forward raised .* shape \[4, 15\] .*expects shape \(N, \.\.\., 16\)"):
        healthcheck.check(model, torch.randn(4, 15), probes=False)
