"""Cost of the default check (structure + probes) as a ratio to one forward+backward of the same
model and batch (targets: ≤ 5× time, ≤ 2× peak memory).

    python benchmarks/bench_check.py                 # CPU, resnet50 and a GPT-2 config
    python benchmarks/bench_check.py --device cuda   # on a GPU

Each measurement runs in its own process so peak memory is not shared: on CPU the peak resident
set size above what the process held after building the model and batch; on CUDA
torch.cuda.max_memory_allocated above the same point.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ("resnet50", "gpt2")


def build(case: str, device: str):
    torch.manual_seed(0)
    if case == "resnet50":
        import torchvision

        model, x = torchvision.models.resnet50(weights=None), torch.randn(16, 3, 224, 224)
    else:
        import transformers

        cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=512)
        model, x = transformers.GPT2LMHeadModel(cfg), torch.randint(0, 50257, (8, 256))
    return model.to(device), x.to(device)


def forward_backward(model, x) -> None:
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out.logits
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(case: str, what: str, device: str, repeats: int) -> dict:
    import healthcheck

    model, x = build(case, device)
    model.train()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    run = (lambda: forward_backward(model, x)) if what == "fwdbwd" else (lambda: healthcheck.check(model, x))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        run()
        sync(device)
        if i:  # the first call warms up (lazy imports, allocator)
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_bytes()) - base
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "WHAT"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.repeats)))
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'model':<10} {'fwd+bwd s':>10} {'check s':>9} {'time ×':>7} {'fwd+bwd MB':>11} {'check MB':>9} {'mem ×':>6}")
    for case in args.cases.split(","):
        results = {}
        for what in ("fwdbwd", "check"):
            cmd = [sys.executable, __file__, "--worker", case, what, "--device", args.device,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[what] = json.loads(out)
        f, c = results["fwdbwd"], results["check"]
        print(f"{case:<10} {f['seconds']:>10.2f} {c['seconds']:>9.2f} {c['seconds'] / f['seconds']:>7.2f} "
              f"{f['peak_bytes'] / 2**20:>11.0f} {c['peak_bytes'] / 2**20:>9.0f} {c['peak_bytes'] / max(f['peak_bytes'], 1):>6.2f}")


if __name__ == "__main__":
    main()
