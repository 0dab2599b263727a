"""Architecture analysis time for models with 100 residual joins (target: < 2 s on one CPU core).

    python benchmarks/bench_analysis.py

Reports the median wall time of `healthcheck.check` (forward validation + tracing + join analysis
+ rules) over a few runs, for each tracer, next to one plain forward of the same model.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import healthcheck  # noqa: E402
from tests import zoo  # noqa: E402


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = {
        "ResNet-MLP, 100 blocks": (zoo.ScaledResNet(width=64, blocks=100), torch.randn(32, 16)),
        "Pre-LN transformer, 50 layers": (zoo.Transformer(zoo.PreLNBlock, layers=50, dim=64), torch.randint(0, 100, (4, 32))),
    }
    print(f"torch {torch.__version__}, 1 CPU thread")
    print(f"{'model':<42} {'joins':>5} {'tracer':>7} {'check s':>8} {'forward s':>10}")
    for name, (model, x) in cases.items():
        model.eval()
        with torch.no_grad():
            forward = median_seconds(lambda: model(x))
        for tracer in ("fx", "export", "hooks"):
            report = healthcheck.check(model, x, trace=tracer, probes=False)
            seconds = median_seconds(lambda: healthcheck.check(model, x, trace=tracer, probes=False), repeats=3)
            print(f"{name:<42} {len(report.architecture.joins):>5} {tracer:>7} {seconds:>8.2f} {forward:>10.3f}")
    try:
        import transformers
    except ImportError:
        return
    cfg = transformers.GPT2Config(n_layer=50, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    model, x = transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 1000, (4, 32))
    with torch.no_grad():
        forward = median_seconds(lambda: model(x))
    report = healthcheck.check(model, x, probes=False)
    seconds = median_seconds(lambda: healthcheck.check(model, x, probes=False), repeats=3)
    print(f"{'HF GPT-2, 50 layers (auto)':<42} {len(report.architecture.joins):>5} {report.model.trace:>7} "
          f"{seconds:>8.2f} {forward:>10.3f}")


if __name__ == "__main__":
    main()
