"""Join analysis on the ways real code writes (or only seems to write) residual joins."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

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


def test_integer_position_path_is_no_branch():
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 10))
    for method, arch in all_tracers(zoo.CountedPositions(), ids).items():
        assert [j.module for j in arch.joins] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"], method


def test_token_concat_is_no_join_but_channel_concat_is():
    torch.manual_seed(0)
    for method, arch in all_tracers(zoo.SummaryToken(), torch.randn(2, 6, 32)).items():
        assert [j.kind for j in arch.joins] == ["add", "add"], method
    for method, arch in all_tracers(nn.Sequential(zoo.DenseChannels(), zoo.DenseChannels(16)),
                                    torch.randn(2, 8, 6, 6)).items():
        assert [(j.kind, j.pre_activation) for j in arch.joins] == [("concat", True)] * 2, method


@pytest.mark.parametrize("kind", ["norm_act_conv", "dw_pw", "conv_maxpool"])
def test_shortcut_longer_than_one_layer_is_a_projection(kind):
    torch.manual_seed(0)
    model = nn.Sequential(zoo.LongShortcutBlock(8, 16, kind), zoo.LongShortcutBlock(16, 16, kind))
    for method, arch in all_tracers(model, torch.randn(2, 8, 6, 6)).items():
        assert [(j.module, j.skip) for j in arch.joins] == [("0", "projection"), ("1", "projection")], method


def test_shared_pre_activation_feeds_the_projection():
    torch.manual_seed(0)
    model = nn.Sequential(zoo.PreActProjectionBlock(8, 16), zoo.PreActProjectionBlock(16, 16))
    for method, arch in all_tracers(model, torch.randn(2, 8, 6, 6)).items():
        assert [(j.skip, j.norm, j.pre_activation) for j in arch.joins] == [("projection", "branch", True)] * 2, method


def test_layer_internal_sums_and_concats_are_not_joins():
    """Res2Net's hierarchical sums, a Ghost module's concat and a GRN-like gate sit inside one block:
    the block's own `x + out` is its only join, under every tracer."""
    torch.manual_seed(0)
    model = nn.Sequential(zoo.SplitScalesBlock(), zoo.SplitScalesBlock())
    src = source_line(zoo, "return x + out")
    for method, arch in all_tracers(model, torch.randn(2, 16, 6, 6)).items():
        assert [(j.module, j.kind, j.source) for j in arch.joins] == [("0", "add", src), ("1", "add", src)], method


def test_cross_stage_concat_around_residual_blocks_is_a_join():
    """CSPNet: half the channels skip a stage of residual blocks and are concatenated back."""

    class CrossStage(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            self.expand = nn.Conv2d(c, c, 1)
            self.blocks = nn.Sequential(zoo.LongShortcutBlock(c // 2, c // 2, "dw_pw"))
            self.out = nn.Conv2d(c, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xs, xb = self.expand(x).split(8, dim=1)
            return self.out(torch.cat([xs, self.blocks(xb)], dim=1))

    torch.manual_seed(0)
    for method, arch in all_tracers(CrossStage(), torch.randn(2, 16, 6, 6)).items():
        assert [(j.module, j.kind) for j in arch.joins] == [("blocks.0", "add"), ("", "concat")], method


def test_partial_residual_bounds_plain_depth():
    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.PartialResidual(8 + 4 * i, 12 + 4 * i) for i in range(8)])
    for method, arch in all_tracers(model, torch.randn(2, 8, 6, 6)).items():
        assert len(arch.joins) == 8, method
        assert arch.plain_depth == 2, method  # one block's two convs: the side channels do not go around a join


def test_norm_classes_are_recognised_by_name():
    from healthcheck.graph.taxonomy import is_norm_module

    class RmsNorm(zoo.ManualRmsNorm):  # timm's spelling
        pass

    class PreNorm(nn.Module):  # a wrapper holding a weight layer is no norm
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fn = nn.LayerNorm(4), nn.Linear(4, 4)

    class NormLinear(nn.Linear):  # a weight layer named after its weight normalization
        pass

    assert is_norm_module(RmsNorm(4)) and is_norm_module(zoo.ManualRmsNorm(4))
    assert not is_norm_module(PreNorm()) and not is_norm_module(NormLinear(4, 4))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), RmsNorm(8), nn.Linear(8, 8))
    for method, arch in all_tracers(model, torch.randn(2, 8)).items():
        ops = [n for n in arch.graph.nodes if n.module == "1"]
        assert ops and all(n.category.value == "norm" for n in ops), method
        assert arch.norm_layers == {"RmsNorm": 1}, method


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_written_out_in_ops_is_a_norm(norm):
    torch.manual_seed(0)
    model = nn.Sequential(zoo.InlineNormBlock(norm=norm), zoo.InlineNormBlock(norm=norm))
    for method, arch in all_tracers(model, torch.randn(2, 5, 32)).items():
        assert [(j.norm, j.pre_activation) for j in arch.joins] == [("branch", True)] * 2, method
    model = nn.Sequential(zoo.ManualSoftmaxMixer(), zoo.ManualSoftmaxMixer())
    for method, arch in all_tracers(model, torch.randn(2, 5, 32)).items():
        assert [j.norm for j in arch.joins] == ["none", "none"], method


def test_channel_concat_after_a_token_linear_is_a_join():
    """A U-Net level whose branch ends in a linear layer over (B, HW, C) tokens, reshaped back to
    (B, C, H, W): the concat along channels is still a join."""

    class TokenMixLevel(nn.Module):
        def __init__(self, c: int = 8) -> None:
            super().__init__()
            self.conv, self.norm, self.proj = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Linear(c, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            y = F.relu(self.norm(self.conv(x))).flatten(2).transpose(1, 2)
            y = self.proj(y).transpose(1, 2).reshape(b, c, h, w)
            return torch.cat([x, y], dim=1)

    torch.manual_seed(0)
    for method, arch in all_tracers(TokenMixLevel(), torch.randn(2, 8, 4, 4)).items():
        assert [j.kind for j in arch.joins] == ["concat"], method
