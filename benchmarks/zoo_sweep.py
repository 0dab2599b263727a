"""Zoo sweep: run `healthcheck FILE:model --format json` on one model per timm family and on
small-config Hugging Face models, and tabulate what the tool says about them.

    OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --out benchmarks/zoo/runs/after
    OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --only hf --filter 'llama|gemma' --out /tmp/zoo
    OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --pythonpath /work/before --out benchmarks/zoo/runs/before

Every model is checked through the CLI's JSON path: for each model a small file is written under
OUT/models/ that defines `model()` and `example_inputs()`, and a long-lived worker subprocess calls
`healthcheck.cli.main([FILE:model, "--format", "json", "-o", OUT/json/KEY.json])`, so the exit code
and the JSON are exactly what the CLI produces. Each model has a timeout; a worker that dies or
times out is restarted and the model is recorded as a crash. The worker imports `healthcheck` from
--pythonpath (default: whatever the interpreter finds), so the same sweep runs against any checkout.

Outputs in OUT: results.csv / results.md (one row per model), findings.csv (one row per finding),
summary.md / summary.json (crashes, exit 2, models with errors / warnings, models per rule code).
The timm selection (smallest variant per family, by parameter count on the meta device, and the
input size used) is cached in benchmarks/zoo/timm_selection.json; --reselect rebuilds it.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import re
import select
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ZOO_DIR = BENCH_DIR / "zoo"
SELECTION_FILE = ZOO_DIR / "timm_selection.json"
BATCH = 4
SEQ_LEN = 32
DONE_MARK = "@@zoo-done "


# ----------------------------------------------------------------------------------------------
# Model specs


@dataclass
class ModelSpec:
    key: str  # unique, file-name safe
    family: str
    source: str  # "timm" | "hf"
    name: str  # timm model name, or HF model_type
    input_size: list[int] = field(default_factory=list)  # timm: [C, H, W]; hf: a short description
    params: int | None = None


# Smaller-than-default image sizes tried for timm models, largest first after the default is
# capped; the first that builds and runs a forward pass at batch 1 is used.
TIMM_SIZES = (128, 160, 192, 224, 256)


def _timm_families() -> dict[str, list[str]]:
    import timm
    from timm.models import _registry

    families = {}
    for module in sorted(_registry._module_to_models):
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
        if names:
            families[module] = names
    return families


def _meta_params(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a variant that cannot be built on meta is skipped
        return None


def _timm_build(name: str, size: int | None, default: int) -> Any:
    import timm

    if size is None or size == default:
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:  # the model has no img_size argument: convolutional models take any size
        return timm.create_model(name, pretrained=False)


def _timm_input_size(name: str) -> list[int]:
    """[C, H, W]: the default size, else the largest smaller size in TIMM_SIZES the model runs at."""
    import timm
    import torch

    cfg = timm.get_pretrained_cfg(name)
    default = list(getattr(cfg, "input_size", None) or (3, 224, 224)) if cfg is not None else [3, 224, 224]
    c, h, w = default
    for size in sorted(s for s in TIMM_SIZES if s < min(h, w)):
        try:
            torch.manual_seed(0)
            model = _timm_build(name, size, h).eval()
            with torch.no_grad():
                model(torch.randn(1, c, size, size))
            return [c, size, size]
        except Exception:  # noqa: BLE001 - this size is not accepted; try the next
            continue
    return default


def select_timm(families: dict[str, list[str]] | None = None) -> list[ModelSpec]:
    families = families or _timm_families()
    specs = []
    for family, names in families.items():
        sized = [(p, n) for n in names if (p := _meta_params(n)) is not None]
        if not sized:
            print(f"timm {family}: no variant builds on meta, skipped", file=sys.stderr)
            continue
        params, name = min(sized)
        size = _timm_input_size(name)
        print(f"timm {family}: {name} {params} params, input {size}", file=sys.stderr, flush=True)
        specs.append(ModelSpec(key=f"timm_{name}", family=family, source="timm", name=name, input_size=size,
                               params=params))
    return specs


def timm_specs(reselect: bool) -> list[ModelSpec]:
    if reselect or not SELECTION_FILE.exists():
        specs = select_timm()
        SELECTION_FILE.parent.mkdir(parents=True, exist_ok=True)
        SELECTION_FILE.write_text(json.dumps([asdict(s) for s in specs], indent=1) + "\n")
    return [ModelSpec(**d) for d in json.loads(SELECTION_FILE.read_text())]


# Hugging Face: (family, model_type, task, config overrides). Tasks pick the head a user trains
# (causal LM, masked LM, seq2seq, classification, CTC) and the example inputs.
_TEXT = dict(vocab_size=1000)
HF_FAMILIES: list[tuple[str, str, str, dict[str, Any]]] = [
    # decoders
    ("gpt2", "gpt2", "causal", {}),
    ("gpt_neo", "gpt_neo", "causal", dict(attention_types=[[["global", "local"], 1]], window_size=16)),
    ("gptj", "gptj", "causal", dict(rotary_dim=8)),
    ("gpt_neox", "gpt_neox", "causal", {}),
    ("codegen", "codegen", "causal", dict(rotary_dim=8)),
    ("llama", "llama", "causal", {}),
    ("mistral", "mistral", "causal", {}),
    ("mixtral", "mixtral", "causal", {}),
    ("qwen2", "qwen2", "causal", {}),
    ("qwen2_moe", "qwen2_moe", "causal", {}),
    ("qwen3", "qwen3", "causal", {}),
    ("qwen3_moe", "qwen3_moe", "causal", {}),
    ("gemma", "gemma", "causal", {}),
    ("gemma2", "gemma2", "causal", {}),
    ("gemma3_text", "gemma3_text", "causal", dict(sliding_window=16)),
    ("olmo", "olmo", "causal", {}),
    ("olmo2", "olmo2", "causal", {}),
    ("olmoe", "olmoe", "causal", {}),
    ("phi", "phi", "causal", {}),
    ("phi3", "phi3", "causal", {}),
    ("falcon", "falcon", "causal", {}),
    ("bloom", "bloom", "causal", {}),
    ("opt", "opt", "causal", dict(word_embed_proj_dim=64)),
    ("granite", "granite", "causal", {}),
    ("granitemoe", "granitemoe", "causal", {}),
    ("starcoder2", "starcoder2", "causal", {}),
    ("stablelm", "stablelm", "causal", {}),
    ("cohere", "cohere", "causal", {}),
    ("mpt", "mpt", "causal", {}),
    ("xglm", "xglm", "causal", {}),
    ("nemotron", "nemotron", "causal", {}),
    ("deepseek_v3", "deepseek_v3", "causal", dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                                   qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                                   n_shared_experts=1, first_k_dense_replace=1, n_group=1, head_dim=8,
                                                   num_key_value_heads=4,
                                                   topk_group=1)),
    ("mamba", "mamba", "causal", dict(state_size=8)),
    ("mamba2", "mamba2", "causal", dict(num_heads=8, head_dim=16, state_size=16, n_groups=1, chunk_size=16)),
    ("falcon_mamba", "falcon_mamba", "causal", dict(state_size=8)),
    ("rwkv", "rwkv", "causal", dict(attention_hidden_size=64, context_length=64)),
    ("recurrent_gemma", "recurrent_gemma", "causal", dict(lru_width=64, attention_window_size=16)),
    # encoders
    ("bert", "bert", "masked", {}),
    ("roberta", "roberta", "masked", {}),
    ("xlm-roberta", "xlm-roberta", "masked", {}),
    ("distilbert", "distilbert", "masked", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128)),
    ("albert", "albert", "masked", dict(embedding_size=32)),
    ("electra", "electra", "masked", dict(embedding_size=64)),
    ("deberta", "deberta", "masked", {}),
    ("deberta-v2", "deberta-v2", "masked", {}),
    ("mobilebert", "mobilebert", "masked", dict(embedding_size=32, intra_bottleneck_size=32,
                                                 true_hidden_size=32, num_feedforward_networks=2)),
    ("megatron-bert", "megatron-bert", "masked", {}),
    ("mpnet", "mpnet", "masked", {}),
    ("roformer", "roformer", "masked", dict(embedding_size=64)),
    ("funnel", "funnel", "masked", dict(block_sizes=[1, 1], d_head=16, d_inner=128, n_head=4)),
    ("squeezebert", "squeezebert", "masked", dict(embedding_size=64, q_groups=2, k_groups=2, v_groups=2,
                                                   post_attention_groups=2, intermediate_groups=2,
                                                   output_groups=2)),
    # encoder-decoders
    ("t5", "t5", "seq2seq", dict(num_decoder_layers=2)),
    ("mt5", "mt5", "seq2seq", dict(num_decoder_layers=2)),
    ("bart", "bart", "seq2seq", {}),
    ("mbart", "mbart", "seq2seq", {}),
    ("pegasus", "pegasus", "seq2seq", {}),
    ("marian", "marian", "seq2seq", dict(decoder_vocab_size=1000)),
    ("blenderbot", "blenderbot", "seq2seq", {}),
    ("led", "led", "seq2seq", dict(attention_window=[8, 8], max_encoder_position_embeddings=128,
                                   max_decoder_position_embeddings=128)),
    # audio
    ("whisper", "whisper", "whisper", dict(num_mel_bins=16, max_source_positions=32, max_target_positions=64)),
    ("wav2vec2", "wav2vec2", "ctc", {}),
    ("hubert", "hubert", "ctc", {}),
    ("wavlm", "wavlm", "ctc", {}),
    ("data2vec-audio", "data2vec-audio", "ctc", {}),
    # vision
    ("vit", "vit", "image", dict(image_size=64, patch_size=8)),
    ("deit", "deit", "image", dict(image_size=64, patch_size=8)),
    ("beit", "beit", "image", dict(image_size=64, patch_size=8)),
    ("dinov2", "dinov2", "image", dict(image_size=64, patch_size=8)),
    ("swin", "swin", "image", dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                    window_size=4)),
    ("swinv2", "swinv2", "image", dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                        window_size=4)),
    ("convnext", "convnext", "image", dict(hidden_sizes=[32, 64], depths=[2, 2])),
    ("convnextv2", "convnextv2", "image", dict(hidden_sizes=[32, 64], depths=[2, 2])),
    ("resnet", "resnet", "image", dict(embedding_size=32, hidden_sizes=[32, 64], depths=[2, 2],
                                        layer_type="basic")),
    ("regnet", "regnet", "image", dict(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 2], groups_width=16)),
    ("mobilevit", "mobilevit", "image", dict(image_size=64, hidden_sizes=[64, 80, 96],
                                              neck_hidden_sizes=[16, 16, 24, 32, 48, 64, 160])),
    ("levit", "levit", "image", dict(image_size=64, hidden_sizes=[64, 96, 128], num_attention_heads=[2, 3, 4],
                                      depths=[1, 1, 1], key_dim=[16, 16, 16])),
    ("poolformer", "poolformer", "image", dict(hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1])),
    ("efficientnet", "efficientnet", "image", dict(image_size=64, width_coefficient=0.5, depth_coefficient=0.5,
                                                      hidden_dim=640)),
    ("segformer", "segformer", "segment", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                decoder_hidden_size=64, num_attention_heads=[1, 2, 2, 4])),
    ("clip_text", "clip_text_model", "text_encoder", {}),
    ("clip_vision", "clip_vision_model", "vision_encoder", dict(image_size=64, patch_size=8)),
]

HF_CLASSES = {"deit": "DeiTForImageClassification", "levit": "LevitForImageClassification"}  # where the auto class cannot resolve the head

# Common small sizes, applied to whichever of these names the config class has.
_SMALL = dict(
    hidden_size=64, d_model=64, n_embd=64, num_hidden_layers=2, n_layer=2, num_layers=2, encoder_layers=2,
    decoder_layers=2, num_attention_heads=4, n_head=4, n_heads=4, encoder_attention_heads=4,
    decoder_attention_heads=4, num_key_value_heads=2, intermediate_size=128, encoder_ffn_dim=128,
    decoder_ffn_dim=128, d_ff=128, ffn_dim=128, d_kv=16, head_dim=16, max_position_embeddings=128,
    n_positions=128, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, use_cache=False, num_channels=3,
)
_VISION_TASKS = ("image", "segment", "vision_encoder")
_AUDIO_SMALL = dict(conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32,
                    mask_time_prob=0.0)


def hf_specs() -> list[ModelSpec]:
    return [ModelSpec(key=f"hf_{family.replace('-', '_')}", family=family, source="hf", name=family,
                      input_size=[]) for family, *_ in HF_FAMILIES]


def _hf_config(family: str) -> tuple[Any, str]:
    from transformers import AutoConfig

    _, model_type, task, extra = next(f for f in HF_FAMILIES if f[0] == family)
    default = AutoConfig.for_model(model_type)
    keys = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    # a list-valued default (per-stage depths, heads, widths) is set per family, not from _SMALL
    overrides = {k: v for k, v in _SMALL.items() if k in keys and not isinstance(getattr(default, k, None), (list, tuple))}
    if task not in _VISION_TASKS and task != "ctc" and "vocab_size" in keys:
        overrides.update(_TEXT)
    if task == "ctc":
        overrides.update(_AUDIO_SMALL)
    if family == "mamba2":  # mamba2 ties heads to the expanded width: 2 * 64 = 8 heads * 16
        overrides.pop("num_attention_heads", None)
    overrides.update(extra)
    config = AutoConfig.for_model(model_type, **overrides)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):  # special ids of the full-size vocabulary must fit the small one
        for name, small_id in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0),
                               ("decoder_start_token_id", 0), ("start_token_id", 0)):
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= vocab:
                setattr(config, name, small_id)
    return config, task


def hf_build(family: str) -> Any:
    import transformers

    config, task = _hf_config(family)
    auto = {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM",
            "whisper": "AutoModelForSpeechSeq2Seq", "ctc": "AutoModelForCTC", "image": "AutoModelForImageClassification",
            "segment": "AutoModelForSemanticSegmentation"}.get(task, "AutoModel")
    if family in HF_CLASSES:
        return getattr(transformers, HF_CLASSES[family])(config).train()
    try:
        model = getattr(transformers, auto).from_config(config)
    except ValueError:  # no head class for this family: the base model
        model = transformers.AutoModel.from_config(config)
    return model.train()


def _token_batch(config: Any, generator: Any) -> tuple[Any, Any]:
    """Token ids that avoid the special ids, and right padding on two of the rows (a real batch)."""
    import torch

    vocab = getattr(config, "vocab_size", 1000) or 1000
    ids = torch.randint(4, min(vocab, 1000), (BATCH, SEQ_LEN), generator=generator)
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    pad = getattr(config, "pad_token_id", None)
    for row, length in ((2, SEQ_LEN - 4), (3, SEQ_LEN - 8)):
        mask[row, length:] = 0
        if pad is not None:
            ids[row, length:] = pad
    return ids, mask


def hf_inputs(family: str, model: Any) -> dict[str, Any]:
    import torch

    config, task = _hf_config(family)
    generator = torch.Generator().manual_seed(1)
    accepts = set(inspect.signature(model.forward).parameters)
    if task in _VISION_TASKS:
        size = getattr(config, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(BATCH, 3, min(size, 64), min(size, 64), generator=generator)}
    if task == "ctc":
        return {"input_values": torch.randn(BATCH, 8000, generator=generator)}
    if task == "whisper":
        frames = 2 * config.max_source_positions
        return {"input_features": torch.randn(BATCH, config.num_mel_bins, frames, generator=generator),
                "decoder_input_ids": torch.randint(4, config.vocab_size, (BATCH, 16), generator=generator)}
    ids, mask = _token_batch(config, generator)
    inputs = {"input_ids": ids}
    if "attention_mask" in accepts:
        inputs["attention_mask"] = mask
    if task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(4, min(config.vocab_size, 1000), (BATCH, 16),
                                                    generator=generator)
    return inputs


def hf_input_description(family: str) -> str:
    _, _, task, _ = next(f for f in HF_FAMILIES if f[0] == family)
    return {"image": "4x3x64x64", "segment": "4x3x64x64", "vision_encoder": "4x3x64x64", "ctc": "4x8000 audio",
            "whisper": "4x16x64 mel + 4x16 ids"}.get(task, f"{BATCH}x{SEQ_LEN} ids (2 rows padded)"
                                                      + (" + 4x16 dec ids" if task == "seq2seq" else ""))


# ----------------------------------------------------------------------------------------------
# The model files the CLI loads


def build_model(spec: dict[str, Any]) -> Any:
    if spec["source"] == "timm":
        import timm

        default = timm.get_pretrained_cfg(spec["name"])
        default_h = (getattr(default, "input_size", None) or (3, 224, 224))[1] if default else 224
        return _timm_build(spec["name"], spec["input_size"][1], default_h).train()
    return hf_build(spec["name"])


def build_inputs(spec: dict[str, Any], model: Any) -> Any:
    import torch

    if spec["source"] == "timm":
        generator = torch.Generator().manual_seed(1)
        return torch.randn(BATCH, *spec["input_size"], generator=generator)
    return hf_inputs(spec["name"], model)


MODEL_FILE = '''"""Generated by benchmarks/zoo_sweep.py: {key}."""
import sys

sys.path.insert(0, {bench!r})
import zoo_sweep as _zoo

SPEC = {spec!r}
_BUILT = []  # the model the CLI built: the inputs only read its forward signature


def model():
    _BUILT[:] = [_zoo.build_model(SPEC)]
    return _BUILT[0]


def example_inputs():
    return _zoo.build_inputs(SPEC, _BUILT[0] if _BUILT else model())
'''


def write_model_file(spec: ModelSpec, out: Path) -> Path:
    path = out / "models" / f"{spec.key}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MODEL_FILE.format(key=spec.key, bench=str(BENCH_DIR), spec=asdict(spec)))
    return path


# ----------------------------------------------------------------------------------------------
# Worker: a long-lived process that runs the CLI on one model file per request line


def _forward_backward_seconds(spec: dict[str, Any]) -> float | None:
    """Seconds of one plain forward+backward of the same model and inputs (the cost the check is compared to)."""
    import torch

    try:
        torch.manual_seed(0)
        model = build_model(spec)
        inputs = build_inputs(spec, model)
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        model(*args, **kwargs)  # warm-up, as the check's own first pass is
        start = time.perf_counter()
        out = model(*args, **kwargs)
        tensors = [v for v in (out.values() if isinstance(out, dict) else [out])
                   if isinstance(v, torch.Tensor) and v.is_floating_point()]
        sum(t.float().pow(2).mean() for t in tensors).backward()
        return time.perf_counter() - start
    except Exception:  # noqa: BLE001 - the timing is informative only
        return None


def worker_main() -> None:
    import contextlib

    import timm  # noqa: F401 - imported once here, so a model's seconds do not include library start-up
    import transformers  # noqa: F401

    from healthcheck.cli import main as cli_main

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the model prints goes to stderr, not into the reply channel
    for line in sys.stdin:
        request = json.loads(line)
        stderr_path = Path(request["stderr"])
        start = time.perf_counter()
        code: int | None = None
        with open(stderr_path, "w") as err, contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            try:
                cli_main([request["file"] + ":model", "--format", "json", "-o", request["json"]],
                         standalone_mode=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - the CLI never raises; if it does, that is a crash
                traceback.print_exc(file=err)
                code = None
        seconds = time.perf_counter() - start
        fb = _forward_backward_seconds(request["spec"]) if request.get("time_fb") else None
        reply.write(DONE_MARK + json.dumps({"key": request["key"], "exit": code, "seconds": seconds,
                                            "fb_seconds": fb}) + "\n")


class Worker:
    def __init__(self, python: str, env: dict[str, str], log: Path):
        with open(log, "a") as stderr:  # library noise outside the CLI's own stderr capture
            self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                         start_new_session=True)

    def run(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """The worker's reply, or "crash"/"timeout" (the worker is then dead and must be replaced)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "crash"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return "timeout"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                self.kill()
                return "crash"
            if line.startswith(DONE_MARK):
                return json.loads(line[len(DONE_MARK):])

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    model: str
    family: str
    source: str
    params: int | None
    input: str
    status: str  # ok | exit2 | crash | timeout
    exit: int | None
    tracer: str = ""
    joins: int | None = None
    depth: int | None = None
    errors: int = 0
    warnings: int = 0
    infos: int = 0
    codes: str = ""  # "HC303:E HC101:W"
    seconds: float = 0.0
    fb_seconds: float | None = None
    message: str = ""  # last stderr line for exit 2 / crash


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("healthcheck: error"):
            return line[:300]
    return lines[-1][:300] if lines else ""


def make_row(spec: ModelSpec, reply: dict[str, Any] | str, json_path: Path, stderr_path: Path
             ) -> tuple[Row, list[dict[str, Any]]]:
    input_text = "x".join(map(str, [BATCH, *spec.input_size])) if spec.source == "timm" else \
        hf_input_description(spec.name)
    if isinstance(reply, str):
        return Row(spec.name, spec.family, spec.source, spec.params, input_text, reply, None,
                   message=_last_line(stderr_path)), []
    code = reply["exit"]
    row = Row(spec.name, spec.family, spec.source, spec.params, input_text,
              "ok" if code in (0, 1) else ("exit2" if code == 2 else "crash"), code,
              seconds=round(reply["seconds"], 2),
              fb_seconds=None if reply.get("fb_seconds") is None else round(reply["fb_seconds"], 4))
    findings: list[dict[str, Any]] = []
    if json_path.exists() and code in (0, 1):
        data = json.loads(json_path.read_text())
        row.params = data["model"]["parameters"]
        row.tracer = data["model"]["trace"]
        row.joins = len(data["architecture"]["joins"])
        row.depth = data["architecture"].get("depth")
        findings = data["findings"]
        severity = Counter(f["severity"] for f in findings)
        row.errors, row.warnings, row.infos = severity["error"], severity["warning"], severity["info"]
        row.codes = " ".join(f"{f['code']}:{f['severity'][0].upper()}" for f in findings
                             if f["severity"] in ("error", "warning"))
    else:
        row.message = _last_line(stderr_path)
    return row, findings


REVIEW_FILE = BENCH_DIR / "zoo_review.md"


def load_review(path: Path = REVIEW_FILE) -> dict[tuple[str, str, str], str]:
    """(source, model, code) -> verdict, from the rows `| source | model | code | verdict | class | reason |`
    of the reviewed file; the verdict starts with "false" (a false alarm) or "true" (a real problem)."""
    review: dict[tuple[str, str, str], str] = {}
    if not path.exists():
        return review
    for line in path.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in ("timm", "hf") and re.fullmatch(r"HC\d{3}", cells[2]):
            review[(cells[0], cells[1], cells[2])] = cells[3].lower()
    return review


def review_counts(rows: list[Row], review: dict[tuple[str, str, str], str]) -> dict[str, Any]:
    """Error/warning findings by reviewed verdict; the unreviewed ones are listed by name."""
    counts: Counter[str] = Counter()
    unreviewed = []
    for r in rows:
        for code in dict.fromkeys(r.codes.split()):  # one per (model, code), as the reviewed table has them
            rule = code.split(":")[0]
            verdict = review.get((r.source, r.model, rule))
            kind = "unreviewed" if verdict is None else ("true" if verdict.startswith("true") else "false_alarm")
            counts[kind] += 1
            if verdict is None:
                unreviewed.append(f"{r.model} {code}")
    return {"false_alarm": counts["false_alarm"], "true": counts["true"], "unreviewed": counts["unreviewed"],
            "unreviewed_findings": unreviewed}


def summarize(rows: list[Row], findings: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    review = load_review()
    for source in sorted({r.source for r in rows}):
        part = [r for r in rows if r.source == source]
        per_code: Counter[str] = Counter()
        for r in part:
            for code in {c for c in r.codes.split() if c}:
                per_code[code] += 1
        summary[source] = {
            "models": len(part),
            "crashes": sum(r.status == "crash" for r in part),
            "timeouts": sum(r.status == "timeout" for r in part),
            "exit2": sum(r.status == "exit2" for r in part),
            "with_errors": sum(r.errors > 0 for r in part),
            "with_warnings": sum(r.warnings > 0 for r in part),
            "with_warnings_only": sum(r.warnings > 0 and r.errors == 0 for r in part),
            "clean": sum(r.status == "ok" and r.errors == 0 and r.warnings == 0 for r in part),
            "models_per_code": dict(sorted(per_code.items())),
            "seconds": round(sum(r.seconds for r in part), 1),
            "median_check_over_fb": _median([r.seconds / r.fb_seconds for r in part if r.fb_seconds]),
            "review": review_counts(part, review),
        }
    return summary


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[len(values) // 2], 1) if values else None


def write_outputs(out: Path, rows: list[Row], findings: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> None:
    columns = list(asdict(rows[0]).keys()) if rows else []
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    with open(out / "findings.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "source", "code", "severity", "module", "message"])
        for r in rows:
            for f in findings.get(f"{r.source}:{r.model}", []):
                writer.writerow([r.model, r.source, f["code"], f["severity"], (f.get("location") or {}).get("module"),
                                 f["message"]])
    summary = summarize(rows, findings)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    md = [f"# Zoo sweep ({meta['label']})", "",
          f"healthcheck from `{meta['healthcheck']}`, torch {meta['torch']}, timm {meta['timm']}, transformers "
          f"{meta['transformers']}; batch {BATCH}; OMP_NUM_THREADS={meta['omp']}; {meta['date']}.", "",
          "| source | models | crashes | timeouts | exit 2 | with errors | with warnings | warnings only | clean | seconds |"
          " median check / fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for source, s in summary.items():
        md.append(f"| {source} | {s['models']} | {s['crashes']} | {s['timeouts']} | {s['exit2']} | {s['with_errors']} | "
                  f"{s['with_warnings']} | {s['with_warnings_only']} | {s['clean']} | {s['seconds']} | "
                  f"{s['median_check_over_fb']} |")
    md += ["", "Models per rule code (E = error, W = warning):", ""]
    for source, s in summary.items():
        md.append(f"- {source}: " + ", ".join(f"{c} {n}" for c, n in s["models_per_code"].items()))
    md += ["", f"Error/warning findings against {REVIEW_FILE.name} (verdicts per source, model, code):", ""]
    for source, s in summary.items():
        rv = s["review"]
        md.append(f"- {source}: {rv['false_alarm']} reviewed false alarms, {rv['true']} reviewed true, "
                  f"{rv['unreviewed']} unreviewed" + (f" ({', '.join(rv['unreviewed_findings'])})"
                                                      if rv["unreviewed_findings"] else ""))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    table = ["| model | family | source | params | input | tracer | joins | errors | warnings | codes | exit | s |"
             " check / fwd+bwd | note |", "|" + "---|" * 14]
    for r in rows:
        ratio = f"{r.seconds / r.fb_seconds:.0f}×" if r.fb_seconds else ""
        table.append(f"| {r.model} | {r.family} | {r.source} | {r.params or ''} | {r.input} | {r.tracer} | "
                     f"{'' if r.joins is None else r.joins} | {r.errors} | {r.warnings} | {r.codes} | "
                     f"{r.status if r.exit is None else r.exit} | {r.seconds} | {ratio} | "
                     f"{r.message.replace('|', '/')[:120]} |")
    (out / "results.md").write_text("\n".join(md + ["", *table]) + "\n")


# ----------------------------------------------------------------------------------------------


def resummarize(out: Path) -> None:
    rows = []
    findings: dict[str, list[dict[str, Any]]] = {}
    ints, floats = ("params", "exit", "joins", "depth", "errors", "warnings", "infos"), ("seconds", "fb_seconds")
    with open(out / "results.csv") as fh:
        for record in csv.DictReader(fh):
            values: dict[str, Any] = dict(record)
            for name in ints:
                values[name] = int(values[name]) if values[name] not in ("", None) else None
            for name in floats:
                values[name] = float(values[name]) if values[name] not in ("", None) else None
            for name in ("errors", "warnings", "infos"):
                values[name] = values[name] or 0
            rows.append(Row(**values))
    for r in rows:
        key = f"{r.source}_{r.model}" if r.source == "timm" else f"hf_{r.family.replace('-', '_')}"
        path = out / "json" / f"{key}.json"
        findings[f"{r.source}:{r.model}"] = json.loads(path.read_text())["findings"] if path.exists() else []
    meta = json.loads((out / "summary.json").read_text())["meta"]
    write_outputs(out, rows, findings, meta)
    print((out / "summary.md").read_text())


def _probe_healthcheck(python: str, env: dict[str, str]) -> str:
    # run outside any checkout: `-c` puts the current folder first on sys.path, the worker does not
    result = subprocess.run([python, "-c", "import healthcheck; print(healthcheck.__file__)"], env=env,
                            capture_output=True, text=True, cwd="/")
    return result.stdout.strip() or result.stderr.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("timm", "hf"), help="Only timm models or only Hugging Face models.")
    parser.add_argument("--limit", type=int, help="At most this many models (after --only/--filter).")
    parser.add_argument("--filter", help="Regular expression on the model name, family or key.")
    parser.add_argument("--out", type=Path, default=ZOO_DIR / "runs" / "latest", help="Output folder.")
    parser.add_argument("--label", help="Name of this run in the summary (default: the --out folder's name).")
    parser.add_argument("--python", default=sys.executable, help="Interpreter that runs the workers.")
    parser.add_argument("--pythonpath", help="Prepended to PYTHONPATH of the workers (e.g. another checkout).")
    parser.add_argument("--timeout", type=float, default=240.0, help="Seconds per model before it is a crash.")
    parser.add_argument("--no-fb", action="store_true", help="Skip timing one plain forward+backward per model.")
    parser.add_argument("--reselect", action="store_true", help="Rebuild the cached timm selection first.")
    parser.add_argument("--resummarize", action="store_true",
                        help="Only rewrite the summary and tables of --out from its results (e.g. after editing "
                             "the reviewed file).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return
    if args.resummarize:
        resummarize(args.out)
        return

    specs: list[ModelSpec] = []
    if args.only in (None, "timm"):
        specs += timm_specs(args.reselect)
    if args.only in (None, "hf"):
        specs += hf_specs()
    if args.filter:
        pattern = re.compile(args.filter)
        specs = [s for s in specs if pattern.search(s.name) or pattern.search(s.family) or pattern.search(s.key)]
    if args.limit:
        specs = specs[:args.limit]

    out: Path = args.out
    (out / "json").mkdir(parents=True, exist_ok=True)
    (out / "stderr").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    import timm
    import torch
    import transformers

    meta = {"label": args.label or out.name, "healthcheck": _probe_healthcheck(args.python, env),
            "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
            "omp": env["OMP_NUM_THREADS"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"healthcheck from {meta['healthcheck']}; {len(specs)} models -> {out}", flush=True)

    rows: list[Row] = []
    findings: dict[str, list[dict[str, Any]]] = {}
    worker: Worker | None = None
    started = time.monotonic()
    for i, spec in enumerate(specs, 1):
        model_file = write_model_file(spec, out)
        json_path = out / "json" / f"{spec.key}.json"
        stderr_path = out / "stderr" / f"{spec.key}.txt"
        json_path.unlink(missing_ok=True)
        worker = worker or Worker(args.python, env, out / "worker_stderr.txt")
        reply = worker.run({"key": spec.key, "file": str(model_file), "json": str(json_path),
                            "stderr": str(stderr_path), "spec": asdict(spec), "time_fb": not args.no_fb},
                           args.timeout)
        if isinstance(reply, str):
            worker = None
        row, found = make_row(spec, reply, json_path, stderr_path)
        rows.append(row)
        findings[f"{row.source}:{row.model}"] = found
        print(f"[{i}/{len(specs)} {time.monotonic() - started:6.0f}s] {spec.source} {spec.name}: {row.status} "
              f"exit={row.exit} {row.seconds}s E{row.errors} W{row.warnings} {row.codes} {row.message[:100]}",
              flush=True)
        write_outputs(out, rows, findings, meta)  # partial results survive an interrupted sweep
    if worker is not None:
        worker.close()
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
