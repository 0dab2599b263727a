"""`HealthMonitor`: the init-time measurements, sampled during training, logged to TensorBoard.

    monitor = HealthMonitor(model, log_dir="runs/health", every=100)
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        monitor.step(loss)              # after backward, before or after optimizer.step()
        optimizer.step(); optimizer.zero_grad()
        monitor.after_optimizer_step()  # optional: update ratios of this step

On a sampled step (every `every` steps) the model's forward is recorded (the same recorder and
statistics as `healthcheck.check`): E[y²], residual ratio and effective rank at every join (or at
every layer's input and the output of a model without joins), ‖∂L/∂y‖ at those points from tensor
hooks, dead units after ReLUs; step() adds gradient and weight norms per parameter tensor and a
weight snapshot for the update ratio; the next
`snr_window - 1` steps accumulate gradients on device for the gradient SNR. Everything is reduced on
device, across ranks under torch.distributed, and copied to the host once per sampled step. Other
steps do one device-side NaN/Inf check of the loss and nothing else: no host sync, no hooks, no
kept activations.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthcheck.config import Config
from healthcheck.graph.architecture import architecture_of
from healthcheck.graph.joins import find_joins
from healthcheck.graph.recorder import Session
from healthcheck.graph.tracers import TraceResult
from healthcheck.probes.measure import Measurements, profile_points
from healthcheck.probes.observer import StatsObserver
from healthcheck.records import SEVERITIES, Finding
from healthcheck.report.text import stage_of
from healthcheck.rules import RuleContext, run_rules
from healthcheck.suppression import ignored_at_source

#: rules the monitor evaluates by default: forward signal, gradients, training
DEFAULT_SELECT = ("HC201", "HC202", "HC203", "HC205", "HC301", "HC302", "HC4")


class HealthWarning(UserWarning):
    """A health finding appeared or cleared during training (on_finding="warn")."""


class HealthError(RuntimeError):
    """Raised on a finding at or above `fail_on`: by the monitor when on_finding="raise", by the
    training callbacks' check before the first step."""

    def __init__(self, findings: list[Finding], message: str | None = None) -> None:
        super().__init__(message or "; ".join(f"{f.code} {f.message}" for f in findings))
        self.findings = findings


@dataclass
class TrainingSample:
    """What the monitor measured on one sampled step (host values)."""

    step: int
    previous_step: int
    measurements: Measurements | None  # depth profile of the sampled forward
    grad_norm: dict[str, float] = field(default_factory=dict)  # per parameter tensor
    weight_norm: dict[str, float] = field(default_factory=dict)
    update_ratio: dict[str, float] = field(default_factory=dict)  # ‖Δw‖/‖w‖ (the latest measured step)
    grad_snr: dict[str, float] = field(default_factory=dict)  # from the last completed SNR window
    dead_fraction: dict[str, float] = field(default_factory=dict)  # per non-negative activation
    nonfinite: list[str] = field(default_factory=list)  # where NaN/Inf was seen since the last sample
    loss: float | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP(1) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and \
            type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
        model = model.module
    return model


def _distributed() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name.replace("(root)", "root")) or "root"


class HealthMonitor:
    """Watch signal propagation during training and log it to TensorBoard (see module docs).

    Args:
        model: the model (DDP/FSDP wrappers are looked through).
        log_dir: TensorBoard directory (rank 0 writes); None logs nothing but still evaluates rules.
        every: sample every N steps (the first step is sampled).
        include / exclude: glob patterns on parameter names (and module paths for activations) to watch.
        detail: "stage" aggregates tags per stage (layer1, encoder.layer, …); "full" logs every tensor.
        on_finding: "warn", "raise", "ignore", or a callable `f(finding, event)` with event
            "appeared" / "cleared".
        fail_on: severity that "raise" raises at (default "error").
        snr_window: consecutive steps whose gradients estimate the gradient SNR (0 turns it off;
            default 4, or `every` when smaller, off when every=1).
        ranks: compute effective ranks on sampled steps.
        coordinates: the update ratio and gradient SNR of a tensor are estimated on this many of its
            coordinates (a fixed random subset; relative error ≈ 1/√n, 1.6% at 4096), so that the
            monitor never copies whole parameter tensors. None uses every coordinate (exact, but a
            copy of the watched parameters is held for one step).
        config: thresholds and select/ignore (`[tool.healthcheck]`); by default the HC2xx/HC3xx rules
            that need no extra pass and HC4xx.
        writer: a SummaryWriter to log through (a trainer's) instead of one on `log_dir`.
        figure_every: draw the depth-profile figure (`health/depth_profile`) on the first sample and
            every N-th after; 0 never. Drawing costs ~0.25 s of CPU, far more than the rest of a
            sample, so it is not done on every one.
    """

    def __init__(self, model: nn.Module, log_dir: str | Path | None = None, every: int = 100, *,
                 include: Iterable[str] = ("*",), exclude: Iterable[str] = (), detail: str = "stage",
                 on_finding: str | Callable[[Finding, str], Any] = "warn", fail_on: str = "error",
                 snr_window: int | None = None, ranks: bool = True, coordinates: int | None = 4096,
                 config: Config | None = None, writer: Any = None, figure_every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, not {every}")
        if detail not in ("stage", "full"):
            raise ValueError(f"detail must be 'stage' or 'full', not {detail!r}")
        if not (callable(on_finding) or on_finding in ("warn", "raise", "ignore")):
            raise ValueError(f"on_finding must be 'warn', 'raise', 'ignore' or a callable, not {on_finding!r}")
        if fail_on not in SEVERITIES:
            raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
        if figure_every < 0:
            raise ValueError(f"figure_every must be ≥ 0, not {figure_every}")
        if snr_window is None:  # 4 steps, fewer when sampling more often, off at every step
            snr_window = min(4, every) if every > 1 else 0
        if snr_window == 1 or snr_window < 0 or snr_window > every:
            raise ValueError(f"snr_window must be 0 (off) or between 2 and every={every}, not {snr_window}")
        self.model = _unwrap(model)
        self.every, self.detail, self.on_finding, self.fail_on = every, detail, on_finding, fail_on
        self.snr_window, self.ranks, self.figure_every = snr_window, ranks, figure_every
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.config = config or Config(select=DEFAULT_SELECT)
        self.distributed, self.rank, self.world = _distributed()
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and self._watched(n)]
        if not self.params:
            raise ValueError("no parameter matches include/exclude; nothing to watch")
        if coordinates is not None and coordinates < 1:
            raise ValueError(f"coordinates must be ≥ 1 or None, not {coordinates}")
        generator = torch.Generator().manual_seed(0)
        self._coords = [
            None if coordinates is None or p.numel() <= coordinates
            else torch.randperm(p.numel(), generator=generator)[:coordinates].to(p.device)
            for _, p in self.params
        ]
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._writer = writer
        self._step = 0
        self._last_sample = -1
        self._active: dict[tuple[str, str], Finding] = {}
        self._nonfinite_loss: torch.Tensor | None = None
        self._session: Session | None = None
        self._observer: StatsObserver | None = None
        self._recording: Any = None
        self._snapshot: list[torch.Tensor] | None = None
        self._pending: dict[str, Any] = {}  # device values waiting for the next flush
        self._snr_sum: list[torch.Tensor] | None = None
        self._snr_sq: torch.Tensor | None = None
        self._snr_count = 0
        self._uses_after_step = False
        self._at_joins: bool | None = None  # profile at joins, or at layers: known after the first sample
        self._layout_written = False
        self.history: list[TrainingSample] = []  # every sample, for inspection and tests
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, always_call=True),
        ]

    # -- configuration helpers ---------------------------------------------------------------
    def _watched(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    @property
    def writer(self) -> Any:
        if self._writer is None and self.log_dir is not None and self.rank == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def _sampled(self, step: int) -> bool:
        return step % self.every == 0

    # -- the sampled forward -------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._session is not None or self._recording is not None or not self._sampled(self._step):
            return
        if not torch.is_grad_enabled():  # an evaluation forward: not the training step
            return
        # joins, or layers when the model has none; until the first sample has told, both
        self._observer = StatsObserver(at_joins=self._at_joins is not False, at_layers=self._at_joins is not True,
                                       ranks=self.ranks, dead_units=True)
        self._session = Session(self.model, self._observer)
        self._session.start((args, kwargs))

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._session is None:
            return
        session, self._session = self._session, None
        self._recording = session.stop(output)
        if self._observer is not None and self._observer.at_layers:
            self._observer.measure_output(self._recording.graph, output)

    # -- the training loop API -------------------------------------------------------------------
    def step(self, loss: torch.Tensor | None = None) -> list[tuple[Finding, str]]:
        """Call once per training step, after `loss.backward()`. Returns (finding, "appeared" |
        "cleared") for what changed on this step (only on sampled steps; empty otherwise)."""
        step = self._step
        if loss is not None:
            flag = ~torch.isfinite(loss.detach()).all()
            self._nonfinite_loss = flag if self._nonfinite_loss is None else self._nonfinite_loss | flag
        if self._snapshot is not None and not self._uses_after_step:
            self._measure_update()  # the optimizer stepped since the sampled step
        if self._snr_sum is not None:
            self._accumulate_snr()
        events: list[tuple[Finding, str]] = []
        if self._sampled(step):
            self._sample_gradients(loss)
            if self.snr_window:
                self._snr_sum, self._snr_sq, self._snr_count = None, None, 0
                self._accumulate_snr()
            if not self._uses_after_step:
                events = self._flush(step)
        self._step += 1
        return events

    def after_optimizer_step(self) -> list[tuple[Finding, str]]:
        """Optional: call after `optimizer.step()` to measure this step's update ratio."""
        first_call, self._uses_after_step = not self._uses_after_step, True
        if self._snapshot is None:
            return []
        self._measure_update()
        if first_call:  # step() already flushed this sample: add the ratios to it
            self._flush_update(self._step - 1)
            return []
        return self._flush(self._step - 1)

    def _flush_update(self, step: int) -> None:
        names, ratio, valid = self._pending.pop("update")
        values = {n: r for n, r, ok in zip(names, ratio.cpu().tolist(), valid.cpu().tolist()) if ok}
        if self.history and self.history[-1].step == step:
            self.history[-1].update_ratio = values
        self._write_groups("update_ratio", values, statistics.median, step)

    def __enter__(self) -> HealthMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._writer is not None:
            self._writer.flush()
            if self.log_dir is not None:
                self._writer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "active": [list(k) for k in self._active]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self._active = {tuple(k): None for k in state.get("active", [])}  # type: ignore[misc]

    # -- measurements on device ----------------------------------------------------------------
    def _grads(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(n, p, p.grad) for n, p in self.params if p.grad is not None]

    def _sample_gradients(self, loss: torch.Tensor | None) -> None:
        grads = self._grads()
        if grads:
            g = torch.stack(torch._foreach_norm([gr.detach().float() for _, _, gr in grads]))
            w = torch.stack(torch._foreach_norm([p.detach().float() for _, p, _ in grads]))
            self._pending["grad"] = ([n for n, _, _ in grads], g, w)
            self._pending["nonfinite_grad"] = ~torch.isfinite(g).all()
            self._pending["nonfinite_weight"] = ~torch.isfinite(w).all()
        self._snapshot = [t.clone() for t in self._subset(p.detach() for _, p in self.params)]
        if loss is not None:
            self._pending["loss"] = loss.detach().float().reshape(())

    def _subset(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The sampled coordinates of each watched tensor (all of them for small tensors)."""
        return [t.reshape(-1) if idx is None else t.reshape(-1).index_select(0, idx)
                for t, idx in zip(tensors, self._coords)]

    def _measure_update(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        current = self._subset(p.detach() for _, p in self.params)
        deltas = torch._foreach_sub(current, snapshot)
        delta = torch.stack(torch._foreach_norm(deltas))
        base = torch.stack(torch._foreach_norm(snapshot))
        self._pending["update"] = ([n for n, _ in self.params], delta / base.clamp(min=1e-30), base > 0)

    def _accumulate_snr(self) -> None:
        grads = [p.grad for _, p in self.params]
        if any(g is None for g in grads):
            self._snr_sum = None
            return
        grads = [g.float() for g in self._subset(g.detach() for g in grads)]
        norms = torch.stack(torch._foreach_norm(grads)).pow(2)
        if self._snr_sum is None:
            self._snr_sum, self._snr_sq, self._snr_count = [g.clone() for g in grads], norms, 1
        else:
            torch._foreach_add_(self._snr_sum, grads)
            self._snr_sq = self._snr_sq + norms
            self._snr_count += 1
        if self._snr_count == self.snr_window:
            k = self._snr_count
            mean_sq = torch.stack(torch._foreach_norm(self._snr_sum)).pow(2) / k**2
            variance = (self._snr_sq / k - mean_sq) * k / (k - 1)
            self._pending["snr"] = ([n for n, _ in self.params], mean_sq / variance.clamp(min=1e-30))
            self._snr_sum, self._snr_sq, self._snr_count = None, None, 0

    # -- one host transfer per sampled step ------------------------------------------------------
    def _flush(self, step: int) -> list[tuple[Finding, str]]:
        recording, observer = self._recording, self._observer
        self._recording, self._observer = None, None
        pending, self._pending = self._pending, {}
        joins = find_joins(recording.graph) if recording is not None else []
        if recording is not None and self._at_joins is None:
            self._at_joins = bool(joins)
        at_joins = bool(self._at_joins)
        if at_joins:
            nodes = [j.node for j in joins]
        else:
            nodes = sorted(observer.layer_points) if observer is not None else []

        # values to average over ranks, values to max over ranks
        mean_keys: list[Any] = []
        mean_values: list[torch.Tensor] = []
        device = self.params[0][1].device

        def add(key: Any, value: torch.Tensor) -> None:
            mean_keys.append(key)
            mean_values.append(value.detach().float().reshape(()).to(device))

        if observer is not None:
            for n in nodes:
                for name, value in observer.values.get(n, {}).items():
                    add((n, name), value)
                if n in observer.grads:
                    add((n, "grad_sq"), observer.grads[n])
            for n, value in observer.operand_moments.items():
                add((n, "operand"), value)
        if "loss" in pending:
            add("loss", pending["loss"])
        max_parts = [torch.stack([
            (self._nonfinite_loss if self._nonfinite_loss is not None else torch.zeros((), dtype=torch.bool)).to(device).float(),
            pending.get("nonfinite_grad", torch.zeros((), dtype=torch.bool, device=device)).float(),
            pending.get("nonfinite_weight", torch.zeros((), dtype=torch.bool, device=device)).float(),
        ])]
        active_keys = list(observer.active) if observer is not None else []
        max_parts += [observer.active[k].float().to(device) for k in active_keys]
        flat_mean = torch.stack(mean_values) if mean_values else torch.zeros(0, device=device)
        flat_max = torch.cat([t.reshape(-1) for t in max_parts])
        if self.distributed:
            torch.distributed.all_reduce(flat_mean)
            flat_mean /= self.world
            torch.distributed.all_reduce(flat_max, op=torch.distributed.ReduceOp.MAX)
        host_mean = dict(zip(mean_keys, flat_mean.cpu().tolist()))  # the one host sync of this step
        host_max = flat_max.cpu().tolist()
        other = {k: (v[0], v[1].cpu().tolist(), *[x.cpu().tolist() for x in v[2:]]) for k, v in pending.items()
                 if k in ("grad", "update", "snr")}
        self._nonfinite_loss = None

        sample = TrainingSample(step=step, previous_step=self._last_sample, measurements=None)
        self._last_sample = step
        sample.loss = host_mean.get("loss")
        sample.nonfinite = [name for name, flag in zip(("loss", "gradients", "weights"), host_max[:3]) if flag > 0]
        offset = 3
        if observer is not None and recording is not None:
            for k in active_keys:
                size = observer.active[k].numel()
                alive = host_max[offset:offset + size]
                offset += size
                node = recording.graph.nodes[k]
                name = f"{node.module or '(root)'}:{node.op}#{k}"
                sample.dead_fraction[name] = 1 - sum(1 for a in alive if a > 0) / max(size, 1)
            points = profile_points(recording.graph, joins if at_joins else [], nodes, host_mean,
                                    grad_scale=1 / self.world, ranks=self.world)
            sample.measurements = Measurements(tuple(points), None, float("nan"), "join" if at_joins else "layer")
        if "grad" in other:
            names, g, w = other["grad"]
            sample.grad_norm, sample.weight_norm = dict(zip(names, g)), dict(zip(names, w))
        if "update" in other:
            names, ratio, valid = other["update"]
            sample.update_ratio = {n: r for n, r, ok in zip(names, ratio, valid) if ok}
        if "snr" in other:
            names, snr = other["snr"]
            sample.grad_snr = {n: s for n, s in zip(names, snr) if math.isfinite(s)}
        self.history.append(sample)

        architecture = architecture_of(self.model, TraceResult(recording.graph, "hooks")) if recording else None
        findings = []
        if architecture is not None or sample.nonfinite:
            context = RuleContext(architecture or _EMPTY, sample.measurements, sample)
            findings = run_rules(context, self.config.select, self.config.ignore, self.config.rule_options)
            findings = [f for f in findings if not ignored_at_source(f)]  # `# healthcheck: ignore[...]`
        events = self._events(findings)
        self._log(sample, findings, events)
        self._act(events, step)
        return events

    # -- findings: appear once, clear once -------------------------------------------------------
    def _events(self, findings: list[Finding]) -> list[tuple[Finding, str]]:
        current = {(f.code, f.location.module): f for f in findings}
        events = [(f, "appeared") for key, f in current.items() if key not in self._active]
        events += [(f, "cleared") for key, f in self._active.items() if key not in current and f is not None]
        self._active = current
        return events

    def _act(self, events: list[tuple[Finding, str]], step: int) -> None:
        if not events or self.on_finding == "ignore":
            return
        if callable(self.on_finding):
            for finding, event in events:
                self.on_finding(finding, event)
            return
        if self.on_finding == "raise":
            level = SEVERITIES.index(self.fail_on)
            bad = [f for f, e in events if e == "appeared" and SEVERITIES.index(f.severity) <= level]
            if bad:
                raise HealthError(bad)
        if self.rank == 0:
            for finding, event in events:
                warnings.warn(f"step {step}: {finding.code} {event}: {finding.message}", HealthWarning,
                              stacklevel=4)

    # -- TensorBoard -------------------------------------------------------------------------------
    def _group(self, name: str, activation: bool = False) -> str:
        """The tag group of a parameter ('layer1.0.conv1.weight') or activation ('layer1.0:relu#12')."""
        if self.detail == "full":
            return name
        module = name.split(":")[0] if activation else name.rpartition(".")[0]
        return stage_of(module)

    def _log(self, sample: TrainingSample, findings: list[Finding], events: list[tuple[Finding, str]]) -> None:
        writer = self.writer
        if writer is None:
            return
        step = sample.step
        if sample.loss is not None:
            writer.add_scalar("health/loss", sample.loss, step)
        writer.add_scalar("health/nonfinite", float(bool(sample.nonfinite)), step)
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
            self._write_groups(attribute, getattr(sample, attribute), reduce, step)
        for severity in SEVERITIES:
            writer.add_scalar(f"health/findings/{severity}", sum(f.severity == severity for f in findings), step)
        if events:
            lines = [f"- **{event}** {f.severity} {f.code}: {f.message} ({f.location.module})" for f, event in events]
            writer.add_text("health/findings", "\n".join(lines), step)
        self._write_layout(writer)
        if self.figure_every and (len(self.history) - 1) % self.figure_every == 0:
            self._write_profile_figure(writer, sample)
        writer.flush()

    def _write_groups(self, attribute: str, values: dict[str, float], reduce: Callable[[list[float]], float],
                      step: int) -> None:
        """Per-tensor (or per-layer) values as one scalar per group (stage, or each name with detail="full")."""
        writer = self.writer
        if writer is None:
            return
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
                       "loss": ["Multiline", [r"health/loss"]]},
        }
        writer.add_custom_scalars(charts)

    def _write_profile_figure(self, writer: Any, sample: TrainingSample) -> None:
        try:  # matplotlib's object API: no pyplot state, no backend switch in the user's process
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.ticker import NullFormatter
        except ImportError:
            return
        samples = [s for s in self.history if s.measurements is not None and s.measurements.profile][-8:]
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
        writer.add_figure("health/depth_profile", figure, sample.step, close=False)


def _root_sum_square(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


@dataclass(frozen=True)
class _NoArchitecture:
    joins: tuple = ()
    plain_depth: int = 0
    plain_end: str = ""
    has_norm: bool = False


_EMPTY = _NoArchitecture()
