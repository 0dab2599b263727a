"""`HealthMonitor`: the training loop's API. It decides which steps are sampled and puts the jobs
together: sampling (`sampling`), cross-rank reduction and the host copy (`reduction`), rules and
findings (`findings`), TensorBoard (`healthcheck.report.tensorboard.TrainingLog`)."""

from __future__ import annotations

import atexit
import math
import numbers
import statistics
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthcheck.config import Config
from healthcheck.graph.joins import find_joins
from healthcheck.graph.recorder import Recording
from healthcheck.monitor.findings import FindingTracker
from healthcheck.monitor.reduction import ANY, LOCAL, MEAN, Entry, distributed, norms, ratios, signal_to_noise, to_host
from healthcheck.monitor.samples import DEFAULT_SELECT, HealthWarning, LossPoint, TrainingSample
from healthcheck.monitor.sampling import ForwardRecorder, GradientStats, LossScale, ParameterSet, unwrap
from healthcheck.probes.measure import Measurements, profile_points
from healthcheck.probes.observer import StatsObserver
from healthcheck.records import Finding
from healthcheck.report.tensorboard import TrainingLog
from healthcheck.rules.training import matrix_update_ratio

#: points of the loss trend (HC405) kept; beyond, the older half is thinned to every other point
LOSS_TREND_POINTS = 512


class HealthMonitor:
    """Watch signal propagation during training and log it to TensorBoard (see the package docs).

    Args:
        model: the model (DDP/FSDP and torch.compile wrappers are looked through).
        log_dir: TensorBoard directory (rank 0 writes; it must be writable, checked here); None logs
            nothing but still evaluates rules.
        every: sample every N optimizer steps (the first step is sampled).
        include / exclude: glob patterns on parameter names (and module paths for activations) to watch.
        detail: "stage" aggregates tags per stage (layer1, encoder.layer, …); "full" logs every tensor.
        on_finding: "warn", "raise", "ignore", or a callable `f(finding, event)` with event
            "appeared" / "cleared".
        fail_on: severity that "raise" raises at (default "error").
        snr_window: consecutive optimizer steps whose gradients estimate the gradient SNR (0 turns it
            off; default 4, or `every` when smaller, off when every=1).
        ranks: compute effective ranks on sampled steps.
        coordinates: the update ratio and gradient SNR of a tensor are estimated on this many of its
            coordinates (a fixed random subset; relative error ≈ 1/√n, 1.6% at 4096), so that the
            monitor never copies whole parameter tensors. None uses every coordinate.
        config: thresholds and select/ignore (`[tool.healthcheck]`); by default the HC2xx/HC3xx rules
            that need no extra pass and HC4xx.
        writer: a SummaryWriter to log through (a trainer's) instead of one on `log_dir`.
        figure_every: draw the depth-profile figure (`health/depth_profile`) on the first sample and
            every N-th after; 0 never (a figure costs ~0.25 s of CPU).
        scaler: the `torch.amp.GradScaler` of a mixed-precision loop. Gradient norms are then logged
            unscaled, a step whose gradients overflowed (the scaler skips it) is not a NaN finding,
            and the scale is logged (`health/loss_scale`); a scale that keeps falling is HC401.
        accumulation: micro-batches per optimizer step when `step()` is called after every
            micro-batch's backward (gradient accumulation); steps, sampling and update ratios then
            count optimizer steps. Calling `step()` once per optimizer step needs no argument.
        history_size: samples kept in `history` (the latest; None keeps all).
    """

    def __init__(self, model: nn.Module, log_dir: str | Path | None = None, every: int = 100, *,
                 include: Iterable[str] = ("*",), exclude: Iterable[str] = (), detail: str = "stage",
                 on_finding: str | Callable[[Finding, str], Any] = "warn", fail_on: str = "error",
                 snr_window: int | None = None, ranks: bool = True, coordinates: int | None = 4096,
                 config: Config | None = None, writer: Any = None, figure_every: int = 10,
                 scaler: Any = None, accumulation: int = 1, history_size: int | None = 100) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer ≥ 1, not {every!r}")
        if snr_window is None:  # 4 steps, fewer when sampling more often, off at every step
            snr_window = min(4, every) if every > 1 else 0
        if snr_window == 1 or snr_window < 0 or snr_window > every:
            raise ValueError(f"snr_window must be 0 (off) or between 2 and every={every}, not {snr_window}")
        if not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation must be an integer ≥ 1 (micro-batches per optimizer step), "
                             f"not {accumulation!r}")
        if history_size is not None and (not isinstance(history_size, int) or history_size < 1):
            raise ValueError(f"history_size must be an integer ≥ 1 or None, not {history_size!r}")
        if isinstance(include, str) or isinstance(exclude, str):
            raise ValueError("include and exclude are lists of patterns, not one string")
        self.model = unwrap(model)
        self.every, self.snr_window, self.accumulation = every, snr_window, accumulation
        self.config = config or Config(select=DEFAULT_SELECT)
        self.distributed, self.rank, self.world = distributed()
        self.parameters = ParameterSet(self.model, include, exclude, coordinates)
        self.findings = FindingTracker(self.config, on_finding, fail_on, self.rank)
        self.log = TrainingLog(log_dir, writer, detail, figure_every, write=self.rank == 0)
        self.gradients = GradientStats(snr_window, LossScale(scaler))
        self.recorder = ForwardRecorder(self.model, ranks)  # last: hooks only once nothing can fail
        self.history: deque[TrainingSample] = deque(maxlen=history_size)
        self._step = 0  # optimizer steps seen
        self._micro = 0  # micro-batches seen of the current optimizer step
        self._last_sample = -1
        self._nonfinite_loss: torch.Tensor | None = None  # device flag, read at the next host copy
        self._nonfinite_host = False  # the same for losses given as Python numbers
        self._unflushed: int | None = None  # a sampled step waiting for after_optimizer_step()
        self._uses_after_step = False
        self._scale_falls, self._last_scale = 0, None
        self._loss_trend: list[LossPoint] = []  # the sampled losses so far (HC405)
        self._warned: set[str] = set()
        self._closed = False
        self.recorder.armed = self._sampled(0)
        # a run that ends without close() (a script that returns, an exception the loop does not
        # catch) still reports a NaN/Inf seen since the last sample: at interpreter exit, as a warning
        self._exit_hook = _close_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)

    # -- read-only views kept from the single-module monitor -------------------------------------
    on_finding = property(lambda self: self.findings.on_finding)
    fail_on = property(lambda self: self.findings.fail_on)
    detail = property(lambda self: self.log.detail)
    log_dir = property(lambda self: self.log.log_dir)
    writer = property(lambda self: self.log.writer)

    @property
    def params(self) -> list[tuple[str, torch.Tensor]]:
        """The watched parameters now (resolved again on every sample)."""
        watched = self.parameters.resolve()
        return list(zip(watched.names, watched.params))

    def _sampled(self, step: int) -> bool:
        return step % self.every == 0

    # -- the training loop API -------------------------------------------------------------------
    # torch.compiler.disable: a training step compiled as a whole runs these eagerly (one graph
    # break at the call) instead of tracing the monitor's bookkeeping and recompiling on its counter
    @torch.compiler.disable
    def step(self, loss: torch.Tensor | float | None = None) -> list[tuple[Finding, str]]:
        """Call after `loss.backward()`: once per training step, or after every micro-batch with
        `accumulation=k`. `loss` may be a tensor (a scalar, or per-sample losses: their mean is
        logged), a Python number (`loss.item()`) or None. Returns (finding, "appeared" |
        "cleared") for what changed (only on sampled steps; empty otherwise)."""
        loss_value = self._watch_loss(loss)
        events: list[tuple[Finding, str]] = []
        if self._unflushed is not None:  # after_optimizer_step() did not come after the last sample
            step, self._unflushed = self._unflushed, None
            self.gradients.measure_update()
            events += self._flush(step)
        elif self.gradients.has_snapshot and not self._uses_after_step:
            self.gradients.measure_update()  # the optimizer stepped since the sampled step
        if self._micro < self.accumulation - 1:
            self._micro += 1
            return events
        step = self._step  # the last micro-batch: the optimizer steps next
        self._step, self._micro = step + 1, 0  # counted before anything can raise (on_finding="raise")
        self.recorder.armed = self._sampled(self._step)
        self.gradients.accumulate_snr()
        if self._sampled(step):
            self.gradients.sample(self.parameters.resolve(), loss_value)
            if self._uses_after_step:
                self._unflushed = step
            else:
                events += self._flush(step)
        return events

    @torch.compiler.disable
    def after_optimizer_step(self) -> list[tuple[Finding, str]]:
        """Optional: call after `optimizer.step()` to measure this step's update ratio."""
        first_call, self._uses_after_step = not self._uses_after_step, True
        if not self.gradients.has_snapshot:
            return []
        self.gradients.measure_update()
        if self._unflushed is not None:
            step, self._unflushed = self._unflushed, None
            return self._flush(step)
        if first_call:  # step() already flushed this sample: add the ratios to it
            return self._flush_update(self._last_sample)
        return []

    def __enter__(self) -> HealthMonitor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._close(may_raise=exc_type is None)

    def close(self) -> None:
        """Write what is still pending (a sample waiting for after_optimizer_step(), a NaN/Inf seen
        since the last sample in the loss, or now in the weights or gradients: HC401 is raised or
        warned here as on a sampled step), remove the hooks, flush the writer. Under
        torch.distributed this does no collective: each rank reports what it saw itself. A monitor
        still open when the interpreter exits is closed then (reporting by warning)."""
        self._close(may_raise=True)

    def _close(self, may_raise: bool) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        try:
            last_step = self._step - 1 if self._micro == 0 else self._step
            if self._step == 0 and self._micro == 0:
                return  # no training step was seen
            # the end of the run: one look at the weights (and, without a GradScaler whose skipped
            # steps leave Inf there by design, the gradients), so that a NaN that reached them after
            # the last sample is not lost when the loss no longer shows it (the loop stopped, or
            # step() got no loss)
            self.gradients.pending.update(self.gradients.final_flags(self.parameters.resolve()))
            if self._unflushed is not None:
                step, self._unflushed = self._unflushed, None
                self.gradients.drop_snapshot()  # whether the optimizer stepped is unknown
                self._flush(step, collective=False, may_raise=may_raise)
            else:
                self._flush(max(last_step, 0), collective=False, may_raise=may_raise, only_if_nonfinite=True)
        finally:
            self.recorder.close()
            self.log.close()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "active": [list(k) for k in self.findings.active]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: {"step": int ≥ 0, "active": [[code, module], …] (optional)}."""
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"monitor state must be a dict with an integer 'step' (from state_dict()), "
                             f"not {_describe(state)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"monitor state 'step' must be an integer ≥ 0, not {step!r}")
        active = state.get("active", [])
        if not isinstance(active, (list, tuple)) or not all(
                isinstance(k, (list, tuple)) and len(k) == 2 and all(isinstance(x, str) for x in k) for k in active):
            raise ValueError("monitor state 'active' must be a list of [code, module] string pairs")
        self._step, self._micro = int(step), 0
        self.findings.active = {(k[0], k[1]): None for k in active}
        self.recorder.armed = self._sampled(self._step)

    # -- input ---------------------------------------------------------------------------------
    def _watch_loss(self, loss: Any) -> torch.Tensor | None:
        """The device-side NaN/Inf flag of every step's loss (no host sync); the loss to log."""
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            if loss.numel() == 0:
                return None
            detached = loss.detach()
            flag = ~torch.isfinite(detached).all()
            self._nonfinite_loss = flag if self._nonfinite_loss is None else self._nonfinite_loss | flag
            return detached.float().mean() if detached.numel() > 1 else detached.float().reshape(())
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            value = float(loss)
            self._nonfinite_host |= not math.isfinite(value)
            return torch.tensor(value)
        raise TypeError(f"HealthMonitor.step(loss): loss must be a tensor, a number or None, "
                        f"not {type(loss).__name__}")

    # -- one host copy per sampled step -----------------------------------------------------------
    def _flush(self, step: int, collective: bool = True, may_raise: bool = True,
               only_if_nonfinite: bool = False) -> list[tuple[Finding, str]]:
        recording, observer = self.recorder.take()
        pending = self.gradients.take()
        try:
            joins = find_joins(recording.graph) if recording is not None else []
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self._warn_once("joins", f"healthcheck: the joins of the forward at step {step} could not be read: {exc}")
            joins = []
        if recording is not None and self.recorder.at_joins is None:
            self.recorder.at_joins = bool(joins)
        at_joins = bool(self.recorder.at_joins)
        nodes = [j.node for j in joins] if at_joins else sorted(observer.layer_points) if observer else []
        device = next((p.device for p in self.parameters.model.parameters()), torch.device("cpu"))
        entries, keys = self._entries(recording, observer, nodes, pending, device)
        host = to_host(entries, device, collective=collective and self.distributed)
        self._nonfinite_loss, nonfinite_host = None, self._nonfinite_host
        self._nonfinite_host = False

        sample = TrainingSample(step=step, previous_step=self._last_sample, measurements=None)
        flags = {where: host[("nonfinite", where)][0] > 0 for where in ("loss", "gradients", "weights")}
        flags["loss"] |= nonfinite_host
        if "scale" in pending:
            sample.loss_scale = host["scale"][0]
            sample.skipped_step = flags["gradients"]  # the scaler skips it: by design, not a NaN
            flags["gradients"] = False
            self._track_scale(sample)
        sample.nonfinite = [where for where, flag in flags.items() if flag]
        if only_if_nonfinite and not sample.nonfinite:
            return []
        self._last_sample = step
        sample.loss = host["loss"][0] if "loss" in host else None
        if recording is not None and observer is not None:
            try:
                self._measure_forward(sample, recording, observer, joins if at_joins else [], nodes, keys, host,
                                     at_joins)
            except Exception as exc:  # noqa: BLE001 - a probe that cannot be read must not stop training
                self._warn_once("profile", f"healthcheck: the activations of step {step} could not be read and "
                                f"are left out: {type(exc).__name__}: {exc}")
        if "grad" in pending and not sample.skipped_step:
            names, g, w = pending["grad"]  # reduced over shards (FSDP2) and ranks
            sample.grad_norm = norms(names, g, host, "grad_norm")
            sample.weight_norm = {n: v for n, v in norms(names, w, host, "weight_norm").items() if n in sample.grad_norm}
        if "update" in pending:
            sample.update_ratio = self._update_ratios(pending["update"], host)
        sample.tensor_ndim = {name: p.ndim for name, p in self.parameters.model.named_parameters()}
        if "snr" in pending:
            sample.grad_snr = signal_to_noise(*pending["snr"], host)
        self._add_to_trend(sample)
        self.history.append(sample)
        try:
            findings = self.findings.evaluate(self.model, recording, sample)
        except Exception as exc:  # noqa: BLE001 - a rule that fails must not stop training
            self._warn_once("rules", f"healthcheck: the monitor's rules failed at step {step} and were skipped: {exc}")
            findings = []
        events = self.findings.events(findings)
        self.log.write(sample, findings, events, list(self.history)[-8:])
        self.findings.act(events, step, may_raise=may_raise)
        return events

    def _measure_forward(self, sample: TrainingSample, recording: Recording, observer: StatsObserver,
                         joins: list, nodes: list[int], keys: dict[int, str],
                         host: dict[Hashable, list[float]], at_joins: bool) -> None:
        """The depth profile and dead units of the recorded forward, from the host values."""
        for index in observer.active:
            alive = host.get(("active", keys[index]))
            if alive is None:
                continue
            node = recording.graph.nodes[index]
            sample.dead_fraction[f"{node.module or '(root)'}:{node.op}#{index}"] = \
                1 - sum(1 for a in alive if a > 0) / max(len(alive), 1)
        # every statistic the observer recorded at a point (profile_points reads what it knows, so a new
        # statistic — such as the rank's sampling band — reaches the monitor's points without a list here)
        index_of = {key: index for index, key in keys.items()}
        values = {(index_of[key[0]], key[1]): value[0] for key, value in host.items()
                  if isinstance(key, tuple) and len(key) == 2 and key[0] in index_of}
        points = profile_points(recording.graph, joins, nodes, values,
                                grad_scale=1 / self.world, ranks=self.world)
        sample.measurements = Measurements(tuple(points), None, float("nan"), "join" if at_joins else "layer")

    def _entries(self, recording: Recording | None, observer: StatsObserver | None, nodes: list[int],
                 pending: dict[str, Any], device: torch.device) -> tuple[list[Entry], dict[int, str]]:
        """The sample's device values with rank-independent keys: a node is named by its module,
        op and occurrence there, not by its index (which shifts when ranks run different layers)."""
        keys: dict[int, str] = {}
        if recording is not None:
            graph_nodes = recording.graph.nodes
            seen: dict[str, int] = {}
            for node in graph_nodes:
                # the submodules its inputs come from tell apart `x = x + block_k(x)` joins issued
                # from one module, whichever blocks a rank skipped (inputs from outside the node's
                # module, which depend on what ran before, are left out)
                inside = [graph_nodes[i].module for i in node.inputs if _below(graph_nodes[i].module, node.module)]
                signature = f"{node.module}:{node.op}:{','.join(inside)}"
                keys[node.index] = f"{signature}:{seen.get(signature, 0)}"
                seen[signature] = seen.get(signature, 0) + 1
        entries: list[Entry] = []
        false = torch.zeros((), device=device)
        if observer is not None and recording is not None:
            for n in nodes:
                for name, value in observer.values.get(n, {}).items():
                    entries.append(Entry((keys[n], name), value, MEAN))
                if n in observer.grads:
                    entries.append(Entry((keys[n], "grad_sq"), observer.grads[n], MEAN))
            for n, value in observer.operand_moments.items():
                entries.append(Entry((keys[n], "operand"), value, MEAN))
            for n, alive in observer.active.items():
                entries.append(Entry(("active", keys[n]), alive, ANY))
        if "loss" in pending:
            entries.append(Entry("loss", pending["loss"], MEAN))
        loss_flag = self._nonfinite_loss if self._nonfinite_loss is not None else false
        entries += [Entry(("nonfinite", "loss"), loss_flag, ANY),
                    Entry(("nonfinite", "gradients"), pending.get("nonfinite_grad", false), ANY),
                    Entry(("nonfinite", "weights"), pending.get("nonfinite_weight", false), ANY)]
        if "grad" in pending:
            _, g, w = pending["grad"]
            entries += g.entries("grad_norm") + w.entries("weight_norm")
        if "update" in pending:
            _, delta, base = pending["update"]
            entries += delta.entries("update_delta") + base.entries("update_base")
        if "snr" in pending:
            _, mean, second, _ = pending["snr"]
            entries += mean.entries("snr_mean") + second.entries("snr_second")
        if "scale" in pending:
            entries.append(Entry("scale", pending["scale"], LOCAL))
        return entries, keys

    def _update_ratios(self, update: tuple, host: dict[Hashable, list[float]]) -> dict[str, float]:
        measured, unchanged = ratios(*update, host)
        if unchanged and self.gradients.loss_scale.scaler is None:
            self._warn_once("unchanged", "healthcheck: no watched parameter changed between the sampled step and "
                            "the next step() call, so update ratios are not measured; with gradient accumulation "
                            "pass accumulation=<micro-batches per optimizer step>, or call after_optimizer_step()")
        return measured

    def _flush_update(self, step: int) -> list[tuple[Finding, str]]:
        """The update ratios of a sample that step() already flushed (the first after_optimizer_step()),
        and the rule that reads them (HC403): the first step's update is the first sign of a learning
        rate that is far too high."""
        update = self.gradients.pending.pop("update")
        entries = update[1].entries("update_delta") + update[2].entries("update_base")
        # every rank calls this at the same step: reduced like a sample (shards of FSDP2 parameters)
        values = self._update_ratios(update, to_host(entries, update[1].squares.device,
                                                     collective=self.distributed))
        events: list[tuple[Finding, str]] = []
        if self.history and self.history[-1].step == step:
            sample = self.history[-1]
            sample.update_ratio = values
            if self._loss_trend and self._loss_trend[-1].step == step:
                self._loss_trend[-1].update_ratio = matrix_update_ratio(sample)
            try:
                events = self.findings.late(sample, ("HC403",))
            except Exception as exc:  # noqa: BLE001 - a rule that fails must not stop training
                self._warn_once("rules", f"healthcheck: the monitor's rules failed at step {step} and were skipped: {exc}")
        self.log.write_groups("update_ratio", values, statistics.median, step)
        self.findings.act(events, step)
        return events

    def _add_to_trend(self, sample: TrainingSample) -> None:
        """The sample's finite loss (and update size) onto the run's loss trend, which HC405 reads; a
        long run keeps the first point, the latest ones and a thinned history between."""
        if sample.loss is not None and math.isfinite(sample.loss) and not sample.nonfinite:
            self._loss_trend.append(LossPoint(sample.step, sample.loss, matrix_update_ratio(sample)))
            if len(self._loss_trend) > LOSS_TREND_POINTS:
                half = LOSS_TREND_POINTS // 2
                older = self._loss_trend[1:half]
                self._loss_trend[:half] = [self._loss_trend[0], *older[1::2]]
        sample.loss_trend = self._loss_trend

    def _track_scale(self, sample: TrainingSample) -> None:
        if self._last_scale is not None and sample.loss_scale is not None:
            self._scale_falls = self._scale_falls + 1 if sample.loss_scale < self._last_scale else 0
        self._last_scale = sample.loss_scale
        sample.loss_scale_falls = self._scale_falls

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and self.rank == 0:
            self._warned.add(key)
            warnings.warn(message, HealthWarning, stacklevel=4)


def _close_at_exit(monitor: weakref.ref[HealthMonitor]) -> Callable[[], None]:
    def close() -> None:
        alive = monitor()
        if alive is not None:
            try:
                alive._close(may_raise=False)
            except Exception as exc:  # noqa: BLE001 - nothing may fail at interpreter exit
                warnings.warn(f"healthcheck: the monitor could not be closed at exit: {exc}", HealthWarning,
                              stacklevel=1)
    return close


def _below(module: str, parent: str) -> bool:
    """`module` is a strict submodule of `parent` ("" is the root)."""
    return module != parent and (parent == "" or module.startswith(parent + "."))


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}" if value else "an empty dict"
    return type(value).__name__
