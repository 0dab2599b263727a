"""Independent HC303 check used in benchmarks/zoo_review.md.

Neighbour correlation of input gradients along a line of 32 inputs (`--step` × ‖x0‖ apart),
BatchNorm frozen at the example batch's statistics, eval mode (dropout and drop-path off),
L = Σ out · R; also on 4 consecutive points of the same line (what a batch-4 probe sees).

    OMP_NUM_THREADS=1 python benchmarks/zoo/checks/line_probe.py resnet10t dla46x_c --step 0.02
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
import zoo_sweep  # noqa: E402


def neighbour_correlation(grads: torch.Tensor) -> float:
    g = grads.double().reshape(grads.shape[0], -1)
    g = g - g.mean(0, keepdim=True)
    a, b = g[:-1], g[1:]
    return float((a * b).sum() / (a.pow(2).sum() * b.pow(2).sum()).sqrt())


def line_correlations(spec: dict, points: int, step: float) -> tuple[float, float]:
    torch.manual_seed(0)
    model = zoo_sweep.build_model(spec)
    x = zoo_sweep.build_inputs(spec, model)
    for module in model.modules():  # one train-mode pass stores the batch statistics as running stats
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()
        model(x)
    model.eval()
    x0 = x[0]
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    direction = direction / direction.norm() * x0.norm()
    offsets = (torch.arange(points) - (points - 1) / 2) * step
    line = (x0[None] + offsets.reshape(-1, *[1] * x0.dim()) * direction[None]).requires_grad_(True)
    out = model(line)
    out = out if torch.is_tensor(out) else out[0]
    weights = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(1))
    (grads,) = torch.autograd.grad((out * weights).sum(), [line])
    middle = points // 2 - 2
    return neighbour_correlation(grads), neighbour_correlation(grads[middle:middle + 4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="timm model names from benchmarks/zoo/timm_selection.json")
    parser.add_argument("--step", type=float, default=0.02)
    parser.add_argument("--points", type=int, default=32)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    selection = {s["name"]: s for s in json.loads(zoo_sweep.SELECTION_FILE.read_text())}
    for name in args.models:
        long, short = line_correlations(selection[name], args.points, args.step)
        print(f"{name}: step {args.step}: {args.points} points {long:.3f}, 4 points {short:.3f}", flush=True)


if __name__ == "__main__":
    main()
