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
from healthcheck.rules.registry import Rule, RuleContext, register, severity_at
from healthcheck.rules.stream import (
    GROWTH_THRESHOLDS,
    exponential_rate,
    growth_is_linear,
    relative_gradient,
    stream_points,
    trend,
    with_entry,
)
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


def _stem_loss(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    """Signal lost before the first point: the stem (or embedding) leaves almost nothing of the input's
    second moment. Later blocks that add O(1) each then look like enormous growth; name the real cause."""
    m = ctx.measurements
    points = _profile(ctx)
    if not points or not (m.input_var > 0 and math.isfinite(m.input_var)) or not points[0].var > 0:
        return
    first = points[0]
    # what enters the first block: its skip operand (var / var_ratio at a first join), or the point itself
    entry = first.var / first.var_ratio if first.var_ratio else first.var
    drop = m.input_var / min(first.var, entry)
    lowest = _lowest_stream_point(ctx)
    if lowest is not None and lowest is not first and m.input_var / lowest.var > max(drop, opt["stem_warn_drop"]):
        yield from _early_loss(ctx, opt, lowest)
        return
    # below the warning level, a normalized layer downstream rescales a small stem output: it trains
    # (benchmarks/rule_judgements.md), so an info
    severity = severity_at(drop, opt["stem_warn_drop"], opt["stem_error_drop"]) or (
        "info" if drop >= opt["stem_info_drop"] else None)
    if severity is None:
        return
    yield HC202.finding(
        severity,
        f"signal vanishes before the first {_unit(ctx)}: E[y²] falls from {m.input_var:.3g} at the input to "
        f"{m.input_var / drop:.3g} entering {first.id} (×{1 / drop:.3g}) in the stem/embedding, so what later "
        f"{_unit(ctx)}s add is not a growth of the input's signal; look for a near-zero init there (a "
        "normalization weight or gain drawn around 0, a tiny embedding or conv init)",
        _where(first),
        {"input_var": m.input_var, "entry_var": m.input_var / drop, "first_var": first.var, "drop": drop,
         "where": "stem"},
        ("initialize the stem's normalization weights to 1 (nn.init.ones_) and its layers with a "
         "variance-preserving init", None),
    )


def _lowest_stream_point(ctx: RuleContext) -> Any:
    """The stream point with the least E[y²], or None."""
    stream = [p for g in stream_points(ctx) for p in g if p.var is not None and p.var > 0 and math.isfinite(p.var)]
    return min(stream, key=lambda p: p.var, default=None)


def _regrown_after_loss(ctx: RuleContext, opt: dict[str, Any]) -> bool:
    """The stream fell `stem_warn_drop`× below the input's E[y²] somewhere (in the stem, or in layers
    without a skip between stages) and never rises above the input's scale again: what grows along it
    is the lost signal coming back, e.g. a normalized branch amplifying activations that are far below
    its norm's eps (MobileViT's HF init: BatchNorm weights ~ N(0, 0.02) leave 1e-11), not an explosion."""
    m = ctx.measurements
    lowest = _lowest_stream_point(ctx)
    if lowest is None or not (m.input_var > 0 and math.isfinite(m.input_var)):
        return False
    peak = max(p.var for g in stream_points(ctx) for p in g if p.var is not None and math.isfinite(p.var))
    return m.input_var / lowest.var >= _STEM_OPTIONS["stem_warn_drop"] and peak <= m.input_var


def _early_loss(ctx: RuleContext, opt: dict[str, Any], lowest: Any) -> Iterator[Finding]:
    """HC202 for signal lost between the input and a point of the stream (not at its first point): the
    stem or the layers without a skip before `lowest` leave almost nothing of the input's E[y²]."""
    m = ctx.measurements
    drop = m.input_var / lowest.var
    severity = severity_at(drop, opt["stem_warn_drop"], opt["stem_error_drop"])
    if severity is None:
        return
    peak = max(p.var for g in stream_points(ctx) for p in g if p.var is not None and math.isfinite(p.var))
    yield HC202.finding(
        severity,
        f"signal vanishes between the input and {lowest.id}: E[y²] falls from {m.input_var:.3g} at the input to "
        f"{lowest.var:.3g} there (×{1 / drop:.3g}), in the stem and the layers without a skip before it; the blocks "
        f"after it only grow it back (to at most {peak:.3g}), which is not exploding variance. Look for a near-zero "
        "init there (normalization weights drawn around 0, a tiny conv or embedding init)",
        _where(lowest),
        {"input_var": m.input_var, "lowest_var": lowest.var, "peak_var": peak, "drop": drop, "where": "before_stream"},
        ("initialize the normalization weights to 1 (nn.init.ones_) and the layers with a variance-preserving "
         "init", None),
    )


def _variance(ctx: RuleContext, opt: dict[str, Any], vanishing: bool) -> Iterator[Finding]:
    if vanishing:
        yield from _stem_loss(ctx, opt)
    elif _regrown_after_loss(ctx, opt):
        return  # HC202 names the cause: the signal was lost before, this is it growing back
    groups = with_entry(stream_points(ctx))
    # shrinking: the log-linear fit; growth: the growth of the increments, blind to additive offsets
    fit = trend(groups, lambda p: p.var) if vanishing else exponential_rate(groups, lambda p: p.var)
    if fit is None or fit.points < opt["min_points"]:
        return
    # growth: only an exponential trend is the pathology; (k+1)/k growth (a norm in each branch,
    # after a small embedding) is linear and healthy
    if not vanishing and growth_is_linear(groups, lambda p: p.var):
        return
    per_point, total = fit.per_point, fit.total
    if vanishing:
        per_point, total = 1 / per_point, 1 / total
    if per_point >= opt["error_ratio"] and total >= opt["error_total"]:
        severity = "error"
    elif per_point >= opt["warn_ratio"] and total >= opt["warn_total"]:
        severity = "warning"
    else:
        return
    unit = _unit(ctx)
    stream = [p for g in groups for p in g]
    worst = max(stream, key=lambda p: (p.var_ratio or 1) ** (-1 if vanishing else 1))
    rule = HC202 if vanishing else HC201
    shown = (1 / per_point, 1 / total) if vanishing else (per_point, total)
    where = f" ({fit.stacks} stacks, fitted separately)" if fit.stacks > 1 else ""
    yield rule.finding(
        severity,
        f"activation variance {'shrinks' if vanishing else 'grows'} exponentially: ×{shown[0]:.3g} per {unit} "
        f"(fitted over {fit.points} {unit}s of the residual stream{where}) → ×{shown[1]:.3g} from first to last",
        _where(worst),
        {"ratio_per_point": shown[0], "total": shown[1], "points": fit.points, "steps": fit.steps,
         "stacks": fit.stacks, "first_var": stream[0].var, "last_var": stream[-1].var},
        _variance_fix(ctx, vanishing),
    )


def _hc201(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _variance(ctx, opt, vanishing=False)


def _hc202(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _variance(ctx, opt, vanishing=True)


_VARIANCE_OPTIONS = {**GROWTH_THRESHOLDS, "min_points": 4}
#: HC202 only: how far the stem may lower E[y²] from the input to what enters the first point (info, warning,
#: error); calibrated by short trainings (benchmarks/rule_judgements.md): ×2e-4 trains, ×5e-9 fails with SGD
_STEM_OPTIONS = {"stem_info_drop": 1e3, "stem_warn_drop": 1e6, "stem_error_drop": 1e12}

HC201 = register(Rule(
    code="HC201", name="exploding-variance",
    summary="Activation variance grows exponentially with depth",
    what="Reads the measured second moment E[y²] at every join (or layer) of the residual stream on the "
         "example batch at initialization, splits the stream into stacks (encoder/decoder, stages of another "
         "width: a new stack where the tensor size or the module prefix changes; joins inside another join's "
         "branch are left out). Per stack it estimates the exponential rate from how fast the per-block "
         "increments E[y²]_(k+1) − E[y²]_k grow (later half over earlier half: ×ρ per block for ρ^k growth, "
         "×1 for linear growth whatever the first point's scale), pools the stacks, and takes the smaller of that "
         "rate and the slope of a log-linear fit (one intercept per stack). It reports when an exponential also "
         "fits log E[y²] better than a straight line E[y²] = c + d·k does, the rate is at least `warn_ratio` "
         "per block and the fitted growth over the stream's in-stack steps at least `warn_total`.",
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
    what="Like HC201, for steady shrinking along the stream: the fitted per-block factor is at most "
         "1/`warn_ratio` and the fitted change at most 1/`warn_total`. Separately, it reports signal lost "
         "before the first point: when what enters the first block has `stem_info_drop`× (info), "
         "`stem_warn_drop`× (warning) or `stem_error_drop`× (error) less E[y²] than the input, the stem or "
         "embedding is named as the cause (later blocks that add O(1) each then are not 'exploding variance').",
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
    transform=None, fix_safety="unsafe", options={**_VARIANCE_OPTIONS, **_STEM_OPTIONS}, check=_hc202,
))


def _draws_needed(directions: float, threshold: float) -> float:
    """Independent vectors from which `directions` measured is sure to be at most `threshold`: the
    band's high end d/(1 − √(d/m))² (stats.directions_band) falls to the threshold when
    m = d/(1 − √(d/threshold))²."""
    return directions / (1 - math.sqrt(min(directions / threshold, 0.999))) ** 2


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
    # Dong et al.'s rank collapse: the positions of each input (tokens, pixels) fall onto one vector.
    # A ratio of two traces over all n vectors: sure whatever the number of inputs
    # It must persist through every later point that has positions (and hold at two points at least): a pooling window that covers a small
    # map (a 3×3 average over 2×2 pixels) or a reshape that puts patches on the batch axis makes one
    # point's positions equal without any collapse of the model, and the layers after it tell them apart.
    first_within = points[0].within_share
    with_positions = [p for p in points if p.within_share is not None]
    collapsed_from = len(with_positions)
    while collapsed_from > 0 and with_positions[collapsed_from - 1].within_share <= opt["within_collapse"]:
        collapsed_from -= 1
    run = with_positions[collapsed_from:]
    persistent = {id(p) for p in run} if len(run) >= 2 else set()  # one point alone is not a collapse
    positions_collapsed = [p for p in tail if id(p) in persistent and first_within is not None
                           and p.within_share <= opt["within_collapse"] < first_within / opt["min_drop"]]
    worst = min(positions_collapsed or tail, key=lambda p: p.directions)
    lost = first / max(worst.directions, 1e-12)
    if not positions_collapsed and (worst.directions > opt["warn_directions"] or lost < opt["min_drop"]):
        return
    # The measured count is biased low and bounded by the independent draws behind it (tokens of one
    # sequence are not independent): a verdict is sure only when the whole sampling band
    # (stats.directions_band) is below its threshold; a count inside the band is at most an info
    low, high = worst.directions_band or (worst.directions, worst.directions)
    if positions_collapsed or high <= opt["error_directions"]:
        severity = "error"
    elif high <= opt["warn_directions"]:
        severity = "warning"
    else:
        severity = "info"
    plain = not ctx.architecture.joins
    fix = ("add residual connections with normalization in the branch" if plain else
           "normalize inside the residual branches (BatchNorm/LayerNorm) so the skip keeps the signal's directions")
    evidence = {"first_directions": first, "worst_directions": worst.directions, "worst_normalized": worst.effective_rank,
                "last_normalized": points[-1].effective_rank, "band": [low, high]}
    if worst.within_share is not None:
        evidence["within_share"] = worst.within_share
    message = (f"the representation collapses to {worst.directions:.2g} direction(s) of variance at {worst.id} "
               f"(from {first:.3g} at the first {_unit(ctx)}; sampling band {low:.2g}–{high:.3g}): ")
    if positions_collapsed:
        message += (f"the positions of each input (tokens, pixels) fall onto one vector, {worst.within_share:.2g} of "
                    f"the variance is left between them (from {first_within:.2g}): they become indistinguishable")
    elif severity == "info":
        # how many independent vectors this sample had, by inverting high = d/(1 − √(d/m))²
        d = max(worst.directions, 1.0)
        draws = d / (1 - math.sqrt(d / high)) ** 2 if high > d else d
        needed = _draws_needed(d, opt["warn_directions"])
        evidence.update(uncertain=True, draws=draws, draws_needed=needed)
        message += (f"uncertain: about {draws:.0f} independent vector(s) behind this count (the tokens or pixels of "
                    f"one input are alike) could hide up to {high:.3g} directions; an example with more inputs (a "
                    "larger batch) settles it")
        if needed < 1e4:
            message += f" (a collapse this deep is sure from about {needed:.0f} independent vectors)"
    else:
        message += "inputs become indistinguishable"
    yield HC203.finding(severity, message, _where(worst), evidence, (fix, None))


HC203 = register(Rule(
    code="HC203", name="collapsed-effective-rank",
    summary="Signal collapses to a few directions (effective rank → 1)",
    what="Measures the effective rank Σλ/λ_max of the covariance of channel vectors (one per input and "
         "position) at every point, and reports when, in the later half of the network, it falls to "
         "`warn_directions` or fewer directions after dropping `min_drop`× from the first point, both in "
         "directions and as a fraction of what the point can carry (min(channels, vectors)), so that a "
         "narrow layer such as a 4-class head is not taken for a collapse. The count is biased low and bounded "
         "by the independent draws behind it (tokens of one sequence are alike), so the severity follows the "
         "sampling band: error only when the whole band is at most `error_directions`, warning when it is at "
         "most `warn_directions`, else an info that says the verdict is uncertain and how many more inputs make "
         "it sure. Also an error when the positions of each input (tokens, pixels) collapse onto one vector: "
         "at most `within_collapse` of the variance left between them, a ratio of traces that is sure at "
         "any batch.",
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
    options={"warn_directions": 3.0, "error_directions": 2.0, "min_drop": 3.0, "within_collapse": 0.01},
    check=_hc203,
))


def _hc204(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    points = [p for p in _profile(ctx) if p.sensitivity is not None]
    if len(points) < 2:
        return
    worst = max(points, key=lambda p: p.sensitivity)
    chi = worst.sensitivity
    severity = severity_at(chi, opt["warn_chi"], opt["error_chi"])
    if severity is None:
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
    severity = severity_at(median, opt["warn_ratio"], opt["error_ratio"])
    if severity is None:
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


def gradient_trend(ctx: RuleContext) -> tuple[Any, list[list[Any]]]:
    """The fitted per-point change of the scale-corrected gradient along the residual stream, per stack."""
    groups = stream_points(ctx)
    return trend(groups, relative_gradient), groups


def _gradient(ctx: RuleContext, opt: dict[str, Any], vanishing: bool) -> Iterator[Finding]:
    fit, groups = gradient_trend(ctx)
    if fit is None or fit.points < opt["min_points"]:
        return
    backwards = 1 / fit.per_point  # going backwards: each point's gradient relative to the next one's
    growth = 1 / fit.total  # first point of every stack relative to its last, chained over the stacks
    measure = 1 / growth if vanishing else growth
    severity = severity_at(measure, opt["warn_total"], opt["error_total"])
    if severity is None:
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
    stream = [p for g in groups for p in g if relative_gradient(p) is not None]
    where = f" ({fit.stacks} stacks, fitted separately)" if fit.stacks > 1 else ""
    yield rule.finding(
        severity,
        f"gradients {direction} ×{backwards:.3g} per {unit} going backwards along the residual stream{where}: "
        f"‖∂L/∂y‖·rms(y) is ×{growth:.3g} at the first {unit} relative to the last (fitted over {fit.points})",
        _where(stream[0]),
        {"first_grad_rms": stream[0].grad_rms, "last_grad_rms": stream[-1].grad_rms, "ratio": growth,
         "ratio_per_point": backwards, "points": fit.points, "steps": fit.steps, "stacks": fit.stacks,
         "scale_corrected": True},
        (fix, transform),
    )


def _hc301(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _gradient(ctx, opt, vanishing=False)


def _hc302(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    yield from _gradient(ctx, opt, vanishing=True)


HC301 = register(Rule(
    code="HC301", name="exploding-gradients",
    summary="Gradients grow exponentially going backwards",
    what="Backpropagates the loss (or a fixed random projection of the output) on the example batch at init, "
         "takes the gradient RMS ‖∂L/∂y‖/√n at every point of the residual stream scaled by the activation's "
         "own RMS (‖∂L/∂y‖·rms(y): what sets a layer's relative update ‖∂L/∂W‖/‖W‖, and blind to a change of "
         "activation scale between stages), fits its log against depth per stack (as HC201) and reports when "
         "the fitted change from the last point back to the first reaches `warn_total`. Points inside a "
         "branch and readout stacks of another size (a class token) are not on the stream.",
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
    what="Like HC301, for scale-corrected gradients that the fit along the stream makes `warn_total`× smaller "
         "at the first point than at the last.",
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
    # White-noise gradients give 0 ± noise on this line (noise from its points and input size): a
    # reading is a verdict only when it is below the threshold by two noise s.d.
    noise = m.grad_correlation_noise or 0.0
    if corr + 2 * noise < opt["error_correlation"] and plain:
        severity = "error"
    elif corr + 2 * noise < opt["warn_correlation"]:
        severity = "warning"
    else:
        return
    # Decorrelated gradients at init are common in BatchNorm networks that train well (torchvision
    # resnet50 and Inception-v3 at their default init: −0.03; a 24-layer plain BN MLP −0.02 and it
    # trains, digits 0.87-0.91; benchmarks/zoo_review.md). What fails is the chaos behind them once
    # it is strong: the measured sensitivity χ (HC204) of the same model, ×7e3 at 48 layers (digits:
    # chance). So the correlation alone is an info, and its severity is at most χ's.
    chi = max((p.sensitivity for p in _profile(ctx) if p.sensitivity is not None), default=None)
    hc204 = HC204.options
    corroborated = None if chi is None else severity_at(chi, hc204["warn_chi"], hc204["error_chi"])
    if chi is None:
        severity = "warning"  # χ could not be measured: no corroboration either way
    elif corroborated is None:
        severity = "info"
    elif corroborated == "warning":
        severity = "warning"
    fix = ("add skip connections (with BN in the branch)" if plain else
           "zero-init the last normalization gain of each residual branch so blocks start as the identity")
    points = _profile(ctx)
    line = f"{m.line_points} " if m.line_points else ""
    message = (f"gradients are shattered: the input gradients at {line}neighbouring inputs (2% of the input's norm "
               f"apart) have correlation {corr:.3g}")
    if chi is not None:
        message += (f"; with sensitivity χ up to {chi:.3g}" if corroborated else
                    f"; the sensitivity stays low (χ ≤ {chi:.3g}), as in BatchNorm networks that train from "
                    "decorrelated gradients: no verdict alone")
    yield HC303.finding(
        severity,
        message,
        _where(points[-1]) if points else Location("(root)"),
        {"grad_correlation": corr, "plain_stack": plain, "line_points": m.line_points, "noise": noise,
         "max_sensitivity": chi},
        (fix, None if plain else "zero_init_gains"),
    )


HC303 = register(Rule(
    code="HC303", name="shattered-gradients",
    summary="Gradients at neighbouring inputs are uncorrelated (shattered)",
    what="Computes the input gradients at 24 points along a line through the first example input (each "
         "point 2% of the input's norm from the next; for token inputs, through its embedding; every other "
         "input shared by all points; BatchNorm using the real batch's statistics; dropout, drop-path and "
         "random ops neutral) and reports when the mean correlation between neighbours is below "
         "`warn_correlation`, an error in plain stacks below `error_correlation` (by two s.d. of the noise "
         "that white-noise gradients give on that line). An exactly linear gradient field scores 0.99 on 24 "
         "points. Measured at batch 4 and 16: 2-layer ReLU MLPs 0.87, resnet18 0.66-0.82, VGG-16/19-BN "
         "0.41/0.27, deep plain ReLU stacks without norm 0.56-0.88, transformers 0.98; plain BN MLP stacks "
         "of 24-48 layers -0.10 to 0.22 (below 0.1 from batch 8); torchvision resnet50 and Inception-v3 "
         "at their default init -0.03 (0.80 with zero-initialized last BN gains). Those train, so a low "
         "correlation alone is an info: its severity is at most that of the measured sensitivity χ (HC204's "
         "`warn_chi`/`error_chi`), the chaos that makes deep plain BN stacks fail.",
    why="In deep plain networks the gradient changes completely between nearby inputs — it looks like white "
        "noise — so gradient steps stop generalizing across examples and training is badly behaved. "
        "Correlation decays like 2^−depth without skips and like 1/√depth with them (measured: plain BN stacks "
        "shatter by 24 layers; ReLU stacks without norm at He init stay correlated, being critical rather "
        "than chaotic).",
    source="science.md, Predictions: 'deep plain ReLU stack' row (seed 001; Balduzzi et al. 2017).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()) for _ in range(32)])
""",
    good_example="""
model = nn.Sequential(*[ResidualBlock(256, norm=nn.BatchNorm1d) for _ in range(16)])
""",
    fix_summary="Add skip connections with BN in the branch",
    transform=None, fix_safety="unsafe",
    options={"warn_correlation": 0.05, "error_correlation": 0.1}, check=_hc303,
))
