"""The terminal report: a header, joins grouped by stage, findings coloured by severity."""

from __future__ import annotations

import io
import math
import os
import re
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from healthcheck.graph.joins import Join
from healthcheck.records import Finding, Report
from healthcheck.rules.structure import short_source

THEME = Theme({
    "hc.error": "bold red", "hc.warning": "yellow", "hc.info": "cyan", "hc.ok": "green",
    "hc.dim": "dim", "hc.code": "bold", "hc.fix": "green",
})
_MARK = {"error": "✖", "warning": "▲", "info": "●"}


def stage_of(module: str) -> str:
    """'layer1.0' -> 'layer1', 'encoder.layer.3.output' -> 'encoder.layer', 'features.1.0' -> 'features.1'."""
    parts = module.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if digits:
        return ".".join(parts[: digits[-1]]) or "(root)"
    if parts and re.search(r"\d+$", parts[-1]) and len(parts) > 1:
        return ".".join(parts[:-1])
    return module or "(root)"


def _summarize(values: list[Any]) -> str:
    counts = Counter("-" if v is None else ("yes" if v is True else "no" if v is False else
                                            (f"{v:.3g}" if isinstance(v, float) else str(v))) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return " · ".join(f"{n} {v}" for v, n in counts.most_common())


def short_path(source: str | None) -> str:
    if not source:
        return "-"
    path, _, line = source.rpartition(":")
    try:
        rel = os.path.relpath(path)
    except ValueError:
        rel = path
    if rel.startswith(".."):
        rel = os.path.join(*path.split(os.sep)[-2:])
    return f"{rel}:{line}"


def joins_table(joins: tuple[Join, ...], with_source: bool = True) -> Table:
    table = Table(title="Residual joins", title_justify="left", show_edge=False, header_style="bold", pad_edge=False)
    columns = ["stage", "joins", "skip", "norm", "pre-act", "act after", "scale", "gain"] + (["source"] if with_source else [])
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in ("joins", "norm", "scale", "gain", "pre-act"))
    stages: dict[str, list[Join]] = {}
    for j in joins:
        stages.setdefault(stage_of(j.module), []).append(j)
    for stage, group in stages.items():
        kinds = Counter(j.kind for j in group)
        row = [
            Text(stage), " · ".join(f"{n} {k}" for k, n in kinds.items()),
            _summarize([j.skip for j in group]), _summarize([j.norm for j in group]),
            _summarize([j.pre_activation for j in group]), _summarize([j.activation_after_join for j in group]),
            _summarize([j.scale for j in group]), _summarize([j.learnable_gain for j in group]),
        ]
        if with_source:
            row.append(Text(", ".join(sorted({short_source(j.source) for j in group if j.source})) or "-"))
        table.add_row(*row)
    return table


_BARS = "▁▂▃▄▅▆▇█"
#: (attribute, label, log scale) of the profile rows in the text report
PROFILE_ROWS = (
    ("var", "variance E[y²]", True),
    ("residual_ratio", "residual ratio r", True),
    ("grad_rms", "gradient RMS", True),
    ("effective_rank", "effective rank (norm.)", True),
    ("sensitivity", "sensitivity χ", True),
)


def sparkline(values: list[float], log: bool = True, width: int = 32) -> str:
    """Values as bars, resampled to at most `width`, on a log scale by default."""
    values = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    points = [math.log10(v) for v in values] if log else values
    low, high = min(points), max(points)
    span = high - low
    if span < 1e-9:
        return _BARS[3] * len(points)
    return "".join(_BARS[min(len(_BARS) - 1, int((p - low) / span * len(_BARS)))] for p in points)


def profile_table(measurements: Any) -> Table:
    unit = "blocks" if measurements.at == "join" else "layers"
    table = Table(title=f"Depth profile ({len(measurements.profile)} {unit}, one batch, train mode)",
                  title_justify="left", show_edge=False, header_style="bold", pad_edge=False)
    for column in ("quantity", "first", "last", f"per {unit[:-1]}", "profile (log scale)"):
        table.add_column(column, no_wrap=True)
    for attribute, label, log in PROFILE_ROWS:
        values = measurements.series(attribute)
        if not values:
            continue
        positive = [v for v in values if v > 0]
        per_point = ""
        if len(positive) > 1 and positive[0] > 0:
            per_point = f"×{(positive[-1] / positive[0]) ** (1 / (len(positive) - 1)):.3g}"
        table.add_row(Text(label), f"{values[0]:.3g}", f"{values[-1]:.3g}", per_point, sparkline(values, log))
    return table


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(format_value(v) for v in value[:4])
        return f"[{shown}{', …' if len(value) > 4 else ''}]" + (f" ({len(value)})" if len(value) > 4 else "")
    return str(value)


def stability_lines(stability: Any) -> list[str]:
    """The stability measurements (healthcheck.probes.stability.Stability) as short lines of plain text:
    the optimizer and its sharpness against the limit, the trial steps, the output scale at init, what
    could not be measured; the note that stability was not assessed when no optimizer was given. The
    text and Markdown reports lay them out."""
    if stability is None:
        return []
    lines = []
    spec, sharpness, trial, output = stability.optimizer, stability.sharpness, stability.trial, stability.output
    if spec is not None:
        settings = [f"lr {spec.lr:.3g}"]
        if spec.momentum:
            settings.append(f"momentum {spec.momentum:.3g}")
        if spec.preconditioned and spec.kind != "rmsprop":
            settings.append(f"β₁ {spec.betas[0]:.3g}")
        head = f"stability under {spec.kind} ({', '.join(settings)})"
        if sharpness is not None:
            which = "preconditioned sharpness" if sharpness.preconditioned else "sharpness"
            limit = f" against the limit {sharpness.limit:.3g} ({sharpness.ratio:.2g}× the limit)" \
                if math.isfinite(sharpness.ratio) else ""
            head += f": {which} {sharpness.value:.3g}{limit}"
        lines.append(head)
    if trial is not None:
        line = f"trial: {trial.steps} steps on a copy, loss {format_value(trial.loss_start)} → " \
               f"{format_value(trial.loss_end)}"
        if trial.non_finite_at is not None:
            line += f", non-finite at step {trial.non_finite_at}"
        if trial.update_ratios:
            line += f", largest first-step update ‖Δw‖/‖w‖ {max(trial.update_ratios.values()):.3g}"
        units, before, after = trial.dead_counts()
        if units:
            line += f", dead units {before} → {after} of {units}"
        lines.append(line)
    if output is not None and output.expected_loss is not None:
        lines.append(f"output at init: loss {output.expected_loss:.3g} on random labels against "
                     f"{output.uniform_loss:.3g} (ln {output.classes}) for a uniform guess")
    elif output is not None and spec is not None:
        lines.append(f"output at init: RMS {output.output_rms:.3g}")
    lines += [f"{part} not measured: {why}" for part, why in stability.skipped.items()]
    if stability.note:
        lines.append(f"note: {stability.note}")
    return lines


def finding_text(f: Finding) -> Text:
    text = Text()
    text.append(f"{_MARK[f.severity]} {f.severity:<7} ", style=f"hc.{f.severity}")
    text.append(f.code, style="hc.code")
    text.append(f"  {f.message}\n")
    where = f.location.module or "(root)"
    if f.location.source:
        where += f"  ({short_path(f.location.source)})"
    text.append(f"    at {where}\n", style="hc.dim")
    if f.evidence:
        text.append(f"    evidence: {evidence_text(f.evidence)}\n", style="hc.dim")
    if f.fix is not None:
        text.append("    fix: ", style="hc.fix")
        text.append(f"{f.fix.summary}\n")
    return text


def findings_text(report: Report, width: int = 100) -> str:
    """The findings alone, plain text: for messages such as a failing test's."""
    buffer = io.StringIO()
    console = Console(file=buffer, theme=THEME, no_color=True, width=width, highlight=False)
    for f in report.findings:
        console.print(finding_text(f), end="")
    summary = ", ".join(f"{n} {s}" for s, n in report.summary().items() if n) or "no findings"
    suppressed = f" ({len(report.suppressed)} suppressed)" if report.suppressed else ""
    console.print(f"{summary}{suppressed} · `healthcheck rule CODE` explains a rule")
    return buffer.getvalue()


def render_text(report: Report, *, color: bool = False, verbose: bool = False, width: int | None = None) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, theme=THEME, force_terminal=color, no_color=not color,
                      width=width or 120, highlight=False, soft_wrap=False)
    write_text(report, console, verbose=verbose)
    return buffer.getvalue()


#: (key in profile_numbers, label) of the before/after table
FIX_ROWS = (
    ("var_ratio_per_block", "variance ratio per block"),
    ("var_growth", "variance growth, first → last"),
    ("grad_ratio_first_last", "gradient RMS first / last"),
    ("max_sensitivity", "max sensitivity χ"),
    ("min_directions", "min effective rank (directions)"),
    ("grad_correlation", "gradient correlation"),
)


def fix_rows(fixes: list[Any]) -> list[tuple[str, list[str]]]:
    """The before/after table of fixes tried, as (label, [before, after each fix]) formatted cells;
    quantities that no column measured are left out. The text and Markdown reports lay it out."""
    numbers = [fixes[0].before_numbers] + [f.after_numbers for f in fixes]
    rows = []
    for key, label in FIX_ROWS:
        values = [n.get(key) for n in numbers]
        if any(v is not None for v in values):
            rows.append((label, ["-" if v is None else format_value(v) for v in values]))
    rows.append(("findings", [", ".join(n.get("findings", [])) or "none" for n in numbers]))
    return rows


def evidence_text(evidence: dict[str, Any]) -> str:
    return " · ".join(f"{k}={format_value(v)}" for k, v in evidence.items())


def write_fixes(report: Report, console: Console) -> None:
    """Before/after table of the fixes tried, then the code change for each verified one."""
    from healthcheck.fixes.guidance import suggestion

    fixes = report.fixes or []
    console.print()
    if not fixes:
        console.print(Text("No automatic fix applies to these findings.", style="hc.dim"))
        return
    table = Table(title="Fixes applied to a copy and measured again", title_justify="left", show_edge=False,
                  header_style="bold", pad_edge=False)
    table.add_column("quantity")
    table.add_column("before", justify="right")
    for f in fixes:
        table.add_column(f.transform, justify="right")
    for label, cells in fix_rows(fixes):
        table.add_row(Text(label), *[Text(c) for c in cells])
    table.add_row(Text("verified"), "", *[Text("yes", style="hc.ok") if f.verified else Text("no", style="hc.error")
                                          for f in fixes])
    console.print(table)
    joins = {j.id: j for j in report.architecture.joins}
    for f in fixes:
        if not f.verified:
            continue
        first = next((joins[i] for i in f.joins if i in joins), None) or next(iter(joins.values()), None)
        if first is None:
            continue
        console.print()
        console.print(Text(f"{f.transform}: {f.summary} ({len(f.joins)} joins)", style="hc.fix"))
        console.print(Text(suggestion(f.transform, first)))


def write_text(report: Report, console: Console, *, verbose: bool = False) -> None:
    arch, model = report.architecture, report.model
    header = Text()
    header.append(model.name, style="bold")
    header.append(f" · {model.parameters / 1e6:.3g}M parameters · traced with {model.trace}"
                  f" · {len(arch.joins)} residual joins · depth {arch.depth}"
                  f" · {report.seconds:.2f} s", style="hc.dim")
    console.print(header)
    if verbose:
        for method, why in model.trace_failures.items():
            console.print(Text(f"  {method} tracing failed: {why}", style="hc.dim"))
        norms = ", ".join(f"{k}×{v}" for k, v in arch.norm_layers.items()) or "none"
        console.print(Text(f"  normalization layers: {norms}; longest run without skips: "
                           f"{arch.plain_depth} weight layers", style="hc.dim"))
    if model.weights != "real":  # structure only, traced on fake tensors
        console.print(Text("  weights not materialized (meta device): structure traced on fake tensors"
                           if model.weights == "not materialized" else
                           "  structure traced on fake tensors: no forward ran on the weights", style="hc.dim"))
    if model.trace == "hooks":
        console.print(Text("  note: fx and torch.export could not follow the model; the graph was recorded "
                           f"from one {'real' if model.weights == 'real' else 'fake-tensor'} forward pass "
                           "(run with --verbose for why)", style="hc.warning"))
    console.print()
    if arch.joins:
        console.print(joins_table(arch.joins, with_source=console.width >= 110))
    else:
        console.print(Text("No residual joins: every layer feeds the next (a plain stack).", style="hc.dim"))
    console.print()
    measurements = report.measurements
    if measurements is not None and measurements.profile:
        console.print(profile_table(measurements))
        extra = []
        if measurements.grad_correlation is not None:
            extra.append(f"gradient correlation between neighbouring inputs: {measurements.grad_correlation:.3g}")
        extra += [f"{probe} not measured: {why}" for probe, why in measurements.failures.items()]
        for line in extra:
            console.print(Text(line, style="hc.dim"))
        console.print()
    elif measurements is not None and measurements.failures:  # no profile: say why, not just "no findings"
        for probe, why in measurements.failures.items():
            console.print(Text(f"{probe} not measured: {why}", style="hc.warning"))
        console.print()
    stability = stability_lines(report.stability)
    if stability:
        for line in stability:
            console.print(Text(line, style="" if line.startswith("note: ") else "hc.dim"))
        console.print()
    if report.findings:
        console.print(Text("Findings", style="bold"))
        for f in report.findings:
            console.print(finding_text(f), end="")
    summary = report.summary()
    line = Text()
    if not report.findings:
        line.append("✔ no findings", style="hc.ok")
    else:
        parts = [(f"{summary[s]} {s}{'s' if summary[s] != 1 and s != 'info' else ''}", f"hc.{s}")
                 for s in ("error", "warning", "info") if summary[s]]
        for i, (part, style) in enumerate(parts):
            line.append((", " if i else "") + part, style=style)
    if report.suppressed:
        reasons = Counter({"comment": "# healthcheck: ignore", "baseline": "baseline"}[s.reason]
                          for s in report.suppressed)
        line.append(" (suppressed: " + ", ".join(f"{n} by {why}" for why, n in reasons.items()) + ")",
                    style="hc.dim")
        if verbose:
            for s in report.suppressed:
                line.append(f"\n  suppressed {s.finding.code} at {s.finding.location.module or '(root)'}: "
                            f"{s.finding.message}", style="hc.dim")
    console.print(line)
    if report.fixes is not None:
        write_fixes(report, console)
