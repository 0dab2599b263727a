"""Effective rank (HC203) knows its own sampling error (issue 12, item 2): the band of the measured
directions follows Marchenko–Pastur, the independent draws behind it follow the inputs (not the tokens
of one input), and an error needs the whole band below the threshold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import healthcheck
from healthcheck.loading import PROBE_INPUTS, random_inputs, special_token_ids
from healthcheck.probes import stats


def hc203(report) -> list:
    return [f for f in report.findings if f.code == "HC203"]


# --- the band -------------------------------------------------------------------------------------

@pytest.mark.parametrize("vectors", [64, 256, 1024])
def test_band_of_isotropic_vectors_follows_marchenko_pastur(vectors):
    """n independent isotropic vectors of c channels: Σλ/λ_max ≈ c/(1 + √(c/n))² (the MP edge), the
    band's high end recovers the c directions that are there, and its width shrinks like √(c/n).
    Tolerance: λ_max fluctuates on the Tracy–Widom scale, relative (1/√n + 1/√c)^(4/3) ≈ 0.1 at c = 32,
    plus the finite-c shortfall below the edge of the same order: 20 % on d, 35 % on the high end, which
    amplifies d's error by 1/(1 − √(d/n))."""
    channels = 32
    x = torch.randn(vectors, channels, generator=torch.Generator().manual_seed(vectors))
    labatie, _, draws, within = stats.rank_statistics(x, -1, max_vectors=vectors)
    directions = float(labatie) * min(vectors, channels)
    assert float(draws) == vectors  # one vector per input: every vector is a draw
    assert math.isnan(float(within))  # no positions within an input
    assert directions == pytest.approx(channels / (1 + math.sqrt(channels / vectors)) ** 2, rel=0.2)
    low, high = stats.directions_band(directions, float(draws), channels)
    assert low == directions
    assert high == pytest.approx(channels, rel=0.35)
    # relative width (high − low)/high ≈ 1 − 1/(1 + √(c/n))²: 0.66, 0.43, 0.26
    assert (high - low) / high == pytest.approx(1 - 1 / (1 + math.sqrt(channels / vectors)) ** 2, abs=0.15)


def test_band_narrows_with_more_draws_and_is_capped_by_the_channels():
    widths = [stats.directions_band(1.2, draws, 64)[1] for draws in (4, 16, 64, 256, 1024)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 1.3 < 2 < widths[1]
    assert stats.directions_band(3.0, 2.0, 64) == (3.0, 64.0)  # d ≥ draws: the sample cannot bound it
    assert stats.directions_band(None, 8.0, 64) is None


def test_tokens_of_one_input_are_not_independent_draws():
    """Tokens that copy their sequence's vector count as one draw per sequence (Kish's design effect with
    ρ ≈ 1); tokens drawn independently count one each."""
    generator = torch.Generator().manual_seed(0)
    sequences, tokens, channels = 8, 32, 64
    shared = torch.randn(sequences, 1, channels, generator=generator).expand(sequences, tokens, channels)
    alike = shared + 0.01 * torch.randn(sequences, tokens, channels, generator=generator)
    _, _, draws, within = stats.rank_statistics(alike, -1, max_vectors=256)
    assert float(draws) == pytest.approx(sequences, rel=0.1)
    assert float(within) < 1e-3  # the positions of each input sit on its vector
    independent = torch.randn(sequences, tokens, channels, generator=generator)
    _, _, draws, within = stats.rank_statistics(independent, -1, max_vectors=256)
    # ρ's sampling s.d. ≈ √(2(B − 1))/n ≈ 0.015 and n_eff = n/(1 + (p − 1)ρ): above 0.4 n at 3 s.d.
    assert float(draws) > 0.4 * 256
    assert float(within) == pytest.approx(1 - (sequences - 1) / 255, abs=0.05)


# --- the verdicts ---------------------------------------------------------------------------------

class ReluStack(nn.Module):
    """A deep plain ReLU stack, He init, no normalization (science.md, 'plain stack, no BN'): the
    normalized effective rank falls towards 1/min(n, d) with depth."""

    def __init__(self, depth: int = 48, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class RankOneProjection(nn.Module):
    """Healthy layers, then a rank-1 bottleneck (u vᵀ) repeated: every later vector lies on one line."""

    def __init__(self, width: int = 64, depth: int = 8) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        u, v = torch.randn(width, 1), torch.randn(1, width)
        self.line = nn.Parameter(u @ v / width)
        self.tail = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x) @ self.line
        for layer in self.tail:
            x = layer(x) * 0 + x  # identity on the line, a weight layer per point
        return x


@pytest.mark.parametrize("build", [ReluStack, RankOneProjection])
def test_a_collapsed_stack_is_an_error_from_enough_inputs_and_uncertain_from_few(build):
    torch.manual_seed(0)
    model = build()
    [finding] = hc203(healthcheck.check(model, torch.randn(128, 64, generator=torch.Generator().manual_seed(1))))
    assert finding.severity == "error", finding.message
    low, high = finding.evidence["band"]
    assert low <= finding.evidence["worst_directions"] <= high <= 2.0
    # four inputs: d ≥ 1 from 4 draws hides up to 1/(1 − √(1/4))² = 4 directions, never an error
    few = hc203(healthcheck.check(model, torch.randn(4, 64, generator=torch.Generator().manual_seed(1))))
    assert [f.severity for f in few] in ([], ["warning"], ["info"])
    assert all(f.evidence["band"][1] >= 4.0 for f in few)


class CausalBlock(nn.Module):
    """Pre-norm (RMSNorm) causal self-attention + gated MLP, weights N(0, 0.02), no biases: the common LM
    recipe."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).masked_fill(~mask, float("-inf"))
        x = x + self.out((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class CausalLM(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4, vocab: int = 500) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def test_a_healthy_causal_lm_at_two_sequences_never_gets_an_hc203_error():
    """At init the causal attention averages each sequence's prefix: its tokens become alike, and 2
    sequences × 16 tokens show ~1.4 directions at the last blocks (a large batch shows many more). Over
    10 seeds that count is at error level, but inside its band: never an error (at most an info that
    says how to get a sure verdict)."""
    at_error_level = uncertain = 0
    for seed in range(10):
        torch.manual_seed(seed)
        tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(100 + seed))
        report = healthcheck.check(CausalLM(dim=128, layers=6), tokens)
        findings = hc203(report)
        assert all(f.severity == "info" and f.evidence["uncertain"] for f in findings), [f.message for f in findings]
        assert all(f.evidence["band"][1] > 3.0 and "larger batch" in f.message for f in findings)
        uncertain += len(findings)
        profile = report.measurements.profile
        at_error_level += min(p.directions for p in profile[len(profile) // 2:]) <= 2.0
    assert at_error_level >= 8  # the measured count alone says "collapsed": the band is what tells it apart
    assert uncertain >= 1  # and where it also fell 3× from the first block, the verdict is "uncertain"


class AttentionWithoutSkips(nn.Module):
    def __init__(self, dim: int = 48, layers: int = 8, vocab: int = 200) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for attention, proj in zip(self.layers, self.proj):
            x = proj(attention(x, x, x, need_weights=False)[0])
        return x


def test_tokens_collapsing_within_each_sequence_is_an_error_even_from_two_sequences():
    """Dong et al.'s rank collapse: the tokens of a sequence fall onto one vector. The share of the
    variance left between them is a ratio of traces over all vectors, sure at any batch."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    [finding] = hc203(healthcheck.check(AttentionWithoutSkips(), tokens))
    assert finding.severity == "error" and finding.evidence["within_share"] <= 0.01, finding.message


# --- random inputs for --input-shape ----------------------------------------------------------------

def test_input_shape_draws_enough_inputs_and_no_special_tokens():
    model = CausalLM(vocab=50)
    model.embed.padding_idx = 0
    model.config = type("Config", (), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": [2, 3],
                                       "unk_token_id": None})()
    assert special_token_ids(model, 50) == {0, 1, 2, 3}
    (tokens,) = random_inputs(model, ((2, 16),), seed=0)
    assert tokens.shape == (PROBE_INPUTS, 16)  # more inputs, the user's sequence length
    assert tokens.min() >= 4 and tokens.max() < 50 and len(tokens.unique()) > 30
    # a large image keeps within the element budget; a 1-d shape and a time-first RNN input are kept
    assert random_inputs(nn.Conv2d(3, 8, 3), ((1, 3, 256, 256),), 0)[0].shape[0] < PROBE_INPUTS
    assert random_inputs(nn.Linear(8, 8), ((5,),), 0)[0].shape == (5,)
    assert random_inputs(nn.LSTM(8, 8), ((7, 2, 8),), 0)[0].shape == (7, 2, 8)


def test_a_users_own_example_is_never_enlarged():
    x = torch.randn(2, 64)
    report = healthcheck.check(ReluStack(depth=4), x)
    assert report.model.input_shapes == ((2, 64),) and x.shape == (2, 64)


def test_hc104_reads_a_collapse_from_the_band_not_the_raw_count():
    """HC104 confirms a plain stack's collapse only when the sampling band's high end is ≤ 2, as HC203
    does: 1.5 directions counted from a few independent vectors (band up to 6) is no confirmation."""
    from types import SimpleNamespace

    from healthcheck.probes import Measurements, Point
    from healthcheck.rules.structure import HC104, _plain_stack_confirmed

    def profile(band_high: float) -> Measurements:
        points = tuple(Point(id=f"layer{k}", at="layer", depth=k + 1, module=f"{k}", source=None, var=1.0,
                             var_ratio=1.0, residual_ratio=None, grad_norm=1.0, grad_rms=1.0,
                             effective_rank=d / 64, participation_ratio=None, sensitivity=1.0, numel=64,
                             rank_size=64, directions_band=(d, d if k < 2 else band_high))
                       for k, d in enumerate([30.0, 20.0, 1.5, 1.5]))
        return Measurements(points, None, 1.0, "layer")

    architecture = SimpleNamespace(joins=[])
    severities = {high: _plain_stack_confirmed(SimpleNamespace(measurements=profile(high), architecture=architecture),
                                               HC104.options)
                  for high in (6.0, 1.9)}
    assert severities[6.0][0] == "warning" and severities[1.9][0] == "error"
    assert severities[6.0][1]["measured_directions_band"] == [1.5, 6.0]
