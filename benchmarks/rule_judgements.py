"""The cases of benchmarks/rule_judgements.md: the check's verdict on each, and (with --train) the short
training run that judges it. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/rule_judgements.py            # verdicts only (about a minute)
    OMP_NUM_THREADS=1 python benchmarks/rule_judgements.py --train    # and train each (10+ minutes)

Recipe: scikit-learn digits, standardized, batch 64, 300 steps, seed 0; SGD momentum 0.9 lr 0.05 and
Adam lr 1e-3; "trains" = no NaN and test accuracy ≥ 0.90.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import healthcheck  # noqa: E402
from tests import zoo  # noqa: E402
from tests.test_rule_calibration import Bare, Normed, StemLoss, stack  # noqa: E402


class RowTransformer(nn.Module):
    """The 8×8 digit as 8 row tokens through `tests.zoo` Pre-/Post-LN blocks."""

    def __init__(self, block: type[nn.Module], layers: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.1)
        self.blocks = nn.Sequential(*[block(dim, 4) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim) if block is zoo.PreLNBlock else nn.Identity()
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class DigitStem(StemLoss):
    """StemLoss on one-channel 8×8 digits."""

    def __init__(self, std: float) -> None:
        super().__init__(std)
        self.stem[0] = nn.Conv2d(1, 16, 3, padding=1)
        if std == 0:
            nn.init.ones_(self.stem[1].weight)


#: name -> (model factory, input kind: "flat" 64 features or "image" 1×8×8)
CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "Bare default init, 12 blocks": (lambda: stack(Bare, 12, "default"), "flat"),
    "Bare 0.1x He, 12 blocks": (lambda: stack(Bare, 12, "small"), "flat"),
    "Bare zero last layer, 12 blocks": (lambda: stack(Bare, 12, "zero"), "flat"),
    "Bare He, 12 blocks": (lambda: stack(Bare, 12, "he"), "flat"),
    "Normed (LN in branch), 12 blocks": (lambda: stack(Normed, 12), "flat"),
    "stem BN w ~ N(0, 0.02)": (lambda: DigitStem(0.02), "image"),
    "stem BN w ~ N(0, 1e-4)": (lambda: DigitStem(1e-4), "image"),
    "stem BN w = 1 (control)": (lambda: DigitStem(0.0), "image"),
    "Post-LN, 48 joins": (lambda: RowTransformer(zoo.PostLNBlock, 24), "flat"),
    "Pre-LN, 48 joins (control)": (lambda: RowTransformer(zoo.PreLNBlock, 24), "flat"),
    "Post-LN, 24 joins": (lambda: RowTransformer(zoo.PostLNBlock, 12), "flat"),
}


def digits(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def prepare(a: np.ndarray) -> torch.Tensor:
        t = torch.tensor((a - mean) / std)
        return t.reshape(-1, 1, 8, 8) if kind == "image" else t

    return prepare(x_train), torch.tensor(y_train), prepare(x_test), torch.tensor(y_test)


def train(model: nn.Module, kind: str, optimizer: str, steps: int = 300, batch: int = 64) -> float | None:
    """Test accuracy after the recipe's steps, or None when the loss went NaN/Inf."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits(kind)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x_train), (batch,), generator=generator)
        loss = F.cross_entropy(model(x_train[index]), y_train[index])
        if not torch.isfinite(loss):
            return None
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(-1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="also train each case (SGD and Adam)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, (build, kind) in CASES.items():
        torch.manual_seed(0)
        example = digits(kind)[0][:64]
        report = healthcheck.check(build(), example)
        verdict = " ".join(sorted({f"{f.code}:{f.severity}" for f in report.findings})) or "-"
        line = f"{name:36s} {verdict:40s}"
        if args.train:
            for optimizer in ("sgd", "adam"):
                torch.manual_seed(0)
                accuracy = train(build(), kind, optimizer)
                line += f" {optimizer} {'NaN' if accuracy is None else f'{accuracy:.3f}'}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
