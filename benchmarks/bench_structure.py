"""Time and peak memory of the structural check (`check(..., probes=False)`, `--no-probes`).

Each case runs in its own process, so that its peak resident memory (ru_maxrss, which includes the
~0.7 GiB of importing torch and transformers) is its own:

    OMP_NUM_THREADS=1 python benchmarks/bench_structure.py            # every case
    OMP_NUM_THREADS=1 python benchmarks/bench_structure.py llama-70b-meta

Cases: GPT-2-large built for real (3 GiB of weights) and on the meta device, and Llama-style 7B and
70B configs (transformers' LlamaConfig) on the meta device. `--real-forward` runs the path taken
before structure was traced on fake tensors (a real forward, then the tracers), for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("gpt2-large-real", "gpt2-large-meta", "llama-7b-meta", "llama-70b-meta")
SEQUENCE = 64  # tokens in the example input (batch 1)


def build(case: str):  # noqa: ANN201 - a transformers model
    import torch
    import transformers

    if case.startswith("gpt2-large"):
        config = transformers.GPT2Config(n_layer=36, n_embd=1280, n_head=20)
        model_class = transformers.GPT2LMHeadModel
    else:
        size = {"llama-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=32),
                "llama-70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                  num_attention_heads=64, num_key_value_heads=8)}[case.rsplit("-", 1)[0]]
        config = transformers.LlamaConfig(vocab_size=32000, **size)
        model_class = transformers.LlamaForCausalLM
    if case.endswith("-meta"):
        with torch.device("meta"):
            return model_class(config), config.vocab_size
    torch.manual_seed(0)
    return model_class(config), config.vocab_size


def run_case(case: str, real_forward: bool) -> dict:
    import torch

    import healthcheck
    import healthcheck.api

    if real_forward:  # the path before: no fake tracing
        from healthcheck.graph.fake import FakeStructure

        healthcheck.api.structure_without_weights = lambda *args, **kwargs: FakeStructure(None, "benchmark")
    start = time.perf_counter()
    model, vocabulary = build(case)
    built = time.perf_counter() - start
    ids = torch.randint(1, vocabulary, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    report = healthcheck.check(model, ids, probes=False)
    seconds = time.perf_counter() - start
    return {"case": case + (" (real forward)" if real_forward else ""), "parameters": report.model.parameters,
            "build_s": round(built, 2), "check_s": round(seconds, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "trace": report.model.trace, "weights": report.model.weights, "joins": len(report.architecture.joins),
            "findings": sorted(f.code for f in report.findings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--real-forward", action="store_true", help="the path before: a real forward, then tracing")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run in this process
    options = parser.parse_args()
    if unknown := set(options.cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    options.cases = options.cases or list(CASES)
    if options.one:
        print(json.dumps(run_case(options.cases[0], options.real_forward)))
        return
    for case in options.cases:
        command = [sys.executable, __file__, case, "--one", *(["--real-forward"] if options.real_forward else [])]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            print(f"{case}: failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            continue
        result = json.loads(lines[-1])
        print(f"{result['case']:24s} {result['parameters'] / 1e9:6.2f}B parameters  build {result['build_s']:6.2f} s  "
              f"check {result['check_s']:6.2f} s  peak RSS {result['peak_rss_gib']:5.2f} GiB  "
              f"traced with {result['trace']} ({result['weights']}), {result['joins']} joins, "
              f"findings {result['findings']}", flush=True)


if __name__ == "__main__":
    main()
