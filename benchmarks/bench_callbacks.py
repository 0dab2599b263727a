"""Cost of the training callbacks: a whole `Trainer.train()` / `Trainer.fit()` with `HealthCallback`
vs the same run without it, in the same process (runs alternate: plain, monitored, monitored, plain,
… so that drift hits both alike). The check before training is a one-off and reported apart; the
rest is the monitor's share per step (target: ≤ 3% of a step at every=100, as for HealthMonitor).

    python benchmarks/bench_callbacks.py                     # both frameworks, CPU
    python benchmarks/bench_callbacks.py --steps 400 --repeats 3 --framework hf
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def hf_run(args, callback) -> tuple[float, float]:
    import transformers
    from healthcheck.plugins.huggingface import HealthCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=1000,
                                     n_positions=args.length)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 1000, (args.batch * 8, args.length), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                                  use_cpu=args.device == "cpu", report_to=["tensorboard"],
                                                  logging_steps=50, save_strategy="no", disable_tqdm=True)
        callbacks = [HealthCallback(every=args.every)] if callback else []
        trainer = transformers.Trainer(model, training, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(transformers.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return seconds, (callbacks[0].report.seconds if callback else 0.0)


def lightning_run(args, callback) -> tuple[float, float]:
    import lightning as L
    from healthcheck.plugins.lightning import HealthCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers = [nn.Linear(args.width, args.width), nn.LayerNorm(args.width), nn.ReLU()] * args.layers
            self.net = nn.Sequential(*layers, nn.Linear(args.width, 10))
            self.example_input_array = torch.randn(args.batch, args.width)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(args.batch * 8, args.width), torch.randint(0, 10, (args.batch * 8,)))
    callbacks = [HealthCallback(every=args.every)] if callback else []
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_steps=args.steps, logger=TensorBoardLogger(out), callbacks=callbacks,
                            accelerator=args.device, devices=1, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=args.batch))
        seconds = time.perf_counter() - start
    return seconds, (callbacks[0].report.seconds if callback else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["hf", "lightning", "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    runs = {"hf": hf_run, "lightning": lightning_run}
    frameworks = list(runs) if args.framework == "both" else [args.framework]
    print(f"{args.steps} steps, every={args.every}, batch {args.batch}, width {args.width}, {args.layers} layers, "
          f"{args.device}, {torch.get_num_threads()} threads")
    for name in frameworks:
        runs[name](argparse.Namespace(**{**vars(args), "steps": 5}), True)  # warm-up: imports, first compile
        plain, monitored, checks = [], [], []
        for _ in range(args.repeats):
            for callback in (False, True, True, False):
                seconds, check = runs[name](args, callback)
                (monitored if callback else plain).append(seconds)
                if callback:
                    checks.append(check)
        p, m, c = statistics.median(plain), statistics.median(monitored), statistics.median(checks)
        step = p / args.steps
        monitor_share = (m - c - p) / args.steps
        print(f"{name:9s} plain {p:.2f} s ({step * 1e3:.1f} ms/step) · with callback {m:.2f} s (×{m / p:.3f}) · "
              f"check {c:.2f} s once ({c / step:.1f} steps) · monitor {monitor_share * 1e3:+.2f} ms/step "
              f"({monitor_share / step:+.1%})")


if __name__ == "__main__":
    main()
