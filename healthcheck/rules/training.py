"""HC4xx: rules that read what the training monitor samples (healthcheck.monitor)."""

from __future__ import annotations

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
    yield HC402.finding(
        "warning",
        f"gradient signal-to-noise ratio is low: median ‖E g‖²/E‖g − E g‖² = {median:.3g} over "
        f"{len(values)} tensors (lowest: {', '.join(worst)}); each step is mostly noise",
        Location(worst[0]), {"median_snr": median, "lowest": dict(values[:3]), "tensors": len(values)},
    )


HC402 = register(Rule(
    code="HC402", name="low-gradient-snr",
    summary="Gradient signal-to-noise ratio is low",
    what="Estimates, per parameter tensor, ‖E g‖² / E‖g − E g‖² from the mini-batch gradients of a few "
         "consecutive steps after each sampled step (Cockpit's GSNR idea at the level of mini-batches), "
         "and reports when the median falls below `warn_snr`.",
    why="When the noise between mini-batch gradients dwarfs their mean, steps mostly cancel: raising the "
        "learning rate only adds noise, and a larger batch (or gradient accumulation) or a lower learning "
        "rate makes better progress.",
    source="science.md, Quantities: gradient SNR (training) — Cockpit (Schneider et al. 2021).",
    bad_example="""
loader = DataLoader(data, batch_size=2)   # tiny batch, gradients dominated by noise
""",
    good_example="""
loader = DataLoader(data, batch_size=64)  # or accumulate gradients over several micro-batches
""",
    fix_summary="Increase the batch size (or accumulate gradients), or lower the learning rate",
    transform=None, fix_safety="unsafe", options={"warn_snr": 0.01}, check=_hc402,
))


def _hc403(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    sample = _sample(ctx)
    if sample is None or not sample.update_ratio:
        return
    values = [v for v in sample.update_ratio.values() if v > 0]
    if not values:
        return
    median = statistics.median(values)
    if median >= opt["error_high"]:
        severity, side = "error", "large"
    elif median >= opt["warn_high"]:
        severity, side = "warning", "large"
    elif median <= opt["warn_low"]:
        severity, side = "warning", "small"
    else:
        return
    worst = max(sample.update_ratio.items(), key=lambda kv: kv[1]) if side == "large" else \
        min(sample.update_ratio.items(), key=lambda kv: kv[1])
    yield HC403.finding(
        severity,
        f"updates are too {side}: median ‖Δw‖/‖w‖ = {median:.3g} per step (healthy ≈ 1e-3; "
        f"{'largest' if side == 'large' else 'smallest'} {worst[1]:.3g} at {worst[0]})",
        Location(worst[0]), {"median_update_ratio": median, "tensor": worst[0], "value": worst[1]},
        (("lower the learning rate (or warm it up)", None) if side == "large" else
         ("raise the learning rate, or check that the optimizer holds these parameters", None)),
    )


HC403 = register(Rule(
    code="HC403", name="update-ratio-out-of-range",
    summary="Parameter updates too large or too small relative to the weights",
    what="Measures ‖Δw‖/‖w‖ per parameter tensor over one optimizer step on sampled steps and reports when "
         "the median leaves [`warn_low`, `warn_high`].",
    why="A step that changes the weights by more than a few percent throws away what they learned (and "
        "often precedes divergence); a step below 1e-6 of the weights does not train. About 1e-3 is the "
        "usual healthy range.",
    source="science.md, Quantities: update ratio (training).",
    bad_example="""
optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
""",
    good_example="""
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
""",
    fix_summary="Adjust the learning rate",
    transform=None, fix_safety="unsafe",
    options={"warn_high": 1e-2, "error_high": 1e-1, "warn_low": 1e-6}, check=_hc403,
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
         "for every input and position of the batch, and reports the worst layer.",
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
    transform=None, fix_safety="unsafe", options={"warn_fraction": 0.5, "error_fraction": 0.9}, check=_hc404,
))
