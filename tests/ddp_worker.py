"""Worker for test_monitor.test_ddp_two_processes_match_single_process.

`python ddp_worker.py single DIR` trains on the global batch in one process; under torchrun,
`ddp_worker.py ddp DIR` trains the same model with DDP, each rank on its half of the batch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from healthcheck.monitor import HealthMonitor
from tests import zoo


def main(mode: str, log_dir: str) -> None:
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
    monitor = HealthMonitor(model, log_dir=log_dir, every=2, snr_window=2, ranks=False, on_finding="ignore")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
    monitor.close()
    rank = dist.get_rank() if mode == "ddp" else 0
    if mode == "ddp":
        dist.barrier()  # rank 0 may still be writing events: leave together
        dist.destroy_process_group()
    (Path(log_dir) / f"done.{rank}").touch()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
