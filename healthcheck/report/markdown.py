"""Markdown sized for a pull-request comment (GitHub's limit is 65,536 characters): one summary table
over all models, then per model its findings with fixes and, when fixes were tried (--fix), the
before/after numbers of each fix measured on a fixed copy."""

from __future__ import annotations

from healthcheck.records import Finding, Report
from healthcheck.report.text import fix_rows, short_path, stability_lines

ICONS = {"error": "🔴", "warning": "🟠", "info": "🔵"}
MAX_FINDINGS = 25  # per model; the rest are counted, the full list is in the JSON/SARIF report
MAX_CHARS = 60_000


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def findings_table(findings: list[Finding], limit: int = MAX_FINDINGS) -> str:
    if not findings:
        return "No findings."
    rows = ["| | rule | where | finding | fix |", "|---|---|---|---|---|"]
    for f in findings[:limit]:
        where = f"`{f.location.module or '(root)'}`"
        if f.location.source:
            where += f" {short_path(f.location.source)}"
        rows.append(f"| {ICONS[f.severity]} {f.severity} | {f.code} | {_cell(where)} | {_cell(f.message)} | "
                    f"{_cell(f.fix.summary) if f.fix else ''} |")
    if len(findings) > limit:
        rows.append(f"| | | | … and {len(findings) - limit} more | |")
    return "\n".join(rows)


def fixes_table(report: Report) -> str:
    fixes = report.fixes or []
    if not fixes:
        return ""
    head = "| quantity | before | " + " | ".join(f"after `{f.transform}`" for f in fixes) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(fixes)]
    rows += [f"| {label} | " + " | ".join(_cell(c) for c in cells) + " |" for label, cells in fix_rows(fixes)]
    rows.append("| verified | | " + " | ".join("✅ yes" if f.verified else "❌ no" for f in fixes) + " |")
    return "**Fixes measured on a copy of the model**\n\n" + "\n".join(rows)


def _status(report: Report, fail_on: str) -> str:
    if report.fails(fail_on):
        return "❌ fails"
    return "⚠️ passes with findings" if report.findings else "✅ healthy"


def _model_section(report: Report, fail_on: str) -> str:
    failing = report.fails(fail_on)
    parts = [f"<details{' open' if failing else ''}>",
             f"<summary><b>{report.model.name}</b>: {_counts(report)}</summary>", "",
             findings_table(report.findings)]
    stability = stability_lines(report.stability)
    if stability:
        parts += ["", "<sub>" + "<br>".join(_cell(line) for line in stability) + "</sub>"]
    if report.suppressed:
        reasons = {"comment": "`# healthcheck: ignore`", "baseline": "the baseline"}
        known = ", ".join(f"{s.finding.code} `{s.finding.location.module or '(root)'}` ({reasons[s.reason]})"
                          for s in report.suppressed[:MAX_FINDINGS])
        parts += ["", f"Suppressed: {known}{' …' if len(report.suppressed) > MAX_FINDINGS else ''}"]
    table = fixes_table(report)
    if table:
        parts += ["", table]
    parts += ["", "</details>"]
    return "\n".join(parts)


def _counts(report: Report) -> str:
    summary = report.summary()
    counts = [f"{summary[s]} {s}{'s' if summary[s] != 1 and s != 'info' else ''}" for s in summary if summary[s]]
    return ", ".join(counts) or "no findings"


def render_markdown(reports: list[Report], fail_on: str = "error") -> str:
    failing = sum(r.fails(fail_on) for r in reports)
    title = (f"❌ {failing} of {len(reports)} model{'s' if len(reports) != 1 else ''} fail{'s' if failing == 1 else ''}"
             if failing else f"✅ {len(reports)} model{'s' if len(reports) != 1 else ''} pass")
    lines = [f"### healthcheck: {title} (fail on: {fail_on})", "",
             "| model | parameters | traced | joins | errors | warnings | info | suppressed | result |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in reports:
        s = r.summary()
        lines.append(f"| {_cell(r.model.name)} | {r.model.parameters / 1e6:.3g}M | {r.model.trace} | "
                     f"{len(r.architecture.joins)} | {s['error']} | {s['warning']} | {s['info']} | "
                     f"{len(r.suppressed)} | {_status(r, fail_on)} |")
    text = "\n".join(lines) + "\n"
    for r in reports:
        section = "\n" + _model_section(r, fail_on) + "\n"
        if len(text) + len(section) > MAX_CHARS:
            text += "\n… more models in the full report (--format json or sarif).\n"
            break
        text += section
    return text + "\n<sub>`healthcheck rule CODE` explains a rule; silence one finding with "\
        "`# healthcheck: ignore[CODE]` on its line.</sub>\n"

