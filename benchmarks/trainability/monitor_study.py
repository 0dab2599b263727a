"""HealthMonitor on healthy and failing training runs: does it warn before the loss goes bad, and
does it stay quiet on runs that train? (issue 13, item 5)

    python benchmarks/trainability/monitor_study.py --seeds 0 1 2 --json runs.json   # the built-in cases
    python benchmarks/trainability/monitor_study.py --study --task digits --seeds 0  # study.py's cases
    python benchmarks/trainability/monitor_study.py --rescore benchmarks/trainability/monitor_runs_own.json \
        --baseline before.json --markdown report.md      # score stored runs (and a baseline) again
    python benchmarks/trainability/monitor_study.py --rescore RUNS.json --replay-loss-rule  # HC405 re-evaluated
    python benchmarks/trainability/monitor_study.py --rescore RUNS.json --drop HC405         # as if deselected

MONITOR.md is assembled from the two stored sets (see its head).

The runs are small classifiers on scikit-learn's digits (8×8 images, 10 classes) trained with a
fixed recipe: batch 64, 300 steps (≈ 13 epochs), SGD with momentum 0.9 at the case's learning rate
(Adam for the transformer and the Adam cases). A run *trains* when its loss stays finite and its
test accuracy reaches 0.90; it *fails* otherwise. Its loss *goes bad* at the first step whose loss
is NaN/Inf or above 3× the initial loss (a run that fails without that, e.g. by dying ReLUs, has no
bad step: it counts as flagged when the monitor reports anything at warning or above).

Each run is monitored the way a user monitors one (README, examples/train_loop.py): `monitor.step
(loss)` after backward, the optimizer step, `monitor.after_optimizer_step()`, `every` steps between
samples, the default rules and thresholds. Per run: the first warning/error and its code, the bad
step, the lead time (bad step − first flag), the findings on runs that train (false alarms).

When benchmarks/trainability/study.py (the trainability study) exists and `--study` is given, its
cases are used instead of the built-in ones (`train(case, seed, on_step=...)`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from healthcheck.monitor import HealthMonitor  # noqa: E402

STEPS, BATCH = 300, 64
BAD_FACTOR = 3.0  # loss above 3× its initial value counts as gone bad


# -- data -------------------------------------------------------------------------------------------

_DIGITS: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test split of scikit-learn's digits, pixels scaled to [0, 1] (fixed split)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        x, y = x[order], y[order]
        _DIGITS = (x[:1437], y[:1437], x[1437:], y[1437:])
    return _DIGITS


# -- models -----------------------------------------------------------------------------------------

def MLP(depth: int, width: int = 64, act: str = "relu", norm: bool = False, init: str = "he",  # noqa: N802
        head_gain: float = 1.0) -> nn.Module:
    """The study's plain MLP (benchmarks/trainability/study.py), LayerNorm before each activation when
    `norm`: one definition for both studies (same parameters drawn in the same order)."""
    from study import MLP as StudyMLP

    return StudyMLP(depth, width, act=act, init=init, norm="ln" if norm else "none", head_gain=head_gain)


class Block(nn.Module):
    """x + α·f(x) with f = Linear → ReLU → Linear (He); α trainable, starting at `alpha` (SkipInit: 0),
    or a pre-LayerNorm branch."""

    def __init__(self, width: int, alpha: float | None, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.alpha = nn.Parameter(torch.tensor(float(alpha))) if alpha is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(F.relu(self.fc1(self.norm(x))))
        return x + (self.alpha * branch if self.alpha is not None else branch)


class ResMLP(nn.Module):
    def __init__(self, blocks: int, width: int = 64, alpha: float | None = None, norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[Block(width, alpha, norm) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class CNN(nn.Module):
    """Plain 3×3 conv stack on the 1×8×8 image (He init), optional BatchNorm, global pooling, head."""

    def __init__(self, depth: int, channels: int = 16, bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for _ in range(depth):
            conv = nn.Conv2d(c_in, channels, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, *([nn.BatchNorm2d(channels)] if bn else []), nn.ReLU()]
            c_in = channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(-1, 1, 8, 8)).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """The 8 image rows as tokens, pre-LN encoder, mean-pooled head."""

    def __init__(self, layers: int = 2, d: int = 32, post_ln: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=not post_ln)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(-1, 8, 8)) + self.pos).mean(dim=1))


# -- cases ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    lr: float
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    expected: str = "trains"  # what the case was designed to do (the label is measured, not this)


CASES: list[Case] = [
    # designed to train
    Case("mlp4", lambda: MLP(4), 0.05),
    Case("mlp8_default_init", lambda: MLP(8, init="default"), 0.05),
    Case("mlp16_lr0.01", lambda: MLP(16), 0.01),
    Case("mlp8_layernorm", lambda: MLP(8, norm=True), 0.05),
    Case("mlp4_tanh", lambda: MLP(4, act="tanh"), 0.05),
    Case("resmlp8_preln", lambda: ResMLP(8, norm=True), 0.01),
    Case("skipinit8_lr0.01", lambda: ResMLP(8, alpha=0.0), 0.01),
    Case("cnn4_bn", lambda: CNN(4, bn=True), 0.05),
    Case("transformer2_adam", lambda: TinyTransformer(2), 1e-3, "adam"),
    Case("mlp4_adam", lambda: MLP(4), 1e-3, "adam"),
    # designed to fail
    Case("mlp16_lr0.05", lambda: MLP(16), 0.05, expected="fails"),
    Case("mlp24_lr0.05", lambda: MLP(24), 0.05, expected="fails"),
    Case("mlp4_lr1", lambda: MLP(4), 1.0, expected="fails"),
    Case("skipinit16_lr0.3", lambda: ResMLP(16, alpha=0.0), 0.3, expected="fails"),
    Case("resmlp16_nonorm", lambda: ResMLP(16), 0.05, expected="fails"),
    Case("cnn10_nonorm", lambda: CNN(10), 0.05, expected="fails"),
    Case("mlp4_head_x30", lambda: MLP(4, head_gain=30.0), 0.05, expected="fails"),
    Case("mlp8_adam_lr0.05", lambda: MLP(8), 0.05, "adam", expected="fails"),
    Case("transformer4_postln_adam0.02", lambda: TinyTransformer(4, post_ln=True), 0.02, "adam", expected="fails"),
    Case("mlp12_tanh_lr0.5", lambda: MLP(12, act="tanh"), 0.5, expected="fails"),
]


# -- one run ----------------------------------------------------------------------------------------

@dataclass
class Event:
    step: int
    code: str
    severity: str
    event: str  # "appeared" / "cleared"
    message: str


@dataclass
class Run:
    case: str
    seed: int
    every: int
    losses: list[float]
    test_accuracy: float
    trains: bool
    bad_step: int | None  # first step with a non-finite loss or one above 3× the initial loss
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)  # per sampled step: the statistics the HC4xx rules read

    def first_flag(self, levels: tuple[str, ...] = ("error", "warning"),
                   codes: tuple[str, ...] | None = None) -> Event | None:
        return next((e for e in self.events if e.event == "appeared" and e.severity in levels
                     and (codes is None or e.code.startswith(codes))), None)


def bad_step_of(losses: list[float]) -> int | None:
    first = losses[0]
    for step, loss in enumerate(losses):
        if not math.isfinite(loss) or (math.isfinite(first) and loss > BAD_FACTOR * first):
            return step
    return None


def make_optimizer(case: Case, model: nn.Module) -> torch.optim.Optimizer:
    if case.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=case.lr)
    return torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)


def run_case(case: Case, seed: int, every: int, steps: int = STEPS) -> Run:
    """Train the case with the monitor as a user would; losses are read after the run (one host
    copy at the end, so the monitor's own no-sync behaviour on unsampled steps is what is timed)."""
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = case.build()
    optimizer = make_optimizer(case, model)
    order = torch.Generator().manual_seed(seed)
    current = [0]
    events: list[Event] = []

    def record(finding, event: str) -> None:
        events.append(Event(current[0], finding.code, finding.severity, event, finding.message))

    losses: list[torch.Tensor] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with HealthMonitor(model, log_dir=None, every=every, on_finding=record, figure_every=0,
                           history_size=None) as monitor:
            perm = torch.randperm(len(x_train), generator=order)
            cursor = 0
            for step in range(steps):
                current[0] = step
                if cursor + BATCH > len(perm):
                    perm, cursor = torch.randperm(len(x_train), generator=order), 0
                idx = perm[cursor:cursor + BATCH]
                cursor += BATCH
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                monitor.step(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                monitor.after_optimizer_step()
                losses.append(loss.detach())
            current[0] = steps - 1
    seconds = time.perf_counter() - start
    values = torch.stack(losses).tolist()
    with torch.no_grad():
        model.eval()
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    finite = all(math.isfinite(v) for v in values)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    return Run(case.name, seed, every, values, accuracy, finite and accuracy >= 0.90, bad_step_of(values), events,
               seconds, [sample_stats(s, matrices) for s in monitor.history])


def sample_stats(sample, matrices: set[str]) -> dict:
    """What the training rules read on one sample, kept so that thresholds can be re-scored."""
    def median(values):
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else None

    return {"step": sample.step, "loss": sample.loss, "nonfinite": sample.nonfinite,
            "update_all": median(v for v in sample.update_ratio.values() if v > 0),
            "update_matrix": median(v for n, v in sample.update_ratio.items() if v > 0 and n in matrices),
            "update_matrix_max": max((v for n, v in sample.update_ratio.items() if n in matrices), default=None),
            "snr": median(sample.grad_snr.values()),
            "dead_max": max(sample.dead_fraction.values(), default=None),
            "grad_norm": math.sqrt(sum(v * v for v in sample.grad_norm.values())) if sample.grad_norm else None,
            "weight_norm": math.sqrt(sum(v * v for v in sample.weight_norm.values())) if sample.weight_norm else None}


def run_study_case(case_name: str, seed: int, every: int) -> Run:
    """A case of the trainability study (study.py, its pre-registered recipe), monitored through its
    `on_step` / `after_step` hooks; its own outcome decides trains / fails and the bad step."""
    import study  # benchmarks/trainability/study.py

    case = study.case_named(case_name)
    model = study.make_model(case, seed)
    events: list[Event] = []
    current = [0]

    def record(finding, event: str) -> None:
        events.append(Event(current[0], finding.code, finding.severity, event, finding.message))

    def on_step(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        current[0] = step
        monitor.step(loss)

    def after_step(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        monitor.after_optimizer_step()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = HealthMonitor(model, log_dir=None, every=every, on_finding=record, figure_every=0,
                                history_size=None)
        with monitor:  # closed when training stops (the recipe stops at the first NaN/Inf loss)
            outcome = study.train(case, seed, on_step=on_step, after_step=after_step, model=model)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    return Run(case_name, seed, every, [v for _, v in outcome.loss_curve], outcome.final_test_metric or 0.0,
               outcome.trained, outcome.first_bad_step, events, time.perf_counter() - start,
               [sample_stats(s, matrices) for s in monitor.history])


def replay_loss_rule(run: Run) -> Run:
    """The run's events with HC405 (loss-not-decreasing) evaluated again on its stored samples by the
    current rule and the monitor's persistence (for runs stored before the rule, or after a change of
    its options): HC405 reads only the sampled losses and the median update ratio over matrices, which
    the samples keep, so this is the monitor's verdict without retraining."""
    from healthcheck.config import Config
    from healthcheck.monitor.findings import FindingTracker
    from healthcheck.monitor.samples import DEFAULT_SELECT, LossPoint, TrainingSample
    from healthcheck.rules import RuleContext, run_rules

    tracker = FindingTracker(Config(select=DEFAULT_SELECT), "ignore", "error", rank=0)
    trend: list[LossPoint] = []
    events = [e for e in run.events if e.code != "HC405"]
    previous = -1
    for stats in run.samples:
        loss, nonfinite = stats["loss"], stats["nonfinite"]
        sample = TrainingSample(step=stats["step"], previous_step=previous, measurements=None, nonfinite=nonfinite,
                                loss=loss, loss_trend=trend)
        previous = stats["step"]
        if loss is not None and math.isfinite(loss) and not nonfinite:
            trend.append(LossPoint(stats["step"], loss, stats["update_matrix"]))
        findings = run_rules(RuleContext(None, None, sample), ("HC405",), (), {})
        events += [Event(stats["step"], f.code, f.severity, e, f.message) for f, e in tracker.events(findings)]
    events.sort(key=lambda e: e.step)  # stable: the monitor's order within a step is kept
    return Run(**{**asdict(run), "events": events})


def drop_codes(run: Run, codes: tuple[str, ...]) -> Run:
    """The run as a monitor with these rules deselected would have reported it."""
    return Run(**{**asdict(run), "events": [e for e in run.events if not e.code.startswith(codes)]})


# -- scoring ----------------------------------------------------------------------------------------

@dataclass
class Score:
    healthy: int
    healthy_alarmed: int  # runs that train with a finding at warning or above
    failing: int
    flagged_before: int  # failing runs flagged (warning+) strictly before the loss went bad (or at all, if it never did)
    flagged_at_or_before: int
    flagged_error_before: int
    lead_times: list[int]
    alarm_codes: dict[str, int]
    flag_codes: dict[str, int]

    @property
    def median_lead(self) -> float | None:
        return statistics.median(self.lead_times) if self.lead_times else None


def score(runs: list[Run]) -> Score:
    healthy = [r for r in runs if r.trains]
    failing = [r for r in runs if not r.trains]
    alarm_codes: dict[str, int] = {}
    for r in healthy:
        for code in sorted({e.code for e in r.events if e.event == "appeared" and e.severity in ("error", "warning")}):
            alarm_codes[code] = alarm_codes.get(code, 0) + 1
    before = at_or_before = error_before = 0
    leads: list[int] = []
    flag_codes: dict[str, int] = {}
    for r in failing:
        flag, error = r.first_flag(), r.first_flag(("error",))
        if flag is not None:
            flag_codes[flag.code] = flag_codes.get(flag.code, 0) + 1
        if r.bad_step is None:
            before += flag is not None
            at_or_before += flag is not None
            error_before += error is not None
            continue
        if flag is not None and flag.step < r.bad_step:
            before += 1
            leads.append(r.bad_step - flag.step)
        if flag is not None and flag.step <= r.bad_step:
            at_or_before += 1
        if error is not None and error.step < r.bad_step:
            error_before += 1
    return Score(len(healthy), sum(1 for r in healthy if r.first_flag()), len(failing), before, at_or_before,
                 error_before, leads, alarm_codes, flag_codes)


def table(runs: list[Run]) -> str:
    rows = ["| case | seed | trains (test acc) | loss goes bad at | first warning/error | first error | lead (steps) |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        flag, error = r.first_flag(), r.first_flag(("error",))
        lead = "" if flag is None or r.bad_step is None else str(r.bad_step - flag.step)
        rows.append(f"| {r.case} | {r.seed} | {'yes' if r.trains else 'no'} ({r.test_accuracy:.2f}) | "
                    f"{'—' if r.bad_step is None else r.bad_step} | "
                    f"{'—' if flag is None else f'{flag.code} {flag.severity} @ {flag.step}'} | "
                    f"{'—' if error is None else f'{error.code} @ {error.step}'} | {lead} |")
    return "\n".join(rows)


def summary(s: Score) -> str:
    median = "—" if s.median_lead is None else f"{s.median_lead:g}"
    return (f"- healthy runs (train: finite loss, test accuracy ≥ 0.90): {s.healthy}; with a warning or error: "
            f"{s.healthy_alarmed} {dict(sorted(s.alarm_codes.items()))}\n"
            f"- failing runs: {s.failing}; flagged (warning+) before the loss goes bad: {s.flagged_before} "
            f"(at or before: {s.flagged_at_or_before}; at error level before: {s.flagged_error_before}); "
            f"first codes {dict(sorted(s.flag_codes.items()))}\n"
            f"- lead times (steps, failing runs whose loss goes bad and that were flagged before): "
            f"{sorted(s.lead_times)}; median {median}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="*", default=None, help="case names (substring match)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--json", default=None, help="store the runs (events and per-sample statistics) here")
    parser.add_argument("--markdown", default=None, help="write (or with --append, add) a report section here")
    parser.add_argument("--rescore", default=None, help="score a stored runs JSON without training")
    parser.add_argument("--study", action="store_true",
                        help="the cases of benchmarks/trainability/study.py instead of the built-in ones")
    parser.add_argument("--task", default=None, help="with --study: only this task (digits | teacher)")
    parser.add_argument("--baseline", default=None,
                        help="runs JSON of the same cases under an earlier monitor: its summary goes in as 'before'")
    parser.add_argument("--replay-loss-rule", action="store_true",
                        help="with --rescore: evaluate HC405 again on the stored samples (current rule and options)")
    parser.add_argument("--drop", nargs="*", default=(),
                        help="with --rescore: score as if these codes (prefixes) were deselected, e.g. HC405")
    parser.add_argument("--title", default="HealthMonitor on healthy and failing runs")
    parser.add_argument("--append", action="store_true", help="append the section to --markdown")
    parser.add_argument("--command", default=None, help="the command that produced the runs (for the report)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rescore:
        stored = json.loads(Path(args.rescore).read_text())
        runs = [Run(**{**r, "events": [Event(**e) for e in r["events"]]}) for r in stored]
        if args.replay_loss_rule:
            runs = [replay_loss_rule(r) for r in runs]
        if args.drop:
            runs = [drop_codes(r, tuple(args.drop)) for r in runs]
    else:
        if args.study:
            sys.path.insert(0, str(HERE))
            import study

            names = [c.name for c in study.cases() if (args.task is None or c.task == args.task)]
        else:
            names = [c.name for c in CASES]
        names = [n for n in names if not args.only or any(o in n for o in args.only)]
        by_name = {c.name: c for c in CASES}
        runs = []
        for name in names:
            for seed in args.seeds:
                run = run_study_case(name, seed, args.every) if args.study else \
                    run_case(by_name[name], seed, args.every, args.steps)
                flag = run.first_flag()
                print(f"{name:40s} seed {seed}: trains={run.trains!s:5s} acc {run.test_accuracy:.2f} "
                      f"bad@{run.bad_step} first flag {flag and (flag.code, flag.severity, flag.step)} "
                      f"({run.seconds:.1f}s)", flush=True)
                runs.append(run)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in runs]))
    s = score(runs)
    print(summary(s))
    if args.markdown:
        command = args.command or ("python benchmarks/trainability/monitor_study.py " + " ".join(sys.argv[1:]))
        text = f"## {args.title}\n\n`{command}`\n\n"
        if args.baseline:
            stored = json.loads(Path(args.baseline).read_text())
            before = score([Run(**{**r, "events": [Event(**e) for e in r["events"]]}) for r in stored])
            text += f"Before (the monitor at the start of this work, same runs):\n\n{summary(before)}\n\nAfter:\n\n"
        text += f"{summary(s)}\n\n{table(runs)}\n\n"
        path = Path(args.markdown)
        path.write_text((path.read_text() if args.append and path.exists() else "") + text)


if __name__ == "__main__":
    main()
