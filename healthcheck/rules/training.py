"""HC4xx: rules that read what the training monitor samples (healthcheck.monitor)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

from healthcheck.records import Finding, Location
from healthcheck.rules.registry import Rule, RuleContext, register, severity_at


def _sample(ctx: RuleContext) -> Any:
    return ctx.training


#: under a GradScaler: a scale below MIN_LOSS_SCALE means gradients overflow even unscaled (error); a
#: scale that fell at FALLING_SCALE_SAMPLES samples in a row to below FALLING_SCALE_FLOOR means they
#: overflow on step after step (warning). A skipped overflow step alone, or a scale settling from a
#: high start (2^24 → 2^17), is the scaler working as designed, not a finding.
MIN_LOSS_SCALE = 1.0
FALLING_SCALE_SAMPLES = 4
FALLING_SCALE_FLOOR = 2.0**8


def _hc401(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    if sample is None:
        return
    scale = getattr(sample, "loss_scale", None)
    if not sample.nonfinite and scale is not None:
        falls = getattr(sample, "loss_scale_falls", 0)
        if scale < MIN_LOSS_SCALE or (falls >= FALLING_SCALE_SAMPLES and scale < FALLING_SCALE_FLOOR):
            yield HC401.finding(
                "error" if scale < MIN_LOSS_SCALE else "warning",
                f"the GradScaler's loss scale keeps falling ({scale:.3g} at step {sample.step}, lower at "
                f"{falls} samples in a row): gradients overflow to Inf/NaN on step after step and the "
                f"optimizer skips those steps",
                Location("(root)"), {"loss_scale": scale, "falls": falls, "step": sample.step},
            )
        return
    if not sample.nonfinite:
        return
    yield HC401.finding(
        "error",
        f"NaN or Inf appeared between steps {sample.previous_step + 1} and {sample.step} "
        f"(in: {', '.join(sample.nonfinite) or 'loss'})",
        Location("(root)"), {"where": list(sample.nonfinite), "step": sample.step},
    )


HC401 = register(Rule(
    code="HC401", name="non-finite-values",
    summary="NaN or Inf in the loss, gradients or weights during training",
    what="Checks the loss on every step with a device-side flag (no host synchronisation; the flag is read "
         "at the next sampled step) and the gradients and weights on sampled steps.",
    why="One NaN spreads to every weight through the next update; the run is lost from there on, but "
        "keeps using GPU time until someone looks at the curves.",
    source="design.md rule list; the usual causes: learning rate too high, Post-LN without warm-up, "
           "exploding gradients (HC301), log/div of zero in the loss.",
    bad_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=10.0)   # far too high
""",
    good_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
""",
    fix_summary="Lower the learning rate (or warm it up), clip gradients, check the loss for log(0) / x/0",
    transform=None, fix_safety="unsafe", check=_hc401,
))


def _hc402(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    if sample is None or not sample.grad_snr:
        return
    values = sorted(sample.grad_snr.items(), key=lambda kv: kv[1])
    median = statistics.median(v for _, v in values)
    if median >= opt["warn_snr"]:
        return
    worst = [name for name, _ in values[:3]]
    # a model-wide statistic (the median over tensors): located at the root so that the finding keeps
    # one identity from sample to sample while the lowest tensor changes
    yield HC402.finding(
        "warning",
        f"gradient signal-to-noise ratio is low: median ‖E g‖²/E‖g − E g‖² = {median:.3g} over "
        f"{len(values)} tensors (lowest: {', '.join(worst)}); each step is mostly noise",
        Location("(root)"), {"median_snr": median, "lowest": dict(values[:3]), "tensors": len(values)},
    )


HC402 = register(Rule(
    code="HC402", name="low-gradient-snr",
    summary="Gradient signal-to-noise ratio is low",
    what="Estimates, per parameter tensor, ‖E g‖² / E‖g − E g‖² from the mini-batch gradients of a few "
         "consecutive steps after each sampled step (Cockpit's GSNR idea at the level of mini-batches), "
         "and reports when the median falls below `warn_snr`.",
    why="When the noise between mini-batch gradients dwarfs their mean, steps mostly cancel: raising the "
        "learning rate only adds noise, and a larger batch (or gradient accumulation) or a lower learning "
        "rate makes better progress. The estimate from a few gradients is noisy, so the finding appears only when "
        "the median stays low for `persist` samples in a row.",
    source="science.md, Quantities: gradient SNR (training) — Cockpit (Schneider et al. 2021).",
    bad_example="""
loader = DataLoader(data, batch_size=2)   # tiny batch, gradients dominated by noise
""",
    good_example="""
loader = DataLoader(data, batch_size=64)  # or accumulate gradients over several micro-batches
""",
    fix_summary="Increase the batch size (or accumulate gradients), or lower the learning rate",
    transform=None, fix_safety="unsafe", options={"warn_snr": 0.01, "persist": 3}, check=_hc402,
))


def _update_ratios(sample: Any) -> dict[str, float]:
    """The measured update ratios of the weight matrices (tensors of ≥ 2 dimensions): a bias, gain or
    norm scale that starts at or near zero has a ratio of 0.1–10 on the first steps of a healthy run
    (measured: the median over all tensors reached 0.15 on runs that train, over matrices 0.013), so
    they are left out whenever the model has matrices."""
    ndim = getattr(sample, "tensor_ndim", None) or {}
    measured = {n: v for n, v in sample.update_ratio.items() if v > 0 and math.isfinite(v)}
    matrices = {n: v for n, v in measured.items() if ndim.get(n, 2) >= 2}
    return matrices or measured


def _hc403(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    if sample is None or not sample.update_ratio:
        return
    ratios = _update_ratios(sample)
    if not ratios:
        return
    median = statistics.median(ratios.values())
    if median >= opt["error_high"]:
        severity, side = "error", "large"
    elif median >= opt["warn_high"]:
        severity, side = "warning", "large"
    elif median <= opt["warn_low"]:
        severity, side = "warning", "small"
    else:
        return
    worst = max(ratios.items(), key=lambda kv: kv[1]) if side == "large" else min(ratios.items(), key=lambda kv: kv[1])
    yield HC403.finding(
        severity,
        f"updates are too {side}: median ‖Δw‖/‖w‖ = {median:.3g} per step over {len(ratios)} weight tensors "
        f"(healthy ≈ 1e-3; {'largest' if side == 'large' else 'smallest'} {worst[1]:.3g} at {worst[0]})",
        Location("(root)"), {"median_update_ratio": median, "tensor": worst[0], "value": worst[1]},
        (("lower the learning rate (or warm it up)", None) if side == "large" else
         ("raise the learning rate, or check that the optimizer holds these parameters", None)),
    )


HC403 = register(Rule(
    code="HC403", name="update-ratio-out-of-range",
    summary="Parameter updates too large or too small relative to the weights",
    what="Measures ‖Δw‖/‖w‖ per parameter tensor over one optimizer step on sampled steps and reports when "
         "the median over the weight matrices (biases and gains left out) leaves [`warn_low`, `warn_high`]; "
         "an error at `error_high` on one sample, a warning when it stays out for `persist` samples in a row.",
    why="A step that changes the weights by more than a few percent throws away what they learned (and "
        "often precedes divergence); a step below 1e-6 of the weights does not train. About 1e-3 is the "
        "usual healthy range.",
    source="science.md, Quantities: update ratio (training). Thresholds from benchmarks/trainability/MONITOR.md "
           "(47 runs that train, 65 that fail): runs that train reach a median over matrices of 0.02–0.05 for a few "
           "samples (BatchNorm nets at SGD 0.2, Fixup, a huge head) and 0.099 on Adam's first step (lr·sign(g): "
           "lr/rms(w)), never 0.05 on two samples in a row; runs that diverge reach 0.1–35. The first step is "
           "optimizer-biased (Adam's is its largest, SGD+momentum's its smallest), so one sample alone is an "
           "error only at 2× the largest healthy value.",
    bad_example="""
optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
""",
    good_example="""
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
""",
    fix_summary="Adjust the learning rate",
    transform=None, fix_safety="unsafe",
    options={"warn_high": 5e-2, "error_high": 2e-1, "warn_low": 1e-6, "persist": 2}, check=_hc403,
))


def _hc404(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    if sample is None or not sample.dead_fraction:
        return
    layer, fraction = max(sample.dead_fraction.items(), key=lambda kv: kv[1])
    severity = severity_at(fraction, opt["warn_fraction"], opt["error_fraction"])
    if severity is None:
        return
    dead_layers = sum(1 for v in sample.dead_fraction.values() if v >= opt["warn_fraction"])
    yield HC404.finding(
        severity,
        f"{fraction:.0%} of the units after {layer} never activate on the batch ({dead_layers} layer(s) at "
        f"{opt['warn_fraction']:.0%} or more): they get no gradient and cannot recover",
        Location(layer), {"layer": layer, "dead_fraction": fraction, "layers_over_threshold": dead_layers},
    )


HC404 = register(Rule(
    code="HC404", name="dead-units",
    summary="Many ReLU units never activate",
    what="On sampled steps, counts per non-negative activation (ReLU, ReLU6, …) the channels that are zero "
         "for every input and position of the batch, and reports the worst layer (a warning once it stays over "
         "`warn_fraction` for `persist` samples: a fraction from one batch moves by ±0.06 at 64 units).",
    why="A ReLU unit that is off for every input passes no gradient to its weights, so nothing brings it "
        "back: capacity is lost for good. A learning rate spike or a large negative bias usually kills them.",
    source="design.md rule list (HC404); He et al. 2015 on ReLU units.",
    bad_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=5.0)   # a few huge steps kill half the units
""",
    good_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # or LeakyReLU / GELU, or warm-up
""",
    fix_summary="Lower the learning rate or warm it up; consider LeakyReLU/GELU",
    transform=None, fix_safety="unsafe", options={"warn_fraction": 0.5, "error_fraction": 0.9, "persist": 2},
    check=_hc404,
))


def matrix_update_ratio(sample: Any) -> float | None:
    """The median update ratio over the weight matrices of a sample (HC403's statistic), or None
    when the sample has no measured ratio."""
    ratios = _update_ratios(sample) if getattr(sample, "update_ratio", None) else {}
    return statistics.median(ratios.values()) if ratios else None


def _loss_noise(window: list[float]) -> float:
    """The sample-to-sample noise of the sampled loss, from the spread of its successive differences
    about their mean: a steady trend (a loss falling by the same amount at each sample) is not noise,
    and the batch-to-batch spread of the loss estimate is. σ(Δ)/√2 estimates one sample's σ."""
    diffs = [b - a for a, b in zip(window, window[1:])]
    return statistics.pstdev(diffs) / math.sqrt(2) if len(diffs) > 1 else 0.0


def _hc405(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    trend = getattr(sample, "loss_trend", None) if sample is not None else None
    if not trend or sample.nonfinite or sample.loss is None or not math.isfinite(sample.loss):
        return
    points = [p for p in trend if p.step <= sample.step]
    window_size = int(opt["window"])
    # enough steps for a healthy run to have moved: a window of samples after the first, and at least
    # `min_steps` optimizer steps (at every=1 five samples are five steps, too few for momentum to build)
    if len(points) < window_size + 1 or points[-1].step != sample.step or sample.step < opt["min_steps"]:
        return
    initial, window = points[0].loss, [p.loss for p in points[-window_size:]]
    noise = _loss_noise(window)
    # the window's mean against the first sampled loss: both are noisy, the first by one sample's σ,
    # the mean by σ/√W. The finding needs confidence that the loss has NOT moved: even the upper end of
    # the fall's confidence interval is below `min_progress` of the initial loss. A noisy loss whose
    # fall is uncertain (small batches) is left alone; a flat one is reported
    standard_error = noise * math.sqrt(1 + 1 / window_size)
    progress = initial - statistics.mean(window)
    if progress + opt["z"] * standard_error >= opt["min_progress"] * abs(initial):
        return
    # a learning rate still warming up (or momentum still building) moves the weights by more at each
    # sample: the loss cannot be judged until the update size has stopped growing. The median update
    # ratio over the last samples against that of the samples around half the steps so far
    ratios = [(p.step, p.update_ratio) for p in points if p.update_ratio is not None and p.update_ratio > 0]
    recent = [r for _, r in ratios[-3:]]
    earlier = [r for step, r in ratios if step <= sample.step / 2][-3:]
    if recent and earlier and statistics.median(recent) > opt["growing_updates"] * statistics.median(earlier):
        return
    yield HC405.finding(
        "warning",
        f"the loss is not decreasing: {statistics.mean(window):.4g} on average over the last {window_size} "
        f"samples (steps {points[-window_size].step}–{sample.step}) against {initial:.4g} at step {points[0].step}; "
        f"a change of {-progress:+.3g} (±{opt['z'] * standard_error:.2g} from the noise of the sampled loss), "
        f"less than {opt['min_progress']:.0%} of the initial loss",
        Location("(root)"),
        {"initial_loss": initial, "window_mean": statistics.mean(window), "noise": noise, "window": window_size,
         "step": sample.step},
    )


HC405 = register(Rule(
    code="HC405", name="loss-not-decreasing",
    summary="The training loss has not moved from its initial value",
    what="Compares the mean of the last `window` sampled losses with the first sampled loss. The noise of the "
         "sampled loss is measured on the window itself (the spread of its successive differences, so that a "
         "steady fall is not counted as noise); the finding appears when even the fall plus `z` standard errors "
         "of that noise is below `min_progress` of the initial loss: the loss has confidently not moved (a "
         "noisy loss whose fall is uncertain, as with small batches, is not reported). Evaluated once `window` samples after "
         "the first and `min_steps` optimizer steps have passed, and only while the weights' update size has "
         "stopped growing (median update ratio of the weight matrices now at most `growing_updates` × what it "
         "was at half the steps so far): a warm-up schedule that starts near lr 0 waits it out. A loss that "
         "fell and came back to its initial value is reported too. A warning after `persist` samples in a row.",
    why="A run whose loss sits at its initial value (for a classifier: the loss of a uniform guess) is not "
        "learning: gradients vanish before the early layers, the units are dead, the step size is far too "
        "small, or too large steps throw away what each step learned. Every step from here on is wasted compute.",
    source="benchmarks/trainability/MONITOR.md (issue 13, item 5): on the monitor study's runs that train "
           "(every=10; 76 runs that train, 88 that fail, in three sets), no run that trains got it (window 4–6, "
           "`min_progress` 0.05–0.15 alike); runs stuck at chance (deep default-init or tiny-init ReLU "
           "MLPs, 10–12-layer plain CNNs, deep MLPs or a Post-LN transformer at too high a learning rate) met it "
           "from step 60. Runs that fail by learning too slowly for their budget (a loss falling 15% in 100 "
           "steps) are not this finding: the monitor does not know the budget.",
    bad_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)   # or a deep ReLU stack with default init
""",
    good_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)   # and check the model at init
""",
    fix_summary="Check the learning rate (too small to move, or so large that steps cancel), the init "
                "(run `healthcheck` on the model: vanishing gradients HC302, dead units), and the findings "
                "reported at init",
    transform=None, fix_safety="unsafe",
    options={"window": 5, "z": 2.0, "min_progress": 0.1, "min_steps": 50, "growing_updates": 1.5, "persist": 2},
    check=_hc405,
))
