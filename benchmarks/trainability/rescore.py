"""Score the current check's verdict at init against the trainability study's stored outcomes, without
retraining (issue 13, item 4). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/trainability/rescore.py --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/trainability/rescore.py --only 'tf_*' --out /tmp/scores.md

For every case × seed in outcomes.json: the model at init (`study.make_model`), its 32-row example
(inputs only), `healthcheck.check(model, inputs)` ("without optimizer") and, when `check` accepts
`optimizer=`, `check(model, inputs, optimizer=make_optimizer(case, model))` ("with optimizer").
Positive class: the run fails. Writes SCORES.md (or --out) and the raw verdicts to
benchmarks/trainability/scratch/verdicts.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import study  # noqa: E402

SCORES = HERE / "SCORES.md"
SCRATCH = HERE / "scratch"
MODES = ("without", "with")  # optimizer not given / given


@dataclass
class Verdict:
    """The check's findings on one case × seed in one mode."""

    case: str
    seed: int
    mode: str  # "without" | "with"
    findings: list[tuple[str, str]]  # (code, severity), error and warning and info
    seconds: float
    failure: str | None = None  # the check itself raised (UsageError, crash): no prediction

    @property
    def error(self) -> bool:
        return any(severity == "error" for _, severity in self.findings)

    @property
    def warning_or_error(self) -> bool:
        return any(severity in ("error", "warning") for _, severity in self.findings)


@dataclass
class Confusion:
    """Positive class: the run fails to train."""

    tp: int = 0  # predicted fail, failed
    fp: int = 0  # predicted fail, trained (false alarm)
    fn: int = 0  # predicted fine, failed (miss)
    tn: int = 0  # predicted fine, trained

    def add(self, predicted_fail: bool, failed: bool) -> None:
        if predicted_fail and failed:
            self.tp += 1
        elif predicted_fail:
            self.fp += 1
        elif failed:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def accuracy(self) -> float | None:
        return (self.tp + self.tn) / self.total if self.total else None


@dataclass
class RuleCount:
    """How often one code fired (at the given level) on failing and on training runs."""

    error_on_failing: int = 0
    error_on_training: int = 0
    warning_on_failing: int = 0
    warning_on_training: int = 0


@dataclass
class Scores:
    mode: str
    task: str  # "all" or one task's name
    runs: int
    failing: int
    check_failures: int
    error: Confusion = field(default_factory=Confusion)
    warning_or_error: Confusion = field(default_factory=Confusion)
    rules: dict[str, RuleCount] = field(default_factory=dict)
    false_alarms: list[str] = field(default_factory=list)  # "case seed: codes" (error level)
    misses: list[str] = field(default_factory=list)  # failing runs with no error
    warned_training: list[str] = field(default_factory=list)  # training runs with a warning (no error)


def score(verdicts: list[Verdict], outcomes: dict[tuple[str, int], dict], mode: str, task: str = "all") -> Scores:
    """Confusion tables for "error → fails" and "error or warning → fails", per-rule counts and the
    confusion lists, over the verdicts of `mode` that have a stored outcome. A run where the check
    itself raised counts as "no finding" (it reports nothing to the user) and is also counted apart."""
    rows = [v for v in verdicts if v.mode == mode and (v.case, v.seed) in outcomes
            and (task == "all" or v.case.endswith(f"/{task}"))]
    result = Scores(mode=mode, task=task, runs=len(rows), failing=0, check_failures=sum(v.failure is not None for v in rows))
    for v in rows:
        failed = not outcomes[(v.case, v.seed)]["trained"]
        result.failing += failed
        result.error.add(v.error, failed)
        result.warning_or_error.add(v.warning_or_error, failed)
        for code in sorted({c for c, s in v.findings if s in ("error", "warning")}):
            count = result.rules.setdefault(code, RuleCount())
            level = "error" if (code, "error") in v.findings else "warning"
            setattr(count, f"{level}_on_{'failing' if failed else 'training'}",
                    getattr(count, f"{level}_on_{'failing' if failed else 'training'}") + 1)
        label = f"{v.case} seed {v.seed}"
        codes = ", ".join(f"{c}:{s}" for c, s in v.findings if s != "info") or "none"
        if v.error and not failed:
            result.false_alarms.append(f"{label}: {codes}")
        elif failed and not v.error:
            result.misses.append(f"{label}: {codes}" + (f" (check raised: {v.failure})" if v.failure else ""))
        elif not failed and v.warning_or_error:
            result.warned_training.append(f"{label}: {codes}")
    result.rules = dict(sorted(result.rules.items()))
    return result


# -- running the check ------------------------------------------------------------------------------

def accepts_optimizer() -> bool:
    import healthcheck

    return "optimizer" in inspect.signature(healthcheck.check).parameters


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def run_check(name: str, seed: int, modes: tuple[str, ...]) -> list[Verdict]:
    """The check's verdicts on one case × seed (a fresh model per mode)."""
    import healthcheck

    case = study.case_named(name)
    inputs, _ = study.example_batch(case, seed)
    out = []
    for mode in modes:
        model = study.make_model(case, seed)
        start = time.perf_counter()
        try:
            if mode == "with":
                report = healthcheck.check(model, inputs, optimizer=study.make_optimizer(case, model))
            else:
                report = healthcheck.check(model, inputs)
            findings, failure = [(f.code, f.severity) for f in report.findings], None
        except Exception as exc:  # noqa: BLE001 - a check that raises is a result to score, not a crash
            findings, failure = [], f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        out.append(Verdict(name, seed, mode, findings, round(time.perf_counter() - start, 3), failure))
    return out


def _run_check_task(task: tuple[str, int, tuple[str, ...]]) -> list[Verdict]:
    return run_check(*task)


# -- report -----------------------------------------------------------------------------------------

def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(all_scores: list[Scores], task_scores: list[Scores], verdicts: list[Verdict], seconds: float,
           jobs: int) -> str:
    import torch

    lines = ["# Trainability study: the check's verdict at init against training outcomes", "",
             "Generated by `python benchmarks/trainability/rescore.py` (recipe version "
             f"{study.RECIPE_VERSION}, torch {torch.__version__}); positive class = the run fails to train "
             "(RECIPE.md). A run where the check raised counts as no finding.", "",
             "| task | optimizer given | runs | failing | prediction | precision | recall | accuracy "
             "| TP | FP | FN | TN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in all_scores + task_scores:
        for label, c in (("error → fails", s.error), ("error or warning → fails", s.warning_or_error)):
            lines.append(f"| {s.task} | {s.mode} | {s.runs} | {s.failing} | {label} | {_f(c.precision)} | "
                         f"{_f(c.recall)} | {_f(c.accuracy)} | {c.tp} | {c.fp} | {c.fn} | {c.tn} |")
    checks = [v for v in verdicts if v.seconds]
    median = sorted(v.seconds for v in checks)[len(checks) // 2] if checks else 0.0
    lines += ["", f"{len(checks)} checks, median {median:.1f} s each (one thread, shared 2-core machine); "
              f"this scoring took {seconds:.0f} s with {max(jobs, 1)} job(s)"
              + (" (re-scored from stored verdicts)." if not jobs else "."), ""]
    for s in all_scores:
        lines += [f"## Per rule, optimizer {s.mode}", "",
                  "| code | error on failing | error on training | warning on failing | warning on training |",
                  "|---|---|---|---|---|"]
        lines += [f"| {code} | {r.error_on_failing} | {r.error_on_training} | {r.warning_on_failing} | "
                  f"{r.warning_on_training} |" for code, r in s.rules.items()] or ["| – | | | | |"]
        if s.check_failures:
            lines += ["", f"The check raised on {s.check_failures} runs (listed with the misses)."]
        lines += ["", f"### False alarms (error on a run that trains), optimizer {s.mode}: {len(s.false_alarms)}", ""]
        lines += [f"- {item}" for item in s.false_alarms] or ["- none"]
        lines += ["", f"### Misses (failing run with no error), optimizer {s.mode}: {len(s.misses)}", ""]
        lines += [f"- {item}" for item in s.misses] or ["- none"]
        lines += ["", f"### Warnings (no error) on runs that train, optimizer {s.mode}: {len(s.warned_training)}", ""]
        lines += [f"- {item}" for item in s.warned_training] or ["- none"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (each on one thread)")
    parser.add_argument("--only", default="*", help="fnmatch pattern on case names (substring if no wildcard)")
    parser.add_argument("--out", type=Path, default=SCORES, help="where the scores go (Markdown)")
    parser.add_argument("--outcomes", type=Path, default=study.OUTCOMES)
    parser.add_argument("--mode", choices=("both", *MODES), default="both")
    parser.add_argument("--verdicts", type=Path, help="score stored verdicts (a verdicts.json of an earlier run) "
                        "instead of running the check")
    args = parser.parse_args()
    outcomes = study.load_outcomes(args.outcomes)
    if not outcomes:
        print(f"rescore: no outcomes in {args.outcomes}; run study.py first", file=sys.stderr)
        return 2
    pattern = args.only if any(ch in args.only for ch in "*?[") else f"*{args.only}*"
    modes = MODES if args.mode == "both" else (args.mode,)
    if "with" in modes and not accepts_optimizer():
        print("rescore: check() takes no optimizer= here; scoring without it only", file=sys.stderr)
        modes = tuple(m for m in modes if m != "with")
    known = {c.name for c in study.cases()}
    tasks = [(name, seed, modes) for name, seed in outcomes if name in known and fnmatch.fnmatch(name, pattern)]
    start = time.perf_counter()
    verdicts: list[Verdict] = []
    if args.verdicts:
        verdicts = [Verdict(**{**row, "findings": [tuple(f) for f in row["findings"]]})
                    for row in json.loads(args.verdicts.read_text())]
        verdicts = [v for v in verdicts if v.mode in modes and fnmatch.fnmatch(v.case, pattern)]
        tasks = []
    if args.jobs > 1 and tasks:
        # spawn, not fork: a forked child of a process that ran torch ops can hang in OpenMP
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            for done, result in enumerate(pool.map(_run_check_task, tasks, chunksize=2), 1):
                verdicts += result
                if done % 20 == 0:
                    print(f"  {done}/{len(tasks)} checked ({time.perf_counter() - start:.0f} s)", flush=True)
    else:
        _worker_init()
        for done, task in enumerate(tasks, 1):
            verdicts += run_check(*task)
            if done % 20 == 0:
                print(f"  {done}/{len(tasks)} checked ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    all_scores = [score(verdicts, outcomes, mode) for mode in modes]
    task_scores = [score(verdicts, outcomes, mode, task) for task in study.TASKS for mode in modes]
    text = render(all_scores, task_scores, verdicts, seconds, 0 if args.verdicts else args.jobs)
    args.out.write_text(text + "\n")
    if not args.verdicts:
        SCRATCH.mkdir(exist_ok=True)
        (SCRATCH / "verdicts.json").write_text(json.dumps([asdict(v) for v in verdicts], indent=1))
    for s in all_scores + task_scores:
        for label, c in (("error", s.error), ("error|warning", s.warning_or_error)):
            print(f"{s.task:7s} optimizer {s.mode:7s} {label:13s} → fails: precision {_f(c.precision)} recall {_f(c.recall)} "
                  f"accuracy {_f(c.accuracy)}  (TP {c.tp} FP {c.fp} FN {c.fn} TN {c.tn}; {s.runs} runs, "
                  f"{s.failing} failing)")
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
