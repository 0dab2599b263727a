"""Does a verified fix train better? Train the sick example model and each fixed copy that
`healthcheck.fixes.fix` verifies, with the same data, optimizer and seed, and compare the losses.

    python benchmarks/fix_evidence.py                          # runs/fix_evidence/ (TensorBoard + PNG)
    python benchmarks/fix_evidence.py --png docs/fix_evidence.png

Synthetic task: 10 classes given by a fixed random linear teacher on 4×4-pooled 16×16 images.
CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def batches(steps: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 3 * 4 * 4, generator=generator)
    for _ in range(steps):
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        y = (F.avg_pool2d(x, 4).flatten(1) @ teacher.T).argmax(dim=1)
        yield x, y


def train(model: torch.nn.Module, steps: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    model.train()
    for x, y in batches(steps, 64, seed):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item() if torch.isfinite(loss) else float("nan"))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--log-dir", default="runs/fix_evidence")
    parser.add_argument("--png", default=None, help="where to write the loss curves (default: LOG_DIR/losses.png)")
    args = parser.parse_args()

    from healthcheck.fixes import fix
    from healthcheck.loading import import_file

    torch.manual_seed(0)
    sick = import_file(ROOT / "examples" / "deep_resnet_no_norm.py").DeepResNet()
    example = next(batches(1, 64, 1))[0]
    _, results = fix(sick, example)
    models = {"sick (as written)": sick} | {f"fixed: {r.transform}": r.model for r in results if r.verified}
    curves = {name: train(model, args.steps, args.lr, seed=0) for name, model in models.items()}

    window = max(args.steps // 10, 1)
    print(f"{'model':<28} {'loss, first 10%':>16} {'loss, last 10%':>15}")
    for name, losses in curves.items():
        print(f"{name:<28} {statistics.fmean(losses[:window]):>16.4f} {statistics.fmean(losses[-window:]):>15.4f}")

    from torch.utils.tensorboard import SummaryWriter

    for name, losses in curves.items():
        with SummaryWriter(str(Path(args.log_dir) / name.replace(": ", "_").replace(" ", "_"))) as writer:
            for step, value in enumerate(losses):
                writer.add_scalar("loss", value, step)
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        axis.plot(losses, label=name, linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("deep_resnet_no_norm.py: as written vs. healthcheck's verified fixes")
    axis.legend()
    figure.tight_layout()
    png = Path(args.png or Path(args.log_dir) / "losses.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    print(f"loss curves: {png}; TensorBoard: {args.log_dir}")


if __name__ == "__main__":
    main()
