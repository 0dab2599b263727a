"""HC5xx: stability under the optimizer and the output's scale at init (issue 13, items 1-2).

Rules that read `RuleContext.stability` (healthcheck.probes.stability.Stability): the sharpness against
the optimizer's stability limit (HC501), a few real optimizer steps on a copy of the model (HC502,
HC503) and the output's scale at init (HC504). Without a Stability (probes off) they are silent.

Decisions for the wiring (A2):
- No optimizer given: a *report note*, not a finding. `Stability.note` is one sentence ("stability
  under the optimizer was not assessed: …", `healthcheck.probes.stability.NOT_ASSESSED`), also in
  `Stability.to_json()["note"]`; renderers print it once. HC501-HC503 are then silent; HC504 runs
  (it needs no optimizer).
- HC5 is its own stage, "stability" (registry.STAGES): evaluated only when `context.stability` is set.

Severity follows evidence (benchmarks/stability_judgements.md): an error only where measured runs
failed; the sharpness is a lower bound (a Rayleigh quotient), so its ratio to the limit never
overstates the curvature.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from healthcheck.records import Finding, Location
from healthcheck.rules.registry import Rule, RuleContext, register, severity_at


def _stability(ctx: RuleContext) -> Any:
    return getattr(ctx, "stability", None)


def _lr_text(lr: float) -> str:
    return f"{lr:.2g}"


def _hc501(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    s = _stability(ctx)
    if s is None or s.sharpness is None or s.optimizer is None:
        return
    sharp = s.sharpness
    ratio = sharp.ratio
    if not math.isfinite(ratio):
        return
    severity = severity_at(ratio, opt["warn_ratio"], opt["error_ratio"])
    if severity is None:
        return
    spec = s.optimizer
    trial = s.trial
    # the quadratic model's prediction is an error only when the trial steps confirm it. Overshooting steps
    # can settle: normalized (scale-invariant) weights grow, which lowers their curvature (measured: BatchNorm
    # MLPs at 500× the limit trained), and a catapult spike shrinks the layer that made the curvature
    # (measured: a 30× head at 8-11× the limit spiked, recovered and trained in 4 of 6 runs)
    settles = trial is not None and trial.non_finite_at is None and trial.end_ratio <= opt["trial_end_ratio"]
    if settles and severity == "error":
        severity = "warning"
    what = "preconditioned sharpness λ_max(P⁻¹H)" if sharp.preconditioned else "sharpness λ_max(H)"
    # the stable lr puts the sharpness at the limit; a margin below it (the sharpness grows in training)
    advised = sharp.stable_lr * opt["margin"]
    yield HC501.finding(
        severity,
        f"the step size is {ratio:.3g}× the optimizer's stability limit: {what} ≥ {sharp.value:.3g} on the "
        f"example batch (a lower bound, {sharp.products} Hessian-vector products) against {sharp.limit:.3g} for "
        f"{spec.kind} at lr {_lr_text(spec.lr)}; the first steps overshoot"
        + (f" (the trial steps still lowered the loss, {trial.loss_start:.3g} → {trial.loss_end:.3g})" if settles else "")
        + f". Lower lr to ≈ {_lr_text(advised)}, or add a warm-up that starts there",
        Location("(root)"),
        {**sharp.to_json(), "advised_lr": advised, "optimizer": spec.kind},
        (f"lower the learning rate to ≈ {_lr_text(advised)} (or warm up from there to {_lr_text(spec.lr)} over "
         "the first few hundred steps)", None),
    )


HC501 = register(Rule(
    code="HC501", name="step-size-above-stability-limit",
    summary="The learning rate is above the stability limit for the loss's curvature at init",
    what="With an optimizer given, estimates the sharpness of the training loss on the example batch, the "
         "top eigenvalue λ_max of its Hessian, from Hessian-vector products (double backward, at most 20), "
         "and compares it with the optimizer's stability limit: 2/lr for SGD, "
         "2(1+β)/lr with heavy-ball momentum β, 2(1+β)/((1+2β)·lr) with Nesterov. For Adam, AdamW, NAdam "
         "and RMSprop the preconditioned sharpness λ_max(P⁻¹H) with P = √v̂ + ε, v̂ the optimizer's "
         "second moment after HC502's trial steps (g² when they did not finish), against "
         "(2+2β₁)/((1−β₁)·lr) (≈ 38/lr at β₁ = 0.9), or 2(1+β)/lr for RMSprop. The "
         "estimate (the top Ritz value of a Lanczos iteration) is a Rayleigh quotient, a lower bound on λ_max. "
         "Reports when the ratio sharpness/limit reaches `warn_ratio` (warning) or `error_ratio` (error): "
         "between 1 and 2 the first steps overshoot and come back (the catapult phase of Lewkowycz et al. "
         "2020; measured, such runs train), beyond 2 they are not expected to settle. An error needs the trial "
         "steps (HC502) to agree: when their loss stayed finite and ended at `trial_end_ratio` of its start or "
         "less, it stays a warning (overshooting steps can settle: normalized weights grow, which lowers their "
         "curvature, and a spike shrinks the layer that made it; BatchNorm nets far above the limit trained). The loss is `loss_fn` when given, else "
         "the output's `.loss`, else cross-entropy against seeded random labels for logits and MSE against "
         "unit-variance targets otherwise.",
    why="Gradient descent on a loss with top Hessian eigenvalue λ is stable only while lr·λ < 2 (with "
        "momentum, 2(1+β)); beyond it the component of the weights along the top eigenvector grows every "
        "step. Training drifts to that edge anyway (progressive sharpening, 'edge of stability'); starting "
        "above it makes the first steps overshoot: the loss spikes, units die, and far above it the run "
        "diverges. The same architecture trains at lr 0.01 and diverges at 0.05; the init-time profile "
        "cannot see this.",
    source="science.md, Stability under the optimizer (Cohen et al., ICLR 2021; Cohen et al. 2022, "
           "'Adaptive gradient methods at the edge of stability'; Lewkowycz et al. 2020, the catapult phase).",
    bad_example="""
model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(16)], nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)   # λ_max·lr far above 2(1+β)
""",
    good_example="""
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=500)   # warm-up
""",
    fix_summary="Lower the learning rate to the one the message gives, or add a warm-up",
    transform=None, fix_safety="safe",
    options={"warn_ratio": 2.0, "error_ratio": 4.0, "margin": 0.5, "trial_end_ratio": 0.9},
    check=_hc501,
))


def _hc502(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    s = _stability(ctx)
    if s is None or s.trial is None or s.optimizer is None:
        return
    trial, spec = s.trial, s.optimizer
    evidence = trial.to_json()
    evidence.pop("update_ratios", None)
    evidence.pop("total_update_ratios", None)
    advised = None
    if s.sharpness is not None and math.isfinite(s.sharpness.stable_lr):
        advised = min(spec.lr, s.sharpness.stable_lr) * opt["margin"]  # as HC501's advice
    lower = f"lower lr to ≈ {_lr_text(advised)}" if advised and advised < spec.lr else "lower the learning rate"
    fix = (f"{lower}, or add a warm-up; check the output scale and the init of the last layers", None)
    if trial.non_finite_at is not None:
        yield HC502.finding(
            "error",
            f"the loss becomes NaN/Inf after {trial.non_finite_at} trial step(s) of {spec.kind} at lr "
            f"{_lr_text(spec.lr)} on a copy of the model (example batch; loss {trial.loss_start:.3g} at the "
            f"start); {lower}",
            Location("(root)"), evidence, fix)
        return
    end, growth = trial.end_ratio, trial.growth
    if end >= opt["error_end_ratio"]:
        severity = "error"
    elif growth >= opt["warn_growth"]:
        severity = "warning"
    else:
        return
    message = (f"the loss rises in {trial.steps} trial steps of {spec.kind} at lr {_lr_text(spec.lr)} on a copy of "
               f"the model, on the fixed example batch it should fit: {trial.loss_start:.3g} → at most "
               f"{trial.loss_max:.3g} (×{growth:.3g}) → {trial.loss_end:.3g} after the last step; ")
    message += ("the steps diverge; " if severity == "error" else
                "it came back down, but steps that overshoot this far early kill units and slow training; ")
    yield HC502.finding(severity, message + lower, Location("(root)"), evidence, fix)


HC502 = register(Rule(
    code="HC502", name="loss-diverges-in-trial-steps",
    summary="A few real optimizer steps on a copy of the model make the loss blow up",
    what="With an optimizer given, runs 12 steps of a fresh optimizer of the same class and "
         "hyper-parameters on a deep copy of the model (the user's model and optimizer are not touched), "
         "on the fixed example batch and the training loss (as HC501), and reads the loss at every step. "
         "An error when the loss or the weights become NaN/Inf, or when the loss after the last step is "
         "`error_end_ratio`× its start or more (on one fixed batch a healthy step size only lowers it); a "
         "warning when it rose `warn_growth`× above its start on the way and came back. The lr it advises "
         "is `margin`× the lower of the given lr and HC501's stable lr.",
    why="Repeating one batch is the easiest problem the optimizer will see: if the loss cannot go down "
        "there, the real run with fresh batches (and the curvature that grows during training) will not "
        "either. The trial measures what HC501 predicts, including everything the quadratic model leaves "
        "out (Adam's sign-like first steps, normalization, the loss's nonlinearity).",
    source="science.md, Stability under the optimizer; issue 13 (measured runs: the same MLP diverges at "
           "lr 0.05 and trains at 0.01).",
    bad_example="""
report = check(model, x, optimizer=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
# HC502: loss 2.3 → 1.9e+13 in 12 steps
""",
    good_example="""
report = check(model, x, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
""",
    fix_summary="Lower the learning rate, add a warm-up, or scale down the output layer's init",
    transform=None, fix_safety="safe",
    options={"error_end_ratio": 3.0, "warn_growth": 3.0, "margin": 0.5}, check=_hc502,
))


def _hc503(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    s = _stability(ctx)
    if s is None or s.trial is None or s.optimizer is None or not s.trial.dead:
        return
    trial, spec = s.trial, s.optimizer
    # an activation that makes the output is fitted to the surrogate's random targets (half of them
    # negative for MSE), not to data: a final ReLU that turns off there says nothing about the model
    sites = [d for d in trial.dead if not (d.at_output and trial.loss in ("mse", "cross_entropy"))]
    if not sites:
        return
    units, before, after = (sum(d.units for d in sites), sum(d.dead_before for d in sites),
                            sum(d.dead_after for d in sites))
    newly = (after - before) / units if units else 0.0
    layers_killed = [d for d in sites if d.units and d.dead_after == d.units and d.dead_before < d.units]
    severity = severity_at(newly, opt["warn_fraction"], opt["error_fraction"])
    if layers_killed:
        severity = "error"  # a layer whose every unit is off passes no signal and no gradient
    if severity is None:
        return
    worst = max(sites, key=lambda d: (d.dead_after - d.dead_before) / max(d.units, 1))
    killed = f"; every unit of {len(layers_killed)} activation call(s) is off" if layers_killed else ""
    yield HC503.finding(
        severity,
        f"{after - before} of {units} ReLU/GELU units ({newly:.0%}) stop being active on the whole example batch "
        f"within {trial.steps} trial steps of {spec.kind} at lr {_lr_text(spec.lr)} ({before} were off at init; worst: "
        f"{worst.site}, {worst.dead_after} of {worst.units} off){killed}: dead units get no gradient and do not "
        "come back",
        Location("(root)"),
        {"units": units, "dead_before": before, "dead_after": after, "newly_dead_fraction": newly,
         "layers_killed": [d.site for d in layers_killed], "sites": [d.to_json() for d in sites]},
        ("lower the learning rate or add a warm-up (large early steps push pre-activations negative); "
         "normalization before the activation, or a leaky activation, keeps units alive", None),
    )


HC503 = register(Rule(
    code="HC503", name="units-die-in-trial-steps",
    summary="ReLU/GELU units die during the first optimizer steps",
    what="During HC502's trial steps, counts per call of relu/relu6/gelu/silu (modules and functional "
         "calls alike) the units (channels: dim 1 of 2-, 4- and 5-dim inputs, the last dim of 3-dim ones) "
         "whose input is never above the activation's threshold (0 for ReLU, −3 for GELU, −5 for SiLU) on "
         "the whole example batch, before the first step and after the last. Reports when the fraction of "
         "all units that died during the steps reaches `warn_fraction` (warning) or `error_fraction` "
         "(error), and as an error when every unit of one call is off.",
    why="A unit that is off for every input receives no gradient and stays off: too large early steps "
        "(a learning rate above the stability limit, a huge output) push biases and pre-activations "
        "negative, and a plain He-initialized stack can lose most of its ReLUs in a few steps. The "
        "init-time profile sees healthy units; the trial sees them die.",
    source="science.md, Stability under the optimizer; issue 13 ('plain He CNNs lose all their ReLUs in "
           "the first steps'; Lu et al. 2019, dying ReLU).",
    bad_example="""
check(plain_relu_cnn, x, optimizer=torch.optim.SGD(plain_relu_cnn.parameters(), lr=0.2, momentum=0.9))
""",
    good_example="""
check(bn_relu_cnn, x, optimizer=torch.optim.SGD(bn_relu_cnn.parameters(), lr=0.05, momentum=0.9))
""",
    fix_summary="Lower the learning rate or warm up; normalize before the activation",
    transform=None, fix_safety="safe",
    options={"warn_fraction": 0.25, "error_fraction": 0.5}, check=_hc503,
))


def _hc504(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    s = _stability(ctx)
    if s is None or s.output is None or s.output.excess is None:
        return
    out = s.output
    # below error_excess the outcome is a coin toss (measured: 13 of 18 such runs trained), so the
    # finding is info: worth knowing, not a claim that training fails
    severity = severity_at(out.excess, opt["info_excess"], opt["error_excess"])
    if severity is None:
        return
    severity = "info" if severity == "warning" else severity
    head = out.head or "the output layer"
    trial = s.trial
    recovered = trial is not None and trial.non_finite_at is None and trial.end_ratio <= opt["recovered_end_ratio"]
    if recovered and severity == "error":
        # the trial steps brought the loss down from the huge start: the optimizer undoes the scale
        severity = "warning"
    yield HC504.finding(
        severity,
        f"the output at init is far too confident: the cross-entropy a uniform random label would get is "
        f"{out.expected_loss:.3g}, {out.excess:.3g}× the {out.uniform_loss:.3g} (ln {out.classes}) of a uniform guess "
        f"(logit s.d. {out.logit_std:.3g} across classes): the first steps only undo the random scale, with large "
        f"gradients; scale down the init of {head} or zero-init it"
        + (f" (the trial steps recovered: loss {trial.loss_start:.3g} → {trial.loss_end:.3g})" if recovered else ""),
        Location(out.head or "(root)"),
        out.to_json(),
        (f"zero-init {head} (nn.init.zeros_ on its weight and bias) or scale its init down so that the "
         "initial loss is ≈ ln C", None),
    )


HC504 = register(Rule(
    code="HC504", name="output-scale-at-init",
    summary="The output at init is far larger than a uniform guess (huge initial loss)",
    what="For a class output (logits: a floating tensor of 2 or 3 dims with a last dim ≥ 2, or an output's "
         "`.logits`), computes on the example batch at init the cross-entropy that uniformly random "
         "labels would give, E_y[logsumexp(z) − z_y] = logsumexp(z) − mean(z) (masked and pad positions "
         "left out), and compares it with ln C, the loss of a uniform guess, which a healthy init is close to "
         "(it is ln C + σ²/2 for small logits of s.d. σ). Reports when the ratio reaches `info_excess` "
         "(info) or `error_excess` (error). Needs no optimizer; with one, an error becomes a warning when "
         "HC502's trial steps recover from it: the loss stayed finite and ended at `recovered_end_ratio` of "
         "its start or less. Only an output that names its logits (`.logits`) or is what the last layer "
         "with parameters returned is read as logits: a backbone's hidden states are not. Measured on the "
         "trainability benchmark (recipe v2): heads 30× too large (ratio 4–14) trained in 13 of 18 runs, "
         "so below `error_excess` the finding is info; outputs ≥ 20× the uniform loss failed every time.",
    why="Logits many times larger than O(1) make the model confidently wrong on most examples: the initial "
        "loss is 9–116 instead of ln 10 ≈ 2.3, the first updates are dominated by shrinking the head, and "
        "saturated softmax gradients drive units and normalization statistics far from where they "
        "started. Measured on digits, a huge initial loss predicted failure better than several "
        "propagation rules. Zero-initializing the classifier (or scaling it down) makes the start a "
        "uniform guess.",
    source="science.md, Stability under the optimizer ('a huge output at init'); issue 13; the "
           "zero-initialized classifier head of ViT (Dosovitskiy et al. 2021) and timm's models.",
    bad_example="""
head = nn.Linear(512, 10)
nn.init.normal_(head.weight, std=3.0)      # logits of s.d. ≈ 60: initial loss ≈ 100
""",
    good_example="""
head = nn.Linear(512, 10)
nn.init.zeros_(head.weight); nn.init.zeros_(head.bias)   # initial loss = ln 10
""",
    fix_summary="Zero-init the output layer or scale its init down",
    transform=None, fix_safety="unsafe",
    options={"info_excess": 2.0, "error_excess": 20.0, "recovered_end_ratio": 0.5},
    check=_hc504,
))
