"""Worker for the DDP tests of test_monitor and test_robust_monitor.

`python ddp_worker.py single DIR` trains on the global batch in one process; under torchrun,
`ddp_worker.py ddp DIR` trains the same model with DDP, each rank on its half of the batch;
`ddp_worker.py nan DIR`: a NaN on one rank; `ddp_worker.py diverge DIR`: ranks run different layers.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from healthcheck.monitor import HealthMonitor
from tests import zoo


def nan_on_rank_one(log_dir: str) -> None:
    """Only rank 1's loss turns NaN; on_finding="raise" must raise on both ranks (rules see the
    max-reduced flag), so that neither is left waiting in a collective."""
    from healthcheck.monitor import HealthError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(zoo.ScaledResNet(width=16, blocks=2))
    monitor = HealthMonitor(model, every=2, snr_window=0, on_finding="raise")
    x = torch.randn(8, 16)
    try:
        for step in range(6):
            loss = model(x).pow(2).mean()
            loss.backward()  # gradients stay finite: only rank 1's reported loss is NaN
            reported = loss.detach() * float("nan") if rank == 1 and step == 1 else loss.detach()
            monitor.step(reported)
            model.zero_grad()
    except HealthError:
        (Path(log_dir) / f"raised.{rank}").touch()
    dist.barrier()
    dist.destroy_process_group()


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class LayerDropNet(torch.nn.Module):
    """Residual blocks of which each rank skips a different one (LayerDrop with a per-rank draw):
    the ranks' recorded graphs differ in which joins they hold and in their node numbering."""

    def __init__(self, width: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = torch.nn.Linear(width, 10)
        self.skip = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i != self.skip:
                x = block(x)
        return self.head(x)


def train_monitored(model: torch.nn.Module, log_dir: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> HealthMonitor:
    """SGD steps over `batches` with a monitor sampling every 2nd step; the closed monitor."""
    monitor = HealthMonitor(model, log_dir=log_dir, every=2, snr_window=2, ranks=False, on_finding="ignore")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
    monitor.close()
    return monitor


def diverging_graphs(log_dir: str) -> None:
    """Rank r skips block r + 1: no hang, and every rank reads the same reduced numbers."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = LayerDropNet()
    net.skip = rank + 1
    model = DistributedDataParallel(net, find_unused_parameters=True)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]
    monitor = train_monitored(model, log_dir, batches)
    samples = [{"step": s.step, "loss": s.loss, "profile": {p.id: p.var for p in s.measurements.profile},
                "grad_rms": {p.id: p.grad_rms for p in s.measurements.profile}} for s in monitor.history]
    (Path(log_dir) / f"samples.{rank}.json").write_text(json.dumps(samples))
    dist.barrier()
    dist.destroy_process_group()
    (Path(log_dir) / f"done.{rank}").touch()


def main(mode: str, log_dir: str) -> None:
    if mode == "nan":
        nan_on_rank_one(log_dir)
        return
    if mode == "diverge":
        diverging_graphs(log_dir)
        return
    torch.manual_seed(0)
    model = zoo.ScaledResNet(width=32, blocks=4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    if mode == "ddp":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        per = x.shape[0] // world
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        model = DistributedDataParallel(model)
    train_monitored(model, log_dir, [(x, y)] * 6)
    rank = dist.get_rank() if mode == "ddp" else 0
    if mode == "ddp":
        dist.barrier()  # rank 0 may still be writing events: leave together
        dist.destroy_process_group()
    (Path(log_dir) / f"done.{rank}").touch()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
