"""Reporters: each turns a `Report` into one output format and computes nothing."""

from __future__ import annotations

from healthcheck.records import Report
from healthcheck.report.json import render_json
from healthcheck.report.text import render_text

FORMATS = ("text", "json")


def render(report: Report, fmt: str, *, color: bool = False, verbose: bool = False, width: int | None = None,
           fixes: list | None = None) -> str:
    """`fixes`: the FixResults of `healthcheck.fixes.fix`, when fixes were applied."""
    if fmt == "json":
        return render_json(report, fixes)
    if fmt == "text":
        return render_text(report, color=color, verbose=verbose, width=width, fixes=fixes)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
