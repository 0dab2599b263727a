"""The observer that takes statistics while a recorded model runs (probes and monitor share it)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from healthcheck.graph.ir import Category, OpGraph, OpNode
from healthcheck.graph.joins import is_weight_layer
from healthcheck.probes import stats
from healthcheck.tensors import tensors_of


def is_join_candidate(node: OpNode) -> bool:
    return node.category in (Category.ADD, Category.CONCAT) and len(node.inputs) >= 2


class StatsObserver:
    """At every point (each join candidate, or each weight layer's input in plain stacks): E[y²], the
    operands' second moments, the effective rank, and ‖∂L/∂y‖² from a tensor hook; optionally the
    channels of each non-negative activation that were active for some input (dead units). Every
    value stays a device tensor. `point`, if given, may replace the input point's tensor.

    `at_layers` (default: not `at_joins`) measures weight layers' inputs; both can be on when it is
    not yet known whether the model has joins (the monitor's first sample)."""

    def __init__(self, at_joins: bool, max_vectors: int = 256, seed: int = 0, point: Any = None,
                 ranks: bool = True, dead_units: bool = False, at_layers: bool | None = None) -> None:
        self.at_joins = at_joins
        self.at_layers = not at_joins if at_layers is None else at_layers
        self.layer_points: set[int] = set()  # the points of a per-layer profile: layer inputs, the output
        self.max_vectors = max_vectors
        self.point = point
        self.ranks = ranks
        self.dead_units = dead_units
        self.active: dict[int, torch.Tensor] = {}  # activation node -> bool per channel: ever > 0
        self.values: dict[int, dict[str, torch.Tensor]] = {}  # node index -> statistics
        self.operand_moments: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.last_weight: tuple[str, int] | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch_norm call, in order
        # operand moments read just before an in-place op (`x += shortcut`) overwrote its first operand
        self.before_moments: dict[int, torch.Tensor] = {}
        # bool (batch × positions): the positions a loss counts (padding out); E[y²] and the ranks of
        # token tensors (batch, positions, channels) are taken over them only, as the loss is
        self.counted: torch.Tensor | None = None

    def before_inplace(self, operands: list[tuple[int, torch.Tensor]]) -> None:
        """An in-place join (`out += identity`) overwrites the branch with the sum: read the operands'
        moments now, or the branch would read as the sum (residual ratio 1 where the branch is 0)."""
        if self.at_joins:
            self.before_moments = {index: stats.second_moment(tensor) for index, tensor in operands}

    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        replaced = self.point.maybe_inject(node, result) if self.point is not None else None
        if replaced is not None:
            return replaced
        if self.dead_units and node.category is Category.ACT and node.nonnegative and isinstance(result, torch.Tensor):
            channel = 1 if result.dim() >= 3 and self.last_weight and self.last_weight[0].startswith("conv") else -1
            dims = [d for d in range(result.dim()) if d != (channel % result.dim())]
            self.active[node.index] = (result.detach() > 0).any(dim=dims) if dims else result.detach() > 0
        if node.op == "batch_norm" and operands:
            x = operands[0][1].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            self.batch_stats.append((x.mean(dim=dims), x.var(dim=dims, unbiased=False)))
        if is_weight_layer(node):
            if self.at_layers and operands:
                index, tensor = operands[0]
                self.measure(index, tensor, channel_dim=1 if node.op.startswith("conv") else -1)
                self.layer_points.add(index)
            out = tensors_of(result)
            if out and out[0].dim() >= 2:
                features = out[0].shape[1] if node.op.startswith("conv") else out[0].shape[-1]
                self.last_weight = (node.op, int(features))
        elif self.at_joins and is_join_candidate(node) and isinstance(result, torch.Tensor):
            self.measure(node.index, result, channel_dim=self._channel_dim(result))
            for index, tensor in operands:
                moment = self.before_moments.get(index)
                self.operand_moments[index] = stats.second_moment(tensor) if moment is None else moment
        self.before_moments = {}
        return None

    def measure_output(self, graph: OpGraph, output: Any) -> None:
        """The model's output as the last point of a per-layer profile: its first float tensor with a
        feature dimension (the logits, not a scalar loss beside them)."""
        tensors = [t for t in tensors_of(output) if t.is_floating_point() and t.dim() >= 1]
        for tensor in sorted(tensors, key=lambda t: t.dim() < 2):  # stable: the first 2-d+ one first
            index = next((i for i in graph.outputs if graph.nodes[i].shape == tuple(tensor.shape)), None)
            if index is not None:
                self.measure(index, tensor, channel_dim=-1 if tensor.dim() <= 3 else 1)
                self.layer_points.add(index)
                return

    def _channel_dim(self, tensor: torch.Tensor) -> int:
        if tensor.dim() <= 2 or self.last_weight is None:
            return 1 if tensor.dim() >= 4 else -1
        op, features = self.last_weight
        if tensor.shape[-1] == features and tensor.shape[1] != features:
            return -1
        if tensor.shape[1] == features and tensor.shape[-1] != features:
            return 1
        return 1 if op.startswith("conv") else -1

    def measure(self, index: int, tensor: torch.Tensor, channel_dim: int) -> None:
        if index in self.values or not tensor.is_floating_point():
            return
        counted = self._counted_rows(tensor, channel_dim)
        values = {"var": stats.counted_moment(tensor, counted), "numel": torch.tensor(float(tensor.numel()))}
        if self.ranks:
            rank, participation, draws, within = stats.rank_statistics(tensor, channel_dim, self.max_vectors,
                                                                       self.generator, counted)
            size = stats.rank_size(tensor, channel_dim, self.max_vectors)
            values.update(rank=rank, participation=participation, rank_size=torch.tensor(float(size)),
                          rank_draws=draws, rank_within=within,  # for stats.directions_band and HC203
                          rank_channels=torch.tensor(float(tensor.shape[channel_dim] if tensor.dim() > 1 else 1)))
        self.values[index] = values
        if tensor.requires_grad:
            tensor.register_hook(partial(self._on_grad, index))

    def _counted_rows(self, tensor: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
        """`self.counted` where `tensor` is laid out (batch, positions, channels), else None."""
        mask = self.counted
        if mask is None or tensor.dim() != 3 or channel_dim % 3 != 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
            return None
        return mask.to(device=tensor.device, dtype=torch.bool)

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        self.grads[index] = grad.detach().float().pow(2).sum()


