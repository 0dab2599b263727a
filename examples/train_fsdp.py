"""HealthMonitor under FSDP2 (`fully_shard`): 2 processes on CPU with gloo.

    torchrun --nproc-per-node 2 examples/train_fsdp.py

Parameters are sharded DTensors: the monitor measures each rank's shard and sums the squares over
ranks (no parameter is gathered), so norms, update ratios and activation statistics are those of
the global batch; only rank 0 writes TensorBoard events (runs/fsdp). On a GPU, use "nccl" and
`torch.cuda.set_device(local_rank)`.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from healthcheck import HealthMonitor

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(32, 64), *[nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU())
                                           for _ in range(4)], nn.Linear(64, 10))
for block in model[1:-1]:
    fully_shard(block)  # one FSDP unit per block, then the root
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
with HealthMonitor(model, log_dir="runs/fsdp", every=10) as monitor:
    for step in range(30):
        x = torch.randn(32, 32, generator=generator)
        loss = F.cross_entropy(model(x), x[:, :10].argmax(dim=1))
        loss.backward()
        monitor.step(loss)  # every rank calls it: sampled steps reduce across ranks
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.3f}  grad norm {sum(v * v for v in monitor.history[-1].grad_norm.values()) ** 0.5:.3f}")
dist.destroy_process_group()
