"""`check(model, example_inputs) -> Report`: the one entry point the CLI, plugins and users call."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthcheck.config import Config
from healthcheck.errors import UsageError, describe
from healthcheck.graph.architecture import analyze
from healthcheck.graph.taxonomy import is_user_frame
from healthcheck.graph.tracers import TRACE_METHODS
from healthcheck.guard import copy_inputs, preserved
from healthcheck.loading import as_call_args, expected_input
from healthcheck.probes import ProbeOptions, measure
from healthcheck.records import SEVERITIES, ModelInfo, Report
from healthcheck.rules import RuleContext, run_rules
from healthcheck.rules.registry import evaluated
from healthcheck.suppression import load_baseline, suppress
from healthcheck.tensors import forward_kwargs, tensors_of, to_device


def _shapes(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors_of((args, kwargs)))


def validate_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any], where: str = "") -> None:
    """Run the model once; turn a failure or a non-finite output into one clear UsageError."""
    shapes = " and ".join(str(list(s)) for s in _shapes(args, kwargs)) or "no tensors"
    try:
        with torch.no_grad():
            output = model(*args, **forward_kwargs(model, kwargs))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises is the user's to see
        raise UsageError(f"{where}the model's forward raised {describe(exc)} — on example input of shape "
                         f"{shapes} ({expected_input(model)})") from exc
    outputs = [t for t in tensors_of(output) if t.is_floating_point()]
    if not outputs:
        raise UsageError(f"{where}the model's forward returned no floating-point tensor")
    if not all(bool(torch.isfinite(t).all()) for t in outputs):
        raise UsageError(f"{where}the model's output contains NaN or Inf at initialization on example input "
                         f"of shape {shapes}")


def check(model: nn.Module, example_inputs: Any, *, config: Config | None = None, name: str | None = None,
          probes: bool = True, loss_fn: Any = None, baseline: str | Path | dict | None = None,
          source: str | None = None, **overrides: Any) -> Report:
    """Analyze `model` on `example_inputs` and apply the rules.

    `example_inputs`: a tensor, a tuple of positional inputs, a dict of keyword inputs, or
    `(args, kwargs)`. Options (`fail_on`, `select`, `ignore`, `rule_options`, `trace`, `seed`)
    override `config`. `probes=False` skips the measurements (structure only); `loss_fn(output)`
    replaces the default random projection of the output for the gradient probes. Findings whose
    source line says `# healthcheck: ignore[CODE]`, and those known to `baseline` (a saved JSON
    report), move to `report.suppressed` (see healthcheck.suppression). `source`: "file:line" where
    the model is defined (default: its class). The model, its buffers, modes, grads, hooks and the
    global RNG are left exactly as they were.
    """
    config = (config or Config()).override(**overrides)
    args, kwargs = as_call_args(example_inputs)
    if config.trace not in ("auto", *TRACE_METHODS):
        raise UsageError(f"trace must be auto, {', '.join(TRACE_METHODS)}; not {config.trace!r}")
    methods = TRACE_METHODS if config.trace == "auto" else (config.trace,)
    start = time.perf_counter()
    with preserved(model):
        model.eval()
        forward_start = time.perf_counter()
        # every phase runs on its own copy of the inputs: an in-place op on the input inside forward
        # never reaches the caller's tensors, nor the next phase
        validate_forward(model, *copy_inputs((args, kwargs)))
        cheap_forward = time.perf_counter() - forward_start < 0.1
        parameters = sum(p.numel() for p in model.parameters())  # here, where a lazy model is materialized
        try:
            architecture = analyze(model, *copy_inputs((args, kwargs)), methods, cheap_forward)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"could not trace the model ({', '.join(methods)}): {type(exc).__name__}: {exc}") from exc
        measurements = None
        if probes:
            options = ProbeOptions(seed=config.seed, loss_fn=loss_fn)
            try:
                measurements = measure(model, *copy_inputs((args, kwargs)), at_joins=bool(architecture.joins),
                                       options=options)
            except Exception as exc:  # noqa: BLE001
                raise UsageError(f"the probes could not run the model in train mode: {describe(exc)}") from exc
    context = RuleContext(architecture, measurements)
    findings = run_rules(context, config.select, config.ignore, config.rule_options)
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), f.code))
    info = ModelInfo(
        name=name or type(model).__name__,
        parameters=parameters,
        trace=architecture.trace,
        trace_failures=dict(architecture.trace_failures),
        input_shapes=_shapes(args, kwargs),
        source=source or class_source(model),
    )
    if isinstance(baseline, (str, Path)):
        baseline = load_baseline(baseline)
    report = Report(info, architecture, findings, measurements=measurements, seconds=time.perf_counter() - start,
                    rules=evaluated(context, config.select, config.ignore))
    return suppress(report, baseline)


def class_source(model: nn.Module) -> str | None:
    """'file:line' of the model's class when it is model code (not a torch container such as Sequential)."""
    try:
        path = inspect.getsourcefile(type(model))
        line = inspect.getsourcelines(type(model))[1]
    except (OSError, TypeError):
        return None
    return f"{path}:{line}" if path and is_user_frame(path) else None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: CUDA is not available on this machine")
    return resolved


def load_file(spec: str, config: Config, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple, dict, str, str]:
    """The model and inputs of `FILE[:NAME]`, on `device`: (model, args, kwargs, name, source), where
    source is the "file:line" that defines the model in FILE."""
    from healthcheck.loading import load_target

    target_device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded, reproducible init; the caller's RNG untouched
        torch.default_generator.manual_seed(config.seed)  # not torch.manual_seed: it also queues a CUDA seed
        target = load_target(spec, config.input_shapes, config.seed)
    model = target.model.to(target_device)
    args, kwargs = to_device(target.args, target_device), to_device(target.kwargs, target_device)
    return model, args, kwargs, target.name, target.source


def target_config(spec: str, config: Config | None = None, **overrides: Any) -> Config:
    """The settings for `FILE[:NAME]`: `config` (default: the pyproject.toml above FILE), its
    `models` table for this file, then `overrides` (command-line flags win)."""
    from healthcheck.config import load_config
    from healthcheck.loading import split_spec

    return (config or load_config(split_spec(spec)[0])).for_target(spec).override(**overrides)


def check_file(spec: str, config: Config | None = None, device: str | torch.device = "cpu", probes: bool = True,
               baseline: str | Path | dict | None = None, **overrides: Any) -> Report:
    """`check` on a model file, as the CLI does: `FILE[:NAME]`, config from its pyproject.toml."""
    config = target_config(spec, config, **overrides)
    model, args, kwargs, name, source = load_file(spec, config, device)
    return check(model, (args, kwargs), config=config, name=name, probes=probes, baseline=baseline, source=source)
