"""The Predictions table of science.md, reproduced by the probes on models built here.

He init, ReLU, width 256, batch 256, fixed seeds. Tolerances follow from that size: a per-block
second-moment ratio is an average over 256 × 256 = 65,536 products, so its sampling error is about
1/√65536 ≈ 0.4% per block; geometric means over 24 blocks are tighter still. The finite-width
drift of the gradient (√(π/(π−1)) holds at infinite width) gets 5%.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from healthcheck.guard import preserved
from healthcheck.probes import line_gradient_correlation, measure
from healthcheck.rules.measured import geometric_mean
from tests import zoo

WIDTH, BATCH, BLOCKS = 256, 256, 24


class ResidualBlock(nn.Module):
    """x + f(x) with f = [BN] → ReLU → W → [BN] → ReLU → W (He), optionally scaled by s."""

    def __init__(self, width: int, bn: bool, scale: float | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = zoo.he_linear(width, width), zoo.he_linear(width, width)
        self.bn1 = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.bn2(self.fc2(F.relu(self.bn1(self.fc1(F.relu(x))))))
        return y * self.scale if self.scale is not None else y


class PlainBlock(nn.Module):
    """W → [BN] → ReLU, twice."""

    def __init__(self, width: int, bn: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = zoo.he_linear(width, width), zoo.he_linear(width, width)
        self.bn1 = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm1d(width) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x))))))


def residual(bn: bool, scale: float | None = None, blocks: int = BLOCKS, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[ResidualBlock(width, bn, scale) for _ in range(blocks)])


def plain(bn: bool, layers: int = 2 * BLOCKS, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[PlainBlock(width, bn) for _ in range(layers // 2)])


def probe(model: nn.Module, x: torch.Tensor | None = None, at_joins: bool = True):
    if x is None:
        x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    with preserved(model):
        return measure(model, (x,), {}, at_joins=at_joins)


@pytest.fixture(scope="module")
def no_norm():
    return probe(residual(bn=False))


@pytest.fixture(scope="module")
def bn_branch():
    return probe(residual(bn=True))


@pytest.fixture(scope="module")
def plain_bn():
    return probe(plain(bn=True), at_joins=False)


@pytest.fixture(scope="module")
def plain_no_bn():
    return probe(plain(bn=False), at_joins=False)


def test_variance_doubles_per_block_without_norm(no_norm):
    ratios = no_norm.series("var_ratio")
    assert len(ratios) == BLOCKS
    assert geometric_mean(ratios) == pytest.approx(2.0, rel=0.05)
    # In general 1 + r_k. Block by block the cross term 2E[x·f]/E[x²] of one random network is
    # O(2√r/√width) = 12% at width 256; averaged over the 24 blocks it is 12%/√24 ≈ 2.5%: allow 3σ.
    mean_ratio = statistics.mean(ratios)
    mean_predicted = statistics.mean(1 + r for r in no_norm.series("residual_ratio"))
    assert mean_ratio == pytest.approx(mean_predicted, abs=3 * 2 / math.sqrt(WIDTH * BLOCKS))
    assert statistics.median(no_norm.series("residual_ratio")) == pytest.approx(1.0, rel=0.1)


def test_gradients_grow_backwards_without_norm(no_norm):
    grads = no_norm.series("grad_rms")
    per_block = (grads[0] / grads[-1]) ** (1 / (len(grads) - 1))
    assert per_block == pytest.approx(math.sqrt(2), rel=0.05)  # gradients grow like the variance: √2 per block


def test_variance_grows_linearly_with_bn_in_branch(bn_branch):
    # Input E[x²] = 1 and each BN'd branch adds exactly unit variance: var(y_k) = 1 + k, so the growth
    # ratio is (k+1)/k and the residual ratio r_k = 1/k (blocks numbered from 1).
    for k, point in enumerate(bn_branch.profile, start=1):
        assert point.var_ratio == pytest.approx((k + 1) / k, rel=0.03), k
        assert point.residual_ratio == pytest.approx(1 / k, rel=0.05), k


def test_scaling_by_inverse_sqrt2_keeps_variance_constant():
    m = probe(residual(bn=False, scale=1 / math.sqrt(2)))
    assert geometric_mean(m.series("var_ratio")) == pytest.approx(1.0, rel=0.05)
    # no trend: the product over 24 blocks stays within the finite-width drift, far from 2^24
    assert 0.5 < m.profile[-1].var / m.input_var < 2


def test_plain_bn_stack_keeps_variance_and_grows_gradients(plain_bn):
    # From the first ReLU output on, E[relu(BN(z))²] = 1/2 at every layer for symmetric pre-activations;
    # the skew of a finite batch moves it by about 1% per layer (science.md measured a median of 0.99).
    ratios = plain_bn.series("var_ratio")[1:]
    assert statistics.median(ratios) == pytest.approx(1.0, rel=0.02)
    grads = plain_bn.series("grad_rms")
    per_layer = (grads[0] / grads[-1]) ** (1 / (len(grads) - 1))
    assert per_layer == pytest.approx(math.sqrt(math.pi / (math.pi - 1)), rel=0.05)  # 1.21 (Yang et al. 2019)


def test_effective_rank_collapses_in_deep_plain_stack_without_bn(plain_no_bn):
    first, last = plain_no_bn.profile[0], plain_no_bn.profile[-1]
    assert last.directions < 2.5  # towards a single direction of variance ...
    assert last.effective_rank < 0.1 * first.effective_rank  # ... from a full-rank input
    # and it keeps falling with depth
    ranks = plain_no_bn.series("effective_rank")
    quarter = len(ranks) // 4
    assert statistics.mean(ranks[-quarter:]) < statistics.mean(ranks[quarter:2 * quarter])


def test_sensitivity_grows_exponentially_in_plain_bn_stack(plain_bn):
    chi = plain_bn.series("sensitivity")
    assert chi[-1] > 1e3
    # exponential: a constant factor per layer over the second half, as in the first half
    half = len(chi) // 2
    early = (chi[half] / chi[1]) ** (1 / (half - 1))
    late = (chi[-1] / chi[half]) ** (1 / (len(chi) - 1 - half))
    assert early > 1.1 and late > 1.1
    assert late == pytest.approx(early, rel=0.1)


def test_bn_with_skips_is_well_behaved(bn_branch):
    chi = bn_branch.series("sensitivity")
    # at most polynomial: doubling the depth less than triples χ (exponential ×1.2/layer would be ×80)
    assert chi[-1] / chi[len(chi) // 2 - 1] < 3
    ranks = bn_branch.series("effective_rank")
    assert ranks[-1] > 0.5 * ranks[0]


def _line_models(depth: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    skips = nn.Sequential(zoo.he_linear(1, WIDTH), *[ResidualBlock(WIDTH, True) for _ in range(depth)], nn.Linear(WIDTH, 1))
    torch.manual_seed(0)
    no_skips = nn.Sequential(zoo.he_linear(1, WIDTH), nn.ReLU(), *[PlainBlock(WIDTH, True) for _ in range(depth)],
                             nn.Linear(WIDTH, 1))
    return skips, no_skips


def test_gradient_correlation_decays_fast_without_skips_and_slowly_with_them():
    """science.md protocol: scalar input, 256 points in [−2, 2], train-mode BN over the line."""
    line = torch.linspace(-2, 2, 256).unsqueeze(1)
    with_skips, without = {}, {}
    for depth in (1, 4, 12):
        skips, no_skips = _line_models(depth)
        with preserved(skips), preserved(no_skips):
            with_skips[depth] = line_gradient_correlation(skips, line)
            without[depth] = line_gradient_correlation(no_skips, line)
    assert with_skips[1] > 0.8 and without[1] > 0.8  # shallow: smooth either way
    assert without[12] < 0.15  # 2^-depth decay: shattered by 24 layers
    assert with_skips[12] > 0.25  # ~1/√depth decay with skips
    assert with_skips[4] - without[4] > 0.2 and with_skips[12] - without[12] > 0.2


def _xavier(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def test_post_ln_keeps_large_last_layer_gradients_pre_ln_does_not():
    """Xiong et al. 2020: at init the last layer's gradient is O(1) in depth for Post-LN and
    O(1/√L) for Pre-LN (Xavier init, as in the paper)."""
    tokens = torch.randint(0, 100, (16, 32), generator=torch.Generator().manual_seed(0))
    last = {}
    for layers in (6, 24):
        for block in (zoo.PostLNBlock, zoo.PreLNBlock):
            torch.manual_seed(0)
            model = _xavier(zoo.Transformer(block, layers=layers, dim=128))
            last[block, layers] = probe(model, tokens).profile[-1].grad_rms
    assert last[zoo.PostLNBlock, 24] == pytest.approx(last[zoo.PostLNBlock, 6], rel=0.15)  # independent of depth
    assert last[zoo.PreLNBlock, 24] / last[zoo.PreLNBlock, 6] == pytest.approx(math.sqrt(6 / 24), rel=0.25)
    assert last[zoo.PostLNBlock, 24] > 2.5 * last[zoo.PreLNBlock, 24]


class AttentionOnly(nn.Module):
    def __init__(self, layers: int, dim: int = 64, skips: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, dim)
        self.layers = nn.ModuleList(zoo.Attention(dim, 4) for _ in range(layers))
        self.skips = skips

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for attention in self.layers:
            x = x + attention(x) if self.skips else attention(x)
        return x


def test_attention_only_stack_without_skips_collapses_to_rank_one():
    # Rank collapse (Dong et al. 2021) makes the tokens of a sequence identical: measure within one
    # sequence of 256 tokens, so the effective rank counts directions among its tokens.
    tokens = torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    without = probe(AttentionOnly(12), tokens, at_joins=False)
    ranks = [p.directions for p in without.profile]
    assert ranks[-1] < 1.2  # one line
    assert ranks[3] < 0.5 * ranks[0]  # and fast: most of it within a few layers
    torch.manual_seed(0)
    with_skips = probe(AttentionOnly(12, skips=True), tokens)
    assert with_skips.profile[-1].directions > 5 * ranks[-1]
