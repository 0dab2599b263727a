"""The trainability study's stored outcomes are complete and its scorer counts right
(benchmarks/trainability, issue 13)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "trainability"
sys.path.insert(0, str(STUDY_DIR))

import rescore  # noqa: E402
import study  # noqa: E402


def test_outcomes_file_parses_and_covers_every_case_and_seed() -> None:
    data = json.loads(study.OUTCOMES.read_text())
    assert data["recipe_version"] == study.RECIPE_VERSION
    outcomes = study.load_outcomes()
    missing = [(c.name, seed) for c in study.cases() for seed in study.SEEDS if (c.name, seed) not in outcomes]
    assert not missing, f"{len(missing)} case × seed without an outcome, e.g. {missing[:3]}"
    for row in outcomes.values():
        assert row["recipe_version"] == study.RECIPE_VERSION
        assert isinstance(row["trained"], bool)
        # "trains" is exactly the pre-registered criterion on the stored numbers
        metric = row["final_test_metric"]
        assert row["trained"] == (metric is not None and metric >= row["threshold"])
        assert row["first_bad_step"] is None or row["first_bad_step"] <= row["steps"]


def test_case_names_are_unique_and_both_tasks_have_every_architecture() -> None:
    cases = study.cases()
    assert len({c.name for c in cases}) == len(cases)
    by_task = {task: {c.architecture for c in cases if c.task == task} for task in study.TASKS}
    assert by_task["digits"] == by_task["motifs"]
    assert len({c.architecture.split("/")[0] for c in cases}) >= 40


def test_scorer_arithmetic_on_a_hand_made_table() -> None:
    V = rescore.Verdict
    outcomes = {(name, 0): {"trained": trained} for name, trained in
                [("a", False), ("b", False), ("c", False), ("d", True), ("e", True), ("f", True), ("g", False)]}
    verdicts = [
        V("a", 0, "without", [("HC201", "error")], 1.0),            # TP
        V("b", 0, "without", [("HC201", "error"), ("HC104", "warning")], 1.0),  # TP
        V("c", 0, "without", [("HC104", "warning")], 1.0),          # FN for error, TP for warning
        V("d", 0, "without", [("HC201", "error")], 1.0),            # FP
        V("e", 0, "without", [("HC104", "warning"), ("HC203", "info")], 1.0),  # TN for error, FP for warning
        V("f", 0, "without", [("HC203", "info")], 1.0),             # TN
        V("g", 0, "without", [], 1.0, failure="UsageError: x"),      # check raised: no finding, FN
        V("a", 0, "with", [], 1.0),                                 # other mode: not counted
        V("zz", 0, "without", [("HC201", "error")], 1.0),           # no stored outcome: not counted
    ]
    s = rescore.score(verdicts, outcomes, "without")
    assert (s.runs, s.failing, s.check_failures) == (7, 4, 1)
    assert (s.error.tp, s.error.fp, s.error.fn, s.error.tn) == (2, 1, 2, 2)
    assert s.error.precision == pytest.approx(2 / 3)
    assert s.error.recall == pytest.approx(2 / 4)
    assert s.error.accuracy == pytest.approx(4 / 7)
    w = s.warning_or_error
    assert (w.tp, w.fp, w.fn, w.tn) == (3, 2, 1, 1)
    assert w.precision == pytest.approx(3 / 5) and w.recall == pytest.approx(3 / 4) and w.accuracy == pytest.approx(4 / 7)
    assert s.rules["HC201"] == rescore.RuleCount(error_on_failing=2, error_on_training=1)
    assert s.rules["HC104"] == rescore.RuleCount(warning_on_failing=2, warning_on_training=1)
    assert "HC203" not in s.rules  # info is not a prediction
    assert [x.split(":")[0] for x in s.false_alarms] == ["d seed 0"]
    assert [x.split(":")[0] for x in s.misses] == ["c seed 0", "g seed 0"]
    assert [x.split(":")[0] for x in s.warned_training] == ["e seed 0"]
    empty = rescore.score([], outcomes, "with")
    assert empty.error.precision is None and empty.error.recall is None and empty.error.accuracy is None


def test_recipe_v1_outcomes_are_kept_as_the_record() -> None:
    # recipe v2 replaced the teacher task and the length; v1's 312 outcomes stay, unchanged, as the record
    data = json.loads((STUDY_DIR / "outcomes_v1.json").read_text())
    assert data["recipe_version"] == "1"
    rows = data["outcomes"]
    assert len(rows) == 312 and all(row["recipe_version"] == "1" for row in rows)
    assert {row["case"].rsplit("/", 1)[1] for row in rows} == {"digits", "teacher"}
