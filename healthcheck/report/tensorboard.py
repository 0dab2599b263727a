"""`--tensorboard DIR`: the depth profile as scalars (step = depth) and the findings as text."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from healthcheck.records import Report
from healthcheck.report.markdown import findings_table

#: profile quantities written as scalars, tag = f"{prefix}/{name}"
PROFILE_TAGS = ("var", "var_ratio", "residual_ratio", "grad_norm", "grad_rms", "effective_rank",
                "participation_ratio", "sensitivity")


def log_report(report: Report, writer: Any, prefix: str = "init") -> None:
    """Write `report` through a SummaryWriter (the CLI's own, or a trainer's): `init/<quantity>`
    against depth, `init/findings` as a Markdown table, `init/findings/<severity>` counts."""
    measurements = report.measurements
    if measurements is not None:
        for point in measurements.profile:
            for name in PROFILE_TAGS:
                value = getattr(point, name)
                if value is not None:
                    writer.add_scalar(f"{prefix}/{name}", value, global_step=point.depth)
        if measurements.grad_correlation is not None:
            writer.add_scalar(f"{prefix}/grad_correlation", measurements.grad_correlation, global_step=0)
    writer.add_text(f"{prefix}/findings", findings_table(report.findings), global_step=0)
    for severity, count in report.summary().items():
        writer.add_scalar(f"{prefix}/findings/{severity}", count, global_step=0)


def write_tensorboard(report: Report, log_dir: str | Path, prefix: str = "init") -> Path:
    """One event file under `log_dir` with what `log_report` writes."""
    with warnings.catch_warnings():  # torch.utils.tensorboard's imports warn about torch.jit
        warnings.simplefilter("ignore")
        from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        log_report(report, writer, prefix)
    return log_dir
