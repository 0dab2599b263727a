"""HealthMonitor under the faults of real training (issue 14): each class of fault with a case of
its own, TensorBoard events read back with tensorboard's own reader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from healthcheck.monitor import HealthError, HealthMonitor, HealthWarning
from tests.helpers import ROOT
from tests.test_monitor import events


class Residual(nn.Module):
    """A few residual tanh blocks and a head: joins to profile, cheap to train."""

    def __init__(self, width: int = 16, blocks: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def nonfinite_events(log_dir) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(log_dir).Scalars("health/nonfinite")]


# -- 1. a NaN after the last sample is never lost ----------------------------------------------------

def test_nan_after_the_last_sample_is_raised_and_written_when_the_run_ends(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    with pytest.raises(HealthError, match="HC401"):
        with HealthMonitor(model, log_dir=tmp_path, every=50, on_finding="raise", snr_window=0) as monitor:
            for step in range(7):
                loss = F.cross_entropy(model(x), y) * (float("inf") if step == 5 else 1.0)
                loss.backward()
                monitor.step(loss)
                optimizer.step()
                optimizer.zero_grad()
                monitor.after_optimizer_step()
    assert nonfinite_events(tmp_path) == [(0, 0.0), (6, 1.0)]
    # the Inf loss of step 5 reached the weights through optimizer.step(): close() looks at them too
    assert monitor.history[-1].nonfinite == ["loss", "weights"] and monitor.history[-1].previous_step == 0


def test_nan_on_a_sampled_step_is_written_when_the_loop_breaks_before_after_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = HealthMonitor(model, log_dir=tmp_path, every=3, on_finding="ignore", snr_window=0)
    x, y = batch()
    for step in range(10):
        loss = F.cross_entropy(model(x), y) * (float("nan") if step == 3 else 1.0)
        loss.backward()
        monitor.step(loss)
        if step == 3:
            break  # the user's loop stops on the NaN: no optimizer step, no after_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
    monitor.close()
    assert nonfinite_events(tmp_path) == [(0, 0.0), (3, 1.0)]
    assert "health/var/root" in events(tmp_path).Tags()["scalars"]


def test_sample_is_written_at_the_next_step_when_after_optimizer_step_stops_being_called(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    monitor = HealthMonitor(model, log_dir=tmp_path, every=2, snr_window=0,
                            on_finding=lambda f, event: seen.append((f.code, event)))
    x, y = batch()
    for step in range(6):
        loss = F.cross_entropy(model(x), y) * (float("nan") if step == 2 else 1.0)
        loss.backward()
        monitor.step(loss)
        optimizer.zero_grad()
        if step < 2:  # after the NaN step the loop no longer calls optimizer.step / after_optimizer_step
            optimizer.step()
            monitor.after_optimizer_step()
    assert ("HC401", "appeared") in seen  # at step 3, without waiting for close()
    monitor.close()
    assert [s.step for s in monitor.history] == [0, 2, 4]
    assert "loss" in monitor.history[1].nonfinite


# -- 2. AMP with a GradScaler --------------------------------------------------------------------------

def test_grad_scaler_overflow_steps_are_skips_not_nans_and_norms_are_unscaled(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # float16 autocast and a start scale so high that the first steps' gradients overflow float16:
    # the scaler skips them and halves its scale until they fit (a healthy run)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    monitor = HealthMonitor(model, log_dir=tmp_path, every=1, snr_window=0, on_finding="raise",
                            fail_on="warning", scaler=scaler)
    x, y = batch()
    expected = []
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        expected.append(model.head.weight.grad.double().norm().item() / scaler.get_scale())
        monitor.step(loss)  # must not raise: an overflow the scaler skips is not a NaN
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    monitor.close()
    skipped = [s.skipped_step for s in monitor.history]
    assert skipped[0] and not skipped[-1]  # some steps overflowed, then the scaler settled
    assert all(s.nonfinite == [] for s in monitor.history)
    for sample, norm in zip(monitor.history, expected):
        if not sample.skipped_step:
            assert sample.grad_norm["head.weight"] == pytest.approx(norm, rel=1e-4)  # unscaled
    ev = events(tmp_path)
    assert [e.value for e in ev.Scalars("health/nonfinite")] == [0.0] * 12
    assert ev.Scalars("health/loss_scale")[-1].value < 2.0**24
    assert all(e.value < 1e3 for e in ev.Scalars("health/grad_norm/head"))


def test_a_loss_scale_that_keeps_falling_is_reported():
    """Gradients that overflow on step after step (an input of 1e38 through a linear layer): the
    scale halves at every step; that, not each skipped step, is the finding."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen = []
    monitor = HealthMonitor(model, every=2, snr_window=0, scaler=scaler,
                            on_finding=lambda f, event: seen.append((f.code, f.severity, f.message)))
    x = torch.full((4, 1), 1e38)
    for _ in range(14):
        loss = model(x).mean()
        scaler.scale(loss).backward()
        monitor.step(loss)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    monitor.close()
    assert [s.nonfinite for s in monitor.history] == [[]] * 7
    assert [(code, severity) for code, severity, _ in seen] == [("HC401", "warning")]
    assert "loss scale keeps falling" in seen[0][2]


# -- 3. gradient accumulation --------------------------------------------------------------------------

def _train_accumulating(micro: int, steps: int, **options) -> HealthMonitor:
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = HealthMonitor(model, every=2, snr_window=2, on_finding="ignore", **options)
    for step in range(steps):
        x, y = batch(16, seed=step)
        for part in range(micro):  # the same 16 examples, in `micro` micro-batches
            rows = slice(part * 16 // micro, (part + 1) * 16 // micro)
            (F.cross_entropy(model(x[rows]), y[rows]) / micro).backward()
            monitor.step(F.cross_entropy(model(x[rows]), y[rows]).detach())
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    return monitor


def test_gradient_accumulation_gives_the_update_ratio_and_snr_of_the_whole_batch():
    whole = _train_accumulating(1, 5)
    accumulated = _train_accumulating(4, 5, accumulation=4)
    assert [s.step for s in accumulated.history] == [s.step for s in whole.history] == [0, 2, 4]
    for a, b in zip(accumulated.history, whole.history):
        # without after_optimizer_step() a sample reports the update of the one before it
        assert (a.step == 0) or a.update_ratio and all(v > 0 for v in a.update_ratio.values())
        assert a.update_ratio == pytest.approx(b.update_ratio, rel=1e-4)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
        assert a.grad_snr == pytest.approx(b.grad_snr, rel=1e-3)
    assert accumulated.history[1].grad_snr  # a completed window


def test_undeclared_accumulation_is_not_reported_as_zero_updates():
    with pytest.warns(HealthWarning, match="accumulation="):
        monitor = _train_accumulating(4, 3)
    assert all(v > 0 for s in monitor.history for v in s.update_ratio.values())


# -- 4. parameters replaced after construction ----------------------------------------------------------

def test_parameters_replaced_or_unfrozen_after_construction_are_followed():
    torch.manual_seed(0)
    model = Residual()
    model.head.requires_grad_(False)  # frozen at first, unfrozen later (fine-tuning schedule)
    monitor = HealthMonitor(model, every=1, snr_window=0, on_finding="ignore")
    x, y = batch()
    for step in range(4):
        if step == 1:
            model.head.requires_grad_(True)
        if step == 2:  # new Parameter objects: load_state_dict(assign=True)
            state = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
            model.load_state_dict(state, assign=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        F.cross_entropy(model(x), y).backward()
        monitor.step()
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_optimizer_step()
    monitor.close()
    assert "head.weight" not in monitor.history[0].grad_norm
    assert "head.weight" in monitor.history[1].grad_norm
    replaced = monitor.history[2]
    assert replaced.weight_norm["stem.weight"] == pytest.approx(model.stem.weight.norm().item(), rel=1e-2)
    assert replaced.update_ratio["stem.weight"] > 0  # measured on the new tensors, not the old ones


# -- 5. only the training forward is measured ------------------------------------------------------------

@pytest.mark.parametrize("evaluation", ["eval_mode", "no_grad"])
def test_an_evaluation_forward_on_a_sampled_step_is_not_measured(evaluation):
    x, y = batch()
    variances = []
    for with_evaluation in (False, True):
        torch.manual_seed(0)
        model = Residual()
        monitor = HealthMonitor(model, every=2, snr_window=0, on_finding="ignore")
        for _ in range(3):
            if with_evaluation:  # validation first, on inputs 100× larger
                if evaluation == "eval_mode":
                    model.eval()
                    model(x * 100)
                    model.train()
                else:
                    with torch.no_grad():
                        model(x * 100)
            F.cross_entropy(model(x), y).backward()
            monitor.step()
            model.zero_grad()
        monitor.close()
        variances.append([[p.var for p in s.measurements.profile] for s in monitor.history])
    assert variances[1] == variances[0]


# -- 6. bad input: clear errors up front, never from inside step() -------------------------------------

def test_losses_as_numbers_or_per_sample_vectors_are_accepted(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    x, y = batch()
    for kind in ("number", "vector"):
        monitor = HealthMonitor(model, log_dir=tmp_path / kind, every=2, snr_window=0, on_finding="ignore")
        for step in range(4):
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            if step == 3:
                losses = losses * float("nan")
            monitor.step(losses.mean().item() if kind == "number" else losses)
            model.zero_grad()
        monitor.close()
        assert monitor.history[0].loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=0.05)
        assert nonfinite_events(tmp_path / kind) == [(0, 0.0), (2, 0.0), (3, 1.0)]


def test_bad_input_fails_at_once_with_a_clear_error(tmp_path):
    model = Residual()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="log_dir .* not a writable directory"):
        HealthMonitor(model, log_dir=tmp_path / "a_file" / "runs")
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}  # nothing left behind
    for kwargs in ({"accumulation": 0}, {"history_size": 0}, {"scaler": object()}, {"include": "blocks.*"}):
        with pytest.raises(ValueError):
            HealthMonitor(model, **kwargs)
    monitor = HealthMonitor(model, every=1, snr_window=0)
    for state, match in (({}, "'step'"), ({"step": "3"}, "integer"), ({"step": -1}, "integer"), ([], "'step'"),
                         ({"step": 2, "active": "HC401"}, "active")):
        with pytest.raises(ValueError, match=match):
            monitor.load_state_dict(state)
    monitor.load_state_dict({"step": 7})
    with pytest.raises(TypeError, match="loss must be a tensor, a number or None"):
        monitor.step("0.5")
    monitor.close()


def _zero_output_models():
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    nn.init.zeros_(plain[0].weight)
    nn.init.constant_(plain[0].bias, -1.0)  # every ReLU unit dead: zeros from there on
    yield "dead_first_layer", plain
    residual = Residual()
    nn.init.zeros_(residual.blocks[1][0].weight)
    nn.init.zeros_(residual.blocks[1][0].bias)
    yield "zero_branch", residual
    head = Residual()
    nn.init.zeros_(head.head.weight)
    nn.init.zeros_(head.head.bias)
    yield "zero_logits", head
    everything = Residual()
    for p in everything.parameters():
        nn.init.zeros_(p)
    yield "all_zero", everything


@pytest.mark.parametrize("case", ["dead_first_layer", "zero_branch", "zero_logits", "all_zero"])
def test_a_layer_whose_output_is_all_zeros_does_not_break_the_monitor(case):
    model = dict(_zero_output_models())[case]
    monitor = HealthMonitor(model, every=1, snr_window=0, on_finding="ignore")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        monitor.step()
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    assert len(monitor.history) == 2 and monitor.history[0].measurements.profile
    assert any(v == 0 for p in monitor.history[0].measurements.profile for v in (p.var, p.grad_rms, p.residual_ratio))


# -- 7. DDP with ranks whose graphs differ ----------------------------------------------------------------

def test_ddp_ranks_with_different_graphs_reduce_without_hanging_to_the_same_numbers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "ddp_worker.py"), "diverge", str(tmp_path)],
                          env=env, timeout=240, capture_output=True, text=True)
    assert {p.name for p in tmp_path.glob("done.*")} == {"done.0", "done.1"}, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"samples.{r}.json").read_text()) for r in (0, 1))
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == [0, 2, 4]
    for a, b in zip(rank0, rank1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # the mean over both ranks
        assert set(a["profile"]) != set(b["profile"])  # rank 0 skips blocks.1, rank 1 skips blocks.2
        shared = set(a["profile"]) & set(b["profile"])
        assert {"blocks.0", "blocks.3"} <= shared
        for point in shared:
            assert a["profile"][point] == pytest.approx(b["profile"][point], rel=1e-6), point
            assert a["grad_rms"][point] == pytest.approx(b["grad_rms"][point], rel=1e-6), point
    assert len(events(tmp_path).Scalars("health/var/blocks")) == 3


# -- 8. torch.compile ----------------------------------------------------------------------------------------

def test_a_compiled_model_gets_no_graph_breaks_or_recompiles_from_the_monitor():
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    x, y = batch()
    results = {}
    for monitored in (False, True):
        dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Residual()
        compiled = torch.compile(model, backend="eager")
        monitor = HealthMonitor(compiled, every=2, snr_window=0, on_finding="ignore") if monitored else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        try:
            for _ in range(6):
                loss = F.cross_entropy(compiled(x), y)
                loss.backward()
                if monitor is not None:
                    monitor.step(loss)
                optimizer.step()
                optimizer.zero_grad()
        except Exception as exc:  # noqa: BLE001 - no compiler toolchain here
            pytest.skip(f"torch.compile unavailable: {exc}")
        if monitor is not None:
            monitor.close()
        results[monitored] = (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
                              monitor.history if monitor else None)
    assert results[True][0] == results[False][0] == 0
    assert results[True][1] == results[False][1]  # no recompiles
    history = results[True][2]
    assert [s.step for s in history] == [0, 2, 4] and all(s.grad_norm and s.loss for s in history)


# -- 9. bounded history, one host copy per sampled step ----------------------------------------------------

class HostCopies(TorchFunctionMode):
    """Counts the calls that bring tensor data to the host (not a mock: every call still runs)."""

    NAMES = {"cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("after_step", [False, True])
def test_one_host_copy_per_sampled_step_none_between_and_bounded_history(tmp_path, after_step):
    torch.manual_seed(0)
    model = Residual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = HealthMonitor(model, log_dir=tmp_path, every=3, snr_window=3, on_finding="ignore", history_size=2,
                            figure_every=0)
    x, y = batch()
    copies = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with HostCopies() as counter:
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
            if after_step:
                monitor.after_optimizer_step()
        copies.append(len(counter.calls))
    monitor.close()
    # the first sample of an after_optimizer_step() loop adds its update ratios with a second copy:
    # the monitor learns only then that the loop calls after_optimizer_step()
    assert copies == [2 if after_step else 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert [s.step for s in monitor.history] == [6, 9]
    assert math.isfinite(monitor.history[-1].grad_snr["stem.weight"])
    assert [e.step for e in events(tmp_path).Scalars("health/var/root")] == [0, 3, 6, 9]
