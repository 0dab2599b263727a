"""Init-time probes on Llama-style configs too large to hold: built on the meta device, measured one
block at a time (`healthcheck.probes.blockwise`). Time and peak memory per config.

    python benchmarks/bench_blockwise.py                      # small (whole vs blockwise) and 1b
    python benchmarks/bench_blockwise.py --config 7b          # 32 layers, hidden 4096, 11008
    python benchmarks/bench_blockwise.py --config 7b --verdict  # the full check() (structure + rules)
    python benchmarks/bench_blockwise.py --device cuda --config 70b

Each config runs in its own process. Peak memory: the process's peak resident set size (CPU) and
its increase over the size after the model was built on meta; on CUDA torch.cuda.max_memory_allocated.
"Materialized" is the most parameter and buffer memory that was real at one time (outer parameters
plus one block), from `MemoryUsage`. The batch is 2 × 16 tokens unless --batch/--tokens say otherwise
(at batch 1 the sensitivity χ, centred over the batch, is undefined).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {  # Llama-2 shapes; vocabulary 32000
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # Llama-2-7B
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),  # Llama-2-70B
}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def meta_model(name: str):
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, **CONFIGS[name])
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def worker(name: str, batch: int, tokens: int, device: str, verdict: bool, whole: bool) -> dict:
    from healthcheck.probes import ProbeOptions, measure
    from healthcheck.probes.blockwise import MemoryUsage, materialize_model, measure_blockwise

    model = meta_model(name)
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, 32000, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    result: dict = {"config": name, "parameters": parameters, "batch": [batch, tokens], "device": device,
                    "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = current_rss()
    start = time.perf_counter()
    if whole:  # the reference: the same weights in one piece, the whole-model probes
        materialize_model(model, seed=0, device=device)
        result["materialize_s"] = time.perf_counter() - start
        start = time.perf_counter()
        measured = measure(model, (), {"input_ids": ids}, at_joins=True, options=ProbeOptions())
        result["mode"] = "whole"
    elif verdict:
        import healthcheck

        report = healthcheck.check(model, {"input_ids": ids})
        measured = report.measurements
        result["mode"] = "check"
        result["findings"] = [f"{f.code} {f.severity} {f.location.module}" for f in report.findings]
        result["rules"] = list(report.rules)
    else:
        usage = MemoryUsage()
        measured = measure_blockwise(model, (), {"input_ids": ids}, at_joins=True, options=ProbeOptions(), usage=usage)
        result["mode"] = "blockwise"
        element = next(model.parameters()).element_size()
        result["materialized_peak_gib"] = usage.peak * element / 2**30
        result["materialized_outer_gib"] = usage.outer * element / 2**30
        result["materialized_block_gib"] = usage.largest_block * element / 2**30
        result["materializations"] = usage.materializations
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_gib"] = rss_bytes() / 2**30
    result["rss_before_gib"] = base / 2**30
    if device.startswith("cuda"):
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["failures"] = dict(measured.failures) if measured is not None else None
    if measured is not None and measured.profile:
        result["points"] = len(measured.profile)
        result["var_first_last"] = [measured.profile[0].var, measured.profile[-1].var]
        result["grad_norm_first_last"] = [measured.profile[0].grad_norm, measured.profile[-1].grad_norm]
        result["grad_correlation"] = measured.grad_correlation
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "default"], default="default")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verdict", action="store_true", help="run healthcheck.check (structure, probes, rules)")
    parser.add_argument("--whole", action="store_true", help="materialize in one piece, whole-model probes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.config, args.batch, args.tokens, args.device, args.verdict, args.whole)))
        return
    runs = [("small", True), ("small", False), ("1b", False)] if args.config == "default" else [(args.config, args.whole)]
    for name, whole in runs:
        command = [sys.executable, __file__, "--worker", "--config", name, "--batch", str(args.batch),
                   "--tokens", str(args.tokens), "--device", args.device]
        command += ["--whole"] if whole else []
        command += ["--verdict"] if args.verdict and not whole else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
