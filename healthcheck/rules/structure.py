"""HC1xx: structural rules, read from the traced architecture alone."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from healthcheck.graph.joins import Join
from healthcheck.records import Finding, Location
from healthcheck.rules.registry import Rule, RuleContext, register


def short_source(source: str | None) -> str:
    if not source:
        return "?"
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}"


def by_source(joins: Iterable[Join]) -> Iterator[list[Join]]:
    """Joins grouped by the line of code that makes them (one block class = one fix), in order."""
    groups: dict[str, list[Join]] = {}
    for j in joins:
        groups.setdefault(j.source or j.module, []).append(j)
    yield from groups.values()


def _join_evidence(group: list[Join], **extra: Any) -> dict[str, Any]:
    return {"joins": [j.id for j in group], "count": len(group), **extra}


def _severity(count: int, warn_at: int, error_at: int) -> str | None:
    if count >= error_at:
        return "error"
    if count >= warn_at:
        return "warning"
    return None


def _hc101(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    bare = [j for j in ctx.architecture.joins
            if j.kind == "add" and j.norm == "none" and j.scale is None and not j.learnable_gain]
    severity = _severity(len(bare), opt["warn_joins"], opt["error_joins"])
    if severity is None:
        return
    growth = 2.0 ** len(bare)
    for group in by_source(bare):
        yield HC101.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} add the branch to the skip with no "
            f"normalization and no scaling: variance doubles per block, ×{growth:.3g} over the model's "
            f"{len(bare)} such joins",
            Location(group[0].module, group[0].source),
            _join_evidence(group, joins_in_model=len(bare), predicted_variance_growth=growth,
                           predicted_ratio_per_block=2.0),
        )


HC101 = register(Rule(
    code="HC101", name="unnormalized-residual-join",
    summary="Residual join with no normalization and no scaling",
    what="Finds residual adds `y = x + f(x)` where the branch f has no normalization layer, the sum is "
         "not scaled (e.g. by 1/√2) and the branch has no learnable gain (SkipInit, ReZero, LayerScale).",
    why="At He initialization a variance-preserving branch adds as much variance as the skip carries, so "
        "var(y) ≈ 2·var(x): the activations double at every block and grow like 2^L over L blocks; the "
        "gradients grow the same way going backwards. Deep stacks of such blocks overflow or train "
        "erratically unless a normalization or a scale keeps the sum in check.",
    source="science.md, Predictions: 'residual blocks, no normalization … var(y_k) doubles per block' "
           "(seed 001, residual networks and batch normalization).",
    bad_example="""
class Block(nn.Module):
    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))
""",
    good_example="""
class Block(nn.Module):
    def forward(self, x):
        return (x + self.conv2(F.relu(self.conv1(F.relu(x))))) / math.sqrt(2)
        # or: BatchNorm inside the branch, or a zero-initialized gain on f(x)
""",
    fix_summary="Scale each join by 1/√2, put BatchNorm/LayerNorm inside the branch, or zero-init the "
                "branch's last gain (SkipInit / Fixup)",
    transform="scale_joins",
    fix_safety="unsafe",
    options={"warn_joins": 2, "error_joins": 8},
    check=_hc101,
))


def _hc102(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    after = [j for j in ctx.architecture.joins if j.activation_after_join]
    if not after:
        return
    severity = "warning" if len(after) >= opt["warn_joins"] else "info"
    for group in by_source(after):
        yield HC102.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} are followed by an activation: "
            "the skip path is not an identity, so signal crosses a nonlinearity at every block",
            Location(group[0].module, group[0].source),
            _join_evidence(group, joins_in_model=len(after)),
        )


HC102 = register(Rule(
    code="HC102", name="activation-after-join",
    summary="Activation applied after the residual add (ResNet v1 ordering)",
    what="Finds residual joins whose output passes through an activation (e.g. `relu(x + f(x))`) "
         "before it reaches the next block.",
    why="With the activation after the add, the skip path from one block to the next is not an identity: "
        "every block's output is rectified, so information and gradients cannot pass through the network "
        "unchanged. Pre-activation blocks (norm → activation → weight inside the branch, nothing after the "
        "add) keep an exact identity path and train better at large depth (He et al. 2016, 'Identity "
        "Mappings in Deep Residual Networks'). Harmless at ResNet-50 depth, hence info below the "
        "`warn_joins` count.",
    source="science.md, Fixes: 'ReLU after the join (non-identity skip path) → pre-activation block' (seed 001).",
    bad_example="""
def forward(self, x):
    return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
""",
    good_example="""
def forward(self, x):
    return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
""",
    fix_summary="Use pre-activation blocks: move the activation into the branch (norm → act → weight) "
                "and leave nothing after the add",
    transform="pre_activation",
    fix_safety="unsafe",
    options={"warn_joins": 32},
    check=_hc102,
))


def _hc103(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    post = [j for j in ctx.architecture.joins if j.norm == "post"]
    severity = _severity(len(post), opt["warn_joins"], opt["error_joins"])
    if severity is None:
        return
    for group in by_source(post):
        yield HC103.finding(
            severity,
            f"{len(group)} residual join(s) at {short_source(group[0].source)} normalize after the add "
            f"(Post-LN) in a stack of {len(post)} such joins: last-layer gradients are large at init and "
            "training needs learning-rate warm-up",
            Location(group[0].module, group[0].source),
            _join_evidence(group, joins_in_model=len(post)),
        )


HC103 = register(Rule(
    code="HC103", name="post-norm-at-depth",
    summary="Normalization after the residual add (Post-LN) in a deep stack",
    what="Finds residual joins whose output goes straight into a normalization layer (`LN(x + f(x))`, "
         "the original Transformer and BERT ordering) when the model has at least `warn_joins` of them.",
    why="With Post-LN the normalization sits on the trunk, so gradients to early layers must pass every "
        "LayerNorm; at initialization the expected gradient of the last layers' parameters is large and "
        "grows with depth, and deep Post-LN stacks diverge without a careful learning-rate warm-up. Pre-LN "
        "(`x + f(LN(x))`) keeps an identity path and bounded gradients (Xiong et al. 2020).",
    source="science.md, Predictions: 'Post-LN transformer … gradients at the last layers are large at init' "
           "(seed 000; Xiong et al. 2020, 'On Layer Normalization in the Transformer Architecture').",
    bad_example="""
def forward(self, x):
    x = self.ln1(x + self.attn(x))
    return self.ln2(x + self.mlp(x))
""",
    good_example="""
def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))   # and one final LayerNorm after the last block
""",
    fix_summary="Move the LayerNorm into the branch (Pre-LN) with a final norm after the last block, or "
                "use DeepNorm-style scaled skips; otherwise keep a learning-rate warm-up",
    transform="pre_ln",
    fix_safety="unsafe",
    options={"warn_joins": 12, "error_joins": 48},
    check=_hc103,
))


def _hc104(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    arch = ctx.architecture
    severity = _severity(arch.plain_depth, opt["warn_depth"], opt["error_depth"])
    if severity is None:
        return
    evidence: dict[str, Any] = {"plain_depth": arch.plain_depth, "normalized": arch.has_norm}
    if arch.has_norm:
        growth = (3.14159265 / (3.14159265 - 1)) ** (0.5 * arch.plain_depth)
        evidence["predicted_gradient_growth"] = growth
        consequence = (f"with BatchNorm the gradient grows ≈×1.21 per layer going backwards (≈×{growth:.3g} over "
                       "the run) and sensitivity to input noise grows exponentially")
    else:
        consequence = "without normalization the signal collapses towards one direction and gradients shatter"
    yield HC104.finding(
        severity,
        f"{arch.plain_depth} weight layers in a row with no residual connection: {consequence}",
        Location(arch.plain_end, None),
        evidence,
    )


HC104 = register(Rule(
    code="HC104", name="deep-plain-stack",
    summary="Deep stack of layers with no skip connection",
    what="Measures the longest run of weight layers (conv, linear, attention) that no residual join "
         "bypasses and reports it when it reaches `warn_depth`.",
    why="Without skips, every layer multiplies the backward signal by its Jacobian. With BatchNorm the "
        "gradient norm grows by √(π/(π−1)) ≈ 1.21 per layer going backwards and the network's "
        "sensitivity to small input changes grows exponentially (SNR pathology); without normalization "
        "the representation collapses to a low effective rank and neighbouring inputs get uncorrelated "
        "('shattered') gradients.",
    source="science.md, Predictions: plain stack rows (seed 001; seed 002, Labatie 2019; Yang et al. 2019; "
           "Balduzzi et al. 2017).",
    bad_example="""
layers = []
for _ in range(40):
    layers += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
model = nn.Sequential(*layers)
""",
    good_example="""
class Block(nn.Module):   # residual: x + f(x), BatchNorm in the branch
    def forward(self, x):
        return x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
model = nn.Sequential(*[Block() for _ in range(20)])
""",
    fix_summary="Add residual connections (with normalization in the branch) around groups of layers",
    transform=None,
    fix_safety="unsafe",
    options={"warn_depth": 20, "error_depth": 50},
    check=_hc104,
))


def _hc105(ctx: RuleContext, opt: dict[str, Any]) -> Iterator[Finding]:
    ends = [j for j in ctx.architecture.joins if j.kind == "add" and j.branch_ends_nonnegative]
    for group in by_source(ends):
        yield HC105.finding(
            "warning",
            f"the residual branch of {len(group)} join(s) at {short_source(group[0].source)} ends in a "
            "non-negative activation: f(x) ≥ 0, so each block can only increase its input",
            Location(group[0].module, group[0].source),
            _join_evidence(group),
        )


HC105 = register(Rule(
    code="HC105", name="nonnegative-branch-output",
    summary="Residual branch ends in ReLU (or another non-negative activation)",
    what="Finds residual adds whose branch output passes a ReLU, ReLU6, sigmoid or softplus last.",
    why="If f(x) ≥ 0 everywhere, the block x + f(x) can only push every unit upwards: the branch cannot "
        "correct its input, and the activations drift upwards with depth. Residual branches should end in "
        "a linear (weight or norm) layer.",
    source="design.md rule list and seed 001 (residual blocks: the branch ends with a weight layer).",
    bad_example="""
def forward(self, x):
    return x + F.relu(self.conv2(F.relu(self.conv1(x))))
""",
    good_example="""
def forward(self, x):
    return x + self.conv2(F.relu(self.conv1(x)))
""",
    fix_summary="End the branch with its weight (or norm) layer; move the activation before it",
    transform=None,
    fix_safety="unsafe",
    check=_hc105,
))
