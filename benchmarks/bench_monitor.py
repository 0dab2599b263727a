"""Overhead of HealthMonitor at its default settings: monitored vs plain training step, measured in
the same run (targets: ≤ 3% step time on CPU for a small ResNet, ≤ 1% on a GPU for a ResNet-50
step, ≤ 5% peak memory; no host sync on steps it does not sample).

    python benchmarks/bench_monitor.py                      # CPU: resnet18 on 32×32 images
    python benchmarks/bench_monitor.py --device cuda --model resnet50 --size 224 --batch 64

Plain and monitored segments alternate (plain, monitored, monitored, plain, …) so that drift of
the machine and order effects hit both alike; each segment is `every` steps long, so every monitored segment holds
exactly one sampled step and one SNR window, as in a long run. Peak memory: the same, after a
warm-up that pays the one-time costs (reported apart). On CUDA, non-sampled steps run under
torch.cuda.set_sync_debug_mode("error"): any host sync there raises.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def setup(args):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=10).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    return model, optimizer, x, y


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_steps(model, optimizer, x, y, steps: int, monitor=None, strict_sync: bool = False) -> float:
    sync(str(x.device))
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if monitor is not None:
            sampled = monitor._sampled(monitor._step)
            if strict_sync and not sampled:
                torch.cuda.set_sync_debug_mode("error")
            monitor.step(loss)
            torch.cuda.set_sync_debug_mode(0) if strict_sync else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(str(x.device))
    return time.perf_counter() - start


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory(args) -> tuple[int, int, int]:
    """Peak memory of `every` plain steps and of `every` monitored steps (one sampled step and its
    SNR window), in this process after a warm-up that pays the one-time costs (imports, LAPACK,
    the monitor's first sample) — returned too, as the third value. CPU: peak resident set
    (reset through /proc/self/clear_refs); CUDA: max_memory_allocated."""
    from healthcheck import HealthMonitor

    model, optimizer, x, y = setup(args)
    run_steps(model, optimizer, x, y, 2)
    before = peak(args.device)
    monitor = HealthMonitor(model, every=args.every, on_finding="ignore")
    run_steps(model, optimizer, x, y, 1, monitor)  # the first sample: one-time costs
    one_time = peak(args.device) - before
    run_steps(model, optimizer, x, y, args.every - 1, monitor)
    reset_peak(args.device)
    run_steps(model, optimizer, x, y, args.every)
    plain = peak(args.device)
    reset_peak(args.device)
    run_steps(model, optimizer, x, y, args.every, monitor)
    monitored = peak(args.device)
    monitor.close()
    return plain, monitored, one_time


def host_copies(args) -> list[int]:
    """Calls that bring tensor data to the host (`.cpu()`, `.tolist()`, `.item()`, `bool()`, …) in
    each of `every` monitored steps after the first sample (counted with a TorchFunctionMode: every
    call still runs). Target: 1 on the sampled step, 0 on the others."""
    from torch.overrides import TorchFunctionMode

    from healthcheck import HealthMonitor

    names = {"cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    class Count(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args_=(), kwargs=None):
            self.calls += getattr(func, "__name__", "") in names
            return func(*args_, **(kwargs or {}))

    model, optimizer, x, y = setup(args)
    monitor = HealthMonitor(model, every=args.every, on_finding="ignore", figure_every=0)
    counts = []
    for step in range(2 * args.every):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with Count() as count:
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            monitor.after_optimizer_step()
        if step >= args.every:
            counts.append(count.calls)
    monitor.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--every", type=int, default=100, help="HealthMonitor's every (its default: 100)")
    parser.add_argument("--segments", type=int, default=4, help="plain/monitored segment pairs (order alternates)")

    args = parser.parse_args()
    from healthcheck import HealthMonitor

    model, optimizer, x, y = setup(args)
    monitor = HealthMonitor(model, every=args.every, on_finding="ignore")
    strict = args.device.startswith("cuda")
    run_steps(model, optimizer, x, y, 3)  # warm-up
    monitor.load_state_dict({"step": 1})  # warm the monitor's first sample outside the timed segments
    plain, monitored = [], []
    for pair in range(args.segments):
        for kind in (("plain", "monitored") if pair % 2 == 0 else ("monitored", "plain")):
            if kind == "plain":
                plain.append(run_steps(model, optimizer, x, y, args.every))
            else:
                monitor.load_state_dict({"step": 0})  # each monitored segment starts with a sampled step
                monitored.append(run_steps(model, optimizer, x, y, args.every, monitor, strict_sync=strict))
    t_plain, t_mon = statistics.median(plain), statistics.median(monitored)
    plain_peak, monitored_peak, one_time = memory(args)
    copies = host_copies(args)
    print(f"torch {torch.__version__}, {args.device}, {args.model} {args.batch}×3×{args.size}², every={args.every}, "
          f"threads {torch.get_num_threads()}")
    print(f"step time: plain {t_plain / args.every * 1e3:.1f} ms, monitored {t_mon / args.every * 1e3:.1f} ms "
          f"→ ×{t_mon / t_plain:.4f} ({(t_mon / t_plain - 1) * 100:+.2f}%)  [segments: plain "
          f"{', '.join(f'{t:.2f}' for t in plain)} s; monitored {', '.join(f'{t:.2f}' for t in monitored)} s]")
    print(f"peak memory over {args.every} steps: plain {plain_peak / 2**20:.0f} MB, monitored "
          f"{monitored_peak / 2**20:.0f} MB → ×{monitored_peak / plain_peak:.3f} (one-time, at the first "
          f"sample: +{one_time / 2**20:.0f} MB)")
    print(f"host copies: {copies[0]} on the sampled step, {max(copies[1:], default=0)} on the others")


if __name__ == "__main__":
    main()
