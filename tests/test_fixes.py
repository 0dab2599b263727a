"""Verified fixes (science.md, Fixes): each transform on a model that has the problem gives the
expected after-numbers; the original is untouched; shapes and parameter counts are as documented."""

from __future__ import annotations

import pytest
import torch

from healthcheck.fixes import TRANSFORMS, fix
from healthcheck.fixes.transforms import targets
from healthcheck.graph.architecture import analyze
from healthcheck.rules.measured import geometric_mean
from tests.test_guarantee import assert_same, snapshot
from tests.test_physics import BATCH, BLOCKS, WIDTH, probe, residual


@pytest.fixture(scope="module")
def fixed():
    torch.manual_seed(0)
    model = residual(bn=False)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    report, results = fix(model, x)
    assert_same(before, snapshot(model))  # the original model is byte-identical
    return model, x, report, {r.transform: r for r in results}


def test_all_fixes_of_variance_doubling_are_tried_and_verified(fixed):
    model, x, report, results = fixed
    assert set(results) == {"scale_joins", "scale_branches_by_depth", "norm_in_branch", "zero_init_gains"}
    assert all(r.verified for r in results.values())
    for finding in report.findings:
        if finding.code in ("HC101", "HC201"):
            assert finding.fix.verified["verified"] is True
            assert finding.fix.verified["before"]["var_ratio_per_block"] == pytest.approx(2.0, rel=0.05)


def test_scaling_by_inverse_sqrt2_gives_ratio_one(fixed):
    ratio = fixed[3]["scale_joins"].after_numbers["var_ratio_per_block"]
    assert ratio == pytest.approx(1.0, rel=0.05)


def test_depth_scaled_branches_bound_the_growth(fixed):
    # each of the K = 24 branches adds 1/K of the skip's variance: ×(1 + 1/K)^K ≈ e at most, not 2^24
    growth = fixed[3]["scale_branches_by_depth"].after_numbers["var_growth"]
    assert growth == pytest.approx((1 + 1 / BLOCKS) ** BLOCKS, rel=0.1)


def test_norm_in_branch_gives_linear_growth(fixed):
    profile = probe(fixed[3]["norm_in_branch"].model).profile
    for k, point in enumerate(profile, start=1):  # input E[x²] = 1, each branch adds exactly 1
        assert point.var_ratio == pytest.approx((k + 1) / k, rel=0.03), k


def test_zero_init_gain_starts_every_block_as_identity(fixed):
    after = probe(fixed[3]["zero_init_gains"].model)
    assert geometric_mean(after.series("var_ratio")) == pytest.approx(1.0, abs=1e-6)


def test_shapes_and_parameter_counts(fixed):
    model, x, _, results = fixed
    count = sum(p.numel() for p in model.parameters())
    expected_extra = {"scale_joins": 0, "scale_branches_by_depth": 0, "zero_init_gains": BLOCKS,
                      "norm_in_branch": BLOCKS * 2 * WIDTH}
    for name, result in results.items():
        fixed_model = result.model
        assert fixed_model(x).shape == model(x).shape, name
        assert sum(p.numel() for p in fixed_model.parameters()) == count + expected_extra[name], name


def test_zero_init_uses_the_branch_norm_when_there_is_one():
    torch.manual_seed(0)
    model = residual(bn=True, blocks=4)
    model.eval()
    arch = analyze(model, (torch.randn(8, WIDTH),), {}, ("hooks",))
    chosen = targets(arch.graph, list(arch.joins))
    fixed_model = TRANSFORMS["zero_init_gains"].build(model, chosen)
    assert sum(p.numel() for p in fixed_model.parameters()) == sum(p.numel() for p in model.parameters())
    assert all(not block.bn2.weight.detach().any() for block in fixed_model)  # the last norm of each branch
    assert all(block.bn2.weight.detach().all() for block in model)  # the original keeps its gains
    x = torch.randn(8, WIDTH)
    fixed_model.eval()
    assert torch.allclose(fixed_model(x), x)  # every block starts as the identity


def test_post_ln_becomes_pre_ln():
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.Transformer(zoo.PostLNBlock, layers=24)
    x = torch.randint(0, 100, (8, 16))
    before = snapshot(model)
    report, results = fix(model, x)
    assert_same(before, snapshot(model))
    [result] = [r for r in results if r.transform == "pre_ln"]
    # measured gradients are flat at init: a warning (warm-up), not an error; the fix removes it
    assert result.verified and "HC103:warning" in result.before_numbers["findings"]
    assert not any(f.startswith("HC103") for f in result.after_numbers["findings"])
    fixed_arch = analyze(result.model.eval(), (x,), {})
    assert len(fixed_arch.joins) == 48
    assert {(j.norm, j.pre_activation) for j in fixed_arch.joins} == {("branch", True)}
    assert result.model(x).shape == model(x).shape
    # 48 LayerNorms move into the branches; the last post-norm stays as the final norm: one more LayerNorm
    extra = sum(p.numel() for p in result.model.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == 2 * 32


def test_bert_post_ln_to_pre_ln():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100)
    model = transformers.BertModel(cfg)
    tokens = torch.randint(0, 100, (4, 12))
    _, results = fix(model, tokens, rule_options={"HC103": {"warn_joins": 2}})
    [result] = [r for r in results if r.transform == "pre_ln"]
    fixed_arch = analyze(result.model.eval(), (tokens,), {})
    assert len(fixed_arch.joins) == 4 and {j.norm for j in fixed_arch.joins} == {"branch"}
    assert all(j.pre_activation for j in fixed_arch.joins)


def test_pre_activation_makes_the_skip_path_an_identity():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None)
    x = torch.randn(4, 3, 32, 32)
    before = snapshot(model)
    _, results = fix(model, x, rule_options={"HC102": {"warn_joins": 4}})
    assert_same(before, snapshot(model))
    [result] = [r for r in results if r.transform == "pre_activation"]
    assert result.verified and "HC102:warning" in result.before_numbers["findings"]
    fixed_arch = analyze(result.model.eval(), (x,), {}, ("hooks",))
    assert len(fixed_arch.joins) == 8 and not any(j.activation_after_join for j in fixed_arch.joins)
    assert all(m.inplace is False for m in result.model.modules() if hasattr(m, "inplace"))
    assert result.model(x).shape == model(x).shape
    assert sum(p.numel() for p in result.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_skips_added_to_a_deep_plain_bn_stack_remove_its_errors():
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.PlainStack(48, 256, norm=True)
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    _, results = fix(model, x)
    assert_same(before, snapshot(model))
    [result] = [r for r in results if r.transform == "add_skips"]
    assert result.verified
    assert "HC204:error" in result.before_numbers["findings"]
    assert not any(f.endswith(":error") for f in result.after_numbers["findings"])
    # per layer, the gradient no longer grows ×1.21 going backwards (science.md, Fixes: ≈ 1): the plain
    # profile has a point per layer (48), the fixed one a point per 2-layer block (24)
    before_per_layer = result.before_numbers["grad_ratio_first_last"] ** (1 / 47)
    after_per_layer = result.after_numbers["grad_ratio_first_last"] ** (1 / (2 * 23))
    assert before_per_layer == pytest.approx(1.21, rel=0.05)
    assert after_per_layer < 1.1
    assert result.model(x).shape == model(x).shape
    assert sum(p.numel() for p in result.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_skips_with_bn_keep_the_rank_of_a_plain_stack_without_bn():
    """Rank collapse in a deep plain stack → add skips with BN: the effective rank stays high."""
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.PlainStack(48, 256, norm=False)
    x = torch.randn(128, 256)
    _, results = fix(model, x)
    [result] = [r for r in results if r.transform == "add_skips"]
    assert result.verified and "HC203:error" in result.before_numbers["findings"]
    assert result.before_numbers["min_directions"] < 2.5
    # no longer collapsed: above HC203's warning threshold, and HC203 is gone
    assert result.after_numbers["min_directions"] > 3.0
    assert not any(f.startswith("HC203") for f in result.after_numbers["findings"])
    # one BatchNorm1d(256) per block: 24 × 2 × 256 parameters more
    extra = sum(p.numel() for p in result.model.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == 24 * 2 * 256


def test_fix_with_an_optimizer_object_checks_every_copy_with_that_optimizer():
    """The fixed copies have parameters of their own: they are checked with the optimizer's class and
    hyper-parameters, so the before/after stability numbers compare like with like."""
    model = residual(bn=False, blocks=6, width=32)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    state = snapshot(model)
    report, results = fix(model, x, optimizer=optimizer)
    assert results, "a residual stack without norms gets at least one fix tried"
    specs = [report.stability.optimizer] + [r.after.stability.optimizer for r in results]
    assert all(s is not None and s.kind == "sgd" and s.lr == 0.003 and s.momentum == 0.9 for s in specs)
    assert optimizer.state_dict()["state"] == {}  # read, never stepped
    assert_same(state, snapshot(model))
