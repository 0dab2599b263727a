"""HealthMonitor under FSDP2 (`torch.distributed.fsdp.fully_shard`): real 2-process runs on CPU with gloo.

One torchrun launch (tests/fsdp_worker.py) serves the first four tests (a launch costs seconds);
the example runs as written in a second one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, ROOT

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import fully_shard  # noqa: E402,F401 - FSDP2 (torch ≥ 2.6) or skip

# float32 rounding: the sharded run sums squares of two shards and means of two half-batches in
# another order than one process; 1e-5 is ~100 ulps. The gradient SNR is a ratio m / (s − m) over 2
# steps whose s − m cancels to a few % of s: rounding grows by s / (s − m) ≈ 1 + SNR (~30 here).
RTOL, RTOL_SNR = 1e-5, 1e-3


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True)


def finished(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Both ranks did all their work. gloo in torch 2.14 sometimes aborts a process at interpreter
    exit, after destroy_process_group; that teardown is not ours to test (as in the DDP tests)."""
    assert {p.name for p in out.glob("done.*")} == {"done.0", "done.1"}, proc.stderr[-3000:]
    assert proc.returncode == 0 or "terminate called without an active exception" in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun([str(ROOT / "tests" / "fsdp_worker.py"), str(out)], cwd=out)
    finished(proc, out)
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_sharded_norms_and_statistics_equal_one_process_on_the_global_batch(run):
    """Gradient/weight norms, update ratios and SNR of DTensor parameters (uneven shards, subsampled
    coordinates) and per-join activation statistics equal those of one process on the same global
    batch; both ranks hold the same numbers; the monitor gathers no parameter (only its one
    all_gather_object of the layout and one all_reduce per host copy)."""
    fsdp, other, single = load(run / "fsdp.0.json"), load(run / "fsdp.1.json"), load(run / "single.json")
    assert fsdp["parameter_type"] == "DTensor"
    assert fsdp["samples"] == other["samples"]
    a, b = single["samples"], fsdp["samples"]
    assert [s["step"] for s in a] == [s["step"] for s in b] == [0, 2, 4]
    for index, (reference, sharded) in enumerate(zip(a, b)):
        assert sharded["loss"] == pytest.approx(reference["loss"], rel=RTOL)
        for field in ("grad_norm", "weight_norm", "update_ratio", "grad_snr", "var", "grad_rms", "residual_ratio"):
            assert reference[field] or (field == "grad_snr" and index == 0), field  # a window ends at step 1
            assert set(sharded[field]) == set(reference[field]), field
            tolerance = RTOL_SNR if field == "grad_snr" else RTOL
            for key, value in reference[field].items():
                assert sharded[field][key] == pytest.approx(value, rel=tolerance), (field, key)
    comms = fsdp["comms"]  # c10d ops issued inside step()/after_optimizer_step()
    reductions = comms.get("c10d.allreduce_", 0)
    assert reductions == 4  # 3 samples + the first after_optimizer_step's update ratios
    assert set(comms) <= {"c10d.allreduce_", "c10d.allgather_"} and comms["c10d.allgather_"] == 2 * reductions


def test_rank_zero_alone_writes_one_event_file_with_the_single_process_numbers(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run / "fsdp").glob("events.out.tfevents.*"))) == 1
    a, b = (EventAccumulator(str(run / d), size_guidance={"scalars": 0}) for d in ("single", "fsdp"))
    a.Reload()
    b.Reload()
    for tag in ("health/grad_norm/blocks", "health/var/blocks", "health/update_ratio/blocks", "health/loss"):
        va, vb = [e.value for e in a.Scalars(tag)], [e.value for e in b.Scalars(tag)]
        assert len(va) == len(vb) >= 2 and vb == pytest.approx(va, rel=RTOL), tag


def test_ranks_with_different_graphs_reduce_to_the_same_numbers_and_the_whole_gradient(run):
    """LayerDrop with a per-rank draw under FSDP2: rank 0 skips blocks.1, rank 1 blocks.2. No hang; the
    reduced loss and norms agree on both ranks; joins both recorded agree; the monitor's norm of
    each sharded gradient is the norm of the whole gradient (gathered by the worker for checking)."""
    r0, r1 = load(run / "diverge.0.json"), load(run / "diverge.1.json")
    assert [s["step"] for s in r0["samples"]] == [s["step"] for s in r1["samples"]] == [0, 2, 4]
    for a, b in zip(r0["samples"], r1["samples"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == b["grad_norm"] and a["weight_norm"] == b["weight_norm"]
        assert set(a["var"]) != set(b["var"])  # the recorded graphs differ
        shared = set(a["var"]) & set(b["var"])
        assert {"blocks.0", "blocks.3"} <= shared
        for point in shared:
            assert a["var"][point] == pytest.approx(b["var"][point], rel=1e-6), point
            assert a["grad_rms"][point] == pytest.approx(b["grad_rms"][point], rel=1e-6), point
    assert set(r0["probe"]) == set(r0["full"]) and r0["probe"] == r1["probe"]
    for name, norm in r0["full"].items():
        assert r0["probe"][name] == pytest.approx(norm, rel=RTOL), name


def test_nan_on_one_rank_raises_on_every_rank_without_deadlock(run):
    raised = {r: load(run / f"raised.{r}") for r in (0, 1)}
    assert raised[0] == raised[1] and raised[0]["step"] == 2 and "HC401" in raised[0]["codes"]


def test_fsdp_example_runs_as_written(tmp_path):
    proc = torchrun([str(EXAMPLES / "train_fsdp.py")], cwd=tmp_path)
    assert proc.returncode == 0 or "terminate called without an active exception" in proc.stderr, proc.stderr[-3000:]
    assert "step 20" in proc.stdout  # rank 0 prints
    assert len(list((tmp_path / "runs" / "fsdp").glob("events.out.tfevents.*"))) == 1


def test_readme_shows_the_fsdp_example_as_it_runs():
    """The README's FSDP2 block is examples/train_fsdp.py (run by the test above), not a fragment."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("**FSDP2.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = (EXAMPLES / "train_fsdp.py").read_text().split('"""', 2)[2].lstrip("\n")
    assert block == example
