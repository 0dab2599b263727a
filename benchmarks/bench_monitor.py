"""Overhead of HealthMonitor at its default settings: monitored vs plain training step, measured in
the same run (targets: ≤ 3% step time on CPU for a small ResNet, ≤ 1% on a GPU for a ResNet-50
step, ≤ 5% peak memory; no host sync on steps it does not sample).

    python benchmarks/bench_monitor.py                      # CPU: resnet18 on 32×32 images
    python benchmarks/bench_monitor.py --device cuda --model resnet50 --size 224 --batch 64
    python benchmarks/bench_monitor.py --scale                              # cost vs parameters and joins
    python benchmarks/bench_monitor.py --scale --widths 2048 --layers 20   # a 1.0B-parameter transformer

Plain and monitored segments alternate (plain, monitored, monitored, plain, …) so that drift of
the machine and order effects hit both alike; each segment is `every` steps long, so every monitored segment holds
exactly one sampled step and one SNR window, as in a long run. Peak memory: the same, after a
warm-up that pays the one-time costs (reported apart). On CUDA, non-sampled steps run under
torch.cuda.set_sync_debug_mode("error"): any host sync there raises.

`--scale`: the sampled step's extra cost as a function of parameter count and join count, on pre-LN
transformers (width × layers; 12·width² parameters and 2 joins per layer) fed a tiny batch of
`--tokens` random embeddings. Each step is timed alone, in CPU time of this process (wall time on a
shared machine measures the neighbours): plain steps before and after (median), and a monitored
sample away from the first (whose one-time costs and figure are paid before timing) with its SNR
window and two unsampled steps. Extra per sample = (the sampled step's forward + backward − the
plain median: the recorded forward's hooks and statistics) + the monitor's calls over the SNR window
(norms, the host copy, rules, TensorBoard on the sampled step; SNR sums after it); its share of
training at `every` = extra / (every × plain step). An unsampled step's overhead is the time of its
monitor calls (also shown: its step time − the plain median, noise around 0; optimizer.step() and
freeing the gradients vary most from step to step, which is why extra is not a whole-step difference).
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


class PreLNTransformer(torch.nn.Module):
    """Pre-LN blocks (attention + 4× MLP: 12·width² parameters, 2 joins each) on given embeddings."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        from tests import zoo

        self.blocks = torch.nn.Sequential(*[zoo.PreLNBlock(width, heads=max(1, width // 64)) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def timed_step(model, optimizer, x, monitor=None) -> tuple[float, float]:
    """One SGD step on `x`: its CPU time, that of its forward and backward, and that inside the monitor's calls."""
    clock = time.process_time
    start = clock()
    loss = model(x).pow(2).mean()
    loss.backward()
    inside = clock()
    forward_backward = inside - start
    if monitor is not None:
        monitor.step(loss)
    inside = clock() - inside
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if monitor is not None:
        begin = clock()
        monitor.after_optimizer_step()
        inside += clock() - begin
    return clock() - start, forward_backward, inside


def scale_point(width: int, layers: int, tokens: int, every: int, plain_steps: int) -> dict:
    import tempfile

    from healthcheck import HealthMonitor

    torch.manual_seed(0)
    model = PreLNTransformer(width, layers)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)  # no state: memory is weights + gradients
    x = torch.randn(1, tokens, width)
    for _ in range(3):  # warm-up: the allocator settles in the first steps (large gradients freed each step)
        timed_step(model, optimizer, x)
    plain = [timed_step(model, optimizer, x) for _ in range(plain_steps)]
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = HealthMonitor(model, log_dir=log_dir, every=every, on_finding="ignore")
        window = monitor.snr_window
        for _ in range(window + 1):  # the first sample (one-time costs, the figure) and its window
            timed_step(model, optimizer, x, monitor)
        monitor.load_state_dict({"step": every})  # the next step is an ordinary sample
        steps = [timed_step(model, optimizer, x, monitor) for _ in range(max(window, 1) + 2)]
        joins = len(monitor.history[-1].measurements.profile) if monitor.history[-1].measurements else 0
        monitor.close()
    plain += [timed_step(model, optimizer, x) for _ in range(2)]
    plain_step, plain_forward_backward = (statistics.median(p[i] for p in plain) for i in (0, 1))
    sampled = steps[:max(window, 1)]  # the sampled step and the rest of its SNR window
    calls = sum(inside for _, _, inside in sampled)
    extra = steps[0][1] - plain_forward_backward + calls
    return {"params": params, "joins": joins, "plain": plain_step, "sampled": steps[0][0], "extra": extra,
            "monitor_calls": calls, "share": extra / (every * plain_step),
            "unsampled_calls": max(inside for _, _, inside in steps[len(sampled):]),
            "unsampled_diff": statistics.median(t for t, _, _ in steps[len(sampled):]) - plain_step}


def scale(args) -> None:
    """The sampled step's cost against parameters and joins (see the module docs)."""
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, pre-LN transformer on 1×{args.tokens} "
          f"tokens, every={args.every}; CPU times of this process")
    print(f"{'params':>8} {'joins':>5} {'plain step':>10} {'sampled':>9} {'extra/sample':>12} {'monitor calls':>13} "
          f"{'share at every':>14} {'unsampled: calls':>16} {'step diff':>9} {'peak RSS':>8}")
    for width in args.widths:
        for layers in args.layers:
            r = scale_point(width, layers, args.tokens, args.every, args.plain_steps)
            print(f"{r['params'] / 1e6:7.1f}M {r['joins']:5d} {r['plain'] * 1e3:8.0f}ms {r['sampled'] * 1e3:7.0f}ms "
                  f"{r['extra'] * 1e3:10.0f}ms {r['monitor_calls'] * 1e3:11.0f}ms {r['share'] * 100:13.3f}% "
                  f"{r['unsampled_calls'] * 1e6:14.0f}µs {r['unsampled_diff'] * 1e3:+7.0f}ms "
                  f"{peak('cpu') / 2**30:6.1f}G", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--every", type=int, default=100, help="HealthMonitor's every (its default: 100)")
    parser.add_argument("--segments", type=int, default=4, help="plain/monitored segment pairs (order alternates)")
    parser.add_argument("--scale", action="store_true", help="sampled-step cost vs parameters and joins (CPU)")
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[256, 512, 1024])
    parser.add_argument("--layers", type=lambda s: [int(n) for n in s.split(",")], default=[2, 8, 32])
    parser.add_argument("--tokens", type=int, default=16, help="--scale: tokens per step (batch 1)")
    parser.add_argument("--plain-steps", type=int, default=2, help="--scale: plain steps timed before (and 2 after)")

    args = parser.parse_args()
    if args.scale:
        scale(args)
        return
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
