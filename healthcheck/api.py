"""`check(model, example_inputs) -> Report`: the one entry point the CLI, plugins and users call."""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthcheck.config import Config
from healthcheck.errors import UsageError, describe
from healthcheck.graph.architecture import analyze
from healthcheck.graph.fake import FAKE_FAILURE_KEY, on_meta_device, structure_without_weights, weights_used
from healthcheck.graph.taxonomy import is_user_frame
from healthcheck.graph.tracers import TRACE_METHODS
from healthcheck.guard import copy_inputs, preserved
from healthcheck.loading import as_call_args, expected_input
from healthcheck.probes import ProbeOptions, measure
from healthcheck.probes.blockwise import measure_blockwise, stability_not_assessed
from healthcheck.probes.stability import OptimizerSpec, assess_stability
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
          source: str | None = None, optimizer: torch.optim.Optimizer | OptimizerSpec | str | None = None,
          lr: float | None = None, momentum: float | None = None, **overrides: Any) -> Report:
    """Analyze `model` on `example_inputs` and apply the rules.

    `example_inputs`: a tensor, a tuple of positional inputs, a dict of keyword inputs, or
    `(args, kwargs)`. Options (`fail_on`, `select`, `ignore`, `rule_options`, `trace`, `seed`)
    override `config`. `probes=False` skips the measurements (structure only: traced on fake tensors,
    no real forward, so a model built on the meta device is accepted); `loss_fn(output)`
    replaces the default random projection of the output for the gradient probes. Findings whose
    source line says `# healthcheck: ignore[CODE]`, and those known to `baseline` (a saved JSON
    report), move to `report.suppressed` (see healthcheck.suppression). `source`: "file:line" where
    the model is defined (default: its class). The model, its buffers, modes, grads, hooks and the
    global RNG are left exactly as they were.

    `optimizer`: what the model will train with, for the stability checks (sharpness against the
    optimizer's limit, trial steps on a copy): a `torch.optim.Optimizer` built on this model's
    parameters (read, never stepped: its state, step counts and scheduler are left as they were), or
    a name ("sgd", "adam", "adamw", …) with `lr=` and `momentum=` (also from `config` and
    `[tool.healthcheck]`; healthcheck.probes.stability.OptimizerSpec.parse says what a partial
    setting means). Without one, the report says that stability under the optimizer was not assessed.
    """
    if not probes and (optimizer is not None or lr is not None or momentum is not None):
        raise UsageError("optimizer, lr and momentum are for the stability checks, which probes=False skips")
    if optimizer is None or isinstance(optimizer, str):  # a name: a setting like the others
        overrides.update(optimizer=optimizer, lr=lr, momentum=momentum)
    elif lr is not None or momentum is not None:
        raise UsageError("lr and momentum go with an optimizer name (optimizer=\"sgd\", lr=0.1); a "
                         "torch.optim.Optimizer has them in its param_groups")
    config = (config or Config()).override(**overrides)
    spec = optimizer_spec(model, optimizer, config)  # before minutes of analysis: a bad optimizer fails now
    args, kwargs = as_call_args(example_inputs)
    if config.trace not in ("auto", *TRACE_METHODS):
        raise UsageError(f"trace must be auto, {', '.join(TRACE_METHODS)}; not {config.trace!r}")
    methods = TRACE_METHODS if config.trace == "auto" else (config.trace,)
    start = time.perf_counter()
    # weights on the meta device: the structure from fake tensors, the probes one block at a time
    meta = probes and on_meta_device(model)
    # structure only: traced on fake tensors, no real forward, weights never read (so not copied either)
    with preserved(model, copy_parameters=probes and not meta) as guarded:
        model.eval()
        fake = None if probes and not meta else structure_without_weights(model, *copy_inputs((args, kwargs)), methods)
        cheap_forward = False
        if fake is None or fake.architecture is None:
            guarded.copy_values()  # the real forward may write buffers in place
            forward_start = time.perf_counter()
            # every phase runs on its own copy of the inputs: an in-place op on the input inside forward
            # never reaches the caller's tensors, nor the next phase
            validate_forward(model, *copy_inputs((args, kwargs)))
            cheap_forward = time.perf_counter() - forward_start < 0.1
        parameters = sum(p.numel() for p in model.parameters())  # here, where a lazy model is materialized
        try:
            architecture = fake.architecture if fake is not None and fake.architecture is not None else \
                analyze(model, *copy_inputs((args, kwargs)), methods, cheap_forward)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"could not trace the model ({', '.join(methods)}): {type(exc).__name__}: {exc}") from exc
        if fake is not None and fake.reason is not None:  # the real forward ran after all: say why
            architecture.trace_failures[FAKE_FAILURE_KEY] = fake.reason
        measurements = stability = None
        if probes:
            options = ProbeOptions(seed=config.seed, loss_fn=loss_fn)
            try:
                measurements = (measure_blockwise if meta else measure)(
                    model, *copy_inputs((args, kwargs)), at_joins=bool(architecture.joins), options=options)
            except Exception as exc:  # noqa: BLE001
                raise UsageError(f"the probes could not run the model in train mode: {describe(exc)}") from exc
            try:  # trial steps run on a copy with a fresh optimizer built from `spec`, never the user's
                stability = stability_not_assessed(spec) if meta else assess_stability(
                    model, *copy_inputs((args, kwargs)), spec, seed=config.seed, loss_fn=loss_fn)
            except Exception as exc:  # noqa: BLE001
                raise UsageError(f"the stability checks could not run the model: {describe(exc)}") from exc
    context = RuleContext(architecture, measurements, stability=stability)
    findings = run_rules(context, config.select, config.ignore, config.rule_options)
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), f.code))
    info = ModelInfo(
        name=name or type(model).__name__,
        parameters=parameters,
        trace=architecture.trace,
        trace_failures=dict(architecture.trace_failures),
        weights=weights_used(model, fake),
        input_shapes=_shapes(args, kwargs),
        source=source or class_source(model),
    )
    if isinstance(baseline, (str, Path)):
        baseline = load_baseline(baseline)
    report = Report(info, architecture, findings, measurements=measurements, seconds=time.perf_counter() - start,
                    rules=evaluated(context, config.select, config.ignore), stability=stability)
    return suppress(report, baseline)


def optimizer_spec(model: nn.Module, optimizer: Any, config: Config) -> OptimizerSpec | None:
    """What the stability checks need of the optimizer: from a `torch.optim.Optimizer` (which must train
    this model), an OptimizerSpec as it is, else from the config's name, lr and momentum (None: none given)."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if optimizer is None or isinstance(optimizer, str):
        return OptimizerSpec.parse(config.optimizer, config.lr, config.momentum)
    optimizer = unwrapped_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer built on the model, or a name such as "
                         f"\"sgd\" with lr=; not {type(optimizer).__name__}")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trained & {id(p) for p in model.parameters()}:
        raise UsageError(f"optimizer: the {type(optimizer).__name__} was built on other parameters than "
                         f"{type(model).__name__}'s (a copy of the model?); build it on model.parameters()")
    spec = OptimizerSpec.from_optimizer(optimizer)
    # a scheduler's warm-up starts the lr low (HF's and Lightning's schedulers have set it by the time
    # training begins): stability is decided at the lr the schedule climbs to, its base lr
    # (OneCycleLR keeps its peak in the group as `max_lr`; its `initial_lr` is the low start, max_lr/25)
    group = optimizer.param_groups[0]
    for base_lr in (group.get("initial_lr"), group.get("max_lr")):
        if isinstance(base_lr, (int, float)) and not isinstance(base_lr, bool) and base_lr > spec.lr:
            spec = dataclasses.replace(spec, lr=float(base_lr))
    if not spec.lr > 0 or not math.isfinite(spec.lr):
        raise UsageError(f"optimizer: its learning rate is {spec.lr:g}; stability is judged at the lr training "
                         "reaches: give an optimizer (or a scheduler's initial_lr) with that lr")
    return spec


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer), whose class and defaults say what the training steps do; others as they are."""
    for _ in range(4):  # wrappers of wrappers, a few deep at most
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


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
    # a model built on the meta device stays there: its structure is traced on fake tensors (--no-probes)
    model = target.model if on_meta_device(target.model) else target.model.to(target_device)
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
