"""Recipe v2's positive controls (RECIPE.md, "Positive controls"): one small, healthy model per family —
none is a case — trained with the recipe on a task; test accuracy every 5 epochs. This is the pilot
that set the motifs bar and the length (`scratch/pilot_v2.py` in the recipe, kept here under git).

    OMP_NUM_THREADS=1 python benchmarks/trainability/controls.py 20 0,1,2 motifs,digits
    OMP_NUM_THREADS=1 python benchmarks/trainability/controls.py 30 0,1,2 digits cnn_bn_d2,resnet_bn_b2

Arguments: epochs, seeds, tasks, [control names].
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
from study import CNN, MLP, ResMLP, ResNet, Transformer  # noqa: E402

CONTROLS: list[tuple[str, Callable[[], nn.Module], str, float]] = [
    ("mlp_relu_d2_he", lambda: MLP(2), "sgd", 0.05),
    ("cnn_bn_d2", lambda: CNN(2, norm=True), "sgd", 0.05),
    ("resnet_bn_b2", lambda: ResNet(2), "sgd", 0.05),
    ("resmlp_preln_b4", lambda: ResMLP(4, norm="pre"), "sgd", 0.05),
    ("tf_preln_l2_dim64", lambda: Transformer(2, dim=64), "adam", 1e-3),
]


def accuracies(case: study.Case, seed: int, epochs: int) -> list[float]:
    """Test accuracy after every 5th epoch of the recipe's training (same batches as study.train)."""
    x_train, y_train, x_test, y_test = study.dataset(case.task)
    model = study.make_model(case, seed)
    optimizer = study.make_optimizer(case, model)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(x_train), study.BATCH):
            index = order[first:first + study.BATCH]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % 5 == 0:
            model.eval()
            with torch.no_grad():
                out.append(float((model(x_test).argmax(-1) == y_test).float().mean()))
    return out


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else study.EPOCHS
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
    tasks = (sys.argv[3] if len(sys.argv) > 3 else ",".join(study.TASKS)).split(",")
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else [c[0] for c in CONTROLS]
    torch.set_num_threads(1)
    for task in tasks:
        for name, build, optimizer, lr in CONTROLS:
            if name not in names:
                continue
            for seed in seeds:
                case = study.Case(f"{name}/{optimizer}{lr:g}/{task}", "control", task, optimizer, lr,
                                  0.9 if optimizer == "sgd" else 0.0, build)
                start = time.perf_counter()
                accs = accuracies(case, seed, epochs)
                print(f"{case.name:40s} s{seed} acc@5,10,..: {' '.join(f'{a:.3f}' for a in accs)}  "
                      f"{time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
