"""Reporters: each turns `Report`s into one output format and computes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from healthcheck.records import Report

FORMATS = ("text", "json", "sarif", "junit", "markdown")


def render(reports: Report | Sequence[Report], fmt: str, *, fail_on: str = "error", color: bool = False,
           verbose: bool = False, width: int | None = None) -> str:
    """`reports`: one report or several (one per model checked). `fail_on` marks what fails in
    the JUnit and Markdown formats; fixes tried by `healthcheck.fix` travel in `report.fixes`."""
    reports = [reports] if isinstance(reports, Report) else list(reports)
    if fmt == "json":
        from healthcheck.report.json import render_json

        return render_json(reports)
    if fmt == "text":
        from healthcheck.report.text import render_text

        return "\n".join(render_text(r, color=color, verbose=verbose, width=width) for r in reports)
    if fmt == "sarif":
        from healthcheck.report.sarif import render_sarif

        return render_sarif(reports)
    if fmt == "junit":
        from healthcheck.report.junit import render_junit

        return render_junit(reports, fail_on)
    if fmt == "markdown":
        from healthcheck.report.markdown import render_markdown

        return render_markdown(reports, fail_on)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
