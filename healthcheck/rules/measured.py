"""HC2xx (forward signal) and HC3xx (gradients): rules that read the init-time depth profile.

Each combines the measured numbers with the graph facts (are the joins normalized? is it a plain
stack?) to pick the fix that the science says will work (science.md, Fixes).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

from healthcheck.records import Finding, Location
from healthcheck.rules.registry import Rule, RuleContext, register
from healthcheck.rules.structure import short_source


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _unit(ctx: RuleContext) -> str:
    return "block" if ctx.measurements.at == "join" else "layer"


def _where(point: Any) -> Location:
    return Location(point.module or "(root)", point.source)


def _bare_joins(ctx: RuleContext) -> list[Any]:
    return [j for j in ctx.architecture.joins if j.norm == "none" and j.scale is None and not j.learnable_gain]


def _variance_fix(ctx: RuleContext, vanishing: bool) -> tuple[str, str | None]:
    bare = _bare_joins(ctx)
    if bare and not vanishing:
        return (f"scale each join by 1/√2, put BatchNorm/LayerNorm inside the branch, or zero-init the branch's last "
                f"gain (SkipInit / Fixup) at {short_source(bare[0].source)}", "scale_joins")
    if not ctx.architecture.joins:
        return ("use a variance-preserving init for the nonlinearity (He/Kaiming for ReLU: "
                "nn.init.kaiming_normal_) or add normalization layers", None)
    return ("check the initialization of the residual branches and add normalization inside them", None)


def _profile(ctx: RuleContext) -> list[Any]:
    return list(ctx.measurements.profile) if ctx.measurements is not None else []


def _variance(ctx: RuleContext, opt: dict[str, Any], vanishing: bool) -> Iterator[Finding]:
    points = _profile(ctx)
    ratios = [p.var_ratio for p in points if p.var_ratio is not None]
    if len(ratios) < opt["min_points"]:
        return
    total = math.prod(ratios)
    per_point = geometric_mean(ratios)
    late = geometric_mean(ratios[len(ratios) // 2:])
    if vanishing:
        total, late = 1 / total, 1 / late
    if late >= opt["error_ratio"] and total >= opt["error_total"]:
        severity = "error"
    elif late >= opt["warn_ratio"] and total >= opt["warn_total"]:
        severity = "warning"
    else:
        return
    unit = _unit(ctx)
    shown_total = 1 / total if vanishing else total
    worst = max(points, key=lambda p: (p.var_ratio or 1) ** (-1 if vanishing else 1))
    rule = HC202 if vanishing else HC201
    yield rule.finding(
        severity,
        f"activation variance ×{per_point:.3g} per {unit} over {len(ratios)} {unit}s → ×{shown_total:.3g} at the "
        f"output (late {unit}s ×{late ** (-1 if vanishing else 1):.3g} each)",
        _where(worst),
        {"ratio_per_point": per_point, "late_ratio": late ** (-1 if vanishing else 1), "total": shown_total,
         "points": len(ratios), "first_var": points[0].var, "last_var": points[-1].var},
        _variance_fix(ctx, vanishing),
    )


def _hc201(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _variance(ctx, opt, vanishing=False)


def _hc202(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _variance(ctx, opt, vanishing=True)


_VARIANCE_OPTIONS = {"warn_ratio": 1.15, "warn_total": 100.0, "error_ratio": 1.3, "error_total": 1000.0, "min_points": 4}

HC201 = register(Rule(
    code="HC201", name="exploding-variance",
    summary="Activation variance grows exponentially with depth",
    what="Reads the measured second moment E[y²] at every join (or layer) on the example batch at "
         "initialization and reports a steady multiplicative growth: the geometric-mean growth over the later "
         "half of the points is at least `warn_ratio` and the total growth at least `warn_total`.",
    why="Exponential growth of the activations means exponential growth of the gradients going backwards, "
        "overflow in low precision, and optimizer steps whose effective size depends on depth. Residual blocks "
        "without normalization double the variance per block (ratio 1 + r_k); BatchNorm in the branch makes "
        "the growth linear, ratio (k+1)/k, which this rule does not flag.",
    source="science.md, Predictions: residual rows (seed 001); Quantities: growth ratio.",
    bad_example="""
class Block(nn.Module):                      # measured: variance ×2.0 per block
    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))
""",
    good_example="""
class Block(nn.Module):                      # measured: ×1.0 per block
    def forward(self, x):
        return (x + self.fc2(F.relu(self.fc1(F.relu(x))))) / math.sqrt(2)
""",
    fix_summary="Scale joins by 1/√2, normalize inside the branch, or zero-init the branch's last gain",
    transform="scale_joins", fix_safety="unsafe", options=dict(_VARIANCE_OPTIONS), check=_hc201,
))

HC202 = register(Rule(
    code="HC202", name="vanishing-variance",
    summary="Activation variance shrinks exponentially with depth",
    what="Like HC201, for steady shrinking: the later points each multiply E[y²] by at most 1/`warn_ratio` and "
         "the output has at most 1/`warn_total` of the first point's variance.",
    why="When every layer shrinks the signal (an init whose gain is too small for the nonlinearity, e.g. "
        "PyTorch's default Linear init in a deep ReLU stack shrinks E[y²] about 6× per layer), the output "
        "carries almost nothing of the input and gradients vanish with it.",
    source="science.md, Quantities: activation variance and growth ratio (He et al. 2015 for the gain 2 of ReLU).",
    bad_example="""
layers = [nn.Linear(256, 256), nn.ReLU()] * 30     # default init: gain too small for ReLU
""",
    good_example="""
for m in model.modules():
    if isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
""",
    fix_summary="Use a variance-preserving init for the nonlinearity or add normalization",
    transform=None, fix_safety="unsafe", options=dict(_VARIANCE_OPTIONS), check=_hc202,
))


def _hc203(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    points = [p for p in _profile(ctx) if p.directions is not None]
    if len(points) < 2:
        return
    first = points[0].directions
    # a narrow layer (a classifier head, a bottleneck) has few directions because it has few channels:
    # collapse is a loss of the directions a layer could carry, so its normalized rank must fall too
    tail = [p for p in points[len(points) // 2:]
            if points[0].effective_rank >= opt["min_drop"] * max(p.effective_rank, 1e-12)]
    if not tail:
        return
    worst = min(tail, key=lambda p: p.directions)
    lost = first / max(worst.directions, 1e-12)
    if worst.directions <= opt["error_directions"] and lost >= opt["min_drop"]:
        severity = "error"
    elif worst.directions <= opt["warn_directions"] and lost >= opt["min_drop"]:
        severity = "warning"
    else:
        return
    plain = not ctx.architecture.joins
    fix = ("add residual connections with normalization in the branch" if plain else
           "normalize inside the residual branches (BatchNorm/LayerNorm) so the skip keeps the signal's directions")
    yield HC203.finding(
        severity,
        f"the representation collapses to {worst.directions:.2g} direction(s) of variance at {worst.id} "
        f"(from {first:.3g} at the first {_unit(ctx)}): inputs become indistinguishable",
        _where(worst),
        {"first_directions": first, "worst_directions": worst.directions, "worst_normalized": worst.effective_rank,
         "last_normalized": points[-1].effective_rank},
        (fix, None),
    )


HC203 = register(Rule(
    code="HC203", name="collapsed-effective-rank",
    summary="Signal collapses to a few directions (effective rank → 1)",
    what="Measures the effective rank Σλ/λ_max of the covariance of channel vectors (one per input and "
         "position) at every point, and reports when, in the later half of the network, it falls to "
         "`warn_directions` or fewer directions after dropping `min_drop`× from the first point, both in "
         "directions and as a fraction of what the point can carry (min(channels, vectors)), so that a "
         "narrow layer such as a 4-class head is not taken for a collapse.",
    why="When the effective rank approaches 1, all inputs map onto one line: the network cannot tell inputs "
        "apart and training starts from a degenerate representation. Deep plain stacks without BN and "
        "attention-only stacks without skips (rank collapse, doubly exponential in depth) do this; "
        "BN + skips keep the rank high.",
    source="science.md, Predictions: 'plain stack, no BN' and 'attention-only stacks' rows (seed 002, Labatie "
           "2019; Dong et al. 2021).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(48)])
""",
    good_example="""
model = nn.Sequential(*[ResidualBlock(256, norm=nn.BatchNorm1d) for _ in range(24)])
""",
    fix_summary="Add skips with normalization in the branch",
    transform=None, fix_safety="unsafe",
    options={"warn_directions": 3.0, "error_directions": 2.0, "min_drop": 3.0}, check=_hc203,
))


def _hc204(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    points = [p for p in _profile(ctx) if p.sensitivity is not None]
    if len(points) < 2:
        return
    worst = max(points, key=lambda p: p.sensitivity)
    chi = worst.sensitivity
    if chi >= opt["error_chi"]:
        severity = "error"
    elif chi >= opt["warn_chi"]:
        severity = "warning"
    else:
        return
    growth = geometric_mean([b.sensitivity / a.sensitivity for a, b in zip(points, points[1:]) if a.sensitivity > 0])
    unit = _unit(ctx)
    if not ctx.architecture.joins:
        fix, transform = "add residual connections (with BN in the branch), or remove BN from some layers", None
    else:
        fix, transform = ("zero-init the last normalization gain of each residual branch (e.g. torchvision's "
                          "zero_init_residual=True) so each block starts as the identity", "zero_init_gains")
    yield HC204.finding(
        severity,
        f"sensitivity to input perturbations grows ×{growth:.3g} per {unit} to χ={chi:.3g} at {worst.id}: the "
        f"signal-to-noise ratio falls by {chi ** 2:.3g} (SNR_k/SNR_0 = 1/χ²)",
        _where(worst),
        {"max_sensitivity": chi, "growth_per_point": growth, "snr_drop": chi**2, "first_sensitivity": points[0].sensitivity},
        (fix, transform),
    )


HC204 = register(Rule(
    code="HC204", name="exponential-sensitivity",
    summary="Sensitivity to input noise grows exponentially (low signal-to-noise ratio)",
    what="Measures χ_k = (‖δy_k‖/‖y_k − ȳ_k‖)/(‖δx‖/‖x − x̄‖) for a tiny input perturbation, by one "
         "Jacobian-vector product (forward-mode AD; finite differences where an op has no forward AD), and "
         "reports when it reaches `warn_chi`.",
    why="χ_k measures how much a tiny change of the input is amplified relative to the differences between "
        "inputs: SNR_k/SNR_0 = 1/χ_k². In plain stacks with BatchNorm χ grows exponentially with depth "
        "(×≈1.2 per layer: 7e3 after 48 layers), so the output is dominated by noise and gradients explode; "
        "BN + skips keep it polynomial.",
    source="science.md, Predictions: 'plain stack with BN' and 'BN + skips' rows (seed 002, Labatie 2019).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()) for _ in range(48)])
""",
    good_example="""
model = nn.Sequential(*[ResidualBlock(256, norm=nn.BatchNorm1d) for _ in range(24)])   # x + f(x)
""",
    fix_summary="Add skips (with BN in the branch), or zero-init the branch's last norm gain",
    transform=None, fix_safety="unsafe", options={"warn_chi": 100.0, "error_chi": 1000.0}, check=_hc204,
))


def _hc205(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    points = [p for p in _profile(ctx) if p.residual_ratio is not None]
    if len(points) < opt["min_joins"]:
        return
    median = statistics.median(p.residual_ratio for p in points)
    if median >= opt["error_ratio"]:
        severity = "error"
    elif median >= opt["warn_ratio"]:
        severity = "warning"
    else:
        return
    worst = max(points, key=lambda p: p.residual_ratio)
    yield HC205.finding(
        severity,
        f"residual branches dominate their skips: median E[branch²]/E[skip²] = {median:.3g} over {len(points)} "
        f"joins (max {worst.residual_ratio:.3g} at {worst.id}); the skip barely carries the signal",
        _where(worst),
        {"median_residual_ratio": median, "max_residual_ratio": worst.residual_ratio, "joins": len(points)},
    )


HC205 = register(Rule(
    code="HC205", name="branch-dominates-skip",
    summary="Residual branch output much larger than the skip",
    what="Measures r_k = E[(a·f_k(x_k))²]/E[x_k²] at every join and reports when the median reaches `warn_ratio`.",
    why="A residual block helps because its skip carries the signal and gradient unchanged while the branch "
        "adds a correction. If the branch is much larger than the skip, the block behaves like a plain layer and "
        "the network loses the benefits of skips. Healthy nets have r_k ≈ 1 (no norm) or r_k ≈ 1/(k+1) (BN in "
        "the branch).",
    source="science.md, Quantities: residual ratio; Predictions: residual rows (seeds 001, 002).",
    bad_example="""
def forward(self, x):
    return x + 10.0 * self.branch(x)
""",
    good_example="""
def forward(self, x):
    return x + self.gain * self.branch(x)   # gain initialized to 0 (SkipInit / ReZero) or 1/√depth
""",
    fix_summary="Scale the branch down (a gain initialized small or zero, or 1/√depth) or normalize inside it",
    transform="zero_init_gains", fix_safety="unsafe",
    options={"warn_ratio": 4.0, "error_ratio": 16.0, "min_joins": 2}, check=_hc205,
))


def _gradient(ctx: RuleContext, opt: dict[str, Any], vanishing: bool) -> Iterator[Finding]:
    points = [p for p in _profile(ctx) if p.grad_rms is not None]
    if len(points) < opt["min_points"] or points[0].grad_rms <= 0 or points[-1].grad_rms <= 0:
        return
    growth = points[0].grad_rms / points[-1].grad_rms  # going backwards: first point vs last
    per_point = growth ** (1 / (len(points) - 1))
    measure = 1 / growth if vanishing else growth
    if measure >= opt["error_total"]:
        severity = "error"
    elif measure >= opt["warn_total"]:
        severity = "warning"
    else:
        return
    unit = _unit(ctx)
    rule = HC302 if vanishing else HC301
    direction = "shrink" if vanishing else "grow"
    if vanishing:
        fix = ("keep an identity path for the gradient: Pre-LN instead of Post-LN, skips around plain stacks, "
               "a larger init gain")
        transform = "pre_ln" if any(j.norm == "post" for j in ctx.architecture.joins) else None
    elif not ctx.architecture.joins:
        fix, transform = "add residual connections, or remove BN from some layers", None
    elif _bare_joins(ctx):
        fix, transform = "scale each join by 1/√2 or normalize inside the branch", "scale_joins"
    else:
        fix, transform = "zero-init the last normalization gain of each residual branch", "zero_init_gains"
    yield rule.finding(
        severity,
        f"gradients {direction} ×{per_point:.3g} per {unit} going backwards: ‖∂L/∂y‖ (RMS) is ×{growth:.3g} at the "
        f"first {unit} relative to the last",
        _where(points[0]),
        {"first_grad_rms": points[0].grad_rms, "last_grad_rms": points[-1].grad_rms, "ratio": growth,
         "ratio_per_point": per_point, "points": len(points)},
        (fix, transform),
    )


def _hc301(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _gradient(ctx, opt, vanishing=False)


def _hc302(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _gradient(ctx, opt, vanishing=True)


HC301 = register(Rule(
    code="HC301", name="exploding-gradients",
    summary="Gradients grow exponentially going backwards",
    what="Backpropagates the loss (or a fixed random projection of the output) on the example batch at init "
         "and compares the gradient RMS ‖∂L/∂y‖/√n at the first and last points; reports at `warn_total`.",
    why="If early layers receive gradients orders of magnitude larger than late ones, no single learning rate "
        "suits both: early layers diverge or late layers do not learn. A plain BN-ReLU stack multiplies the "
        "gradient by √(π/(π−1)) ≈ 1.21 per layer; residual blocks without normalization by ≈1.19 per layer.",
    source="science.md, Predictions: 'plain stack … BN' (Yang et al. 2019) and residual rows (seed 001).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()) for _ in range(48)])
""",
    good_example="""
model = nn.Sequential(*[ResidualBlock(256, norm=nn.BatchNorm1d) for _ in range(24)])
""",
    fix_summary="Add skips, or scale/normalize the joins",
    transform=None, fix_safety="unsafe", options={"warn_total": 100.0, "error_total": 1000.0, "min_points": 4},
    check=_hc301,
))

HC302 = register(Rule(
    code="HC302", name="vanishing-gradients",
    summary="Gradients shrink exponentially going backwards",
    what="Like HC301, for gradients that are `warn_total`× smaller at the first point than at the last.",
    why="Early layers that receive almost no gradient do not learn; the network trains as if it were shallow. "
        "Plain stacks with a too-small init, attention-only stacks without skips and deep Post-LN transformers "
        "show it.",
    source="science.md, Predictions: Post-LN row (seed 000; Xiong et al. 2020) and attention-only row.",
    bad_example="""
x = self.ln(x + self.attn(x))   # Post-LN, repeated 48 times
""",
    good_example="""
x = x + self.attn(self.ln(x))   # Pre-LN
""",
    fix_summary="Keep an identity path for the gradient (Pre-LN, skips) or raise the init gain",
    transform=None, fix_safety="unsafe", options={"warn_total": 100.0, "error_total": 1000.0, "min_points": 4},
    check=_hc302,
))


def _hc303(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    m = ctx.measurements
    if m is None or m.grad_correlation is None:
        return
    corr = m.grad_correlation
    plain = not ctx.architecture.joins
    if corr < opt["error_correlation"] and plain:
        severity = "error"
    elif corr < opt["warn_correlation"]:
        severity = "warning"
    else:
        return
    fix = ("add skip connections (with BN in the branch)" if plain else
           "zero-init the last normalization gain of each residual branch so blocks start as the identity")
    points = _profile(ctx)
    yield HC303.finding(
        severity,
        f"gradients are shattered: the input gradients at neighbouring inputs (2% of the input's norm apart) "
        f"have correlation {corr:.3g}",
        _where(points[-1]) if points else Location("(root)"),
        {"grad_correlation": corr, "plain_stack": plain},
        (fix, None if plain else "zero_init_gains"),
    )


HC303 = register(Rule(
    code="HC303", name="shattered-gradients",
    summary="Gradients at neighbouring inputs are uncorrelated (shattered)",
    what="Computes the input gradients at points along a short line through the first example input (each "
         "point 2% of the input's norm from the next, BatchNorm using the real batch's statistics) and "
         "reports when the mean correlation between neighbours is below `warn_correlation` (an error in "
         "plain stacks below `error_correlation`).",
    why="In deep plain networks the gradient changes completely between nearby inputs — it looks like white "
        "noise — so gradient steps stop generalizing across examples and training is badly behaved. "
        "Correlation decays like 2^−depth without skips and like 1/√depth with them.",
    source="science.md, Predictions: 'deep plain ReLU stack' row (seed 001; Balduzzi et al. 2017).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()) for _ in range(32)])
""",
    good_example="""
model = nn.Sequential(*[ResidualBlock(256, norm=nn.BatchNorm1d) for _ in range(16)])
""",
    fix_summary="Add skip connections with BN in the branch",
    transform=None, fix_safety="unsafe",
    options={"warn_correlation": 0.05, "error_correlation": 0.05}, check=_hc303,
))
