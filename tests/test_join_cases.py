"""Join analysis on the ways real code writes (or only seems to write) residual joins."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthcheck.graph.architecture import analyze
from healthcheck.graph.tracers import TRACE_METHODS
from tests import zoo
from tests.helpers import source_line


def all_tracers(model: nn.Module, *args):
    """The analysis under each tracer that can follow the model (fx cannot always)."""
    model.eval()
    results = {}
    for method in TRACE_METHODS:
        try:
            results[method] = analyze(model, args, {}, (method,))
        except Exception:  # noqa: BLE001
            assert method == "fx", f"{method} failed"
    return results


def test_lora_adapter_is_not_a_join():
    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.PreLNBlock(32, 4) for _ in range(2)])
    for block in model:
        block.attn.qkv = zoo.LoraLinear(block.attn.qkv)
        block.mlp[0] = zoo.LoraLinear(block.mlp[0])
    for method, arch in all_tracers(model, torch.randn(2, 8, 32)).items():
        assert [j.module for j in arch.joins] == ["0", "0", "1", "1"], method


def test_parallel_block_written_residual_first_is_one_join():
    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.ParallelBlock() for _ in range(3)])
    src = source_line(zoo, "return x + self.attn(h) + self.mlp(h)")
    for method, arch in all_tracers(model, torch.randn(2, 8, 32)).items():
        assert [(j.module, j.source, j.skip, j.norm, j.pre_activation) for j in arch.joins] == \
            [(str(i), src, "identity", "branch", True) for i in range(3)], method
        assert all(len(j.branch_operands) == 2 and j.branch_weights == 4 for j in arch.joins), method
        assert arch.plain_depth <= 3, method  # the MLP path does not go around the join


def test_torch_transformer_layers_are_located_in_torch_code():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    path = nn.modules.transformer.__file__
    expected = [source_line(path, "x = x + self._sa_block(", 0), source_line(path, "x = x + self._ff_block(", 0)] * 2
    for method, arch in all_tracers(model, torch.randn(2, 8, 32)).items():
        assert [j.source for j in arch.joins] == expected, method
        assert [j.pre_activation for j in arch.joins] == [True] * 4


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def test_torch_transformer_inside_a_user_model_is_traced_into():
    """fx keeps torch.nn modules as leaves; nn.Transformer* hold joins, so they must not be."""
    torch.manual_seed(0)
    arch = analyze(Classifier().eval(), (torch.randint(0, 100, (2, 8)),), {})
    assert len(arch.joins) == 4 and all(j.norm == "branch" and j.pre_activation for j in arch.joins)


def test_in_place_add_and_relu_without_rebinding():
    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.InplaceBlock() for _ in range(3)])
    for method, arch in all_tracers(model, torch.randn(4, 16)).items():
        assert len(arch.joins) == 3, method
        assert all(j.activation_after_join for j in arch.joins), method
        assert arch.plain_depth == 2, method


def test_bias_parameter_is_a_shift_not_a_gain():
    model = nn.Sequential(zoo.BiasEndBlock(), zoo.BiasEndBlock())
    for method, arch in all_tracers(model, torch.randn(4, 16)).items():
        assert [j.learnable_gain for j in arch.joins] == [False, False], method


def test_added_constants_are_not_scales_and_alpha_is():
    torch.manual_seed(0)
    for method, arch in all_tracers(zoo.SumStyles(), torch.randn(4, 16)).items():
        assert [j.scale for j in arch.joins] == [None, None, pytest.approx(0.1)], method
        assert [j.scale_on for j in arch.joins] == [None, None, "branch"], method


def test_join_in_a_helper_is_located_where_forward_calls_it():
    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.HelperJoinBlock(32, 4) for _ in range(2)])
    expected = [source_line(zoo, "x = dropout_add(self.attn(self.ln1(x)), x)"),
                source_line(zoo, "return dropout_add(self.mlp(self.ln2(x)), x)")] * 2
    for method, arch in all_tracers(model, torch.randn(2, 8, 32)).items():
        assert [j.source for j in arch.joins] == expected, method


def test_depth_does_not_depend_on_the_tracer_for_multihead_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    results = all_tracers(model, torch.randn(2, 8, 32))
    assert len({(a.depth, a.plain_depth) for a in results.values()}) == 1, {m: (a.depth, a.plain_depth) for m, a in results.items()}
    assert next(iter(results.values())).depth == 3 * 4  # in-proj, out-proj, two FFN linears per layer


def test_scaled_sum_is_reported_on_the_sum():
    arch = analyze(zoo.ScaledResNet().eval(), (torch.randn(4, 16),), {})
    assert {(j.scale_on, round(j.scale, 6)) for j in arch.joins} == {("sum", round(1 / math.sqrt(2), 6))}
