"""Do the sweep's small HF EfficientNet / MobileViT train from HF's init? (benchmarks/zoo_review.md)

load_digits upsampled to 3x64x64, 10 classes, AdamW 1e-3, 300 steps at batch 32; compared with the
same model after resetting convs to PyTorch's default init and BatchNorm weights to 1.

    OMP_NUM_THREADS=1 python benchmarks/zoo/checks/train_hf_init.py efficientnet mobilevit
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import transformers
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import zoo_sweep  # noqa: E402


def reset_to_pytorch_default(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def main() -> None:
    warnings.simplefilter("ignore")
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=64, mode="nearest").repeat(1, 3, 1, 1)
    y = torch.tensor(labels)
    torch.manual_seed(0)
    order = torch.randperm(len(x))
    train, test = order[:1400], order[1400:]
    for family in sys.argv[1:]:
        for init in ("hf", "pytorch-default"):
            torch.manual_seed(0)
            config, _ = zoo_sweep._hf_config(family)
            config.num_labels = 10
            model = transformers.AutoModelForImageClassification.from_config(config).train()
            if init != "hf":
                reset_to_pytorch_default(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for _ in range(300):
                idx = train[torch.randint(0, len(train), (32,))]
                loss = nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(pixel_values=x[test]).logits.argmax(1) == y[test]).float().mean().item()
            print(f"{family} init={init}: final loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
