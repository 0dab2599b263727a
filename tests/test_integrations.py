"""The Lightning and Hugging Face Trainer callbacks, in real (tiny, CPU) training runs whose
TensorBoard events are read back with tensorboard's own reader."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthcheck import HealthError, HealthWarning

lightning = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from healthcheck.plugins.huggingface import HealthCallback as HFHealthCallback  # noqa: E402
from healthcheck.plugins.lightning import HealthCallback as LightningHealthCallback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

WIDTH = 32


class Block(nn.Module):
    """A residual block; with `norm` it is Pre-LN (healthy), without it variance grows with depth."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        if not norm:  # He init: the branch is as large as the skip, so the variance measurably grows
            for fc in (self.fc1, self.fc2):
                nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int, norm: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(norm) for _ in range(depth)])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Classifier(lightning.LightningModule):
    def __init__(self, net: Net, call_forward: bool = True) -> None:
        super().__init__()
        self.net, self.call_forward = net, call_forward
        self.example_input_array = torch.randn(16, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x) if self.call_forward else self.net(x)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, WIDTH, generator=generator),
                                          torch.randint(0, 4, (96,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=16)


def fit(module: lightning.LightningModule, callback: LightningHealthCallback, log_dir: Path,
        max_steps: int = 6) -> lightning.Trainer:
    trainer = lightning.Trainer(max_steps=max_steps, logger=TensorBoardLogger(str(log_dir), name="run"),
                                callbacks=[callback], accelerator="cpu", devices=1, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, loader())
    return trainer


def events(log_dir: str | Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


# -- Lightning ---------------------------------------------------------------------------------------

def test_lightning_fit_logs_check_and_monitor_through_its_logger(tmp_path):
    torch.manual_seed(0)
    callback = LightningHealthCallback(every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        trainer = fit(Classifier(Net(depth=4, norm=True)), callback, tmp_path)
    assert trainer.global_step == 6
    assert callback.report is not None and callback.report.model.input_shapes == ((16, WIDTH),)
    assert callback.monitor is None  # closed on teardown, hooks removed

    tb = events(trainer.logger.log_dir)  # the logger's own event file: nothing else wrote there
    scalars, tensors = set(tb.Tags()["scalars"]), set(tb.Tags()["tensors"])
    # the check: one point per join depth, findings as text and counts
    assert len(tb.Scalars("init/var")) == len(callback.report.measurements.profile)
    assert "init/findings/text_summary" in tensors
    assert tb.Scalars("init/findings/error")[0].value == callback.report.summary()["error"]
    # the monitor: sampled at global steps 0, 2, 4
    assert steps(tb, "health/loss") == [0, 2, 4]
    for prefix in ("health/var/", "health/residual_ratio/", "health/grad_norm/", "health/update_ratio/"):
        tags = [t for t in scalars if t.startswith(prefix)]
        assert tags, prefix
        assert steps(tb, tags[0]) == [0, 2, 4], tags[0]
    first_loss = tb.Scalars("health/loss")[0].value
    assert first_loss == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=0.2)  # ≈ ln 4 at init


def test_lightning_fails_fast_on_an_unhealthy_model(tmp_path):
    torch.manual_seed(0)
    sick = Net(depth=12, norm=False)
    before = {k: v.clone() for k, v in sick.state_dict().items()}
    callback = LightningHealthCallback(fail_on="error", every=2)
    with pytest.raises(HealthError) as failure:
        trainer = lightning.Trainer(max_steps=6, logger=TensorBoardLogger(str(tmp_path), name="run"),
                                    callbacks=[callback], accelerator="cpu", devices=1, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Classifier(sick), loader())
    assert trainer.global_step == 0
    assert {"HC101", "HC201"} <= {f.code for f in failure.value.findings}  # predicted and measured
    assert "HC101" in str(failure.value) and "fix:" in str(failure.value)
    assert all(torch.equal(before[k], v) for k, v in sick.state_dict().items())  # not one step taken
    # the report was logged before failing, so the run shows why it stopped
    errors = callback.report.summary()["error"]
    assert errors == sum(f.severity == "error" for f in failure.value.findings) > 0
    assert events(trainer.logger.log_dir).Scalars("init/findings/error")[0].value == errors


def test_lightning_monitors_the_submodule_training_step_calls(tmp_path):
    """A training_step that calls `self.net(x)`, not `self(x)`: by default the monitor says that it
    saw no forward; with module="net" it measures the activations."""
    torch.manual_seed(0)
    with pytest.warns(HealthWarning, match="did not run during the sampled training step"):
        fit(Classifier(Net(4, norm=True), call_forward=False), LightningHealthCallback(every=2), tmp_path / "a")

    callback = LightningHealthCallback(torch.randn(16, WIDTH), module="net", every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HealthWarning)
        trainer = fit(Classifier(Net(4, norm=True), call_forward=False), callback, tmp_path / "b", max_steps=3)
    tb = events(trainer.logger.log_dir)
    assert steps(tb, "health/var/blocks") == [0, 2]
    assert callback.report.model.name == "Net"


def test_lightning_check_that_cannot_run_warns_and_training_goes_on(tmp_path):
    module = Classifier(Net(2, norm=True))
    module.example_input_array = torch.randn(16, WIDTH + 1)  # does not fit the first layer
    with pytest.warns(HealthWarning, match="no check before training: .*shape"):
        trainer = fit(module, LightningHealthCallback(fail_on="error", every=2), tmp_path, max_steps=2)
    assert trainer.global_step == 2


# -- Hugging Face Trainer ------------------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, vocab: int = 64, length: int = 16, size: int = 64) -> None:
        self.ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def train(model: nn.Module, output_dir: Path, callbacks: list, max_steps: int = 6) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        use_cpu=True, report_to=["tensorboard"], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    return trainer


def run_dir(output_dir: Path) -> Path:
    (run,) = (output_dir / "runs").iterdir()  # the TensorBoardCallback's one run directory
    return run


def test_hf_trainer_logs_check_and_monitor_through_its_writer(tmp_path):
    callback = HFHealthCallback(every=2)
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        trainer = train(model, tmp_path / "monitored", [callback])
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed on train end
    # the check ran on the first batch the trainer would build (labels dropped)
    assert callback.report.model.input_shapes == ((8, 16),)
    assert callback.report.architecture.joins  # GPT-2's residual joins were found

    tb = events(run_dir(tmp_path / "monitored"))  # one event file, shared with the Trainer's own logs
    scalars = set(tb.Tags()["scalars"])
    assert {"train/loss", "init/var", "init/residual_ratio", "health/loss"} <= scalars
    assert steps(tb, "health/loss") == [0, 2, 4]
    assert steps(tb, "health/var/transformer.h") == [0, 2, 4]
    assert steps(tb, "health/grad_norm/transformer.h") == [0, 2, 4]
    # the monitor's loss is the model's loss on the sampled step: the trainer logs the same number
    # one step later (its global step counts the step just taken)
    trainer_loss = {e.step: e.value for e in tb.Scalars("train/loss")}
    for event in tb.Scalars("health/loss"):
        assert event.value == pytest.approx(trainer_loss[event.step + 1], rel=1e-4)

    # the callback does not change training: same losses without it, to the last bit
    plain = train(gpt2(), tmp_path / "plain", [])
    monitored_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    plain_losses = [e["loss"] for e in plain.state.log_history if "loss" in e]
    assert monitored_losses == plain_losses


class TokenNet(nn.Module):
    """A plain nn.Module language model for the Trainer, built on the unhealthy residual stack."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, WIDTH)
        self.net = Net(depth=12, norm=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(self.embed(input_ids))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten() % 4)
        return out


def test_hf_trainer_fails_fast_on_an_unhealthy_model(tmp_path):
    torch.manual_seed(0)
    callback = HFHealthCallback(fail_on="error")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    model = TokenNet()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.raises(HealthError) as failure:
        trainer.train()
    assert trainer.state.global_step == 0
    assert {"HC101", "HC201"} <= {f.code for f in failure.value.findings}  # predicted and measured
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing left on the model


# -- optional dependencies -----------------------------------------------------------------------------

def test_package_imports_without_the_frameworks():
    script = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
    sys.modules[name] = None
import healthcheck, healthcheck.plugins, healthcheck.callbacks
from healthcheck import check, HealthMonitor
for plugin, install in (("lightning", "pip install lightning"), ("huggingface", "pip install transformers")):
    try:
        __import__("healthcheck.plugins." + plugin)
    except ImportError as exc:
        assert install in str(exc), str(exc)
    else:
        raise AssertionError(plugin + " imported without its framework")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
