"""Worker for tests/test_fsdp.py: HealthMonitor under FSDP2 (`fully_shard`), 2 CPU processes on gloo.

`torchrun --nproc_per_node=2 fsdp_worker.py DIR` (one launch for all the tests, they are slow to start):
1. each rank trains the sharded model on its half of the batch; 2. the ranks skip different blocks
(their recorded graphs differ); 3. a NaN on one rank only; then rank 0 alone trains the model of 1 on
the whole batch in one process (the reference). Each writes what it measured as JSON for the test.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn import functional as F

from healthcheck.monitor import HealthError, HealthMonitor
from tests import zoo
from tests.ddp_worker import LayerDropNet


def record(monitor: HealthMonitor) -> list[dict]:
    return [{"step": s.step, "loss": s.loss, "grad_norm": s.grad_norm, "weight_norm": s.weight_norm,
             "update_ratio": s.update_ratio, "grad_snr": s.grad_snr,
             "var": {p.id: p.var for p in s.measurements.profile},
             "grad_rms": {p.id: p.grad_rms for p in s.measurements.profile},
             "residual_ratio": {p.id: p.residual_ratio for p in s.measurements.profile}} for s in monitor.history]


def train(model: torch.nn.Module, log_dir: Path, batches: list[tuple[torch.Tensor, torch.Tensor]],
          params: list[torch.Tensor]) -> tuple[HealthMonitor, dict[str, int]]:
    """SGD with a monitor sampling every 2nd step. Large tensors are subsampled (coordinates=256 <
    33·33) so that the shard-local coordinate subsets are exercised. Returns the closed monitor and
    the DTensor collectives issued inside the monitor's calls (FSDP2's own run outside them)."""
    monitor = HealthMonitor(model, log_dir=log_dir, every=2, snr_window=2, ranks=False, coordinates=256,
                            on_finding="ignore")
    optimizer = torch.optim.SGD(params, lr=0.05)
    inside: dict[str, int] = {}
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with CommDebugMode() as comms:
            monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        with CommDebugMode() as after:
            monitor.after_optimizer_step()
        for counts in (comms.get_comm_counts(), after.get_comm_counts()):
            for op, n in counts.items():
                inside[str(op)] = inside.get(str(op), 0) + n
    monitor.close()
    return monitor, inside


def match(out: Path, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    per = x.shape[0] // world
    torch.manual_seed(0)
    model = zoo.ScaledResNet(width=33, blocks=3)  # 33 rows: uneven shards (17 + 16)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    sharded = type(model.inp.weight).__name__
    monitor, comms = train(model, out / "fsdp", [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])] * 6,
                           list(model.parameters()))
    (out / f"fsdp.{rank}.json").write_text(json.dumps({"samples": record(monitor), "comms": comms,
                                                       "parameter_type": sharded}))
    return x, y


def single(out: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """The reference: one process, the global batch, the same initial weights."""
    torch.manual_seed(0)
    model = zoo.ScaledResNet(width=33, blocks=3)
    monitor, _ = train(model, out / "single", [(x, y)] * 6, list(model.parameters()))
    (out / "single.json").write_text(json.dumps({"samples": record(monitor)}))


def diverge(out: Path, rank: int) -> None:
    """Rank r skips block r + 1 (LayerDrop with a per-rank draw). One FSDP unit, so that the ranks
    all-gather the same parameters; FSDP2 reduce-scatters the unused ones as zeros when told to
    (`set_reduce_scatter_unused_params`), else its collectives would pair different tensors."""
    torch.manual_seed(0)
    net = LayerDropNet()
    net.skip = rank + 1
    fully_shard(net)
    net.set_reduce_scatter_unused_params(True)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]
    monitor, _ = train(net, out / "diverge", batches, list(net.parameters()))
    samples = record(monitor)
    # the whole gradient, gathered here by the test only, against the monitor's reduced norm; the
    # last sample's gradients are gone (zero_grad), so measure one more backward's against a fresh monitor
    probe = HealthMonitor(net, every=1, snr_window=0, ranks=False, on_finding="ignore")
    F.cross_entropy(net(batches[0][0]), batches[0][1]).backward()
    probe.step()
    full = {n: p.grad.full_tensor().norm().item() for n, p in net.named_parameters()}
    probe.close()
    net.zero_grad()
    (out / f"diverge.{rank}.json").write_text(json.dumps({"samples": samples, "probe": probe.history[0].grad_norm,
                                                          "full": full}))


def nan_on_one_rank(out: Path, rank: int) -> None:
    """Only rank 1's batch holds a NaN at step 1 (not sampled): FSDP2 spreads it into every rank's
    gradient shard; on_finding="raise" must raise on both ranks at the next sample, neither left
    waiting in a collective."""
    torch.manual_seed(0)
    model = zoo.ScaledResNet(width=16, blocks=2)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    monitor = HealthMonitor(model, every=2, snr_window=0, on_finding="raise")
    try:
        for step in range(6):
            x = torch.randn(8, 16)
            if rank == 1 and step == 1:
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            loss.backward()
            monitor.step(loss)
            model.zero_grad()
    except HealthError as error:
        (out / f"raised.{rank}").write_text(json.dumps({"step": monitor._step - 1, "codes": [f.code for f in error.findings]}))
    try:  # gradients still NaN at close: close reports them again, which is not what is tested here
        monitor.close()
    except HealthError:
        pass


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = match(out, rank, world)
    diverge(out, rank)
    nan_on_one_rank(out, rank)
    dist.barrier()  # rank 0 may still be writing events: leave together
    dist.destroy_process_group()
    if rank == 0:
        single(out, x, y)
    (out / f"done.{rank}").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
