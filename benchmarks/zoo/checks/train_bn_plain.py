"""Does a deep plain Linear-BN-ReLU stack train from PyTorch's default init? (benchmarks/zoo_review.md)

load_digits, width 64, depth 24 / 48 / 76, 400 steps at batch 64, SGD (0.05, momentum 0.9) and AdamW (1e-3).

    OMP_NUM_THREADS=1 python benchmarks/zoo/checks/train_bn_plain.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn


def plain_bn_mlp(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def main() -> None:
    torch.manual_seed(0)
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x))
    train, test = order[:1400], order[1400:]
    for depth in (24, 48, 76):
        for name in ("sgd", "adamw"):
            torch.manual_seed(0)
            model = plain_bn_mlp(depth)
            opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if name == "sgd"
                   else torch.optim.AdamW(model.parameters(), lr=1e-3))
            for _ in range(400):
                idx = train[torch.randint(0, len(train), (64,))]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"depth {depth} {name}: final loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
