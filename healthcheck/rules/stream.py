"""The residual stream of a depth profile: which points are in series, how they split into stacks,
and fits along it that the measured rules (and the structural rules, when the probes ran) share.

A profile is not one curve. An encoder and a decoder (BART, T5), the stages of a CNN at different
widths, a class-attention readout on one token, and the small residuals inside a block's branch
(Res2Net) each follow their own scale; a step from one to the next is not a per-block trend. So:

- the *stream* is the joins at the shallowest nesting level that has at least two of them: a join
  inside another join's branch is not in series with the blocks around it;
- a *stack* is a run of stream points with the same tensor size and the same module prefix (the path
  up to its first block index: `model.encoder.layers`, `stages`; the stages of a CNN then split
  where their width changes);
- a trend is a *pooled fit*: the slope of log(value) against position, with one intercept per stack,
  so only the steps inside a stack count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: a value per point to fit; None leaves the point out
Value = Callable[[Any], float | None]


@dataclass(frozen=True)
class Trend:
    """A pooled log-linear fit along the stream: value_k ∝ per_point**k inside every stack."""

    per_point: float  # fitted factor from one point to the next
    steps: int  # steps inside stacks that the fit used
    stacks: int  # stacks with at least two points
    points: int
    change: float | None = None  # the fitted change over the stream, when it is not per_point ** steps

    @property
    def total(self) -> float:
        """The fitted change over all in-stack steps (by default per_point ** steps)."""
        if self.change is not None:
            return self.change
        return math.exp(min(700.0, max(-700.0, math.log(self.per_point) * self.steps)))


def _branch_nodes_contain(join: Any, node: int, ancestors: list[int]) -> bool:
    """`node` lies on `join`'s branch: it descends from the fork and feeds a branch operand."""
    if node <= join.fork or node == join.node:
        return False
    feeds = any(node == b or (ancestors[b] >> node) & 1 for b in join.branch_operands)
    return feeds and bool((ancestors[node] >> join.fork) & 1)


def nesting_levels(architecture: Any) -> dict[str, int]:
    """For each join id, how many residual adds have it inside their branch."""
    joins = list(architecture.joins)
    graph = getattr(architecture, "graph", None)
    if graph is None or len(joins) < 2:
        return {j.id: 0 for j in joins}
    ancestors = graph.ancestors()
    containers = [c for c in joins if c.kind == "add"]
    return {j.id: sum(1 for c in containers if c is not j and _branch_nodes_contain(c, j.node, ancestors))
            for j in joins}


def stream_ids(architecture: Any) -> set[str]:
    """Ids of the joins on the residual stream: the shallowest nesting level with at least two joins
    (a single join around the whole body, as in EDSR's global skip, is not the stream)."""
    levels = nesting_levels(architecture)
    if not levels:
        return set()
    counts: dict[int, int] = {}
    for level in levels.values():
        counts[level] = counts.get(level, 0) + 1
    stream_level = min((lv for lv, n in counts.items() if n >= 2), default=min(counts))
    return {i for i, lv in levels.items() if lv == stream_level}


def series_depth(architecture: Any, ids: Iterable[str]) -> int:
    """The longest chain of the given joins in which each feeds the next (joins in series): parallel
    joins do not compound each other's growth."""
    wanted = set(ids)
    joins = sorted((j for j in architecture.joins if j.id in wanted), key=lambda j: j.node)
    graph = getattr(architecture, "graph", None)
    if graph is None or len(joins) < 2:
        return len(joins)
    ancestors = graph.ancestors()
    chain: dict[int, int] = {}
    for j in joins:
        before = [chain[a.node] for a in joins if a.node < j.node and (ancestors[j.node] >> a.node) & 1]
        chain[j.node] = 1 + max(before, default=0)
    return max(chain.values())


def stack_key(module: str) -> str:
    """The module path up to its first numeric component: `model.decoder.layers.3.attn` →
    `model.decoder.layers`; a top-level Sequential's `3.0` → ``."""
    parts = (module or "").split(".")
    head = []
    for part in parts:
        if part.isdigit():
            break
        head.append(part)
    return ".".join(head)


def stacks(points: Sequence[Any], keep: Callable[[Any], bool] | None = None) -> list[list[Any]]:
    """`points` (forward order) split into stacks: a new stack where the tensor size or the module
    prefix changes. `keep` drops points first (points off the stream)."""
    result: list[list[Any]] = []
    for p in points:
        if keep is not None and not keep(p):
            continue
        if result and result[-1][-1].numel == p.numel and stack_key(result[-1][-1].module) == stack_key(p.module):
            result[-1].append(p)
        else:
            result.append([p])
    return result


def stream_points(ctx: Any) -> list[list[Any]]:
    """The profile's stream points grouped into stacks (a per-layer profile has no joins: every layer
    point is on the stream)."""
    m = ctx.measurements
    if m is None:
        return []
    if m.at != "join":
        return stacks(m.profile)
    on_stream = stream_ids(ctx.architecture)
    return stacks(m.profile, keep=lambda p: p.id in on_stream)


def relative_gradient(point: Any) -> float | None:
    """‖∂L/∂y‖ (RMS) times the activation's own scale √E[y²]: the gradient with respect to a relative
    change of y. Unlike the raw gradient it does not step where a stage changes the activation scale
    (a norm after it makes the loss blind to that scale), and it is what sets a weight's relative update
    ‖∂L/∂W‖/‖W‖ for the layer reading y, which decides whether one learning rate suits every block."""
    if point.grad_rms is None or point.var is None or point.var <= 0:
        return None
    return point.grad_rms * math.sqrt(point.var)


def with_entry(groups: list[list[Any]]) -> list[list[Any]]:
    """`groups` with what enters the first block (its skip operand: var / var_ratio at the profile's
    first join) as a point before it, so that the first block's own growth counts: N blocks in series
    multiply the variance N times, not N − 1. For variance fits only (the entry has no gradient)."""
    if not groups or not groups[0]:
        return groups
    first = groups[0][0]
    if first.at != "join" or first.depth != 1 or not first.var_ratio or first.var_ratio <= 0:
        return groups
    entry = dataclasses.replace(first, id=f"{first.id}:skip", var=first.var / first.var_ratio, var_ratio=None,
                                residual_ratio=None, grad_norm=None, grad_rms=None, sensitivity=None)
    return [[entry, *groups[0]], *groups[1:]]


def _series(stack: list[Any], value: Value) -> list[tuple[int, float]]:
    out = []
    for k, p in enumerate(stack):
        v = value(p)
        if v is not None and v > 0 and math.isfinite(v):
            out.append((k, math.log(v)))
    return out


#: thresholds on a measured variance trend, shared by HC201/HC202 and HC101's measured severity: the
#: fitted factor per block and the change over the stream must both pass
GROWTH_THRESHOLDS = {"warn_ratio": 1.15, "warn_total": 100.0, "error_ratio": 1.3, "error_total": 1000.0}


def _centred(series: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """(mean k, mean y, Σ(k − k̄)², Σ(k − k̄)(y − ȳ)) of a series of (position, value) pairs."""
    mk = sum(k for k, _ in series) / len(series)
    my = sum(y for _, y in series) / len(series)
    return (mk, my, sum((k - mk) ** 2 for k, _ in series), sum((k - mk) * (y - my) for k, y in series))


def trend(groups: Iterable[list[Any]], value: Value) -> Trend | None:
    """Pooled slope of log(value) against position, one intercept per stack (fixed effects)."""
    sxy = sxx = 0.0
    steps = used = points = 0
    for stack in groups:
        series = _series(stack, value)
        if len(series) < 2:
            continue
        _, _, stack_sxx, stack_sxy = _centred(series)
        sxx += stack_sxx
        sxy += stack_sxy
        steps += series[-1][0] - series[0][0]
        used += 1
        points += len(series)
    if used == 0 or sxx <= 0:
        return None
    return Trend(math.exp(sxy / sxx), steps, used, points)


def exponential_rate(groups: Iterable[list[Any]], value: Value) -> Trend | None:
    """The exponential part of the growth: how fast the per-block *increments* v_(k+1) − v_k grow.

    For v_k = a·ρ^k the increments grow ×ρ per block; for linear growth v_k = c + d·k (a norm in every
    branch: each block adds the same amount, after an embedding of any scale) they stay constant, and
    an offset or a few small first blocks (OLMo2-style stacks grow ×40 over their first two joins,
    then by +1 per join) do not move them. Per stack of at least 4 points, the mean increment of the
    later half over that of the earlier half, per block between the halves' centres; pooled over
    stacks (geometric mean weighted by that distance) and capped by the log-linear fit's factor. The
    change over the stream (`total`) is the log-linear fit's."""
    log_sum = weight = 0.0
    steps = used = points = 0
    for stack in groups:
        values = [value(p) for p in stack]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if len(values) < 2:
            continue
        steps += len(values) - 1
        points += len(values)
        used += 1
        increments = [b - a for a, b in zip(values, values[1:])]
        if len(increments) < 3:
            continue
        half = len(increments) // 2
        early, late = sum(increments[:half]) / half, sum(increments[-half:]) / half
        distance = len(increments) - half
        rate = math.log(late / early) / distance if early > 0 and late > 0 else 0.0
        log_sum += rate * distance
        weight += distance
    fit = trend(groups, value)
    if used == 0 or fit is None:
        return None
    if weight == 0:  # stacks too short for increments: the log-linear fit alone
        return Trend(fit.per_point, steps, used, points)
    # the rate: both must see it (the ratio of two small mean increments is noisy where the growth is
    # mild, as in short BN stages; the log-linear fit is fooled by a few small first blocks); the
    # change over the stream: the log-linear fit's
    return Trend(min(math.exp(log_sum / weight), fit.per_point), steps, used, points, change=fit.total)


def _wls_line(series: list[tuple[int, float]]) -> tuple[float, float]:
    """c + d·k fitted to values v_k = exp(y_k) by least squares on relative error (weights 1/v²)."""
    s0 = s1 = s2 = t0 = t1 = 0.0
    for k, y in series:
        w = math.exp(-2 * y)
        v = math.exp(y)
        s0, s1, s2 = s0 + w, s1 + w * k, s2 + w * k * k
        t0, t1 = t0 + w * v, t1 + w * v * k
    det = s0 * s2 - s1 * s1
    if det <= 0:
        return t0 / s0, 0.0
    return (t0 * s2 - t1 * s1) / det, (s0 * t1 - s1 * t0) / det


def growth_is_linear(groups: Iterable[list[Any]], value: Value) -> bool:
    """True when a straight line, value_k = c + d·k, explains the growth at least as well as an
    exponential, value_k = a·ρ^k (both per stack, errors compared in log space).

    BatchNorm/LayerNorm in each branch makes every block add about the same variance, so the stream
    grows like (k+1)/k: linear, whatever the first point's scale (a tiny embedding followed by +1
    per join reads as a huge first/last ratio). Residual adds without normalization multiply it:
    exponential, the pathology (seed 001).
    """
    exponential = linear = 0.0
    for stack in groups:
        series = _series(stack, value)
        if len(series) < 3:
            continue
        mk, my, sxx, sxy = _centred(series)
        slope = sxy / sxx if sxx > 0 else 0.0
        exponential += sum((y - my - slope * (k - mk)) ** 2 for k, y in series)
        c, d = _wls_line(series)
        for k, y in series:
            predicted = c + d * k
            linear += (math.log(predicted) - y) ** 2 if predicted > 0 else 100.0
    return linear <= exponential
