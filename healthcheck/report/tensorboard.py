"""TensorBoard output, all of it: `--tensorboard DIR` (the depth profile as scalars, step = depth, and the
findings as text) and the training monitor's `health/*` tags (`TrainingLog`)."""

from __future__ import annotations

import math
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

from healthcheck.records import SEVERITIES, Finding, Report
from healthcheck.report.markdown import findings_table
from healthcheck.report.text import stage_of

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
    log_dir = Path(log_dir)
    with summary_writer(log_dir) as writer:
        log_report(report, writer, prefix)
    return log_dir


# -- the training monitor's `health/*` tags ----------------------------------------------------------

def summary_writer(log_dir: str | Path) -> Any:
    with warnings.catch_warnings():  # torch.utils.tensorboard's imports warn about torch.jit
        warnings.simplefilter("ignore")
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


def check_writable(log_dir: Path) -> None:
    """Fail now, with the directory named, rather than at the first sampled training step."""
    import tempfile

    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as exc:
        raise ValueError(f"log_dir {str(log_dir)!r} is not a writable directory: "
                         f"{exc.strerror or exc}") from None


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name.replace("(root)", "root")) or "root"


def _root_sum_square(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


class TrainingLog:
    """The monitor's TensorBoard output: one scalar per stage (or per tensor with detail="full")
    and quantity, findings as text and counts, the dashboard layout, a depth-profile figure.

    A write that fails during training (disk full, directory removed) is a warning once and logging
    stops; it never raises into the training loop."""

    def __init__(self, log_dir: str | Path | None, writer: Any, detail: str, figure_every: int,
                 write: bool = True) -> None:
        if detail not in ("stage", "full"):
            raise ValueError(f"detail must be 'stage' or 'full', not {detail!r}")
        if figure_every < 0:
            raise ValueError(f"figure_every must be ≥ 0, not {figure_every}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.detail, self.figure_every = detail, figure_every
        self._writer, self._write = writer, write  # write: this process writes (rank 0)
        self._owned = writer is None and self.log_dir is not None
        if self._owned and write:
            check_writable(self.log_dir)
        self._layout_written = False
        self._samples = 0
        self._failed = False

    @property
    def writer(self) -> Any:
        if self._writer is None and self._owned and self._write and not self._failed:
            self._writer = summary_writer(self.log_dir)
        return self._writer if not self._failed else None

    def _group(self, name: str, activation: bool = False) -> str:
        """The tag group of a parameter ('layer1.0.conv1.weight') or activation ('layer1.0:relu#12')."""
        if self.detail == "full":
            return name
        module = name.split(":")[0] if activation else name.rpartition(".")[0]
        return stage_of(module)

    def write(self, sample: Any, findings: list[Finding], events: list[tuple[Finding, str]],
              recent: list[Any]) -> None:
        """One sample (`recent`: the latest samples, for the figure)."""
        self._samples += 1
        try:
            writer = self.writer
            if writer is not None:
                self._write_sample(writer, sample, findings, events, recent)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self._fail(exc)

    def write_groups(self, attribute: str, values: dict[str, float], reduce: Any, step: int) -> None:
        try:
            writer = self.writer
            if writer is not None:
                self._write_groups(writer, attribute, values, reduce, step)
                writer.flush()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        from healthcheck.monitor import HealthWarning

        self._failed = True
        warnings.warn(f"healthcheck: TensorBoard logging stopped, writing failed: {exc}", HealthWarning, stacklevel=4)

    def close(self) -> None:
        if self._writer is not None and not self._failed:
            try:
                self._writer.flush()
                if self._owned:
                    self._writer.close()
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)

    def _write_sample(self, writer: Any, sample: Any, findings: list[Finding], events: list[tuple[Finding, str]],
                      recent: list[Any]) -> None:
        step = sample.step
        if sample.loss is not None:
            writer.add_scalar("health/loss", sample.loss, step)
        writer.add_scalar("health/nonfinite", float(bool(sample.nonfinite)), step)
        if sample.loss_scale is not None:
            writer.add_scalar("health/loss_scale", sample.loss_scale, step)
            writer.add_scalar("health/skipped_step", float(sample.skipped_step), step)
        if sample.measurements is not None:
            for attribute in ("var", "residual_ratio", "effective_rank", "grad_rms"):
                groups: dict[str, list[float]] = {}
                for p in sample.measurements.profile:
                    value = getattr(p, attribute)
                    if value is not None and math.isfinite(value):
                        key = p.id if self.detail == "full" else stage_of(p.module)
                        groups.setdefault(key, []).append(value)
                for key, values in groups.items():
                    writer.add_scalar(f"health/{attribute}/{_tag(key)}", statistics.fmean(values), step)
        for attribute, reduce in (("grad_norm", _root_sum_square), ("update_ratio", statistics.median),
                                  ("grad_snr", statistics.median), ("dead_fraction", max)):
            self._write_groups(writer, attribute, getattr(sample, attribute), reduce, step)
        for severity in SEVERITIES:
            writer.add_scalar(f"health/findings/{severity}", sum(f.severity == severity for f in findings), step)
        if events:
            lines = [f"- **{event}** {f.severity} {f.code}: {f.message} ({f.location.module})" for f, event in events]
            writer.add_text("health/findings", "\n".join(lines), step)
        self._write_layout(writer)
        if self.figure_every and (self._samples - 1) % self.figure_every == 0:
            self._write_profile_figure(writer, step, recent)
        writer.flush()

    def _write_groups(self, writer: Any, attribute: str, values: dict[str, float], reduce: Any, step: int) -> None:
        """Per-tensor (or per-layer) values as one scalar per group (stage, or each name with detail="full")."""
        groups: dict[str, list[float]] = {}
        for name, value in values.items():
            if math.isfinite(value):
                groups.setdefault(self._group(name, activation=attribute == "dead_fraction"), []).append(value)
        for key, group in groups.items():
            writer.add_scalar(f"health/{attribute}/{_tag(key)}", reduce(group), step)

    def _write_layout(self, writer: Any) -> None:
        if self._layout_written:
            return
        self._layout_written = True
        charts = {
            "activations": {"E[y²] per stage": ["Multiline", [r"health/var/.*"]],
                            "residual ratio": ["Multiline", [r"health/residual_ratio/.*"]],
                            "effective rank": ["Multiline", [r"health/effective_rank/.*"]]},
            "gradients": {"‖∂L/∂y‖ RMS at joins": ["Multiline", [r"health/grad_rms/.*"]],
                          "‖g‖ per group": ["Multiline", [r"health/grad_norm/.*"]],
                          "gradient SNR": ["Multiline", [r"health/grad_snr/.*"]],
                          "update ratio ‖Δw‖/‖w‖": ["Multiline", [r"health/update_ratio/.*"]]},
            "health": {"dead units": ["Multiline", [r"health/dead_fraction/.*"]],
                       "findings": ["Multiline", [r"health/findings/.*", r"health/nonfinite"]],
                       "loss": ["Multiline", [r"health/loss", r"health/loss_scale"]]},
        }
        writer.add_custom_scalars(charts)

    def _write_profile_figure(self, writer: Any, step: int, recent: list[Any]) -> None:
        try:  # matplotlib's object API: no pyplot state, no backend switch in the user's process
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.ticker import NullFormatter
        except ImportError:
            return
        samples = [s for s in recent if s.measurements is not None and s.measurements.profile][-8:]
        if not samples:
            return
        figure = Figure(figsize=(12, 3.2), dpi=80)
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, 3)
        # fixed margins: tight_layout measures every label and costs more than drawing the figure
        figure.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.9, wspace=0.2)
        unit = "join" if samples[-1].measurements.at == "join" else "layer"
        for s in samples:
            profile = s.measurements.profile
            depth = [p.depth for p in profile]
            for axis, attribute in zip(axes, ("var", "grad_rms", "effective_rank")):
                axis.plot(depth, [getattr(p, attribute) or float("nan") for p in profile], label=f"step {s.step}")
        for axis, title in zip(axes, ("E[y²]", "‖∂L/∂y‖ RMS", "effective rank")):
            axis.set_yscale("log")
            axis.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks are most of the drawing time
            axis.set_xlabel(f"depth ({unit})")
            axis.set_title(title)
        axes[-1].legend(fontsize="small")
        writer.add_figure("health/depth_profile", figure, step, close=False)
