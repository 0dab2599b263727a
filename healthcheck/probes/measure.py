"""Init-time probes: how signal and gradients propagate through the model on one batch.

Three recorded passes, all in train mode (BatchNorm sees the batch as in training; dropout is
skipped and every random op gives the same neutral draw in every pass, so that the numbers are
deterministic; activation checkpointing is off while they run):

1. forward + backward: at every point (each residual join, or each layer input in plain stacks),
   the second moment E[y²], the join operands' second moments, the effective rank of the channel
   vectors, and ‖∂L/∂y‖ from a tensor hook;
2. forward-mode AD (one Jacobian-vector product from the input point): sensitivity χ_k;
3. forward + backward on a fixed number of inputs along a line through the first example, all
   other inputs shared by every row: correlation of neighbouring input gradients.

Everything is reduced on the model's device and copied to the host once, at the end. Without a
loss function, L = Σ output · R for a fixed, seeded random R, zero at masked and pad positions.
For token inputs the "input point" is the first floating-point tensor the model makes (the
embedding output). Each pass gets its own copy of the inputs; a probe that cannot run is dropped
with its reason in `Measurements.failures`, the others stand.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from healthcheck.guard import copy_inputs
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
    directions_band: tuple[float, float] | None = None  # sampling band of `directions` (stats.directions_band)
    within_share: float | None = None  # share of the variance between positions of one input (tokens, pixels)

    @property
    def directions(self) -> float | None:
        """Effective rank, not normalized: 1 means the signal lies on a single line."""
        return None if self.effective_rank is None else self.effective_rank * self.rank_size

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "id", "at", "depth", "var", "var_ratio", "residual_ratio", "grad_norm", "effective_rank",
            "sensitivity", "grad_rms", "participation_ratio", "module", "source")} | {
            "directions": self.directions, "directions_band": self.directions_band, "within_share": self.within_share}


@dataclass(frozen=True)
class Measurements:
    profile: tuple[Point, ...]
    grad_correlation: float | None
    input_var: float
    at: str  # "join" | "layer"
    failures: dict[str, str] = field(default_factory=dict)  # probe -> why it could not run
    seconds: float = 0.0
    line_points: int = 0  # inputs on the gradient-correlation line
    line_dim: int = 0  # elements of each input on the line: with line_points, the correlation's noise

    @property
    def grad_correlation_noise(self) -> float | None:
        """Standard deviation of the neighbour correlation of white-noise gradients on this line,
        1/√((points − 1)·elements): a reading within a few of these of a threshold is no verdict."""
        if self.line_points < 2 or self.line_dim < 1:
            return None
        return 1 / math.sqrt((self.line_points - 1) * self.line_dim)

    def series(self, name: str) -> list[float]:
        return [getattr(p, name) for p in self.profile if getattr(p, name) is not None]


@dataclass(frozen=True)
class ProbeOptions:
    seed: int = 0
    max_vectors: int = 256  # channel vectors per point for the effective rank
    line_step: float = 0.02  # distance between neighbouring line inputs, relative to ‖x0‖
    line_points: int = 24  # inputs on the gradient-correlation line, whatever the batch size
    # the line runs in chunks of the user's batch size (its activation memory is then the batch's),
    # except that a chunk may hold this many bytes of activations: small models run the line in one pass
    line_chunk_bytes: int = 128 * 2**20
    sensitivity: bool = True
    grad_correlation: bool = True
    loss_fn: Callable[[Any], torch.Tensor] | None = None


class _InputPoint:
    """Where the probe's input lives: the first float model input, else the first float tensor the
    model makes from its (integer) inputs. `replace(t)` gives the tensor to use there instead.

    `inside=True` skips the model inputs: the point is the first float tensor the model makes. The
    probes fall back to it when the model cannot take a differentiable input (wav2vec2's feature
    encoder sets `requires_grad` on a slice of its input, which only a plain tensor allows).
    `feed(used)` is what the model receives at a model input (default: `used` itself)."""

    def __init__(self, replace: Callable[[torch.Tensor], torch.Tensor], inside: bool = False,
                 feed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.replace = replace
        self.inside = inside
        self.feed = feed
        self.done = False
        self.original: torch.Tensor | None = None
        self.used: torch.Tensor | None = None

    def apply_to_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        target = None if self.inside else first_float(tensors_of((args, kwargs)))
        if target is None:
            return args, kwargs
        self.done = True
        self.original, self.used = target, self.replace(target)
        fed = self.used if self.feed is None else self.feed(self.used)

        def swap(value: Any) -> Any:
            return fed if value is target else value

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def maybe_inject(self, node: OpNode, result: Any) -> torch.Tensor | None:
        if self.done or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return None
        self.done = True
        self.original, self.used = result, self.replace(result)
        return self.used


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in (nested) tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _fresh(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Copies of the inputs for one pass (the guard's copier: mappings, named tuples, dataclasses too):
    an in-place op on its input (`x.mul_(…)`) changes neither the caller's tensors nor the next pass."""
    return copy_inputs((args, kwargs))


def _with_fallbacks(run: Callable[[bool, bool], Any]) -> Any:
    """`run(inside, full_backward)`: first with the point at the model input and a backward pass
    restricted to the input (cheapest); then with a full `backward()` (reentrant
    `torch.utils.checkpoint` refuses `autograd.grad` and `backward(inputs=…)`); then with the point
    inside the model (a model that sets `requires_grad` on its input). The first error if all fail;
    running out of memory is not retried (each fallback needs at least as much)."""
    first: Exception | None = None
    for inside, full in ((False, False), (False, True), (True, True)):
        try:
            return run(inside, full)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried the next way
            first = first or exc
    raise first  # type: ignore[misc]


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


def position_weights(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Which token positions a real loss counts: 1 where `attention_mask` is on and the token is not
    the model's pad id (`config.pad_token_id`), else 0; None when the inputs say nothing (no mask,
    no pad id present). For encoder-decoder models, the decoder's mask and ids (the output is the
    decoder's)."""
    decoder = "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs
    mask = kwargs.get("decoder_attention_mask" if decoder else "attention_mask")
    ids = kwargs.get("decoder_input_ids" if decoder else "input_ids")
    if ids is None and not decoder:
        ids = next((a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()
                    and not a.is_complex() and a.dtype != torch.bool), None)
    weights = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.is_floating_point() and bool((mask <= 0).all()) and bool((mask < 0).any()):
            weights = mask == 0  # an additive mask: 0 where attended, -inf (or very negative) where not
        else:
            weights = mask != 0
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and isinstance(ids, torch.Tensor) and ids.dim() == 2:
        not_pad = ids != pad
        if weights is None:
            weights = not_pad
        elif weights.shape == not_pad.shape:
            weights = weights & not_pad
    if weights is None or bool(weights.all()) or not bool(weights.any()):
        return None  # nothing masked, or everything: an all-zero loss would measure nothing
    return weights


def _loss(output: Any, options: ProbeOptions, generator: torch.Generator, per_sample: bool = True,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """The user's loss, else Σ output · R with R seeded: a different R per sample (like labels),
    or one R shared by all samples (`per_sample=False`) to compare gradients across inputs.

    `weights` (batch × positions, see `position_weights`) zero the masked and pad positions, as a
    real loss ignores them (labels = -100): an output there is not trained, and a pad token's
    gradient alone can be 1e13 times the others'."""
    if options.loss_fn is not None:
        return options.loss_fn(output)
    out = first_float(tensors_of(output))
    if out is None:
        raise ValueError("the model returned no floating-point tensor to backpropagate from")
    shape = out.shape if per_sample or out.dim() == 0 else out.shape[1:]
    direction = torch.randn(shape, generator=generator).to(device=out.device, dtype=torch.float32)
    product = out.float() * direction
    if weights is not None and out.dim() >= weights.dim() and tuple(out.shape[:weights.dim()]) == tuple(weights.shape):
        product = product * weights.reshape(*weights.shape, *[1] * (out.dim() - weights.dim())).to(product)
    return product.sum()


# Module flags that turn activation checkpointing on: Hugging Face (`gradient_checkpointing_enable()`)
# and timm (`set_grad_checkpointing()`).
_CHECKPOINTING_FLAGS = ("gradient_checkpointing", "grad_checkpointing")


@contextmanager
def _checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing off while the probes run, restored after. A checkpointed segment is
    recomputed during backward outside the recorder, with dropout and random ops live: the
    recomputation then differs from the recorded forward (non-reentrant checkpointing fails on it;
    reentrant silently takes gradients through other dropout masks). The function is the same
    without it."""
    switched = [(m, flag) for m in model.modules() for flag in _CHECKPOINTING_FLAGS if getattr(m, flag, None) is True]
    try:
        for module, flag in switched:
            setattr(module, flag, False)
        yield
    finally:
        for module, flag in switched:
            setattr(module, flag, True)


class _PlainCall:
    """Stands in for torch.utils.checkpoint's reentrant `CheckpointFunction`: `apply` calls the function."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _no_recompute(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant checkpoint's context generator: nothing saved for recomputation."""
    yield


@contextmanager
def _raw_checkpoints_off() -> Iterator[None]:
    """A raw `torch.utils.checkpoint.checkpoint(fn, …)` in the model calls `fn` as it is while the
    probes run: its recomputation in backward would run outside the recorder, with dropout live and
    random ops redrawn, and take gradients through other masks than the recorded forward's. Both
    variants look their machinery up in the module at call time (`CheckpointFunction.apply`, the
    non-reentrant context generator), so a model that imported `checkpoint` by name is covered too."""
    import torch.utils.checkpoint as module

    names = {"CheckpointFunction": _PlainCall, "_checkpoint_without_reentrant_generator": _no_recompute,
             "_checkpoint_without_reentrant_generator_impl": _no_recompute}
    saved = {name: getattr(module, name) for name in names if hasattr(module, name)}
    try:
        for name in saved:
            setattr(module, name, names[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def measure(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None, *, at_joins: bool,
            options: ProbeOptions | None = None) -> Measurements:
    """Run the probes. The caller guards the model's state (see `healthcheck.guard.preserved`):
    this sets train mode, clears `.grad` and runs backward passes."""
    with _checkpointing_off(model), _raw_checkpoints_off():
        return _measure(model, args, kwargs, at_joins=at_joins, options=options)


def _measure(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None, *, at_joins: bool,
             options: ProbeOptions | None = None) -> Measurements:
    options = options or ProbeOptions()
    kwargs = forward_kwargs(model, kwargs or {})
    start = time.perf_counter()
    model.train()
    for p in model.parameters():
        p.grad = None
    failures: dict[str, str] = {}
    weights = position_weights(model, args, kwargs)

    # Pass 1: statistics and gradients
    def statistics_pass(inside: bool, full_backward: bool) -> tuple[StatsObserver, Any, torch.Tensor, str | None]:
        for p in model.parameters():
            p.grad = None
        # the model gets a copy of the leaf: an in-place op on its input must not hit a leaf
        point = _InputPoint(lambda t: t.detach().clone().requires_grad_(True), inside, feed=torch.clone)
        args1, kwargs1 = point.apply_to_inputs(*_fresh(args, kwargs))
        observer = StatsObserver(at_joins, options.max_vectors, options.seed, point)
        observer.counted = None if weights is None else weights.bool()
        no_gradients = None
        with torch.enable_grad():
            recording = record(model, args1, kwargs1, observer, skip_dropout=True, random_seed=options.seed)
            if not at_joins:
                observer.measure_output(recording.graph, recording.output)
            loss = _loss(recording.output, options, torch.Generator().manual_seed(options.seed + 1), weights=weights)
            if loss.requires_grad:
                leaf = point.used is not None and point.used.is_leaf and not full_backward
                loss.backward(inputs=[point.used] if leaf else None)
            else:
                no_gradients = "the output does not depend on anything that requires grad"
        moment = stats.second_moment(point.original) if point.original is not None else torch.tensor(float("nan"))
        return observer, recording.graph, moment, no_gradients

    try:
        observer, graph, input_moment, no_gradients = _with_fallbacks(statistics_pass)
    except Exception as exc:  # noqa: BLE001 - the structural report stands without the profile
        failures["profile"] = f"the model could not run forward and backward in train mode: {describe(exc)}"
        return Measurements((), None, float("nan"), "join" if at_joins else "layer", failures,
                            time.perf_counter() - start)
    if no_gradients:
        failures["gradients"] = no_gradients

    joins = find_joins(graph) if at_joins else []
    point_nodes = [j.node for j in joins] if at_joins else sorted(observer.layer_points)

    # Pass 2: sensitivity by forward-mode AD
    chi: dict[int, float] = {}
    if options.sensitivity:
        try:
            chi = _sensitivities(model, *_fresh(args, kwargs), set(point_nodes), options, weights)
        except Exception as exc:  # noqa: BLE001 - forward AD is not implemented for every op
            try:
                chi = _sensitivities_by_difference(model, *_fresh(args, kwargs), set(point_nodes), options, weights)
            except Exception as exc2:  # noqa: BLE001 - a probe that cannot run is reported, not fatal
                failures["sensitivity"] = f"forward AD: {describe(exc)}; finite difference: {describe(exc2)}"
    undefined = [n for n, value in chi.items() if not math.isfinite(value)]
    if undefined:  # ‖δy‖/‖y − ȳ‖ = 0/0 where a layer outputs all zeros (or one value for every input)
        chi = {n: value for n, value in chi.items() if math.isfinite(value)}
        failures[f"sensitivity at {len(undefined)} point(s)"] = (
            "the activations there do not vary across inputs (all zeros?), so χ is undefined")

    # Pass 3: gradient correlation along a line of inputs
    correlation, line_dim = None, 0
    if options.grad_correlation:
        try:
            correlation, line_dim = _line_correlation(model, args, kwargs, options, observer.batch_stats, weights,
                                                      graph)
        except Exception as exc:  # noqa: BLE001
            failures["grad_correlation"] = describe(exc)

    host = _to_host(observer, point_nodes, input_moment)
    profile = profile_points(graph, joins, point_nodes, host, chi)
    if correlation is not None:
        correlation = float(correlation)
    return Measurements(tuple(profile), correlation, host["input_var"], "join" if at_joins else "layer",
                        failures, time.perf_counter() - start, options.line_points if correlation is not None else 0,
                        line_dim)


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
            directions_band=stats.directions_band(
                None if host.get((n, "rank")) is None else host[(n, "rank")] * host.get((n, "rank_size"), 0),
                host.get((n, "rank_draws")), host.get((n, "rank_channels"))),
            within_share=stats.finite_or_none(host.get((n, "rank_within"))),
        ))
        previous = var
    return points


def _on_counted_positions(direction: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """`direction` zeroed at the positions the loss does not count (padding, see `position_weights`)
    when its leading dimensions are those positions: a perturbation of a pad token's embedding is no
    perturbation of the input (and a zero pad embedding through a norm turns it into ×1e6)."""
    if weights is None or tuple(direction.shape[:weights.dim()]) != tuple(weights.shape):
        return direction
    return direction * weights.reshape(*weights.shape, *[1] * (direction.dim() - weights.dim())).to(direction)


def _sensitivities(model: nn.Module, args: tuple, kwargs: dict[str, Any], nodes: set[int],
                   options: ProbeOptions, weights: torch.Tensor | None = None) -> dict[int, float]:
    generator = torch.Generator().manual_seed(options.seed + 2)

    def dual(t: torch.Tensor) -> torch.Tensor:
        tangent = _on_counted_positions(torch.randn(t.shape, generator=generator).to(t.device), weights).to(t.dtype)
        return fwAD.make_dual(t.detach(), tangent)

    point = _InputPoint(dual)
    observer = _TangentObserver(nodes, point)
    with torch.no_grad(), fwAD.dual_level():
        args2, kwargs2 = point.apply_to_inputs(args, kwargs)
        record(model, args2, kwargs2, observer, skip_dropout=True, random_seed=options.seed,
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
                                 options: ProbeOptions, weights: torch.Tensor | None = None,
                                 epsilon: float = 1e-4) -> dict[int, float]:
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
        direction = _on_counted_positions(direction, weights)
        direction = direction * stats.centred_norm(base) / direction.norm()
        return torch.cat([base, (base.float() + epsilon * direction).to(t.dtype)])

    point = _InputPoint(perturb)
    observer = _DifferenceObserver(nodes, point, batch, epsilon)
    doubled_args, doubled_kwargs = tuple(double(a) for a in args), {k: double(v) for k, v in kwargs.items()}
    with torch.no_grad():
        args2, kwargs2 = point.apply_to_inputs(doubled_args, doubled_kwargs)
        record(model, args2, kwargs2, observer, skip_dropout=True, random_seed=options.seed)
        if point.used is None:
            raise ValueError("no floating-point input point to perturb")
        base = point.used[:batch].float()
        input_ratio = (point.used[batch:].float() - base).norm() / epsilon / stats.centred_norm(base)
        keys = sorted(observer.values)
        if not keys:
            return {}
        ratios = torch.stack([observer.values[k][0] / observer.values[k][1] / input_ratio for k in keys])
    return dict(zip(keys, ratios.cpu().tolist()))


def _leading_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size: the leading dimension of the first float input, else of the first input."""
    tensors = [t for t in tensors_of((args, kwargs)) if t.dim() > 0]
    first = first_float(tensors)
    first = first if first is not None else (tensors[0] if tensors else None)
    return None if first is None else int(first.shape[0])


def _activation_bytes_per_row(graph: Any, batch: int | None) -> float:
    """Bytes of floating-point activations one input row makes in a recorded forward (4 per element:
    the probes reduce in float32): what one row of the line costs in memory."""
    if graph is None or not batch:
        return math.inf
    total = sum(math.prod(node.shape) for node in graph.nodes if node.floating and node.shape)
    return 4.0 * total / batch


def line_chunks(points: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of `rows` rows each that cover a line of `points` inputs. The second
    chunk starts on the first chunk's last row: that row, computed beside different neighbours,
    must get the same gradient (rows independent, `_line_correlation`). The last chunk ends at the
    line's end and may overlap its predecessor, so every chunk has the same number of rows (a
    random draw shared by the rows of a chunk is then the same draw in every chunk)."""
    if rows >= points:
        return [(0, points)]
    rows = max(rows, 2)
    chunks, start = [(0, rows)], rows - 1
    while start + rows < points:
        chunks.append((start, start + rows))
        start += rows
    chunks.append((points - rows, points))
    return chunks


def _line_correlation(model: nn.Module, args: tuple, kwargs: dict[str, Any], options: ProbeOptions,
                      batch_stats: list[tuple[torch.Tensor, torch.Tensor]],
                      weights: torch.Tensor | None = None, graph: Any = None) -> tuple[torch.Tensor, int]:
    """(correlation, elements per point): correlation of neighbouring input gradients along a line of `options.line_points` inputs
    through the first example (Balduzzi et al. 2017).

    The line has a fixed number of points, whatever the user's batch: the lag-1 correlation of m
    points has a floor set by m (0.45 for an exactly linear field at m = 4; `linear_field_correlation`).
    Every row shares all the other inputs — each batch-sized input (token ids, decoder ids, masks,
    timesteps, labels) becomes its first row, repeated — so neighbouring rows differ only along the
    line, which lives at the input point (the embedding output for token inputs). BatchNorm uses
    the real batch's statistics, and every random op gives the same draw in every row (recorder).

    Memory: the line runs in chunks of the user's batch size (`line_chunks`; bigger only while a
    chunk's activations stay under `options.line_chunk_bytes`). That is exact when rows are
    independent — BatchNorm is frozen to pass 1's statistics, and attention, convolutions and the
    other norms act within a row — but a model may mix rows in other ways (x − x.mean(0), MoE
    routing with a capacity shared by the batch). The overlap row of the first two chunks checks it:
    if its gradient depends on its neighbours, the line runs again as one batch."""
    n = options.line_points
    if n < 3:
        raise ValueError("gradient correlation needs a line of at least 3 points")
    batch = _leading_size(args, kwargs)
    per_row = _activation_bytes_per_row(graph, batch)
    fit = int(options.line_chunk_bytes // per_row) if math.isfinite(per_row) and per_row > 0 else n
    chunks = line_chunks(n, max(batch or n, fit))
    grads = _line_gradients(model, args, kwargs, options, batch_stats, weights, batch, chunks)
    if len(chunks) > 1:
        overlap = chunks[1][0]
        first, second = grads[0][overlap - chunks[0][0]].double(), grads[1][0].double()
        scale = first.norm().clamp(min=1e-30)
        if not bool((first - second).norm() <= 1e-4 * scale):  # rows not independent: one batch after all
            grads = _line_gradients(model, args, kwargs, options, batch_stats, weights, batch, [(0, n)])
            chunks = [(0, n)]
    rows = torch.empty((n, *grads[0].shape[1:]), dtype=grads[0].dtype, device=grads[0].device)
    for (start, end), grad in zip(chunks, grads):
        rows[start:end] = grad
    if not bool(rows.abs().amax() > 0):
        raise ValueError("the input gradients are zero at initialization (a zero-initialized output layer?)")
    return stats.neighbour_correlation(rows), rows[0].numel()


def _line_gradients(model: nn.Module, args: tuple, kwargs: dict[str, Any], options: ProbeOptions,
                    batch_stats: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor | None,
                    batch: int | None, chunks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The input gradients at the line's rows, one tensor per chunk of `chunks` (see `_line_correlation`)."""
    n = options.line_points
    size = chunks[0][1] - chunks[0][0]

    def first_row(t: torch.Tensor) -> torch.Tensor:
        if batch is None or t.dim() == 0 or t.shape[0] != batch:
            return t.detach().clone()  # no batch dimension: shared as it is
        return t.detach()[:1].repeat(size, *[1] * (t.dim() - 1))

    line_args, line_kwargs = _map_tensors(args, first_row), _map_tensors(kwargs, first_row)
    line_weights = weights[:1].repeat(size, 1) if weights is not None else None

    def run(inside: bool, full_backward: bool, start: int, end: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(options.seed + 3)
        captured: dict[str, torch.Tensor] = {}

        def line(t: torch.Tensor) -> torch.Tensor:
            x0 = t[0].detach().float()
            direction = torch.randn(x0.shape, generator=generator).to(x0.device)
            direction = _on_counted_positions(direction, None if line_weights is None else line_weights[0])
            direction = direction / direction.norm() * x0.norm().clamp(min=1e-6)
            offsets = (torch.arange(start, end, device=x0.device, dtype=torch.float32) - (n - 1) / 2) * options.line_step
            points = x0.unsqueeze(0) + offsets.reshape(-1, *[1] * x0.dim()) * direction.unsqueeze(0)
            captured["line"] = points.to(t.dtype).requires_grad_(True)
            return captured["line"]

        point = _InputPoint(line, inside)
        args3, kwargs3 = point.apply_to_inputs(*_fresh(line_args, line_kwargs))

        class _Inject:
            def on_node(self, node: OpNode, result: Any, operands: list) -> Any:
                return point.maybe_inject(node, result)

        with torch.enable_grad():
            recording = record(model, args3, kwargs3, _Inject(), skip_dropout=True, random_seed=options.seed,
                               shared_rows=size, replacements={"batch_norm": _FrozenBatchNorm(batch_stats)})
            if "line" not in captured:
                raise ValueError("the model made no floating-point tensor to put on the line")
            if captured["line"].shape[0] != size:
                raise ValueError(f"the input point has {captured['line'].shape[0]} rows, not the line's {size}")
            loss = _loss(recording.output, options, torch.Generator().manual_seed(options.seed + 1), per_sample=False,
                         weights=line_weights)
            if full_backward:
                loss.backward()
                grad = captured["line"].grad
                if grad is None:
                    raise ValueError("no gradient reached the input line")
            else:
                (grad,) = torch.autograd.grad(loss, [captured["line"]])
        return grad.detach()

    grads: list[torch.Tensor] = []
    way: tuple[bool, bool] | None = None  # the first chunk finds the way the model can run; the others reuse it
    for start, end in chunks:
        if way is None:
            def first(inside: bool, full: bool, start: int = start, end: int = end) -> tuple[torch.Tensor, tuple]:
                return run(inside, full, start, end), (inside, full)
            grad, way = _with_fallbacks(first)
        else:
            grad = run(*way, start, end)
        grads.append(grad)
    return grads


def linear_field_correlation(points: int) -> float:
    """What `stats.neighbour_correlation` gives for an exactly linear gradient field over `points`
    equally spaced inputs: Σ t̃_i t̃_{i+1} / Σ t̃_i² over the centred offsets (0.45 at 4 points, 0.989
    at 24). A measured correlation this high is as smooth as a field can look on that line."""
    m = points
    total = m * (m * m - 1) / 12  # Σ t̃² over the whole line
    end = ((m - 1) / 2) ** 2
    return (total - end - (m - 1) / 2) / (total - end)


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
