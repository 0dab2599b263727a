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
from healthcheck.graph.taxonomy import SLICING_OPS

#: Ops a skip path may pass through: a projection (DPN's BN -> ReLU -> 1x1 conv, GhostNet's
#: depthwise + pointwise conv, Hiera's linear -> max-pool) is still a shortcut.
_SKIP_PATH_OPS = PROJECTION_OPS | {Category.TRIVIAL, Category.SCALE, Category.ACT}
#: Ops that leave a tensor "the same" for following the trunk forwards or a branch backwards.
_PASS_THROUGH = frozenset({Category.TRIVIAL, Category.SCALE})
#: Ops between a weight layer and the tensor it makes, still "that layer's output".
_LAYER_OUTPUT_OPS = frozenset({Category.NORM, Category.ACT, Category.TRIVIAL, Category.SCALE, Category.POOL})
#: Slicing ops that return several parts.
_MULTI_OUTPUT_SLICING = frozenset({"split", "split_with_sizes", "chunk", "unbind", "tensor_split"})
_MAX_SKIP_OPS = 10
_MAX_SKIP_WEIGHTS = 2


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


def _layer_output_of(graph: OpGraph, index: int) -> int | None:
    """The weight layer whose output `index` is (through norm, activation, pooling, reshapes, gains),
    if any. A sum with a learned tensor (CaiT's class token + attention) is a stream, not a layer's
    output."""
    node = graph.nodes[index]
    while node.category in _LAYER_OUTPUT_OPS and len(node.inputs) == 1 and node.op not in ("add", "sub"):
        node = graph.nodes[node.inputs[0]]
    return node.index if is_weight_layer(node) else None


def _inside(module: str, outer: str) -> bool:
    return module == outer or module.startswith(outer + ".")


def _layer_internal(graph: OpGraph, index: int, fork: int, path: tuple[int, ...], branch: frozenset[int],
                    joins: set[int]) -> bool:
    """A sum or concat inside one layer, not a join: Res2Net's hierarchical `sp + spx[i]`, a Ghost
    module's cat([x1, cheap(x1)]). Either the skip carries a slice of the fork that the branch never
    reads (the branch reads other slices), or the fork is made by a weight layer of the join's own
    module and widened by a concat or one more layer. A stage whose branch holds residual blocks
    (CSPNet's cross-stage concat) is a join."""
    if any(i in joins for i in branch):
        return False
    nodes = graph.nodes
    if path and nodes[path[-1]].op in SLICING_OPS and all(
            nodes[c].op in SLICING_OPS for c in graph.consumers[fork] if c in branch):
        return True
    if not path and nodes[fork].op in _MULTI_OUTPUT_SLICING:
        return True  # the recorder binds every part of a split to the split: skip and branch read parts of it
    # A concat of a fresh output of the module's own layer with more channels computed from it is
    # how a layer widens its output (a Ghost module's cheap conv, Res2Net's scales), and so is a sum
    # with one more layer on it (RepGhost's cheap conv + BN(x1)). A deeper sum there is a residual
    # sub-block after a layer of the block's own (RepViT's ffn after its channel downsample,
    # TinyViT's MLP after its local conv). The root module holds every layer of a model written
    # flat: it says nothing about layers.
    module = nodes[index].module
    if not module or (nodes[index].category is not Category.CONCAT and _count_weights(graph, branch) > 1):
        return False
    producer = _layer_output_of(graph, fork)
    return producer is not None and _inside(nodes[producer].module, module)


def _along_features(graph: OpGraph, branch: frozenset[int], axis: int, ndim: int) -> bool:
    """Whether a concat along `axis` adds features (channels), not tokens or positions. Images
    (N, C, H, W) hold channels first or last; a sequence (N, L, C) of tokens holds them last, and
    (N, C, L) after a 1-d convolution: the branch's last weight layer tells which."""
    if ndim >= 4:
        return axis in (1, ndim - 1)
    if ndim == 3:
        last = max((i for i in branch if is_weight_layer(graph.nodes[i])), default=None)
        return axis == (1 if last is not None and "conv" in graph.nodes[last].op.lower() else 2)
    return axis == ndim - 1


def _best_candidate(graph: OpGraph, anc: list[int], index: int, operands: tuple[int, ...],
                    joins: set[int]) -> _Candidate | None:
    """The skip operand and fork that make `index` a residual join, if any.

    The branch is everything between the fork and the other operands that descend from it; it must
    hold a weight layer and a nonlinearity or norm (a purely linear branch, like a LoRA adapter's
    B·A·x added to W·x, is a reparametrized linear layer, not a residual block), and more weight
    layers than the skip path. The fork carries signal (a float tensor: position ids computed from
    token ids are no branch), the sum is not inside one layer (`_layer_internal`), and a concat
    joins along the feature axis (DenseNet, U-Net): a concat of tokens (a class token put in front
    of the patch tokens) adds no features. `joins`: the joins found so far, in forward order.
    """
    node = graph.nodes[index]
    concat = node.category is Category.CONCAT
    best: _Candidate | None = None
    for a in operands:
        for fork, path in _skip_path_candidates(graph, a):
            skip_weights = _count_weights(graph, path)
            if skip_weights > _MAX_SKIP_WEIGHTS:
                break
            if concat and any(graph.nodes[i].category is not Category.TRIVIAL for i in path):
                break
            branch_operands = tuple(b for b in operands if b != a and (anc[b] >> fork) & 1)
            if not branch_operands:
                continue
            if not graph.nodes[fork].floating:
                break
            branch = frozenset().union(*(_branch_nodes(graph, anc, fork, b) for b in branch_operands))
            weights = _count_weights(graph, branch)
            nonlinear = any(graph.nodes[i].category in NONLINEAR_OPS or graph.nodes[i].category is Category.NORM
                            for i in branch)
            if (weights >= 1 and nonlinear and weights > skip_weights
                    and not _layer_internal(graph, index, fork, path, branch, joins)
                    and not (concat and node.axis is not None and node.shape is not None
                             and not _along_features(graph, branch, node.axis, len(node.shape)))):
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


def _through(graph: OpGraph, index: int, categories: tuple[Category, ...]) -> OpNode:
    """The first op at or before `index` not of `categories` (single-input ops only)."""
    node = graph.nodes[index]
    while node.category in categories and len(node.inputs) == 1:
        node = graph.nodes[node.inputs[0]]
    return node


def _pre_activation(graph: OpGraph, cand: _Candidate, skip: str) -> bool:
    """The branch starts with a norm (-> act) of the block input. Blocks with a projection shortcut
    fork after that shared norm (-> act), which normalizes the trunk (ResNetV2, Hiera), not the
    output of a conv (ResNet v1's stem)."""
    nodes = graph.nodes
    entries = _branch_entries(graph, cand.fork, cand.branch)
    if entries and all(nodes[i].category is Category.NORM for i in entries):
        return True
    if skip != "projection":
        return False
    fork = _through(graph, cand.fork, (Category.TRIVIAL,))
    if fork.category is Category.ACT and len(fork.inputs) == 1:
        fork = _through(graph, fork.inputs[0], (Category.TRIVIAL,))
    return fork.category is Category.NORM and len(fork.inputs) == 1 and not is_weight_layer(
        _through(graph, fork.inputs[0], (Category.TRIVIAL,)))


def _describe(graph: OpGraph, index: int, cand: _Candidate) -> dict:
    nodes = graph.nodes
    node = nodes[index]
    skip = "projection" if any(nodes[i].category in PROJECTION_OPS for i in cand.skip_path) else "identity"
    after = _downstream(graph, index)
    pre_activation = _pre_activation(graph, cand, skip)
    if any(nodes[i].category is Category.NORM for i in cand.branch) or pre_activation:
        norm = "branch"  # in the branch, or on the fork the branch starts from (pre-activation)
    elif after and all(nodes[i].category is Category.NORM for i in after):
        norm = "post"
    else:
        norm = "none"
    entries = _branch_entries(graph, cand.fork, cand.branch)
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
    join_nodes: set[int] = set()
    for node in graph.nodes:
        if node.category not in (Category.ADD, Category.CONCAT) or len(node.inputs) < 2 or node.index in absorbed:
            continue
        if not graph.consumers[node.index] and node.index not in outputs:
            continue  # dead: its result is never used
        operands = _summands(graph, node.index, absorbed) if node.category is Category.ADD else node.inputs
        cand = _best_candidate(graph, anc, node.index, operands, join_nodes)
        if cand is not None:
            found.append((node, cand, _describe(graph, node.index, cand)))
            join_nodes.add(node.index)
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
    # trunk tensors: a join's output, and concats and reshapes that carry one on (ReXNet's
    # cat([x[:, :c] + shortcut, x[:, c:]]): the channels beside a partial residual do not make a
    # plain path around it)
    trunk = set(join_nodes)
    depth = [0] * len(graph.nodes)
    for node in graph.nodes:
        if node.category in (Category.TRIVIAL, Category.CONCAT) and any(i in trunk for i in node.inputs):
            trunk.add(node.index)
        if node.index not in trunk:
            depth[node.index] = max((depth[i] for i in node.inputs), default=0) + weight_layers(node)
    if not depth:
        return 0, None
    end = max(range(len(depth)), key=depth.__getitem__)
    return depth[end], end
