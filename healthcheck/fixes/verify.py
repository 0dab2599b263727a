"""`fix(model, example_inputs)`: apply each suggested transform to a copy, measure it again with the
same probes, and report before/after numbers. A fix is verified only when the finding it targets is
gone (or less severe) on the copy; otherwise it is reported as not verified, not hidden."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from healthcheck.api import check, optimizer_spec
from healthcheck.config import Config
from healthcheck.fixes.transforms import TRANSFORMS, add_skips, targets
from healthcheck.graph.architecture import analyze
from healthcheck.guard import copy_inputs, preserved
from healthcheck.loading import as_call_args
from healthcheck.records import SEVERITIES, Finding, Fix, Report
from healthcheck.rules.measured import geometric_mean

#: every fix science.md lists for the finding a transform name stands for
ALTERNATIVES = {"scale_joins": ("scale_joins", "scale_branches_by_depth", "norm_in_branch", "zero_init_gains")}


@dataclass
class FixResult:
    transform: str
    summary: str
    model: nn.Module  # the fixed copy
    joins: list[str]  # the joins it changed
    after: Report
    verified: bool
    before_numbers: dict[str, Any]
    after_numbers: dict[str, Any]


def profile_numbers(report: Report) -> dict[str, Any]:
    """The numbers a fix should move (science.md, Fixes)."""
    m = report.measurements
    out: dict[str, Any] = {"findings": sorted({f"{f.code}:{f.severity}" for f in report.findings})}
    if m is None or not m.profile:
        return out
    grads = m.series("grad_rms")
    directions = [p.directions for p in m.profile if p.directions is not None]
    out.update({
        "var_ratio_per_block": geometric_mean(m.series("var_ratio")),
        "var_growth": m.profile[-1].var / m.profile[0].var * (m.profile[0].var_ratio or 1.0),
        "grad_ratio_first_last": grads[0] / grads[-1] if len(grads) > 1 and grads[-1] > 0 else None,
        "max_sensitivity": max(m.series("sensitivity"), default=None),
        "min_directions": min(directions) if directions else None,
        "grad_correlation": m.grad_correlation,
    })
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _improved(code: str, severity: str, after: Report) -> bool:
    worst = [f.severity for f in after.findings if f.code == code]
    return not worst or min(SEVERITIES.index(s) for s in worst) > SEVERITIES.index(severity)


def fix(model: nn.Module, example_inputs: Any, **options: Any) -> tuple[Report, list[FixResult]]:
    """Check `model`, then try every transform its findings suggest on a copy.

    Returns the report — its findings' `fix.verified` filled with before/after numbers — and one
    `FixResult` per transform tried (with the fixed copy). `model` is not changed. `options` are
    check()'s, `optimizer=` included.
    """
    optimizer = options.get("optimizer")
    if optimizer is not None and not isinstance(optimizer, str):
        # the fixed copies have parameters of their own: they are checked with what the optimizer is
        # (its class and hyper-parameters), not with the object, which trains only `model`
        options = {**options, "optimizer": optimizer_spec(model, optimizer, Config())}
    before = check(model, example_inputs, **options)
    args, kwargs = as_call_args(example_inputs)
    with preserved(model):
        model.eval()
        architecture = analyze(model, *copy_inputs((args, kwargs)), ("hooks",))  # node order as the rewriter sees it
    all_targets = targets(architecture.graph, list(architecture.joins))
    before_numbers = profile_numbers(before)
    results: list[FixResult] = []
    transforms_of: dict[int, str] = {}  # finding -> the transform that answers it, when not fix.transform
    wanted = dict.fromkeys(alternative for f in before.findings if f.fix and f.fix.transform in TRANSFORMS
                           for alternative in ALTERNATIVES.get(f.fix.transform, (f.fix.transform,)))
    for name in wanted:
        transform = TRANSFORMS[name]
        chosen = [t for t in all_targets if transform.applies_to(t.join)]
        if not chosen:
            continue
        fixed = transform.build(model, chosen)
        after = check(fixed, example_inputs, **{**options, "trace": "hooks"})
        targeted = [f for f in before.findings if f.fix and name in ALTERNATIVES.get(f.fix.transform, (f.fix.transform,))]
        verified = all(_improved(f.code, f.severity, after) for f in targeted)
        results.append(FixResult(name, transform.summary, fixed, [t.join.id for t in chosen], after, verified,
                                 before_numbers, profile_numbers(after)))
    plain = [f for f in before.findings if f.code in ("HC104", "HC203", "HC204", "HC303") and not architecture.joins]
    if plain:  # a plain stack: the fix is to add skips (science.md, Fixes)
        with preserved(model):
            fixed, added = add_skips(model, *copy_inputs((args, kwargs)))
        if added:
            after = check(fixed, example_inputs, **options)
            verified = all(_improved(f.code, f.severity, after) for f in plain)
            results.append(FixResult("add_skips", f"add a residual connection around every 2 layers ({added} skips)",
                                     fixed, [], after, verified, before_numbers, profile_numbers(after)))
            for f in plain:
                transforms_of[id(f)] = "add_skips"
    by_transform = {r.transform: r for r in results}  # a finding shows its own transform's numbers
    findings: list[Finding] = []
    for f in before.findings:
        result = by_transform.get(transforms_of.get(id(f), f.fix.transform if f.fix else None))
        if result is not None:
            verified = {"before": result.before_numbers, "after": result.after_numbers, "verified": result.verified,
                        "transform": result.transform, "joins": result.joins}
            f = dataclasses.replace(f, fix=Fix(f.fix.summary, f.fix.transform, verified))
        findings.append(f)
    return dataclasses.replace(before, findings=findings, fixes=results), results
