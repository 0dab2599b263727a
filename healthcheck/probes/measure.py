"""Init-time probes: how signal and gradients propagate through the model on one batch.

Three recorded passes, all in train mode (BatchNorm sees the batch as in training; dropout is
skipped so that the numbers are deterministic):

1. forward + backward: at every point (each residual join, or each layer input in plain stacks),
   the second moment E[y²], the join operands' second moments, the effective rank of the channel
   vectors, and ‖∂L/∂y‖ from a tensor hook;
2. forward-mode AD (one Jacobian-vector product from the input point): sensitivity χ_k;
3. forward + backward on inputs along a line: correlation of neighbouring input gradients.

Everything is reduced on the model's device and copied to the host once, at the end. Without a
loss function, L = Σ output · R for a fixed, seeded random R. For token inputs the "input point"
is the first floating-point tensor the model makes (the embedding output).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

with warnings.catch_warnings():  # torch's forward-AD decompositions call the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401
    import torch.autograd.forward_ad as fwAD

from healthcheck.errors import describe
from healthcheck.graph.ir import OpNode
from healthcheck.graph.joins import Join, find_joins
from healthcheck.graph.recorder import record
from healthcheck.probes import stats
from healthcheck.probes.observer import StatsObserver
from healthcheck.tensors import first_float, forward_kwargs, tensors_of


@dataclass(frozen=True)
class Point:
    """One row of the depth profile (science.md, Quantities)."""

    id: str
    at: str  # "join" | "layer"
    depth: int  # 1-based position in forward order
    module: str
    source: str | None
    var: float  # E[y²]
    var_ratio: float | None  # var / previous point's var (the first: / its input's)
    residual_ratio: float | None  # E[branch²] / E[skip²] at a join
    grad_norm: float | None  # ‖∂L/∂y‖
    grad_rms: float | None  # ‖∂L/∂y‖ / √numel: comparable across widths and resolutions
    effective_rank: float | None  # Labatie's Σλ/λ_max, normalized by min(vectors, channels)
    participation_ratio: float | None  # (Σλ)²/Σλ², normalized likewise
    sensitivity: float | None  # χ_k
    numel: int = 0
    rank_size: int = 0  # min(vectors, channels): effective_rank × rank_size = directions of variance

    @property
    def directions(self) -> float | None:
        """Effective rank, not normalized: 1 means the signal lies on a single line."""
        return None if self.effective_rank is None else self.effective_rank * self.rank_size

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "id", "at", "depth", "var", "var_ratio", "residual_ratio", "grad_norm", "effective_rank",
            "sensitivity", "grad_rms", "participation_ratio", "module", "source")} | {"directions": self.directions}


@dataclass(frozen=True)
class Measurements:
    profile: tuple[Point, ...]
    grad_correlation: float | None
    input_var: float
    at: str  # "join" | "layer"
    failures: dict[str, str] = field(default_factory=dict)  # probe -> why it could not run
    seconds: float = 0.0

    def series(self, name: str) -> list[float]:
        return [getattr(p, name) for p in self.profile if getattr(p, name) is not None]


@dataclass(frozen=True)
class ProbeOptions:
    seed: int = 0
    max_vectors: int = 256  # channel vectors per point for the effective rank
    line_step: float = 0.02  # distance between neighbouring line inputs, relative to ‖x0‖
    line_points: int = 16  # at most this many inputs on the line (at most the batch size)
    sensitivity: bool = True
    grad_correlation: bool = True
    loss_fn: Callable[[Any], torch.Tensor] | None = None


class _InputPoint:
    """Where the probe's input lives: the first float model input, else the first float tensor the
    model makes from its (integer) inputs. `replace(t)` gives the tensor to use there instead."""

    def __init__(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.replace = replace
        self.done = False
        self.original: torch.Tensor | None = None
        self.used: torch.Tensor | None = None

    def apply_to_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        target = first_float(tensors_of((args, kwargs)))
        if target is None:
            return args, kwargs
        self.done = True
        self.original, self.used = target, self.replace(target)

        def swap(value: Any) -> Any:
            return self.used if value is target else value

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def maybe_inject(self, node: OpNode, result: Any) -> torch.Tensor | None:
        if self.done or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return None
        self.done = True
        self.original, self.used = result, self.replace(result)
        return self.used


class _TangentObserver:
    """Pass 2: ‖δy‖ and ‖y − ȳ‖ at the same points, from dual tensors."""

    def __init__(self, points: set[int], point: _InputPoint) -> None:
        self.points = points
        self.point = point
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        replaced = self.point.maybe_inject(node, result)
        if replaced is not None:
            return replaced
        candidates = [(node.index, result)] + list(operands)
        for index, tensor in candidates:
            if index in self.points and index not in self.values and isinstance(tensor, torch.Tensor):
                primal, tangent = fwAD.unpack_dual(tensor)
                if tangent is not None:
                    self.values[index] = (tangent.float().norm(), stats.centred_norm(primal))
        return None


def _sdpa_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention written out, so forward-mode AD can go through it."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    if is_causal:
        t, s = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return F.softmax(scores, dim=-1) @ value


def _loss(output: Any, options: ProbeOptions, generator: torch.Generator, per_sample: bool = True) -> torch.Tensor:
    """The user's loss, else Σ output · R with R seeded: a different R per sample (like labels),
    or one R shared by all samples (`per_sample=False`) to compare gradients across inputs."""
    if options.loss_fn is not None:
        return options.loss_fn(output)
    out = first_float(tensors_of(output))
    if out is None:
        raise ValueError("the model returned no floating-point tensor to backpropagate from")
    shape = out.shape if per_sample or out.dim() == 0 else out.shape[1:]
    direction = torch.randn(shape, generator=generator).to(device=out.device, dtype=torch.float32)
    return (out.float() * direction).sum()


def measure(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None, *, at_joins: bool,
            options: ProbeOptions | None = None) -> Measurements:
    """Run the probes. The caller guards the model's state (see `healthcheck.guard.preserved`):
    this sets train mode, clears `.grad` and runs backward passes."""
    options = options or ProbeOptions()
    kwargs = forward_kwargs(model, kwargs or {})
    start = time.perf_counter()
    model.train()
    for p in model.parameters():
        p.grad = None
    failures: dict[str, str] = {}

    # Pass 1: statistics and gradients
    point = _InputPoint(lambda t: t.detach().clone().requires_grad_(True))
    args1, kwargs1 = point.apply_to_inputs(args, kwargs)
    observer = StatsObserver(at_joins, options.max_vectors, options.seed, point)
    with torch.enable_grad():
        recording = record(model, args1, kwargs1, observer, skip_dropout=True)
        graph = recording.graph
        if not at_joins:
            observer.measure_output(graph, recording.output)
        loss = _loss(recording.output, options, torch.Generator().manual_seed(options.seed + 1))
        if loss.requires_grad:
            loss.backward(inputs=[point.used] if point.used is not None and point.used.is_leaf else None)
        else:
            failures["gradients"] = "the output does not depend on anything that requires grad"
    input_moment = stats.second_moment(point.original) if point.original is not None else torch.tensor(float("nan"))
    del loss, recording

    joins = find_joins(graph) if at_joins else []
    point_nodes = [j.node for j in joins] if at_joins else sorted(observer.layer_points)

    # Pass 2: sensitivity by forward-mode AD
    chi: dict[int, float] = {}
    if options.sensitivity:
        try:
            chi = _sensitivities(model, args, kwargs, set(point_nodes), options)
        except Exception as exc:  # noqa: BLE001 - forward AD is not implemented for every op
            try:
                chi = _sensitivities_by_difference(model, args, kwargs, set(point_nodes), options)
            except Exception as exc2:  # noqa: BLE001 - a probe that cannot run is reported, not fatal
                failures["sensitivity"] = f"forward AD: {describe(exc)}; finite difference: {describe(exc2)}"

    # Pass 3: gradient correlation along a line of inputs
    correlation = None
    if options.grad_correlation:
        try:
            correlation = _line_correlation(model, args, kwargs, options, observer.batch_stats)
        except Exception as exc:  # noqa: BLE001
            failures["grad_correlation"] = describe(exc)

    host = _to_host(observer, point_nodes, input_moment)
    profile = profile_points(graph, joins, point_nodes, host, chi)
    if correlation is not None:
        correlation = float(correlation)
    return Measurements(tuple(profile), correlation, host["input_var"], "join" if at_joins else "layer",
                        failures, time.perf_counter() - start)


def _to_host(observer: StatsObserver, nodes: list[int], input_moment: torch.Tensor) -> dict[str, Any]:
    """Every statistic to the host in one transfer."""
    keys, values = ["input_var"], [input_moment.float().reshape(())]
    for n in nodes:
        for name, value in observer.values.get(n, {}).items():
            keys.append((n, name))
            values.append(value.float().reshape(()))
        if n in observer.grads:
            keys.append((n, "grad_sq"))
            values.append(observer.grads[n].reshape(()))
    for n, value in observer.operand_moments.items():
        keys.append((n, "operand"))
        values.append(value.float().reshape(()))
    flat = torch.stack([v.to(values[0].device) for v in values]).cpu().tolist()
    return dict(zip(keys, flat))


def profile_points(graph: Any, joins: list[Join], nodes: list[int], host: dict[Any, float],
                   chi: dict[int, float] | None = None, grad_scale: float = 1.0, ranks: int = 1) -> list[Point]:
    """Depth profile from the host copy of a StatsObserver's values (keys `(node, name)`).

    Under DDP, `host` holds the mean over `ranks` of per-rank values; each rank's loss is the mean
    over its own batch, so the global-batch ‖∂L/∂y‖² is that mean × `grad_scale` (1/ranks) and the
    global tensor has `ranks` × the elements.
    """
    chi = chi or {}
    by_node = {j.node: j for j in joins}
    points: list[Point] = []
    previous = host.get("input_var")
    for depth, n in enumerate(nodes, start=1):
        if (n, "var") not in host:
            continue
        var = host[(n, "var")]
        join = by_node.get(n)
        if join is not None and join.scale_on == "sum":
            var *= join.scale**2  # y_k = s·(x_k + f_k(x_k)): the block's output is after the scale
        if join is not None:
            skip = host.get((join.skip_operand, "operand"))
            parts = [host.get((b, "operand")) for b in join.branch_operands]
            branch = None if None in parts else sum(parts)  # parallel branches: Σ E[b²] (cross terms ≈ 0)
            if depth == 1 and skip is not None:
                previous = skip
            residual = branch / skip if skip and branch is not None and skip > 0 else None
        else:
            residual = None
        numel = host[(n, "numel")]
        grad_sq = host.get((n, "grad_sq"))
        if grad_sq is not None:
            grad_sq *= grad_scale
        node = graph.nodes[n]
        points.append(Point(
            id=join.id if join else f"{node.module or '(root)'}:{node.op}#{n}",
            at="join" if join else "layer", depth=depth, module=node.module,
            source=join.source if join else None, var=var,
            var_ratio=var / previous if previous and previous > 0 and math.isfinite(previous) else None,
            residual_ratio=residual,
            grad_norm=math.sqrt(grad_sq) if grad_sq is not None else None,
            grad_rms=math.sqrt(grad_sq / (numel * ranks)) if grad_sq is not None and numel else None,
            effective_rank=host.get((n, "rank")), participation_ratio=host.get((n, "participation")),
            sensitivity=chi.get(n), numel=int(numel), rank_size=int(host.get((n, "rank_size"), 0)),
        ))
        previous = var
    return points


def _sensitivities(model: nn.Module, args: tuple, kwargs: dict[str, Any], nodes: set[int],
                   options: ProbeOptions) -> dict[int, float]:
    generator = torch.Generator().manual_seed(options.seed + 2)

    def dual(t: torch.Tensor) -> torch.Tensor:
        tangent = torch.randn(t.shape, generator=generator).to(device=t.device, dtype=t.dtype)
        return fwAD.make_dual(t.detach(), tangent)

    point = _InputPoint(dual)
    observer = _TangentObserver(nodes, point)
    with torch.no_grad(), fwAD.dual_level():
        args2, kwargs2 = point.apply_to_inputs(args, kwargs)
        record(model, args2, kwargs2, observer, skip_dropout=True,
               replacements={"scaled_dot_product_attention": _sdpa_math})
        if point.used is None:
            raise ValueError("no floating-point input point to perturb")
        primal, tangent = fwAD.unpack_dual(point.used)
        input_ratio = tangent.float().norm() / stats.centred_norm(primal)
        keys = sorted(observer.values)
        ratios = torch.stack([observer.values[k][0] / observer.values[k][1] / input_ratio for k in keys]) if keys else None
    if ratios is None:
        return {}
    return dict(zip(keys, ratios.cpu().tolist()))


class _FrozenBatchNorm:
    """batch_norm with the statistics pass 1 saw on the real batch, call by call: each point of the
    line is then processed as it would be inside that batch, independently of the other points."""

    def __init__(self, batch_stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stats = list(batch_stats)

    def __call__(self, input: torch.Tensor, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
        mean, var = self.stats.pop(0)
        return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)


class _DifferenceObserver:
    """Finite-difference sensitivity on a doubled batch [x; x + εδ]: BatchNorm statistics of a
    duplicated batch equal the original's, so this is the same function, linearized by ε."""

    def __init__(self, points: set[int], point: _InputPoint, batch: int, epsilon: float) -> None:
        self.points, self.point, self.batch, self.epsilon = points, point, batch, epsilon
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        replaced = self.point.maybe_inject(node, result)
        if replaced is not None:
            return replaced
        for index, tensor in [(node.index, result)] + list(operands):
            if (index in self.points and index not in self.values and isinstance(tensor, torch.Tensor)
                    and tensor.dim() > 0 and tensor.shape[0] == 2 * self.batch):
                base, moved = tensor[: self.batch].float(), tensor[self.batch:].float()
                self.values[index] = ((moved - base).norm() / self.epsilon, stats.centred_norm(base))
        return None


def _sensitivities_by_difference(model: nn.Module, args: tuple, kwargs: dict[str, Any], nodes: set[int],
                                 options: ProbeOptions, epsilon: float = 1e-4) -> dict[int, float]:
    tensors = tensors_of((args, kwargs))
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else 0
    if batch < 2:
        raise ValueError("sensitivity needs a batch of at least 2")
    generator = torch.Generator().manual_seed(options.seed + 2)

    def double(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return torch.cat([value, value])
        return value

    def perturb(t: torch.Tensor) -> torch.Tensor:
        base = t[:batch].detach()
        direction = torch.randn(base.shape, generator=generator).to(device=t.device, dtype=torch.float32)
        direction = direction * stats.centred_norm(base) / direction.norm()
        return torch.cat([base, (base.float() + epsilon * direction).to(t.dtype)])

    point = _InputPoint(perturb)
    observer = _DifferenceObserver(nodes, point, batch, epsilon)
    doubled_args, doubled_kwargs = tuple(double(a) for a in args), {k: double(v) for k, v in kwargs.items()}
    with torch.no_grad():
        args2, kwargs2 = point.apply_to_inputs(doubled_args, doubled_kwargs)
        record(model, args2, kwargs2, observer, skip_dropout=True)
        if point.used is None:
            raise ValueError("no floating-point input point to perturb")
        base = point.used[:batch].float()
        input_ratio = (point.used[batch:].float() - base).norm() / epsilon / stats.centred_norm(base)
        keys = sorted(observer.values)
        if not keys:
            return {}
        ratios = torch.stack([observer.values[k][0] / observer.values[k][1] / input_ratio for k in keys])
    return dict(zip(keys, ratios.cpu().tolist()))


def _line_correlation(model: nn.Module, args: tuple, kwargs: dict[str, Any], options: ProbeOptions,
                      batch_stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options.seed + 3)
    captured: dict[str, torch.Tensor] = {}
    inputs = tensors_of((args, kwargs))
    # A shorter line is cheaper, but only a lone float input can change batch size safely.
    shorten = len(inputs) == 1 and inputs[0].is_floating_point()

    def line(t: torch.Tensor) -> torch.Tensor:
        n = min(t.shape[0], options.line_points) if shorten else t.shape[0]
        if n < 3:
            raise ValueError("gradient correlation needs a batch of at least 3")
        x0 = t[0].detach().float()
        direction = torch.randn(x0.shape, generator=generator).to(x0.device)
        direction = direction / direction.norm() * x0.norm().clamp(min=1e-6)
        offsets = (torch.arange(n, device=x0.device, dtype=torch.float32) - (n - 1) / 2) * options.line_step
        points = x0.unsqueeze(0) + offsets.reshape(-1, *[1] * x0.dim()) * direction.unsqueeze(0)
        captured["line"] = points.to(t.dtype).requires_grad_(True)
        return captured["line"]

    point = _InputPoint(line)
    args3, kwargs3 = point.apply_to_inputs(args, kwargs)

    class _Inject:
        def on_node(self, node: OpNode, result: Any, operands: list) -> Any:
            return point.maybe_inject(node, result)

    with torch.enable_grad():
        recording = record(model, args3, kwargs3, _Inject(), skip_dropout=True,
                           replacements={"batch_norm": _FrozenBatchNorm(batch_stats)})
        loss = _loss(recording.output, options, torch.Generator().manual_seed(options.seed + 1), per_sample=False)
        (grad,) = torch.autograd.grad(loss, [captured["line"]])
    if not bool(grad.abs().amax() > 0):
        raise ValueError("the input gradients are zero at initialization (a zero-initialized output layer?)")
    return stats.neighbour_correlation(grad)


def line_gradient_correlation(model: nn.Module, line: torch.Tensor, *, seed: int = 0,
                              loss_fn: Callable[[Any], torch.Tensor] | None = None) -> float:
    """Mean correlation of the input gradients at neighbouring rows of `line` (Balduzzi et al. 2017).

    The rows are the inputs along a line, in order; the model runs on them as one batch in train
    mode (BatchNorm over the line, dropout skipped), L = Σ output · R with one seeded R shared by
    all rows. The caller guards the model's state.
    """
    options = ProbeOptions(seed=seed, loss_fn=loss_fn)
    model.train()
    points = line.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output = record(model, (points,), {}, skip_dropout=True).output
        loss = _loss(output, options, torch.Generator().manual_seed(seed + 1), per_sample=False)
        (grad,) = torch.autograd.grad(loss, [points])
    return float(stats.neighbour_correlation(grad))
