"""Architecture analysis on real models: every field of every join against ground truth read from
the models' code (the line each join comes from is looked up in that code, not assumed)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from healthcheck.graph.architecture import analyze
from healthcheck.loading import import_file
from tests import zoo
from tests.helpers import EXAMPLES, source_line

tv = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from torchvision.models import (  # noqa: E402
    convnext,
    densenet,
    efficientnet,
    mobilenetv2,
    mobilenetv3,
    regnet,
    resnet,
    swin_transformer,
    vision_transformer,
)

DEFAULTS = dict(kind="add", skip="identity", norm="branch", pre_activation=False, activation_after_join=False,
                scale=None, learnable_gain=False)


def joins(modules: list[str], source: str | list[str], **fields) -> list[dict]:
    """Expected records for joins at `modules` (ids get #k where a module has several)."""
    sources = source if isinstance(source, list) else [source] * len(modules)
    out = []
    for module, src in zip(modules, sources):
        out.append({**DEFAULTS, **fields, "module": module, "source": src})
    return out


def with_ids(expected: list[dict]) -> list[dict]:
    counts: dict[str, int] = {}
    for e in expected:
        counts[e["module"]] = counts.get(e["module"], 0) + 1
    seen: dict[str, int] = {}
    for e in expected:
        m = e["module"]
        if counts[m] > 1:
            e["id"] = f"{m or '(root)'}#{seen.get(m, 0)}"
            seen[m] = seen.get(m, 0) + 1
        else:
            e["id"] = m or "(root)"
    return expected


def resnet_layers(blocks: tuple[int, ...], first_projection: bool) -> tuple[list[str], list[str]]:
    modules, skips = [], []
    for stage, n in enumerate(blocks, start=1):
        for i in range(n):
            modules.append(f"layer{stage}.{i}")
            skips.append("projection" if i == 0 and (stage > 1 or first_projection) else "identity")
    return modules, skips


def resnet_truth(blocks, first_projection, source):
    modules, skips = resnet_layers(blocks, first_projection)
    out = joins(modules, source, activation_after_join=True)
    for e, skip in zip(out, skips):
        e["skip"] = skip
    return out


def image(size: int) -> tuple:
    return (torch.randn(2, 3, size, size),)


def tokens() -> tuple:
    return (torch.randint(0, 100, (2, 12)),)


def mobilenet_v2_truth():
    modules = [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    return joins(modules, source_line(mobilenetv2, "return x + self.conv(x)"))


def mobilenet_v3_truth():
    modules = [f"features.{i}" for i in (1, 3, 5, 6, 8, 9, 10, 12, 14, 15)]
    return joins(modules, source_line(mobilenetv3, "result += input"))


def efficientnet_b0_truth():
    modules = ["features.2.1", "features.3.1", "features.4.1", "features.4.2", "features.5.1", "features.5.2",
               "features.6.1", "features.6.2", "features.6.3"]
    return joins(modules, source_line(efficientnet, "result += input"))


def regnet_truth():
    modules, sources, skips = [], [], []
    for stage, depth in enumerate((1, 3, 6, 6), start=1):
        for i in range(depth):
            modules.append(f"trunk_output.block{stage}.block{stage}-{i}")
            sources.append(source_line(regnet, "x = self.proj(x) + self.f(x)") if i == 0
                           else source_line(regnet, "x = x + self.f(x)"))
            skips.append("projection" if i == 0 else "identity")
    out = joins(modules, sources, activation_after_join=True)
    for e, skip in zip(out, skips):
        e["skip"] = skip
    return out


def convnext_truth():
    modules = [f"features.{s}.{i}" for s, n in ((1, 3), (3, 3), (5, 9), (7, 3)) for i in range(n)]
    return joins(modules, source_line(convnext, "result += input"), learnable_gain=True)


def vit_truth(layers: int):
    out = []
    for i in range(layers):
        m = f"encoder.layers.encoder_layer_{i}"
        out += joins([m, m], [source_line(vision_transformer, "x = x + input"),
                              source_line(vision_transformer, "return x + y")], pre_activation=True)
    return out


def swin_truth():
    out = []
    for s, n in ((1, 2), (3, 2), (5, 6), (7, 2)):
        for i in range(n):
            m = f"features.{s}.{i}"
            out += joins([m, m], [source_line(swin_transformer, "x = x + self.stochastic_depth(self.attn(self.norm1(x)))"),
                                  source_line(swin_transformer, "x = x + self.stochastic_depth(self.mlp(self.norm2(x)))")],
                         pre_activation=True)
    return out


def densenet121_truth():
    out = []
    for b, n in enumerate((6, 12, 24, 16), start=1):
        out += joins([f"features.denseblock{b}.denselayer{i}" for i in range(2, n + 1)],
                     # the cat is in bn_function; the join's line is where forward calls it
                     source_line(densenet, "bottleneck_output = self.bn_function(prev_features)"), kind="concat",
                     pre_activation=True)
        out += joins([f"features.denseblock{b}"], source_line(densenet, "return torch.cat(features, 1)"),
                     kind="concat", pre_activation=True)
    return out


def hf_pair(prefix: str, layers: int, first: str, second: str, module_file, **fields):
    out = []
    for i in range(layers):
        m = f"{prefix}.{i}"
        out += joins([m, m], [source_line(module_file, first), source_line(module_file, second)], **fields)
    return out


def gpt2():
    from transformers.models.gpt2 import modeling_gpt2 as mod

    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    truth = hf_pair("transformer.h", 3, "hidden_states = attn_output + residual",
                    "hidden_states = residual + feed_forward_hidden_states", mod, pre_activation=True)
    return transformers.GPT2LMHeadModel(cfg), tokens(), truth


def bert():
    from transformers.models.bert import modeling_bert as mod

    cfg = transformers.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100)
    truth = []
    for i in range(3):
        truth += joins([f"encoder.layer.{i}.attention.output", f"encoder.layer.{i}.output"],
                       [source_line(mod, "self.LayerNorm(hidden_states + input_tensor)", 0),
                        source_line(mod, "self.LayerNorm(hidden_states + input_tensor)", 1)], norm="post")
    return transformers.BertModel(cfg), tokens(), truth


def llama():
    from transformers.models.llama import modeling_llama as mod

    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100)
    truth = []
    for i in range(3):
        m = f"model.layers.{i}"
        truth += joins([m, m], [source_line(mod, "hidden_states = residual + hidden_states", 0),
                                source_line(mod, "hidden_states = residual + hidden_states", 1)], pre_activation=True)
    return transformers.LlamaForCausalLM(cfg), tokens(), truth


def preact_resnet():
    module = import_file(EXAMPLES / "preact_resnet.py")
    src = source_line(EXAMPLES / "preact_resnet.py", "return out + skip")
    truth = joins([f"layers.{i}" for i in range(8)], src, pre_activation=True)
    for i in (2, 4, 6):
        truth[i]["skip"] = "projection"
    return module.PreActResNet(), image(32), truth


def scaled_resnet():
    src = source_line(zoo, "return (x + self.fc2(F.relu(self.fc1(F.relu(x))))) * (1 / math.sqrt(2))")
    return zoo.ScaledResNet(), (torch.randn(4, 16),), joins([f"blocks.{i}" for i in range(8)], src, norm="none",
                                                           scale=1 / math.sqrt(2))


def transformer(block):
    def build():
        first = "x = x + self.attn(self.ln1(x))" if block is zoo.PreLNBlock else "x = self.ln1(x + self.attn(x))"
        second = "return x + self.mlp(self.ln2(x))" if block is zoo.PreLNBlock else "return self.ln2(x + self.mlp(x))"
        fields = dict(pre_activation=True) if block is zoo.PreLNBlock else dict(norm="post")
        truth = []
        for i in range(4):
            truth += joins([f"blocks.{i}"] * 2, [source_line(zoo, first), source_line(zoo, second)], **fields)
        return zoo.Transformer(block), tokens(), truth
    return build


def unet():
    truth = joins(["(root)", "(root)"], [source_line(zoo, "d2 = self.dec2(torch.cat([e2, self.up2(m)], dim=1))"),
                                         source_line(zoo, "d1 = self.dec1(torch.cat([e1, self.up1(d2)], dim=1))")],
                  kind="concat")
    for t in truth:
        t["module"] = ""
    return zoo.UNet(), image(16), truth


def deep_resnet_no_norm():
    module = import_file(EXAMPLES / "deep_resnet_no_norm.py")
    src = source_line(EXAMPLES / "deep_resnet_no_norm.py", "return x + self.conv2(F.relu(self.conv1(F.relu(x))))")
    return module.DeepResNet(), image(16), joins([f"blocks.{i}" for i in range(16)], src, norm="none")


def tv_model(name: str, truth: Callable[[], list[dict]], size: int = 64, **kwargs):
    def build():
        return getattr(tv.models, name)(weights=None, **kwargs), image(size), truth()
    return build


CASES = {
    "resnet18": tv_model("resnet18", lambda: resnet_truth((2, 2, 2, 2), False, source_line(resnet, "out += identity", 0))),
    "resnet50": tv_model("resnet50", lambda: resnet_truth((3, 4, 6, 3), True, source_line(resnet, "out += identity", 1))),
    "resnext50_32x4d": tv_model("resnext50_32x4d", lambda: resnet_truth((3, 4, 6, 3), True, source_line(resnet, "out += identity", 1))),
    "mobilenet_v2": tv_model("mobilenet_v2", mobilenet_v2_truth),
    "mobilenet_v3_large": tv_model("mobilenet_v3_large", mobilenet_v3_truth),
    "efficientnet_b0": tv_model("efficientnet_b0", efficientnet_b0_truth),
    "regnet_y_400mf": tv_model("regnet_y_400mf", regnet_truth),
    "convnext_tiny": tv_model("convnext_tiny", convnext_truth),
    "vit_b_16": tv_model("vit_b_16", lambda: vit_truth(12), size=32, image_size=32),
    "swin_t": tv_model("swin_t", swin_truth),
    "densenet121": tv_model("densenet121", densenet121_truth),
    "vgg11": tv_model("vgg11", list, size=32),
    "squeezenet1_0": tv_model("squeezenet1_0", list),
    "googlenet": tv_model("googlenet", list, init_weights=False, aux_logits=False),
    "inception_v3": tv_model("inception_v3", list, size=80, init_weights=False, aux_logits=False),
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "preact_resnet": preact_resnet,
    "scaled_resnet": scaled_resnet,
    "pre_ln_transformer": transformer(zoo.PreLNBlock),
    "post_ln_transformer": transformer(zoo.PostLNBlock),
    "unet": unet,
    "deep_resnet_no_norm": deep_resnet_no_norm,
}


def _analyze(build, methods=("fx", "export", "hooks")):
    torch.manual_seed(0)
    model, args, truth = build()
    model.eval()
    return analyze(model, args, {}, methods), with_ids(truth)


def _diff(got: list[dict], want: list[dict]) -> str:
    if len(got) != len(want):
        return f"{len(got)} joins found, {len(want)} expected: got modules {[g['module'] for g in got]}"
    for i, (g, w) in enumerate(zip(got, want)):
        bad = {k: (g.get(k), w[k]) for k in w if (g.get(k) != w[k] and not (isinstance(w[k], float) and g.get(k) is not None and math.isclose(g[k], w[k], rel_tol=1e-6)))}
        if bad:
            return f"join {i} ({w['module']}): (got, expected) {bad}"
    return ""


@pytest.mark.parametrize("name", list(CASES))
def test_joins_match_ground_truth(name):
    arch, truth = _analyze(CASES[name])
    assert not _diff([j.to_json() for j in arch.joins], truth), _diff([j.to_json() for j in arch.joins], truth)


HF_MODELS = {"gpt2", "bert", "llama"}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "swin_t", "gpt2", "bert", "llama",
                                  "pre_ln_transformer", "post_ln_transformer", "unet", "scaled_resnet"])
def test_tracers_agree(name):
    """The hooks-only recorder (and export, where it is not the default) finds the same joins."""
    for methods in (("export",), ("hooks",)):
        arch, truth = _analyze(CASES[name], methods)
        assert arch.trace == methods[0]
        got = [j.to_json() for j in arch.joins]
        assert not _diff(got, truth), f"{methods[0]}: {_diff(got, truth)}"


def test_hf_models_fall_back_to_export():
    arch, _ = _analyze(gpt2)
    assert arch.trace == "export" and "fx" in arch.trace_failures


def test_data_dependent_control_flow_uses_hooks_and_still_finds_joins():
    model = zoo.GatedResNet().eval()
    arch = analyze(model, (torch.randn(4, 16),), {})
    assert arch.trace == "hooks"
    assert set(arch.trace_failures) == {"fx", "export"}
    src = source_line(zoo, "x = x + branch(x)")
    expected = with_ids(joins([""] * 4, src, pre_activation=True))
    got = [j.to_json() for j in arch.joins]
    assert not _diff(got, expected), _diff(got, expected)


def test_depth_counts_weight_layers_on_longest_path():
    for name, depth in (("resnet18", 18), ("resnet50", 50), ("vgg11", 11), ("densenet121", 121)):
        arch, _ = _analyze(CASES[name])
        assert arch.depth == depth, name


def test_plain_depth():
    arch = analyze(zoo.PlainStack(depth=24).eval(), (torch.randn(8, 32),), {})
    assert arch.joins == () and arch.plain_depth == 24
    arch, _ = _analyze(CASES["resnet18"])
    assert arch.plain_depth <= 4  # stem conv + two branch convs + fc at most between joins


# timm models, built small (fewer blocks, small images) from their own classes: every expected number
# below is read from the model's source (comments say where), not from what the tool printed.
timm = pytest.importorskip("timm")


def _timm(name: str, size: int | tuple[int, int] = 32, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    h, w = (size, size) if isinstance(size, int) else size
    return model, analyze(model, (torch.randn(1, 3, h, w),), {})


def _timm_source(module: str, text: str, nth: int = 0) -> str:
    return source_line(getattr(__import__("timm.models", fromlist=[module]), module), text, nth)


def test_timm_resnetv2_projection_blocks_are_pre_activation():
    # PreActBottleneck: x_preact = norm1(x); shortcut = downsample(x_preact); conv1(x_preact); return x + shortcut
    _, arch = _timm("resnetv2_50", layers=(1, 1, 1, 1))
    src = _timm_source("resnetv2", "return x + shortcut", 1)
    assert [(j.module, j.skip, j.norm, j.pre_activation, j.source) for j in arch.joins] == \
        [(f"stages.{s}.blocks.0", "projection", "branch", True, src) for s in range(4)]


def test_timm_res2net_inner_sums_and_concat_are_not_joins():
    # Bottle2neck: `sp = sp + spx[i]` and `torch.cat(spo, 1)` are inside one layer; `out += shortcut` is the join
    _, arch = _timm("res2net50_26w_4s", layers=(2, 1, 1, 1))
    src = _timm_source("res2net", "out += shortcut")
    assert [(j.module, j.skip, j.source) for j in arch.joins] == [
        ("layer1.0", "projection", src), ("layer1.1", "identity", src), ("layer2.0", "projection", src),
        ("layer3.0", "projection", src), ("layer4.0", "projection", src)]
    assert arch.plain_depth <= 5  # stem conv + conv1, convs[i], conv3 (+ fc): no inner "join" cuts it


def test_timm_dpn_shortcut_through_norm_act_conv():
    # DualPathBlock: x_s = c1x1_w(x) (BN -> ReLU -> 1x1 conv) on 'proj'/'down' blocks; then
    # torch.cat([x_s1 + out1, x_s2, out2]): a residual add on every block, a dense concat where x_s2 is x's slice
    _, arch = _timm("dpn48b", k_sec=(1, 2, 1, 1))
    src = _timm_source("dpn", "return torch.cat([x_s1 + out1, x_s2, out2], dim=1)")
    got = [(j.id, j.kind, j.skip, j.pre_activation) for j in arch.joins]
    assert got == [("features.conv2_1", "add", "projection", True), ("features.conv3_1", "add", "projection", True),
                   ("features.conv3_2#0", "add", "identity", True), ("features.conv3_2#1", "concat", "identity", True),
                   ("features.conv4_1", "add", "projection", True), ("features.conv5_1", "add", "projection", True)]
    assert {j.source for j in arch.joins} == {src}


def test_timm_ghostnet_two_layer_shortcut_and_ghost_module_concat():
    # GhostBottleneck: x += self.shortcut(shortcut), shortcut = dw conv -> BN -> 1x1 conv -> BN unless in == out;
    # GhostModule's cat([x1, cheap(x1)]) is one layer
    model, arch = _timm("ghostnet_050")
    blocks = {name: m for name, m in model.named_modules() if type(m).__name__ == "GhostBottleneck"}
    assert [j.module for j in arch.joins] == list(blocks)
    assert [j.skip for j in arch.joins] == ["projection" if len(b.shortcut) else "identity" for b in blocks.values()]
    assert {j.kind for j in arch.joins} == {"add"}


def test_timm_rexnet_partial_residual_bounds_plain_depth():
    # LinearBottleneck: torch.cat([x[:, 0:in_channels] + shortcut, x[:, in_channels:]], dim=1)
    model, arch = _timm("rexnet_100")
    blocks = [name for name, m in model.named_modules() if getattr(m, "use_shortcut", False)]
    assert [j.module for j in arch.joins] == blocks
    # the longest run: stem + the first (non-residual) blocks + head, never through the bypassed channels
    assert arch.plain_depth <= 10


@pytest.mark.parametrize("name, kwargs, size, expected", [
    # ClassAttn block: x_cls + attn(norm1(cat(x_cls, x))); x_cls + mlp(norm2(x_cls)); the first block's x_cls is
    # the cls_token parameter (no data skip); Cait.forward_cls: cat((cls_tokens, x), dim=1) is a token concat
    ("cait_xxs24_224", dict(img_size=32, depth=2, depth_token_only=2), 32, 2 * 2 + 2 * 2 - 1),
    # XCABlock: 3 joins; ClassAttentionBlock: 2 joins, its cat([...], dim=1)s are along tokens
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32, 2 * 3 + 2 * 2),
    # MultiScaleBlock (depth [1, 1, 0]): 2 blocks x 2 joins + 2 CrossAttentionBlocks (x[:, 0:1] + attn(norm1(x)));
    # the class-token swaps are token concats
    ("crossvit_tiny_240", dict(depth=([1, 1, 0],)), 240, 2 * 2 + 2),
])
def test_timm_token_concats_are_not_joins(name, kwargs, size, expected):
    _, arch = _timm(name, size, **kwargs)
    assert len(arch.joins) == expected and {j.kind for j in arch.joins} == {"add"}


def test_timm_volo_class_token_concat_is_not_a_join():
    from timm.models.volo import VOLO

    # 4 blocks x 2 joins + 2 ClassAttn post layers x 2 (cls_embed = x[:, :1] + attn(norm1(x)); ...;
    # torch.cat([cls_embed, x[:, 1:]], dim=1) along tokens)
    model = VOLO(layers=(1, 1, 1, 1), img_size=32, embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2),
                 post_layers=("ca", "ca")).eval()
    arch = analyze(model, (torch.randn(1, 3, 32, 32),), {})
    assert len(arch.joins) == 12 and {j.kind for j in arch.joins} == {"add"}
    assert [j.id for j in arch.joins][-4:] == ["post_network.0#0", "post_network.0#1", "post_network.1#0",
                                               "post_network.1#1"]


def test_timm_convnextv2_global_response_norm_is_no_join():
    # GlobalResponseNorm: x + addcmul(bias, weight, x * Nx) is one norm layer; Block: drop_path(x) + shortcut
    _, arch = _timm("convnextv2_atto", depths=(1, 1, 1, 1))
    assert [j.module for j in arch.joins] == [f"stages.{s}.blocks.0" for s in range(4)]
    assert arch.norm_layers.get("GlobalResponseNorm") == 4


def test_timm_hiera_max_pooled_projection_shortcut():
    # HieraBlock (do_expand): x = proj(norm1(x)).view(...).amax(dim=1); x = x + attn(x_norm); x + mlp(norm2(x))
    _, arch = _timm("hiera_tiny_224", (64, 64), img_size=(64, 64), stages=(1, 1, 1, 1))
    assert len(arch.joins) == 8
    projected = [(j.module, j.norm, j.pre_activation) for j in arch.joins if j.skip == "projection"]
    assert projected == [(f"blocks.{b}", "branch", True) for b in (1, 2, 3)]


def test_roberta_position_ids_are_no_branch():
    # RobertaEmbeddings: position ids = cumsum(input_ids != pad) (integer ops): the embedding sum is no join
    cfg = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=40, pad_token_id=1)
    torch.manual_seed(0)
    arch = analyze(transformers.RobertaModel(cfg).eval(), (torch.randint(3, 100, (2, 12)),), {})
    assert [j.module for j in arch.joins] == [f"encoder.layer.{i}.{m}" for i in range(2)
                                              for m in ("attention.output", "output")]


@pytest.mark.parametrize("methods", [("fx",), ("hooks",)])
def test_in_place_join_reads_the_shortcut_as_skip(methods):
    """torchvision's `out += identity`: the skip is the shortcut (the block input or its downsample),
    the branch the sum's in-place operand."""
    arch, _ = _analyze(CASES["resnet18"], methods)
    graph = arch.graph
    for j in arch.joins:
        skip = graph.nodes[j.skip_operand]
        (branch,) = [graph.nodes[i] for i in j.branch_operands]
        assert branch.module == f"{j.module}.bn2", j.id
        if j.skip == "identity":
            assert j.skip_operand == j.fork, j.id
        else:
            assert skip.module == f"{j.module}.downsample.1", j.id
