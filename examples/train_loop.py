"""A plain training loop with HealthMonitor: watch a finding appear, then go away with the fix.

    python examples/train_loop.py            # residual MLP without normalization: HC201, HC203 …
    python examples/train_loop.py --fixed    # the same net with LayerNorm opening each branch: none
    tensorboard --logdir runs/               # the health/* scalars, findings and layout

Synthetic data (a random teacher network), CPU, about a minute.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from healthcheck import HealthMonitor


class Block(nn.Module):
    """x + f(x), f = ReLU → Linear → ReLU → Linear (He init); `norm` puts a LayerNorm in front of f."""

    def __init__(self, width: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(F.relu(self.norm(x)))))


def make_model(fixed: bool, width: int = 64, blocks: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), *[Block(width, norm=fixed) for _ in range(blocks)], nn.Linear(width, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="normalize at the start of each residual branch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-dir", default=None, help="TensorBoard directory (default runs/sick or runs/fixed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    model = make_model(args.fixed)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    log_dir = args.log_dir or f"runs/{'fixed' if args.fixed else 'sick'}"

    def report(finding, event):
        print(f"  {event}: {finding.severity} {finding.code} {finding.message}")

    with HealthMonitor(model, log_dir=log_dir, every=50, on_finding=report) as monitor:
        for step in range(args.steps):
            x = torch.randn(128, 32)
            with torch.no_grad():
                y = teacher(x).argmax(dim=1)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
            if step % 50 == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}")
    last = monitor.history[-1].measurements.profile
    print(f"last sample: E[y²] at the first join {last[0].var:.3g}, at the last {last[-1].var:.3g}")
    print(f"TensorBoard events in {log_dir}")


if __name__ == "__main__":
    main()
