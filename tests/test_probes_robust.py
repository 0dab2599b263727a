"""The probes on models as people write them: the gradient-correlation line (HC303) measures the
model, not the batch, the dropout masks or the other inputs; the default loss ignores padding;
in-place joins read their operands before the add; a probe that cannot run drops only itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import healthcheck
from healthcheck.guard import preserved
from healthcheck.probes import ProbeOptions, measure
from healthcheck.probes.measure import linear_field_correlation

LINE = ProbeOptions().line_points


def probe(model: nn.Module, *args, at_joins: bool = False, sensitivity: bool = False, **kwargs):
    with preserved(model):
        return measure(model, args, kwargs, at_joins=at_joins, options=ProbeOptions(sensitivity=sensitivity))


def inputs(batch: int, features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed))


# --- HC303: the line -------------------------------------------------------------------------------


class HalfSquare(nn.Module):
    """x ↦ (w·x)²/2: its gradient w(w·x) is exactly linear in x."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Linear(features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x).pow(2) / 2


def test_exactly_linear_gradient_field_scores_one_whatever_the_batch():
    # The lag-1 correlation over m points of a linear field is 1 − O(1/m²): the line length sets the
    # tolerance (0.45 at the old 4-point line, 0.989 at 24).
    floor = linear_field_correlation(LINE)
    assert floor > 0.95
    torch.manual_seed(0)
    field = HalfSquare(32)
    for batch in (1, 4, 16):
        assert probe(field, inputs(batch, 32)).grad_correlation == pytest.approx(floor, abs=1e-4)
    # a linear model: the gradient is constant along the line
    assert probe(nn.Linear(32, 4), inputs(4, 32)).grad_correlation == pytest.approx(1.0)


def test_correlation_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    x = inputs(16, 64)
    small, large = probe(mlp, x[:4]), probe(mlp, x)
    assert small.grad_correlation == pytest.approx(large.grad_correlation, abs=1e-5)
    assert small.line_points == large.line_points == LINE


def test_shallow_relu_mlp_is_not_flagged_and_deep_plain_bn_stack_is():
    torch.manual_seed(0)
    shallow = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    report = healthcheck.check(shallow, inputs(4, 64))
    assert report.measurements.grad_correlation > 0.5
    assert "HC303" not in {f.code for f in report.findings}
    # a plain BN stack is chaotic at init (Yang et al. 2019): 24 layers of width 256 shatter the
    # gradients (measured −0.02 at batch 128; −0.08 to 0.05 from batch 4 to 32). The severity follows
    # the measured chaos χ and the digits trainings (benchmarks/zoo_review.md): 24 layers (χ ≈ 1e2)
    # train, borderline (0.87 SGD, 0.91 AdamW): a warning; 48 layers (χ ≈ 8e3) do not: an error.
    for depth, severity in ((24, "warning"), (48, "error")):
        torch.manual_seed(0)
        layers = [m for _ in range(depth) for m in (nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU())]
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        report = healthcheck.check(nn.Sequential(*layers), inputs(128, 256))
        assert report.measurements.grad_correlation < 0.1
        [finding] = [f for f in report.findings if f.code == "HC303"]
        assert finding.severity == severity and "χ" in finding.message


class Stochastic(nn.Module):
    """Every kind of randomness a forward has in train mode: dropout, attention dropout, timm-style
    drop-path (bernoulli_ on a new tensor, scaled by 1/keep), LayerDrop (torch.rand([]) < p) and a
    hand-written mask (torch.rand_like(x) > p)."""

    def __init__(self, p: float, width: int = 32) -> None:
        super().__init__()
        self.p = p
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.dropout = nn.Dropout(p)

    def drop_path(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.relu(self.fc1(x)))
        tokens = h.reshape(h.shape[0], 4, -1)
        attended = F.scaled_dot_product_attention(tokens, tokens, tokens, dropout_p=self.p if self.training else 0.0)
        h = h + self.drop_path(attended.reshape(h.shape))
        if not (self.training and torch.rand([]) < self.p):  # LayerDrop
            h = h + torch.tanh(self.fc2(h))
        h = h * (torch.rand_like(h) > self.p).float() / (1 - self.p)
        return self.fc3(h)


def test_dropout_drop_path_and_random_ops_do_not_change_the_correlation():
    x = inputs(8, 32)
    torch.manual_seed(0)
    on = Stochastic(0.3)
    off = Stochastic(0.0)
    off.load_state_dict(on.state_dict())
    rng = torch.get_rng_state()
    with_noise, without = probe(on, x, at_joins=True), probe(off, x, at_joins=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert with_noise.grad_correlation == pytest.approx(without.grad_correlation, abs=1e-5)
    # every pass sees the same (neutral) draws: the profile is that of the deterministic model
    assert [p.var for p in with_noise.profile] == pytest.approx([p.var for p in without.profile], rel=1e-4)


class TwoInputs(nn.Module):
    """A conditioned model: x on the line, a per-sample condition (a timestep-like float, class ids)
    that must be the same on every row of the line."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc1(x + self.embed(labels) + (0 if t is None else t[:, None]))
        return self.fc2(F.relu(h))


def test_every_row_of_the_line_shares_the_non_line_inputs():
    torch.manual_seed(0)
    model = TwoInputs()
    x = inputs(8, 32)
    labels, t = torch.arange(8) % 10, torch.linspace(0, 3, 8)
    # the same first example with different other rows: only row 0 of every input matters
    a = probe(model, x, labels, t=t)
    b = probe(model, x, labels.flip(0).roll(1), t=t.flip(0).roll(1))
    assert a.grad_correlation == pytest.approx(b.grad_correlation, abs=1e-6)
    assert a.grad_correlation > 0.5


class RowCounter(nn.Module):
    """A conv-BN-ReLU stack that remembers the most rows any forward gave it (the activation memory
    of a pass is proportional to them); `mix_rows` adds a cross-row op that is not BatchNorm."""

    def __init__(self, mix_rows: bool = False) -> None:
        super().__init__()
        self.mix_rows = mix_rows
        self.layers = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                                      nn.ReLU())])
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
        self.most_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.most_rows = max(self.most_rows, x.shape[0])
        h = self.stem(x)
        if self.mix_rows:
            h = h - 0.5 * h.mean(dim=0, keepdim=True)  # every row depends on the others
        return self.head(self.layers(h).mean(dim=(2, 3)))


@pytest.mark.parametrize("mix_rows", [False, True])
def test_the_line_runs_in_chunks_of_the_batch_and_gives_the_same_correlation(mix_rows):
    """The 24-point line costs a batch's activation memory, not 24 rows' (deepseek_vit was killed for
    memory), and chunking is exact: BatchNorm is frozen to the batch's statistics, and a model that
    mixes rows otherwise is caught by the overlap row and runs the line as one batch."""
    torch.manual_seed(0)
    model, x = RowCounter(mix_rows), torch.randn(4, 3, 12, 12)
    results = {}
    for chunk_bytes in (0, 2**40):  # chunks of the batch, and the whole line in one pass
        model.most_rows = 0
        with preserved(model):
            m = measure(model, (x,), {}, at_joins=False, options=ProbeOptions(line_chunk_bytes=chunk_bytes))
            results[chunk_bytes] = (m.grad_correlation, model.most_rows)  # the guard restores the attribute
    (chunked, chunked_rows), (whole, whole_rows) = results[0], results[2**40]
    assert whole_rows == LINE
    assert chunked_rows == (LINE if mix_rows else 4)  # the batch's rows, unless rows are not independent
    assert chunked is not None and chunked == pytest.approx(whole, abs=1e-6)


# --- padding ---------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """HF-style: config.pad_token_id, input_ids and attention_mask keywords; the pad embedding is
    zero and a norm without eps floor blows it up, as in Gemma's scaled RMSNorm."""

    class Config:
        pad_token_id = 0

    def __init__(self, vocab: int = 50, width: int = 32) -> None:
        super().__init__()
        self.config = self.Config()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-12)  # the pad row: 0 · 1e6
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h)


def test_a_masked_pad_token_does_not_change_the_gradient_profile():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(4, 1, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(4, 12, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)], dim=1)
    plain = probe(model, ids, at_joins=True, sensitivity=True)
    for kwargs in ({"attention_mask": mask}, {}):  # the mask, or the pad id alone
        with_pad = probe(model, padded, at_joins=True, sensitivity=True, **kwargs)
        # The pad position gets no loss weight and no perturbation: ‖∂L/∂y‖ and χ are those of the
        # unpadded batch (not ×1e6 from the pad's zero embedding through the norm). R and the
        # tangent are drawn for a longer tensor, so the numbers agree as statistics do: 25 % for a
        # norm over 4×12×32 elements, χ within 20 %.
        for a, b in zip(plain.profile, with_pad.profile):
            # E[y²] and the directions of variance are taken over the counted positions only: exactly
            # the unpadded batch's (the same vectors)
            assert b.var == pytest.approx(a.var, rel=1e-5)
            assert b.directions == pytest.approx(a.directions, rel=1e-4)
            assert b.grad_norm == pytest.approx(a.grad_norm, rel=0.25)
            assert b.sensitivity == pytest.approx(a.sensitivity, rel=0.2)
        assert with_pad.grad_correlation == pytest.approx(plain.grad_correlation, abs=0.05)


# --- probes that cannot run as usual ---------------------------------------------------------------


class SetsRequiresGradOnSlice(nn.Module):
    """wav2vec2's feature encoder: `hidden = input[:, None]; hidden.requires_grad = True`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]
        if self.training:
            h.requires_grad = True
        h = F.gelu(self.conv(h))
        return self.head(h.mean(-1) + h.amax(-1))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(3))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


class InplaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.fc(x)


class DeadLayer(nn.Module):
    """A layer whose output is all zeros at init (zero weights and bias) in a residual stack."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.dead, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        nn.init.zeros_(self.dead.weight)
        nn.init.zeros_(self.dead.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        zero = self.dead(h)
        return self.fc2(zero + F.relu(zero))


@pytest.mark.parametrize("build", [SetsRequiresGradOnSlice, lambda: Checkpointed(True), lambda: Checkpointed(False),
                                   InplaceOnInput, DeadLayer, lambda: nn.Sequential(nn.LazyLinear(16), nn.ReLU(),
                                                                                    nn.Linear(16, 4))],
                         ids=["requires-grad-on-slice", "checkpoint-reentrant", "checkpoint", "inplace-on-input",
                              "dead-layer", "lazy"])
def test_models_that_train_get_a_report(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(8, 64) if isinstance(model, SetsRequiresGradOnSlice) else inputs(8, 32)
    before = x.clone()
    report = healthcheck.check(model, x)
    assert torch.equal(x, before)  # the caller's example is untouched
    m = report.measurements
    assert m is not None and m.profile and "profile" not in m.failures and "gradients" not in m.failures
    assert any(p.grad_norm for p in m.profile)  # the backward pass ran
    for point in m.profile:  # an undefined number is None, never NaN
        assert point.sensitivity is None or math.isfinite(point.sensitivity)


class FlagCheckpointed(nn.Module):
    """Hugging Face / timm style: `gradient_checkpointing = True` makes each block a non-reentrant
    checkpoint, with dropout inside that the recomputation would redraw."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32))
                                    for _ in range(3))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            branch = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing else block(x)
            x = x + branch
        return self.head(x)


def test_gradient_checkpointing_gives_the_numbers_of_the_plain_model():
    torch.manual_seed(0)
    model = FlagCheckpointed()
    plain = healthcheck.check(model, inputs(8, 32)).measurements
    model.gradient_checkpointing = True
    checkpointed = healthcheck.check(model, inputs(8, 32)).measurements
    assert model.gradient_checkpointing  # restored
    assert not checkpointed.failures
    assert [p.grad_norm for p in checkpointed.profile] == pytest.approx([p.grad_norm for p in plain.profile])
    assert checkpointed.grad_correlation == pytest.approx(plain.grad_correlation)


class RawCheckpointed(FlagCheckpointed):
    """A hand-written `checkpoint(block, x)` under a flag the probes do not know: the recomputation in
    backward must not redraw the dropout the recorded forward skipped."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.save_memory = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=self.use_reentrant) if self.save_memory else block(x))
        return self.head(x)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_raw_checkpoint_with_dropout_gives_the_numbers_of_the_plain_model(use_reentrant):
    torch.manual_seed(0)
    model, x = RawCheckpointed(use_reentrant), inputs(8, 32)
    x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad
    plain = probe(model, x, at_joins=True)
    model.save_memory = True
    checkpointed = probe(model, x, at_joins=True)
    assert not checkpointed.failures
    assert [p.grad_norm for p in checkpointed.profile] == pytest.approx([p.grad_norm for p in plain.profile], rel=1e-5)
    assert checkpointed.grad_correlation == pytest.approx(plain.grad_correlation, abs=1e-6)
    import torch.utils.checkpoint as module
    assert module.CheckpointFunction.__name__ == "CheckpointFunction"  # torch's machinery is restored


def test_a_dead_layer_gives_none_ratios_not_a_crash():
    torch.manual_seed(0)
    report = healthcheck.check(DeadLayer(), inputs(8, 32))
    m = report.measurements
    points = list(m.profile)
    dead = next(i for i, p in enumerate(points) if p.var == 0.0)
    assert points[dead].sensitivity is None  # 0/0: no χ, and the failures say why
    assert any(key.startswith("sensitivity at") for key in m.failures)
    assert points[dead + 1].var_ratio is None  # var / 0: no ratio, not ZeroDivisionError
    assert "grad_correlation" in m.failures  # the output is constant: no input gradient to correlate


# --- in-place joins --------------------------------------------------------------------------------


class ZeroGammaBlock(nn.Module):
    """torchvision's zero_init_residual: the branch ends in a BN with γ = 0, so the block starts as
    the identity; `out += identity` as in timm and torchvision ResNets."""

    def __init__(self, width: int, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.bn(self.fc(x))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return F.relu(out)


def test_inplace_join_reads_the_branch_before_the_add():
    ratios = {}
    for inplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), *[ZeroGammaBlock(32, inplace) for _ in range(3)], nn.Linear(32, 4))
        ratios[inplace] = [p.residual_ratio for p in probe(model, inputs(8, 16), at_joins=True).profile]
    assert ratios[True] == ratios[False] == [0.0, 0.0, 0.0]


class FailsInTrainMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("train mode needs labels")
        return self.fc(x)


def test_a_model_the_probes_cannot_run_keeps_its_structural_report():
    report = healthcheck.check(FailsInTrainMode(), inputs(4, 8))
    assert report.architecture is not None and report.measurements.profile == ()
    assert "train mode needs labels" in report.measurements.failures["profile"]
