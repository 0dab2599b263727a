"""Does CoaT's collapsed 1/8-scale stream (HC203 error on coat_tiny) hurt training? coat_tiny at its
timm init vs the same model with its shared ConvPosEnc depthwise convs zero-initialized (x + dwconv(x)
then starts as the identity, no power-iteration growth): digits upsampled to 3×64×64, AdamW 5e-4 with
a 20-step warm-up, batch 16, 150 steps, seed 0. Prints the test accuracy (and with --check the
check's verdicts on a batch of 4).

    OMP_NUM_THREADS=1 python benchmarks/zoo/checks/train_coat_cpe.py [--zero-cpe] [--check]   # ~5 min each
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import healthcheck  # noqa: E402


def data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    xtr, xte, ytr, yte = train_test_split(x, torch.tensor(d.target), test_size=0.3, random_state=0)
    return xtr, xte, ytr, yte


def build(zero_cpe: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("coat_tiny", img_size=64, num_classes=10)
    if zero_cpe:
        for name in ("cpe1", "cpe2", "cpe3", "cpe4"):
            torch.nn.init.zeros_(getattr(model, name).proj.weight)
            torch.nn.init.zeros_(getattr(model, name).proj.bias)
    return model


def main() -> None:
    xtr, xte, ytr, yte = data()
    for zero_cpe in [("--zero-cpe" in sys.argv)]:
        model = build(zero_cpe)
        verdicts = None
        if "--check" in sys.argv:
            report = healthcheck.check(model, xtr[:4])
            verdicts = [(f.code, f.severity) for f in report.findings if f.severity != "info"]
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        gen = torch.Generator().manual_seed(0)
        start, losses = time.time(), []
        model.train()
        for step in range(150):
            for group in opt.param_groups:
                group["lr"] = 5e-4 * min(1.0, (step + 1) / 20)
            idx = torch.randint(0, len(xtr), (16,), generator=gen)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            acc = float((model(xte).argmax(1) == yte).float().mean())
        print(f"{'cpe zero-init' if zero_cpe else 'timm init    '}: check {verdicts}; final loss "
              f"{np.mean(losses[-20:]):.3f}; test accuracy {acc:.3f}; {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
