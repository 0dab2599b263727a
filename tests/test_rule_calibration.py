"""Severity follows what was measured (issue 12, items 3, 4, 6, 7, 10): structural predictions are
confirmed or not by the probes, growth is read from a fit per stack, and the message names the cause.

Small models built here; each case states what the physics predicts and asserts the verdict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import healthcheck
from healthcheck.probes import Point
from healthcheck.rules.stream import growth_is_linear, stack_key, stacks, stream_ids, trend

WIDTH, BATCH = 64, 64


def x_in(scale: float = 1.0, width: int = WIDTH) -> torch.Tensor:
    return scale * torch.randn(BATCH, width, generator=torch.Generator().manual_seed(0))


def by_code(report, code: str) -> list:
    return [f for f in report.findings if f.code == code]


def severities(report, code: str) -> set[str]:
    return {f.severity for f in by_code(report, code)}


class Bare(nn.Module):
    """x + W2·relu(W1·x); `init` sets the branch's scale: "he" (r ≈ 1: variance doubles per block),
    "default" (PyTorch's Linear init: r ≈ 0.06), "small" (0.1× He weights), "zero" (last layer zero,
    Fixup's recommendation: the block is the identity)."""

    def __init__(self, init: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        if init != "default":
            for fc in (self.fc1, self.fc2):
                nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
                nn.init.zeros_(fc.bias)
        with torch.no_grad():
            if init == "small":
                self.fc1.weight.mul_(0.1)
                self.fc2.weight.mul_(0.1)
            if init == "zero":
                self.fc2.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class Normed(nn.Module):
    """x + W·relu(LN(x)): the norm makes every block add the same variance, whatever the stream's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


def stack(block: type[nn.Module], depth: int, *args) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[block(*args) for _ in range(depth)], nn.Linear(WIDTH, 10))


# item 3: HC101 follows the measured growth ------------------------------------------------------


@pytest.mark.parametrize("init", ["default", "small", "zero"])
def test_hc101_is_not_an_error_where_the_measured_growth_is_flat(init):
    report = healthcheck.check(stack(Bare, 12, init), x_in())
    [finding] = by_code(report, "HC101")
    assert finding.severity == "info", finding.message
    assert finding.evidence["measured_ratio_per_block"] < 1.15  # the measured growth, not 2 per block
    assert finding.evidence["predicted_ratio_per_block"] < 1.15  # predicted from the measured r = E[f²]/E[x²]
    assert "HC201" not in {f.code for f in report.findings}


def test_hc101_is_an_error_where_the_variance_measurably_doubles():
    report = healthcheck.check(stack(Bare, 12, "he"), x_in())
    [finding] = by_code(report, "HC101")
    assert finding.severity == "error"
    # this branch (W·relu(W·x), He) has r ≈ 2: var grows ×(1 + r) ≈ 3 per block, as measured
    measured, predicted = finding.evidence["measured_ratio_per_block"], finding.evidence["predicted_ratio_per_block"]
    assert 2.2 < measured < 3.8 and measured == pytest.approx(predicted, rel=0.25)
    assert finding.evidence["joins_in_series"] == 12


def test_a_structural_prediction_alone_is_at_most_a_warning():
    report = healthcheck.check(stack(Bare, 12, "he"), x_in(), probes=False)
    [finding] = by_code(report, "HC101")
    assert finding.severity == "warning" and finding.evidence["measured"] is False
    assert "predicted, not measured" in finding.message


class TwoTowers(nn.Module):
    """Two parallel towers of 6 bare blocks, concatenated: 12 bare joins, but only 6 in series."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(*[Bare("he") for _ in range(6)])
        self.b = nn.Sequential(*[Bare("he") for _ in range(6)])
        self.head = nn.Linear(2 * WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=-1))


def test_hc101_counts_joins_in_series_not_in_parallel():
    torch.manual_seed(0)
    [finding, *_] = by_code(healthcheck.check(TwoTowers(), x_in(), probes=False), "HC101")
    assert finding.evidence["joins_in_model"] == 12 and finding.evidence["joins_in_series"] == 6


class Nested(nn.Module):
    """A residual block whose branch holds another residual block (Res2Net-like internal sums): the inner
    join is not in series with the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.inner, self.fc2 = nn.Linear(WIDTH, WIDTH), Bare("he"), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.inner(self.fc1(x))))


class GlobalSkip(nn.Module):
    """EDSR-style: one long skip around a body of residual blocks; the blocks are the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[Bare("he") for _ in range(4)], nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def test_the_stream_leaves_out_joins_inside_a_branch():
    torch.manual_seed(0)
    report = healthcheck.check(nn.Sequential(*[Nested() for _ in range(4)]), x_in(), probes=False)
    joins = report.architecture.joins
    outer = {j.id for j in joins if j.module.count(".") == 0}
    assert len(joins) == 8 and stream_ids(report.architecture) == outer
    [finding] = by_code(report, "HC101")
    assert finding.evidence["joins_in_model"] == 4 and finding.evidence["joins_in_series"] == 4
    report = healthcheck.check(GlobalSkip(), x_in(), probes=False)
    stream = stream_ids(report.architecture)
    assert len(report.architecture.joins) == 5 and len(stream) == 4 and all(j.startswith("body") for j in stream)


# item 4: linear growth (norm in the branch, tiny input) is not exploding variance ------------------


def test_linear_growth_after_a_tiny_input_is_not_hc201():
    # an embedding at 1e-3 followed by +O(1) per join: E[y²] ≈ 1e-6 + c·k, a huge first/last ratio
    report = healthcheck.check(stack(Normed, 12), x_in(1e-3))
    assert not by_code(report, "HC201"), [f.message for f in by_code(report, "HC201")]
    assert not by_code(report, "HC301") and not by_code(report, "HC302")


def test_exponential_growth_of_bare_adds_is_hc201():
    report = healthcheck.check(stack(Bare, 12, "he"), x_in(1e-3))
    [finding] = by_code(report, "HC201")
    assert finding.severity == "error" and 2.2 < finding.evidence["ratio_per_point"] < 3.8  # 1 + r, r ≈ 2


def _points(values: list[float], module: str = "blocks", numel: int = 100) -> list[Point]:
    return [Point(id=f"{module}.{k}", at="join", depth=k + 1, module=f"{module}.{k}", source=None, var=v,
                  var_ratio=None, residual_ratio=None, grad_norm=None, grad_rms=None, effective_rank=None,
                  participation_ratio=None, sensitivity=None, numel=numel) for k, v in enumerate(values)]


def test_the_fit_tells_linear_from_exponential():
    var = lambda p: p.var  # noqa: E731
    assert growth_is_linear([_points([1e-4 + k for k in range(12)])], var)  # (k+1)/k after a tiny start
    assert growth_is_linear([_points([1.0 + 0.5 * k for k in range(6)])], var)
    assert not growth_is_linear([_points([2.0**k for k in range(12)])], var)  # seed 001: doubling
    assert not growth_is_linear([_points([1.4**k * (1.1 if k % 2 else 0.9) for k in range(16)])], var)  # noisy


# item 6 and 10: per-stack fits, scale-corrected gradients --------------------------------------


def test_stacks_split_on_module_prefix_and_size():
    assert stack_key("model.decoder.layers.3.self_attn") == "model.decoder.layers"
    assert stack_key("stages.2.blocks.5") == "stages" and stack_key("3.0") == ""
    points = _points([1.0] * 3, "encoder.layers") + _points([1.0] * 4, "decoder.layers") + _points([1.0], "decoder.layers", 7)
    assert [len(s) for s in stacks(points)] == [3, 4, 1]
    # a step between stacks is not a trend: 1, 1, 1 then 100, 100, 100, 100 fits as flat
    steps = _points([1.0] * 3, "encoder.layers") + _points([100.0] * 4, "decoder.layers")
    fit = trend(stacks(steps), lambda p: p.var)
    assert fit.stacks == 2 and fit.steps == 5 and fit.per_point == pytest.approx(1.0)


class EncoderDecoder(nn.Module):
    """Two stacks of normalized residual blocks; the decoder runs at 1e3× the encoder's scale and ends
    in a LayerNorm, so its raw gradients are 1e-3 of the encoder's: a step, not a per-block trend."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*[Normed() for _ in range(6)])
        self.decoder = nn.Sequential(*[Normed() for _ in range(6)])
        self.bridge, self.final = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(x)
        return self.head(self.final(self.decoder(1e3 * self.bridge(memory))))


def test_two_stacks_are_two_fits_and_no_gradient_finding():
    torch.manual_seed(0)
    report = healthcheck.check(EncoderDecoder(), x_in())
    profile = report.measurements.profile
    raw = [p.grad_rms for p in profile]
    assert max(raw) / min(raw) > 100  # what a first/last comparison of raw gradients used to call vanishing
    assert not by_code(report, "HC302") and not by_code(report, "HC301"), [f.message for f in report.findings]
    assert not by_code(report, "HC201") and not by_code(report, "HC202")


class ClassReadout(nn.Module):
    """Normalized residual blocks on 16 tokens, then two class-attention-like blocks on one pooled
    token (a different tensor size) at 1e4× the scale, normalized before the head: the readout's raw
    gradients are 1e-4 of the stream's. It is its own stack, not the end of the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Normed() for _ in range(8)])
        self.cls_blocks = nn.ModuleList([Normed() for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        cls = 1e4 * x.mean(dim=1)  # a class token at another scale
        for block in self.cls_blocks:
            cls = block(cls)
        return self.head(self.norm(cls))


def test_a_class_token_readout_is_not_vanishing_gradients():
    torch.manual_seed(0)
    report = healthcheck.check(ClassReadout(), torch.randn(8, 16, WIDTH, generator=torch.Generator().manual_seed(0)))
    raw = [p.grad_rms for p in report.measurements.profile]
    assert raw[0] / raw[-1] > 100  # a first/last comparison used to call this exploding gradients
    assert not [f for f in report.findings if f.code in ("HC201", "HC202", "HC301", "HC302")], \
        [f.message for f in report.findings]


# item 7: signal lost in the stem ------------------------------------------------------------------


class StemLoss(nn.Module):
    """A conv stem whose BatchNorm weights are drawn around 0 (N(0, std)): E[y²] ≈ std² of the input
    before the first block; BN-in-branch residual blocks then add O(1) each."""

    def __init__(self, std: float, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        nn.init.normal_(self.stem[1].weight, 0.0, std)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)) for _ in range(6)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("std, severity", [(0.02, "info"), (1e-4, "warning")])
def test_signal_lost_in_the_stem_is_named_as_such(std, severity):
    # calibrated by training (benchmarks/rule_judgements.md): std 0.02 trains with SGD and Adam, 1e-4 fails with SGD
    torch.manual_seed(0)
    model = StemLoss(std)
    report = healthcheck.check(model, torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert not by_code(report, "HC201"), "the growth after a vanishing stem is not exploding variance"
    [stem] = [f for f in by_code(report, "HC202") if f.evidence.get("where") == "stem"]
    assert stem.severity == severity and "before the first" in stem.message and "stem" in stem.message
    # BN normalizes to unit variance, then scales channel c by its weight: E[y²] = mean(w²)
    assert stem.evidence["entry_var"] == pytest.approx(model.stem[1].weight.detach().pow(2).mean().item(), rel=0.05)
    assert not [f for f in by_code(report, "HC202") if f.evidence.get("where") != "stem"]


class RegrownAfterLoss(nn.Module):
    """HF MobileViT's case: conv layers without a skip whose BatchNorm weights are drawn around 0
    (N(0, 0.02)) leave ~1e-11 of the input's E[y²] before a Pre-LN transformer stack; there, far
    below the LayerNorms' eps, each normalized branch amplifies the stream ×30–50 until it is back at
    the eps scale — exponential-looking growth whose cause is the signal lost before it."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        # conv-BN-SiLU, then 1×1 convs without a norm (MobileViT's conv_1x1 before its transformer),
        # all drawn N(0, 0.02) as HF does: each 1×1 conv multiplies E[y²] by c·0.02² ≈ 0.013
        self.convs = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(),
                                   *[nn.Conv2d(c, c, 1, bias=False) for _ in range(3)])
        for m in self.convs[1:]:
            if isinstance(m, (nn.BatchNorm2d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        self.norms = nn.ModuleList([nn.LayerNorm(c) for _ in range(8)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)) for _ in range(8)])
        for m in self.mlps.modules():  # HF's init: weights N(0, 0.02), biases 0
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.convs(x).flatten(2).transpose(1, 2)
        for norm, mlp in zip(self.norms, self.mlps):
            tokens = tokens + mlp(norm(tokens))
        return self.head(tokens.mean(1))


def test_growth_back_from_signal_lost_before_the_stream_is_named_as_that_loss():
    torch.manual_seed(0)
    report = healthcheck.check(RegrownAfterLoss(), torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    stream = [p.var for p in report.measurements.profile]
    assert stream[0] < 1e-6 * report.measurements.input_var and stream[-1] / stream[0] > 100  # lost, then regrown
    assert not by_code(report, "HC201"), [f.message for f in by_code(report, "HC201")]
    [loss] = [f for f in by_code(report, "HC202") if f.evidence.get("where") in ("stem", "before_stream")]
    assert loss.severity in ("warning", "error") and ("not exploding variance" in loss.message or "stem" in loss.message)


# HC103: Post-LN's severity follows the measured gradients -----------------------------------------


class PostNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.relu(self.fc1(x))))


def test_post_ln_is_not_an_error_when_the_measured_gradients_are_flat():
    model = stack(PostNorm, 48)
    structural = {f.severity for f in healthcheck.check(model, x_in(), probes=False).findings if f.code == "HC103"}
    assert structural == {"warning"}  # 48 post-norm joins: the error threshold, but only a prediction
    [finding] = by_code(healthcheck.check(model, x_in()), "HC103")
    ratio = finding.evidence["measured_gradient_ratio"]
    assert math.isfinite(ratio) and ratio < 3 and finding.severity == "warning", (ratio, finding.message)
    assert "not there at init" in finding.message


class TrainModeFails(nn.Module):
    """Bare He-init blocks whose forward raises in train mode only: the structure traces (eval mode), the
    probes (train mode) cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = stack(Bare, 12, "he")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("no training forward")
        return self.blocks(x)


def test_a_profile_that_could_not_be_measured_never_weakens_a_structural_finding():
    report = healthcheck.check(TrainModeFails(), x_in())
    assert "profile" in report.measurements.failures
    assert severities(report, "HC101") == severities(healthcheck.check(TrainModeFails(), x_in(), probes=False),
                                                      "HC101") == {"warning"}
