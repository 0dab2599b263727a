"""Fix transforms: each takes a model (with its analysis) and returns a new model; the original is
never touched (science.md, Fixes).

Two mechanisms:
- module surgery on a deep copy, when the fix is a change of parameters (zero-init gains);
- `JoinRewriter`, a wrapper that runs a deep copy under the recorder and rewrites the output of
  chosen joins while it runs (scale the sum, add a norm or a gain to the branch). It needs no
  graph rewriting, so it works on every model the recorder can follow; it holds only a deep copy
  of the model and the fix's new parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from healthcheck.graph.ir import Category, OpGraph, OpNode
from healthcheck.graph.joins import Join
from healthcheck.graph.recorder import record
from healthcheck.graph.taxonomy import classify_module
from healthcheck.probes.observer import is_join_candidate
from healthcheck.tensors import forward_kwargs


@dataclass(frozen=True)
class Target:
    """A join as the rewriter finds it again while the model runs: the `ordinal`-th add/concat of
    two data tensors inside `module` (node indices differ between train and eval mode, this does
    not), and which of its operands is the skip."""

    join: Join
    module: str
    ordinal: int
    skip_position: int
    shape: tuple[int, ...]
    post_activation: tuple[str, int, str] | None = None  # (module, ordinal among its activations, op)


def targets(graph: OpGraph, joins: list[Join]) -> list[Target]:
    """Targets for the joins whose skip is a direct operand (n-ary sums are left alone)."""
    ordinals: dict[int, int] = {}
    seen: dict[tuple[str, bool], int] = {}
    for node in graph.nodes:
        kind = (node.module, node.category is Category.ACT)
        if is_join_candidate(node) or node.category is Category.ACT:
            ordinals[node.index] = seen.get(kind, 0)
            seen[kind] = ordinals[node.index] + 1
    out = []
    for join in joins:
        node = graph.nodes[join.node]
        if join.skip_operand not in node.inputs:
            continue
        post = None
        consumers = graph.consumers[join.node]
        if join.activation_after_join and len(consumers) == 1 and graph.nodes[consumers[0]].category is Category.ACT:
            act = graph.nodes[consumers[0]]
            post = (act.module, ordinals[act.index], act.op)
        out.append(Target(join, node.module, ordinals[join.node], node.inputs.index(join.skip_operand),
                          node.shape or (), post))
    return out


class JoinRewriter(nn.Module):
    """A copy of `model` whose chosen joins are rewritten while it runs (subclasses define
    `rewrite(target, result, skip, branch)`, `branch` being the sum of the other operands). A rewrite
    that does not use `result` leaves the original add dead (unused), and dead ops are not joins."""

    def __init__(self, model: nn.Module, chosen: list[Target]) -> None:
        super().__init__()
        self.model = model
        self.targets = {(t.module, t.ordinal): t for t in chosen}

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rewrite_activation(self, key: tuple[str, int], result: torch.Tensor, operand: torch.Tensor) -> torch.Tensor | None:
        """Replace an activation's output (None keeps it)."""
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rewriter, seen, acts = self, {}, {}

        class _Rewrite:
            def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
                if node.category is Category.ACT and operands:
                    ordinal = acts.get(node.module, 0)
                    acts[node.module] = ordinal + 1
                    return rewriter.rewrite_activation((node.module, ordinal), result, operands[0][1])
                if not is_join_candidate(node):
                    return None
                ordinal = seen.get(node.module, 0)
                seen[node.module] = ordinal + 1
                target = rewriter.targets.get((node.module, ordinal))
                if target is None or not isinstance(result, torch.Tensor) or target.skip_position >= len(operands):
                    return None
                skip = operands[target.skip_position][1]
                others = [t for k, (_, t) in enumerate(operands) if k != target.skip_position]
                branch = others[0] if len(others) == 1 else sum(others[1:], others[0])
                return rewriter.rewrite(target, result, skip, branch)

        return record(self.model, args, forward_kwargs(self.model, kwargs), _Rewrite()).output


class TrunkActivationRemoved(JoinRewriter):
    """The activation after each chosen join passes its input through: the skip path becomes an
    exact identity (the branch gets the activation at its start instead, see `pre_activation`)."""

    def __init__(self, model: nn.Module, chosen: list[Target]) -> None:
        super().__init__(model, chosen)
        self.removed = {t.post_activation[:2] for t in chosen if t.post_activation}

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return result

    def rewrite_activation(self, key: tuple[str, int], result: torch.Tensor, operand: torch.Tensor) -> torch.Tensor | None:
        return operand if key in self.removed else None


def _key(target: Target) -> str:
    return f"{target.module or 'root'}#{target.ordinal}".replace(".", "_")


class ScaledJoins(JoinRewriter):
    """y = s·(x + f(x))."""

    def __init__(self, model: nn.Module, chosen: list[Target], scale: float) -> None:
        super().__init__(model, chosen)
        self.scale = scale

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return result * self.scale


class DepthScaledBranches(JoinRewriter):
    """y = x + f(x)/√K over K joins: the depth-aware scaling (Fixup / DeepNorm family)."""

    def __init__(self, model: nn.Module, chosen: list[Target]) -> None:
        super().__init__(model, chosen)
        self.scale = 1 / math.sqrt(max(len(chosen), 1))

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return skip + branch * self.scale


class GatedJoins(JoinRewriter):
    """y = x + α·f(x), α a learnable scalar per join initialized at 0."""

    def __init__(self, model: nn.Module, chosen: list[Target]) -> None:
        super().__init__(model, chosen)
        self.gains = nn.ParameterDict({_key(t): nn.Parameter(torch.zeros(())) for t in chosen})

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return skip + self.gains[_key(target)] * branch


class NormalizedJoins(JoinRewriter):
    """y = x + N(f(x)), one norm per join."""

    def __init__(self, model: nn.Module, chosen: list[Target]) -> None:
        chosen = [t for t in chosen if len(t.shape) in (2, 3, 4, 5)]
        super().__init__(model, chosen)
        self.norms = nn.ModuleDict({_key(t): _norm_for(t.shape) for t in chosen})

    def rewrite(self, target: Target, result: torch.Tensor, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return skip + self.norms[_key(target)](branch)


@dataclass(frozen=True)
class Transform:
    name: str
    summary: str
    applies_to: Callable[[Join], bool]
    build: Callable[[nn.Module, list[Target]], nn.Module]


def scale_joins(model: nn.Module, chosen: list[Target], scale: float = 1 / math.sqrt(2)) -> nn.Module:
    """y = (x + f(x)) / √2 at each join: variance-preserving when var f(x) ≈ var x."""
    return ScaledJoins(copy.deepcopy(model), chosen, scale)


def scale_branches_by_depth(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """y = x + f(x)/√K for K joins: each branch adds 1/K of the variance, the whole stack ×2 at most."""
    return DepthScaledBranches(copy.deepcopy(model), chosen)


def skip_init(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """y = x + α·f(x) with a learnable α initialized at 0 (SkipInit, De & Smith 2020)."""
    return GatedJoins(copy.deepcopy(model), chosen)


def zero_init_gains(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """Zero the weight of the last normalization layer in each branch (torchvision's
    zero_init_residual, Goyal et al. 2017): every block starts as the identity. Branches without
    an affine norm get a SkipInit gain instead."""
    fixed = copy.deepcopy(model)
    rest = []
    for target in chosen:
        norms = target.join.branch_norms
        weight = getattr(fixed.get_submodule(norms[-1]), "weight", None) if norms else None
        if isinstance(weight, nn.Parameter):
            with torch.no_grad():
                weight.zero_()
        else:
            rest.append(target)
    return skip_init(fixed, rest) if rest else fixed


def _norm_for(shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm over channels for (N, C) vectors and (N, C, H, W[, D]) maps; LayerNorm over the last
    dimension for (N, T, D) sequences."""
    if len(shape) == 3:
        return nn.LayerNorm(shape[-1])
    return {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](shape[1])


def norm_in_branch(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """y = x + N(f(x)): each branch then adds unit variance, so growth becomes (k+1)/k."""
    return NormalizedJoins(copy.deepcopy(model), chosen)


class PreNorm(nn.Module):
    """`norm` (a norm or an activation) applied to the tensor a branch starts from, then the
    branch's first module."""

    def __init__(self, norm: nn.Module, module: nn.Module) -> None:
        super().__init__()
        self.norm, self.module = norm, module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        normed = self.norm(x)
        args = tuple(normed if a is x else a for a in args)  # attention called as (x, x, x)
        return self.module(normed, *args, **kwargs)


def _common_module(paths: tuple[str, ...]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def pre_ln(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """Post-LN → Pre-LN (Xiong et al. 2020): y = LN(x + f(x)) becomes y = x + f(LN(x)). Each join's
    norm moves to the start of its branch (wrapping the branch's first module); the last one stays
    where it is, as the final norm after the last block."""
    fixed = copy.deepcopy(model)
    joins = [t.join for t in chosen if t.join.post_norm and t.join.branch_entries]
    for i, join in enumerate(joins):
        norm = fixed.get_submodule(join.post_norm)
        entry = _common_module(join.branch_entries)
        if not entry or entry == join.module or not entry.startswith(join.module):
            entries = join.branch_entries  # no single module holds the whole branch start
        else:
            entries = (entry,)
        for path in entries:
            _set_submodule(fixed, path, PreNorm(copy.deepcopy(norm), fixed.get_submodule(path)))
        if i < len(joins) - 1:
            _set_submodule(fixed, join.post_norm, nn.Identity())
    return fixed


class Residual(nn.Module):
    """x + branch(x), then `after` (the activation that ended the wrapped layers)."""

    def __init__(self, branch: nn.Module, after: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.after = after if after is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(x + self.branch(x))


def _shapes_of_children(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, tuple]:
    shapes: dict[nn.Module, tuple] = {}

    def remember(module: nn.Module, inputs: tuple, output: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes.setdefault(module, (tuple(inputs[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(remember) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _group_units(units: list[list[nn.Module]], shapes: dict[nn.Module, tuple], per_block: int
                 ) -> tuple[list[nn.Module], int]:
    """Consecutive shape-preserving (weight → … → activation) units, `per_block` at a time, as
    Residual blocks; everything else unchanged, in order."""
    rebuilt: list[nn.Module] = []
    pending: list[list[nn.Module]] = []
    added = 0
    for unit in units:
        weights = [m for m in unit if classify_module(m) is Category.WEIGHT]
        eligible = (len(weights) == 1 and classify_module(unit[-1]) is Category.ACT
                    and all(m in shapes and shapes[m][0] == shapes[m][1] for m in weights))
        if not eligible:
            rebuilt.extend(m for u in pending for m in u)
            pending.clear()
            rebuilt.extend(unit)
            continue
        pending.append(unit)
        if len(pending) == per_block:
            modules = [m for u in pending for m in u]
            branch = modules[:-1]
            if not any(classify_module(m) is Category.NORM for m in branch):
                branch.append(_norm_for(shapes[weights[0]][1]))  # skips with BN (science.md, Fixes)
            rebuilt.append(Residual(nn.Sequential(*branch), modules[-1]))
            pending.clear()
            added += 1
    rebuilt.extend(m for u in pending for m in u)
    return rebuilt, added


def add_skips(model: nn.Module, args: tuple, kwargs: dict, layers_per_block: int = 2) -> tuple[nn.Module, int]:
    """Wrap runs of shape-preserving layers inside nn.Sequential containers into residual blocks:
    every `layers_per_block` (weight → norm → activation) units become relu(x + f(x)), f ending at
    the last unit's norm — or at a new BatchNorm/LayerNorm when the units have none (skips without
    normalization would make the variance explode). Returns the copy and how many skips were added."""
    fixed = copy.deepcopy(model)
    shapes = _shapes_of_children(fixed, args, kwargs)
    added = 0
    for container in [m for m in fixed.modules() if isinstance(m, nn.Sequential)]:
        children = list(container.children())
        units: list[list[nn.Module]] = []
        current: list[nn.Module] = []
        for child in children:
            current.append(child)
            if classify_module(child) is Category.ACT:
                units.append(current)
                current = []
        if current:
            units.append(current)
        rebuilt, count = _group_units(units, shapes, layers_per_block)
        added += count
        if count:
            for name in [n for n, _ in container.named_children()]:
                delattr(container, name)
            for i, module in enumerate(rebuilt):
                container.add_module(str(i), module)
    return fixed, added


_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
                "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "tanh": nn.Tanh, "mish": nn.Mish}


def pre_activation(model: nn.Module, chosen: list[Target]) -> nn.Module:
    """relu(x + f(x)) becomes x + f(relu(x)): the activation after each join moves to the start of
    its branch, so the skip path is an exact identity (He et al. 2016, identity mappings)."""
    fixed = copy.deepcopy(model)
    for module in fixed.modules():  # an in-place activation would rectify the join's output itself
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    chosen = [t for t in chosen if t.post_activation and t.join.branch_entries]
    for target in chosen:
        activation = _ACTIVATIONS.get(target.post_activation[2], nn.ReLU)()
        entries = target.join.branch_entries
        entry = _common_module(entries)
        join_module = target.join.module
        if entry and entry != join_module and entry.startswith(join_module):
            entries = (entry,)
        for path in entries:
            if path:
                _set_submodule(fixed, path, PreNorm(copy.deepcopy(activation), fixed.get_submodule(path)))
    return TrunkActivationRemoved(fixed, chosen)


def _unnormalized(join: Join) -> bool:
    return join.kind == "add" and join.norm == "none" and join.scale is None and not join.learnable_gain


TRANSFORMS: dict[str, Transform] = {
    t.name: t for t in (
        Transform("scale_joins", "scale each residual join by 1/√2", _unnormalized, scale_joins),
        Transform("scale_branches_by_depth", "scale each residual branch by 1/√(number of joins)", _unnormalized,
                  scale_branches_by_depth),
        Transform("norm_in_branch", "normalize the output of each residual branch", _unnormalized, norm_in_branch),
        Transform("zero_init_gains", "zero-init the last norm gain of each branch (SkipInit where it has none)",
                  lambda j: j.kind == "add" and not j.learnable_gain, zero_init_gains),
        Transform("pre_ln", "move each join's LayerNorm to the start of its branch (Post-LN → Pre-LN)",
                  lambda j: j.norm == "post" and j.post_norm is not None, pre_ln),
        Transform("pre_activation", "move the activation after each join to the start of its branch",
                  lambda j: j.activation_after_join, pre_activation),
    )
}
