"""HC1xx: structural rules, read from the traced architecture alone."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

from healthcheck.graph.joins import Join
from healthcheck.records import SEVERITIES, Finding, Location
from healthcheck.rules.registry import Rule, RuleContext, register, severity_at
from healthcheck.rules.stream import (
    GROWTH_THRESHOLDS,
    exponential_rate,
    growth_is_linear,
    relative_gradient,
    series_depth,
    stacks,
    stream_ids,
    stream_points,
    trend,
    with_entry,
)


def short_source(source: str | None) -> str:
    if not source:
        return "?"
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}"


def by_source(joins: Iterable[Join]) -> Iterator[list[Join]]:
    """Joins grouped by the line of code that makes them (one block class = one fix), in order."""
    groups: dict[str, list[Join]] = {}
    for j in joins:
        groups.setdefault(j.source or j.module, []).append(j)
    yield from groups.values()


def _join_evidence(group: list[Join], **extra: Any) -> dict[str, Any]:
    return {"joins": [j.id for j in group], "count": len(group), **extra}


def _measured(ctx: RuleContext) -> bool:
    """Whether the probes measured a profile: with `--no-probes`, or when the profile pass could not run
    (`failures["profile"]`), a structural rule has only its prediction, never a weaker reading."""
    return ctx.measurements is not None and bool(ctx.measurements.profile)


def _capped(severity: str | None, ctx: RuleContext) -> str | None:
    """A structural prediction alone (no probes) is at most a warning."""
    return "warning" if severity == "error" and not _measured(ctx) else severity


def _measured_variance(ctx: RuleContext) -> tuple[Any, bool]:
    """The fitted per-block variance change along the residual stream and whether it is exponential."""
    groups = with_entry(stream_points(ctx))
    fit = exponential_rate(groups, lambda p: p.var)
    return fit, fit is not None and not growth_is_linear(groups, lambda p: p.var)


def _hc101(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    on_stream = stream_ids(ctx.architecture)
    bare = [j for j in ctx.architecture.joins
            if j.kind == "add" and j.norm == "none" and j.scale is None and not j.learnable_gain and j.id in on_stream]
    in_series = series_depth(ctx.architecture, (j.id for j in bare))
    severity = severity_at(in_series, opt["warn_joins"], opt["error_joins"])
    if severity is None:
        return
    evidence: dict[str, Any] = {"joins_in_model": len(bare), "joins_in_series": in_series}
    if not _measured(ctx):
        # the prediction of seed 001 for a variance-preserving branch: r = 1, var doubles per block
        growth = 2.0 ** in_series
        claim = f"variance doubles per block (predicted, not measured: ×{growth:.3g} over {in_series} joins in series)"
        evidence.update(predicted_variance_growth=growth, predicted_ratio_per_block=2.0, measured=False)
        severity = _capped(severity, ctx)
    else:
        ids = {j.id for j in bare}
        ratios = [p.residual_ratio for p in ctx.measurements.profile if p.id in ids and p.residual_ratio is not None]
        per_block = math.exp(sum(math.log1p(max(r, 0.0)) for r in ratios) / len(ratios)) if ratios else 2.0
        growth = per_block ** in_series
        fit, exponential = _measured_variance(ctx)
        measured_per_block = fit.per_point if fit is not None else 1.0
        measured_total = fit.total if fit is not None else 1.0
        evidence.update(predicted_variance_growth=growth, predicted_ratio_per_block=per_block,
                        measured_ratio_per_block=measured_per_block, measured_variance_growth=measured_total,
                        measured_exponential=exponential, measured=True)
        # the measured profile decides: the prediction assumes branches as large as the skip, which
        # small default-init branches, zero-initialized last layers and identity-at-init branches are not
        if exponential and measured_per_block >= opt["error_ratio"] and measured_total >= opt["error_total"]:
            confirmed = "error"
        elif exponential and measured_per_block >= opt["warn_ratio"] and measured_total >= opt["warn_total"]:
            confirmed = "warning"
        else:
            confirmed = "info"
        severity = _weaker(severity, confirmed)
        claim = (f"branches measure r = E[f²]/E[x²] ≈ {per_block - 1:.2g}, so variance grows ×{per_block:.3g} per "
                 f"block (×{growth:.3g} over {in_series} joins in series); measured: ×{measured_per_block:.3g} per "
                 f"block{'' if exponential else ', not exponential'}")
    for group in by_source(bare):
        yield HC101.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} add the branch to the skip with no "
            f"normalization and no scaling: {claim}",
            Location(group[0].module, group[0].source),
            _join_evidence(group, **evidence),
        )


def _weaker(a: str, b: str) -> str:
    """The less severe of two severities."""
    return max(a, b, key=SEVERITIES.index)


HC101 = register(Rule(
    code="HC101", name="unnormalized-residual-join",
    summary="Residual join with no normalization and no scaling",
    what="Finds residual adds `y = x + f(x)` on the residual stream where the branch f has no normalization "
         "layer, the sum is not scaled (e.g. by 1/√2) and the branch has no learnable gain (SkipInit, ReZero, "
         "LayerScale), and counts the longest chain of them in series (parallel joins and joins inside another "
         "join's branch do not compound). From the structure alone (`--no-probes`) the doubling is a "
         "prediction: at most a warning. When the probes ran, the measured residual ratio r = E[f²]/E[x²] gives "
         "the predicted growth (1 + r per block) and the measured profile decides the severity: an error only "
         "where E[y²] measurably grows exponentially by at least `error_ratio` per block and `error_total` in "
         "all (as HC201), a warning at `warn_ratio`/`warn_total`, otherwise info (small default-init branches, "
         "a zero-initialized last layer, a branch that is the identity at init).",
    why="At He initialization a variance-preserving branch adds as much variance as the skip carries, so "
        "var(y) ≈ 2·var(x): the activations double at every block and grow like 2^L over L blocks; the "
        "gradients grow the same way going backwards. Deep stacks of such blocks overflow or train "
        "erratically unless a normalization or a scale keeps the sum in check.",
    source="science.md, Predictions: 'residual blocks, no normalization … var(y_k) doubles per block' "
           "(seed 001, residual networks and batch normalization).",
    bad_example="""
class Block(nn.Module):
    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))
""",
    good_example="""
class Block(nn.Module):
    def forward(self, x):
        return (x + self.conv2(F.relu(self.conv1(F.relu(x))))) / math.sqrt(2)
        # or: BatchNorm inside the branch, or a zero-initialized gain on f(x)
""",
    fix_summary="Scale each join by 1/√2, put BatchNorm/LayerNorm inside the branch, or zero-init the "
                "branch's last gain (SkipInit / Fixup)",
    transform="scale_joins",
    fix_safety="unsafe",
    options={"warn_joins": 2, "error_joins": 8, **GROWTH_THRESHOLDS},
    check=_hc101,
))


def _hc102(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    after = [j for j in ctx.architecture.joins if j.activation_after_join]
    if not after:
        return
    severity = "warning" if len(after) >= opt["warn_joins"] else "info"
    for group in by_source(after):
        yield HC102.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} are followed by an activation: "
            "the skip path is not an identity, so signal crosses a nonlinearity at every block",
            Location(group[0].module, group[0].source),
            _join_evidence(group, joins_in_model=len(after)),
        )


HC102 = register(Rule(
    code="HC102", name="activation-after-join",
    summary="Activation applied after the residual add (ResNet v1 ordering)",
    what="Finds residual joins whose output passes through an activation (e.g. `relu(x + f(x))`) "
         "before it reaches the next block.",
    why="With the activation after the add, the skip path from one block to the next is not an identity: "
        "every block's output is rectified, so information and gradients cannot pass through the network "
        "unchanged. Pre-activation blocks (norm → activation → weight inside the branch, nothing after the "
        "add) keep an exact identity path and train better at large depth (He et al. 2016, 'Identity "
        "Mappings in Deep Residual Networks'). Harmless at ResNet-50 depth, hence info below the "
        "`warn_joins` count.",
    source="science.md, Fixes: 'ReLU after the join (non-identity skip path) → pre-activation block' (seed 001).",
    bad_example="""
def forward(self, x):
    return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
""",
    good_example="""
def forward(self, x):
    return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
""",
    fix_summary="Use pre-activation blocks: move the activation into the branch (norm → act → weight) "
                "and leave nothing after the add",
    transform="pre_activation",
    fix_safety="unsafe",
    options={"warn_joins": 32},
    check=_hc102,
))


def _hc103(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    post = [j for j in ctx.architecture.joins if j.norm == "post"]
    severity = severity_at(len(post), opt["warn_joins"], opt["error_joins"])
    if severity is None:
        return
    evidence: dict[str, Any] = {"joins_in_model": len(post)}
    claim = "last-layer gradients are large at init (predicted, not measured) and training needs learning-rate warm-up"
    if not _measured(ctx):
        severity = _capped(severity, ctx)
    else:
        # Xiong et al. 2020: under Post-LN the gradient grows towards the output. Measure it on the
        # post-norm joins, per stack, scale-corrected; a flat profile does not confirm the prediction
        ids = {j.id for j in post}
        fit = trend(stacks(ctx.measurements.profile, keep=lambda p: p.id in ids), relative_gradient)
        towards_output = fit.total if fit is not None else 1.0
        evidence.update(measured_gradient_ratio=towards_output, measured=fit is not None)
        if towards_output >= opt["error_gradient_ratio"]:
            confirmed = "error"
        elif towards_output >= opt["warn_gradient_ratio"]:
            confirmed = "warning"
        else:
            # flat at init does not refute the need for a warm-up, which is about the optimizer: 24- and
            # 48-join Post-LN stacks train with Adam and not with SGD at lr 0.05 (benchmarks/rule_judgements.md)
            confirmed = "warning"
        severity = _weaker(severity, confirmed)
        claim = (f"measured gradients (‖∂L/∂y‖·rms(y)) are ×{towards_output:.3g} larger at the last such join than "
                 "at the first" + ("; large last-layer gradients make training need learning-rate warm-up"
                                   if towards_output >= opt["warn_gradient_ratio"] else ", so the deep Post-LN "
                                   "gradient imbalance is not there at init (a warm-up is still the safe default)"))
    for group in by_source(post):
        yield HC103.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} normalize after the add "
            f"(Post-LN) in a stack of {len(post)} such joins: {claim}",
            Location(group[0].module, group[0].source),
            _join_evidence(group, **evidence),
        )


HC103 = register(Rule(
    code="HC103", name="post-norm-at-depth",
    summary="Normalization after the residual add (Post-LN) in a deep stack",
    what="Finds residual joins whose output goes straight into a normalization layer (`LN(x + f(x))`, "
         "the original Transformer and BERT ordering) when the model has at least `warn_joins` of them. From "
         "the structure alone it is at most a warning. When the probes ran, the scale-corrected gradient "
         "‖∂L/∂y‖·rms(y) is fitted along the post-norm joins (per stack): the finding is an error (at "
         "`error_joins`) only when the last join's gradient is `error_gradient_ratio`× the first's, a warning "
         "at `warn_gradient_ratio`× or when the measured gradients are flat: a need for warm-up is about the "
         "optimizer, which init-time probes cannot refute.",
    why="With Post-LN the normalization sits on the trunk, so gradients to early layers must pass every "
        "LayerNorm; at initialization the expected gradient of the last layers' parameters is large and "
        "grows with depth, and deep Post-LN stacks diverge without a careful learning-rate warm-up. Pre-LN "
        "(`x + f(LN(x))`) keeps an identity path and bounded gradients (Xiong et al. 2020).",
    source="science.md, Predictions: 'Post-LN transformer … gradients at the last layers are large at init' "
           "(seed 000; Xiong et al. 2020, 'On Layer Normalization in the Transformer Architecture').",
    bad_example="""
def forward(self, x):
    x = self.ln1(x + self.attn(x))
    return self.ln2(x + self.mlp(x))
""",
    good_example="""
def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))   # and one final LayerNorm after the last block
""",
    fix_summary="Move the LayerNorm into the branch (Pre-LN) with a final norm after the last block, or "
                "use DeepNorm-style scaled skips; otherwise keep a learning-rate warm-up",
    transform="pre_ln",
    fix_safety="unsafe",
    options={"warn_joins": 12, "error_joins": 48, "warn_gradient_ratio": 3.0, "error_gradient_ratio": 10.0},
    check=_hc103,
))


def _plain_stack_confirmed(ctx: RuleContext, opt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What the probes say about the predicted plain-stack pathologies: "error" when one of them is
    measured, else "warning"; and the numbers (gradient imbalance, sensitivity χ, directions of variance)."""
    m = ctx.measurements
    fit = trend(stream_points(ctx), relative_gradient)
    imbalance = max(fit.total, 1 / fit.total) if fit is not None else 1.0
    chi = max((p.sensitivity for p in m.profile if p.sensitivity is not None), default=1.0)
    ranked = [p for p in m.profile if p.directions is not None and p.rank_size > 1]
    worst = min(ranked[len(ranked) // 2:], key=lambda p: p.directions, default=None)
    directions = worst.directions if worst is not None else None
    # the measured count is biased low and bounded by the independent draws behind it: a collapse is
    # measured only when the sampling band's high end (stats.directions_band), the most directions
    # this sample can hide, is ≤ 2 — as HC203 reads it; a count inside the band is no confirmation
    band = (worst.directions_band or (directions, directions)) if worst is not None else None
    dropped = band is not None and ranked[0].directions >= 3 * max(band[1], 1e-12)
    numbers = {"measured_gradient_imbalance": imbalance, "measured_max_sensitivity": chi,
               "measured_min_directions": directions, "measured_directions_band": list(band) if band else None}
    if imbalance >= opt["error_total"] or chi >= opt["error_total"] or (dropped and band[1] <= 2):
        return "error", numbers
    return "warning", numbers


def _hc104(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    arch = ctx.architecture
    severity = severity_at(arch.plain_depth, opt["warn_depth"], opt["error_depth"])
    if severity is None:
        return
    evidence: dict[str, Any] = {"plain_depth": arch.plain_depth, "normalized": arch.has_norm}
    if arch.has_norm:
        growth = (3.14159265 / (3.14159265 - 1)) ** (0.5 * arch.plain_depth)
        evidence["predicted_gradient_growth"] = growth
        consequence = (f"with BatchNorm the gradient grows ≈×1.21 per layer going backwards (≈×{growth:.3g} over "
                       "the run) and sensitivity to input noise grows exponentially")
    else:
        consequence = "without normalization the signal collapses towards one direction and gradients shatter"
    if not _measured(ctx):
        severity = _capped(severity, ctx)
        consequence += " (predicted, not measured)"
    else:
        confirmed, numbers = _plain_stack_confirmed(ctx, opt)
        evidence.update(numbers, measured=True)
        # not confirmed at init: at most a warning (the optimizer can still fail a very deep plain
        # stack, e.g. by killing its ReLUs in the first steps)
        severity = _weaker(severity, confirmed)
        if confirmed != "error":
            consequence += (f"; not confirmed at init (gradient imbalance ×{numbers['measured_gradient_imbalance']:.3g}, "
                            f"χ ≤ {numbers['measured_max_sensitivity']:.3g})")
    yield HC104.finding(
        severity,
        f"{arch.plain_depth} weight layers in a row with no residual connection: {consequence}",
        Location(arch.plain_end, None),
        evidence,
    )


HC104 = register(Rule(
    code="HC104", name="deep-plain-stack",
    summary="Deep stack of layers with no skip connection",
    what="Measures the longest run of weight layers (conv, linear, attention) that no residual join "
         "bypasses and reports it when it reaches `warn_depth`. From the structure alone it is at most a "
         "warning; when the probes ran, an error (at `error_depth`) needs a measured pathology — gradient "
         "imbalance along the stack or sensitivity χ of `error_total`, or a collapse to ≤ 2 directions — and a "
         "warning otherwise.",
    why="Without skips, every layer multiplies the backward signal by its Jacobian. With BatchNorm the "
        "gradient norm grows by √(π/(π−1)) ≈ 1.21 per layer going backwards and the network's "
        "sensitivity to small input changes grows exponentially (SNR pathology); without normalization "
        "the representation collapses to a low effective rank and neighbouring inputs get uncorrelated "
        "('shattered') gradients.",
    source="science.md, Predictions: plain stack rows (seed 001; seed 002, Labatie 2019; Yang et al. 2019; "
           "Balduzzi et al. 2017).",
    bad_example="""
layers = []
for _ in range(40):
    layers += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
model = nn.Sequential(*layers)
""",
    good_example="""
class Block(nn.Module):   # residual: x + f(x), BatchNorm in the branch
    def forward(self, x):
        return x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
model = nn.Sequential(*[Block() for _ in range(20)])
""",
    fix_summary="Add residual connections (with normalization in the branch) around groups of layers",
    transform=None,
    fix_safety="unsafe",
    options={"warn_depth": 20, "error_depth": 50, "error_total": 1000.0},
    check=_hc104,
))


def _hc105(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    ends = [j for j in ctx.architecture.joins if j.kind == "add" and j.branch_ends_nonnegative]
    for group in by_source(ends):
        yield HC105.finding(
            "warning",
            f"the residual branch of {len(group)} join(s) at {short_source(group[0].source)} ends in a "
            "non-negative activation: f(x) ≥ 0, so each block can only increase its input",
            Location(group[0].module, group[0].source),
            _join_evidence(group),
        )


HC105 = register(Rule(
    code="HC105", name="nonnegative-branch-output",
    summary="Residual branch ends in ReLU (or another non-negative activation)",
    what="Finds residual adds whose branch output passes a ReLU, ReLU6, sigmoid or softplus last.",
    why="If f(x) ≥ 0 everywhere, the block x + f(x) can only push every unit upwards: the branch cannot "
        "correct its input, and the activations drift upwards with depth. Residual branches should end in "
        "a linear (weight or norm) layer.",
    source="design.md rule list and seed 001 (residual blocks: the branch ends with a weight layer).",
    bad_example="""
def forward(self, x):
    return x + F.relu(self.conv2(F.relu(self.conv1(x))))
""",
    good_example="""
def forward(self, x):
    return x + self.conv2(F.relu(self.conv1(x)))
""",
    fix_summary="End the branch with its weight (or norm) layer; move the activation before it",
    transform=None,
    fix_safety="unsafe",
    check=_hc105,
))
