"""Graph passes: find residual joins and describe them; measure depth.

Pure functions of an `OpGraph`. A residual join is an add (or concat) whose operands both
descend from one fork tensor: one through a skip path (the fork itself, or a short projection),
the other through a deeper branch with weights and a nonlinearity. See design.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from healthcheck.graph.ir import NONLINEAR_OPS, PROJECTION_OPS, Category, OpGraph, OpNode

#: Ops a skip path may pass through.
_SKIP_PATH_OPS = PROJECTION_OPS | {Category.TRIVIAL, Category.SCALE}
#: Ops that leave a tensor "the same" for following the trunk forwards or a branch backwards.
_PASS_THROUGH = frozenset({Category.TRIVIAL, Category.SCALE})
_MAX_SKIP_OPS = 8
_MAX_SKIP_WEIGHTS = 1


@dataclass(frozen=True)
class Join:
    id: str
    kind: str  # "add" | "concat"
    skip: str  # "identity" | "projection"
    norm: str  # "branch" | "post" | "none"
    pre_activation: bool
    activation_after_join: bool
    scale: float | None
    learnable_gain: bool
    module: str
    source: str | None
    # graph facts the JSON does not carry, used by rules and probes
    node: int  # the add/concat op
    fork: int  # the tensor both paths start from
    skip_operand: int
    branch_operands: tuple[int, ...]  # several for parallel blocks: x + attn(x) + mlp(x)
    branch_weights: int  # weight layers on the branch
    branch_ends_nonnegative: bool  # branch output passes a ReLU/sigmoid last (HC105)
    scale_on: str | None = None  # "sum" (s·(x + f)) or "branch" (x + a·f): where `scale` applies
    branch_norms: tuple[str, ...] = ()  # modules of the branch's normalization ops, in forward order
    branch_entries: tuple[str, ...] = ()  # modules of the branch's first ops (they read the fork)
    post_norm: str | None = None  # the module normalizing the join's output (norm == "post")

    def to_json(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "skip": self.skip, "norm": self.norm,
            "pre_activation": self.pre_activation,
            "activation_after_join": self.activation_after_join,
            "scale": self.scale, "learnable_gain": self.learnable_gain,
            "module": self.module, "source": self.source,
        }


@dataclass(frozen=True)
class _Candidate:
    skip_operand: int
    branch_operands: tuple[int, ...]  # every operand that descends from the fork
    fork: int
    skip_path: tuple[int, ...]  # ops between fork (exclusive) and skip operand (inclusive)
    branch: frozenset[int]  # ops between fork (exclusive) and the branch operands (inclusive)
    skip_weights: int
    branch_weights: int

    def key(self) -> tuple[int, int, int]:
        return (self.skip_weights, len(self.skip_path), -self.branch_weights)


def _skip_path_candidates(graph: OpGraph, operand: int) -> list[tuple[int, tuple[int, ...]]]:
    """(fork candidate, path) pairs walking back from a would-be skip operand."""
    out = [(operand, ())]
    path: list[int] = []
    current = operand
    while len(path) < _MAX_SKIP_OPS:
        node = graph.nodes[current]
        if node.category not in _SKIP_PATH_OPS or len(node.inputs) != 1:
            break
        path.append(current)
        current = node.inputs[0]
        out.append((current, tuple(path)))
    return out


def _branch_nodes(graph: OpGraph, anc: list[int], fork: int, operand: int) -> frozenset[int]:
    """Ops that lie on some path fork -> operand (fork excluded)."""
    seen = {operand}
    stack = [operand]
    while stack:
        for i in graph.nodes[stack.pop()].inputs:
            if i != fork and i not in seen and (anc[i] >> fork) & 1:
                seen.add(i)
                stack.append(i)
    return frozenset(seen)


def is_weight_layer(node: OpNode) -> bool:
    """A layer with a learned weight matrix (attention modules like nn.MultiheadAttention too)."""
    return node.category is Category.WEIGHT or (node.category is Category.ATTENTION and node.has_param)


def weight_layers(node: OpNode) -> int:
    """Weight layers in one op: an attention module with its parameters (nn.MultiheadAttention, a
    wrapped attention function) is its input and output projections, as torch.export shows them."""
    if not is_weight_layer(node):
        return 0
    return 2 if node.category is Category.ATTENTION or "attention" in node.op else 1


def _count_weights(graph: OpGraph, indices: Iterable[int]) -> int:
    return sum(weight_layers(graph.nodes[i]) for i in indices)


def _best_candidate(graph: OpGraph, anc: list[int], index: int, operands: tuple[int, ...]) -> _Candidate | None:
    """The skip operand and fork that make `index` a residual join, if any.

    The branch is everything between the fork and the other operands that descend from it; it must
    hold a weight layer and a nonlinearity or norm (a purely linear branch, like a LoRA adapter's
    B·A·x added to W·x, is a reparametrized linear layer, not a residual block), and more weight
    layers than the skip path.
    """
    node = graph.nodes[index]
    best: _Candidate | None = None
    for a in operands:
        for fork, path in _skip_path_candidates(graph, a):
            skip_weights = _count_weights(graph, path)
            if skip_weights > _MAX_SKIP_WEIGHTS:
                break
            if node.category is Category.CONCAT and any(graph.nodes[i].category is not Category.TRIVIAL for i in path):
                break
            branch_operands = tuple(b for b in operands if b != a and (anc[b] >> fork) & 1)
            if not branch_operands:
                continue
            branch = frozenset().union(*(_branch_nodes(graph, anc, fork, b) for b in branch_operands))
            weights = _count_weights(graph, branch)
            nonlinear = any(graph.nodes[i].category in NONLINEAR_OPS or graph.nodes[i].category is Category.NORM
                            for i in branch)
            if weights >= 1 and nonlinear and weights > skip_weights:
                cand = _Candidate(a, branch_operands, fork, path, branch, skip_weights, weights)
                if best is None or cand.key() < best.key():
                    best = cand
            break  # the nearest fork on this operand's skip path decides
    return best


def _summands(graph: OpGraph, index: int, absorbed: set[int]) -> tuple[int, ...]:
    """Operands of a sum, looking through inner adds absorbed into it: x + attn + mlp is one join."""
    out: list[int] = []
    for i in graph.nodes[index].inputs:
        out.extend(_summands(graph, i, absorbed) if i in absorbed else (i,))
    return tuple(dict.fromkeys(out))


def _absorbed_adds(graph: OpGraph) -> set[int]:
    """Adds whose only consumer is another add: parts of one n-ary sum."""
    def is_sum(i: int) -> bool:
        return graph.nodes[i].category is Category.ADD and len(graph.nodes[i].inputs) >= 2

    return {n.index for n in graph.nodes if is_sum(n.index) and len(graph.consumers[n.index]) == 1
            and is_sum(graph.consumers[n.index][0])}


def _downstream(graph: OpGraph, index: int) -> list[int]:
    """First ops after `index` that are not reshapes, dropout or constant scaling."""
    out, stack, seen = [], list(graph.consumers[index]), set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        if graph.nodes[i].category in _PASS_THROUGH and graph.nodes[i].scalar is None and not graph.nodes[i].param_operand:
            stack.extend(graph.consumers[i])
        else:
            out.append(i)
    return out


def _branch_tail(graph: OpGraph, operand: int, branch: frozenset[int]) -> tuple[list[int], int]:
    """Pass-through ops at the end of the branch, and the first real op before them."""
    tail, current = [], operand
    while graph.nodes[current].category in _PASS_THROUGH and current in branch:
        tail.append(current)
        if len(graph.nodes[current].inputs) != 1:
            break
        current = graph.nodes[current].inputs[0]
    return tail, current


def _branch_entries(graph: OpGraph, fork: int, branch: frozenset[int]) -> list[int]:
    """First real ops of the branch: reshapes are looked through, and so are inner joins that
    consume the fork directly (DenseNet's earlier concats), since the branch starts after them."""
    entries, stack, seen = [], [c for c in graph.consumers[fork] if c in branch], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        if graph.nodes[i].category in (Category.TRIVIAL, Category.ADD, Category.CONCAT):
            stack.extend(c for c in graph.consumers[i] if c in branch)
        else:
            entries.append(i)
    return entries


def _describe(graph: OpGraph, index: int, cand: _Candidate) -> dict:
    nodes = graph.nodes
    node = nodes[index]
    skip = "projection" if any(nodes[i].category in PROJECTION_OPS for i in cand.skip_path) else "identity"
    after = _downstream(graph, index)
    if any(nodes[i].category is Category.NORM for i in cand.branch):
        norm = "branch"
    elif after and all(nodes[i].category is Category.NORM for i in after):
        norm = "post"
    else:
        norm = "none"
    entries = _branch_entries(graph, cand.fork, cand.branch)
    pre_activation = bool(entries) and all(nodes[i].category is Category.NORM for i in entries)
    if not pre_activation and skip == "projection":
        # Pre-activation blocks with a projection shortcut fork after the shared norm -> act.
        fork = nodes[cand.fork]
        if fork.category is Category.ACT and len(fork.inputs) == 1:
            fork = nodes[fork.inputs[0]]
        pre_activation = fork.category is Category.NORM and any(
            nodes[i].category in (Category.ADD, Category.CONCAT) for i in fork.inputs)
    tail, last_real = _branch_tail(graph, cand.branch_operands[-1], cand.branch)
    branch_scale = next((nodes[i].scalar for i in tail if nodes[i].scalar is not None), None)
    if branch_scale is None and node.scalar is not None and cand.branch_operands == (node.inputs[-1],):
        branch_scale = node.scalar  # torch.add(x, f(x), alpha=a)
    learnable_gain = any(nodes[i].param_operand for i in tail)
    sum_scale = None
    consumers = graph.consumers[index]
    if len(consumers) == 1 and nodes[consumers[0]].category is Category.SCALE:
        sum_scale = nodes[consumers[0]].scalar
    return {
        "kind": "concat" if node.category is Category.CONCAT else "add",
        "skip": skip, "norm": norm, "pre_activation": pre_activation,
        "activation_after_join": bool(after) and all(nodes[i].category is Category.ACT for i in after),
        "scale": sum_scale if sum_scale is not None else branch_scale,
        "scale_on": "sum" if sum_scale is not None else ("branch" if branch_scale is not None else None),
        "learnable_gain": learnable_gain,
        "branch_ends_nonnegative": nodes[last_real].category is Category.ACT and nodes[last_real].nonnegative,
        "branch_norms": tuple(dict.fromkeys(nodes[i].module for i in sorted(cand.branch)
                                            if nodes[i].category is Category.NORM)),
        "branch_entries": tuple(dict.fromkeys(nodes[i].module for i in sorted(entries))),
        "post_norm": nodes[after[0]].module if norm == "post" and len(after) == 1 else None,
    }


def find_joins(graph: OpGraph) -> list[Join]:
    """Every residual join, in forward order."""
    anc = graph.ancestors()
    found = []
    absorbed = _absorbed_adds(graph)
    outputs = set(graph.outputs)
    for node in graph.nodes:
        if node.category not in (Category.ADD, Category.CONCAT) or len(node.inputs) < 2 or node.index in absorbed:
            continue
        if not graph.consumers[node.index] and node.index not in outputs:
            continue  # dead: its result is never used
        operands = _summands(graph, node.index, absorbed) if node.category is Category.ADD else node.inputs
        cand = _best_candidate(graph, anc, node.index, operands)
        if cand is not None:
            found.append((node, cand, _describe(graph, node.index, cand)))
    per_module = Counter(node.module for node, _, _ in found)
    seen: Counter[str] = Counter()
    joins = []
    for node, cand, facts in found:
        name = node.module or "(root)"
        if per_module[node.module] > 1:
            name = f"{name}#{seen[node.module]}"
            seen[node.module] += 1
        joins.append(Join(
            id=name, module=node.module, source=node.source, node=node.index, fork=cand.fork,
            skip_operand=cand.skip_operand, branch_operands=cand.branch_operands,
            branch_weights=cand.branch_weights, **facts,
        ))
    return joins


def weight_depth(graph: OpGraph) -> int:
    """Weight layers on the longest input -> output path (resnet18: 18, vgg11: 11)."""
    depth = [0] * len(graph.nodes)
    for node in graph.nodes:
        depth[node.index] = max((depth[i] for i in node.inputs), default=0) + weight_layers(node)
    return max((depth[i] for i in graph.outputs), default=0)


def plain_depth(graph: OpGraph, joins: list[Join]) -> tuple[int, int | None]:
    """Longest run of weight layers with no residual join anywhere along it, and its last op."""
    join_nodes = {j.node for j in joins}
    depth = [0] * len(graph.nodes)
    for node in graph.nodes:
        if node.index not in join_nodes:
            depth[node.index] = max((depth[i] for i in node.inputs), default=0) + weight_layers(node)
    if not depth:
        return 0, None
    end = max(range(len(depth)), key=depth.__getitem__)
    return depth[end], end
