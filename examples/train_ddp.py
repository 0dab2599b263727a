"""HealthMonitor under DistributedDataParallel: 2 processes on CPU with gloo.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py

Statistics are reduced across ranks on sampled steps; only rank 0 writes TensorBoard events
(runs/ddp) and prints. The monitor looks through the DDP wrapper for the model's modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from healthcheck import HealthMonitor


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(32, 64),
        *[nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)) for _ in range(4)],
        nn.Linear(64, 10),
    )
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    with HealthMonitor(ddp, log_dir="runs/ddp", every=20) as monitor:
        for step in range(100):
            x = torch.randn(64, 32, generator=generator)
            y = (x[:, :10]).argmax(dim=1)
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
            monitor.after_optimizer_step()
            if rank == 0 and step % 20 == 0:
                print(f"step {step:3d}  loss {loss.item():.4f}  (world size {world})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
