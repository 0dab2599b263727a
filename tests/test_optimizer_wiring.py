"""The optimizer reaches the stability checks from every entry point: `check(optimizer=...)` with a
real optimizer or a name, `[tool.healthcheck]`, the CLI flags, and the Lightning and Hugging Face
callbacks (real tiny training runs). The user's model, optimizer, scheduler and inputs are never
changed; bad values are one line and exit 2; without an optimizer the report says so, once."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import healthcheck
from healthcheck import HealthWarning, check
from healthcheck.api import check_file, load_file
from healthcheck.config import Config
from healthcheck.probes.stability import NOT_ASSESSED as NOTE
from healthcheck.probes.stability import OPTIMIZER_NAMES
from healthcheck.report import render
from tests.test_cli import assert_usage_error, run

WIDTH = 16
NOT_ASSESSED = NOTE.partition(":")[0]  # "stability under the optimizer was not assessed" (the text report wraps the rest)

MODEL_FILE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
example_input = torch.randn(8, 16)
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4))


def stability_numbers(report) -> dict:
    """The stability section without what legitimately differs between runs (time taken)."""
    data = report.to_json()["stability"]
    assert data is not None
    return {k: v for k, v in data.items() if k != "seconds"}


def test_check_reads_a_real_optimizer_and_changes_nothing():
    model = mlp()
    x = torch.randn(8, WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(2):  # some state: exp_avg, step counts
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    # a warm-up schedule: the current lr is a fraction of the lr training will climb to
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    scheduler_before = copy.deepcopy(scheduler.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters()]
    x_before = x.clone()
    rng_before = torch.get_rng_state()

    report = check(model, x, optimizer=optimizer)

    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    assert [torch.equal(g, p.grad) for g, p in zip(grads_before, model.parameters())] == [True] * len(grads_before)
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    for key, state in optimizer_before["state"].items():
        assert all(torch.equal(v, after["state"][key][name]) for name, v in state.items())
    assert scheduler.state_dict() == scheduler_before
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng_before)
    spec = report.to_json()["stability"]["optimizer"]
    assert spec["kind"] == "adam"
    assert spec["lr"] == pytest.approx(0.02)  # the schedule's base lr, not the warm-up's 0.002


def test_an_optimizer_of_another_model_is_a_usage_error():
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="other parameters"):
        check(model, torch.randn(8, WIDTH), optimizer=other)
    with pytest.raises(ValueError, match="optimizer name"):
        check(model, torch.randn(8, WIDTH), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr=0.5)
    with pytest.raises(ValueError, match="optimizer"):
        check(model, torch.randn(8, WIDTH), optimizer="adamm", lr=0.1)


def test_name_object_config_and_cli_give_the_same_stability(tmp_path):
    x = torch.randn(8, WIDTH)
    by_name = check(mlp(), x, optimizer="sgd", lr=0.05, momentum=0.9)
    model = mlp()
    by_object = check(model, x, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert stability_numbers(by_name)["optimizer"]["lr"] == 0.05
    measured = {k: v for k, v in stability_numbers(by_name).items() if k != "optimizer"}
    assert measured == {k: v for k, v in stability_numbers(by_object).items() if k != "optimizer"}

    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    file_model, file_args, file_kwargs, _, _ = load_file(str(path), Config())
    by_name = check(file_model, (file_args, file_kwargs), optimizer="sgd", lr=0.05, momentum=0.9)
    (tmp_path / "pyproject.toml").write_text('[tool.healthcheck]\noptimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\n')
    from_config = check_file(str(path))
    assert stability_numbers(from_config) == stability_numbers(by_name)

    (tmp_path / "pyproject.toml").unlink()
    code, out, err = run(str(path), "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--format", "json",
                         "--fail-on", "never")
    assert code == 0, err
    from_cli = {k: v for k, v in json.loads(out)["stability"].items() if k != "seconds"}
    assert from_cli == stability_numbers(by_name)

    # a per-model table sets it for the files it matches; flags win over the file
    (tmp_path / "pyproject.toml").write_text('[tool.healthcheck]\noptimizer = "adam"\nlr = 1e-3\n'
                                             '[tool.healthcheck.models."net.py"]\noptimizer = "sgd"\nlr = 0.05\n'
                                             'momentum = 0.9\n')
    assert stability_numbers(check_file(str(path))) == stability_numbers(by_name)
    assert check_file(str(path), lr=0.01).to_json()["stability"]["optimizer"]["lr"] == 0.01


@pytest.mark.parametrize("flags, needle", [
    (("--lr", "fast"), "--lr"),
    (("--lr", "-0.1"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--lr", "0"), "--lr"),
    (("--momentum", "1.5"), "--momentum"),
    (("--momentum", "x"), "--momentum"),
    (("--optimizer", "adamm", "--lr", "0.1"), "adam"),  # did you mean
    (("--optimizer", ""), "--optimizer"),
    (("--optimizer", "adam"), "needs a learning rate"),  # found in the model's child: still one line
    (("--lr", "0.1", "--no-probes"), "--no-probes"),
])
def test_bad_optimizer_flags_are_one_line_and_exit_2(tmp_path, flags, needle):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    assert_usage_error(*run(str(path), *flags), needle)


def test_help_documents_the_optimizer_flags():
    code, out, _ = run("check", "--help")
    assert code == 0
    for flag in ("--optimizer", "--lr", "--momentum"):
        assert flag in out
    help_text = " ".join(out.split())
    assert all(name in help_text for name in OPTIMIZER_NAMES)


@pytest.mark.parametrize("body, key", [
    ('lr = "fast"', "lr"),
    ("lr = -1", "lr"),
    ("lr = true", "lr"),
    ('optimizer = "adamm"', "optimizer"),
    ("optimizer = 3", "optimizer"),
    ("momentum = 1", "momentum"),
    ('[tool.healthcheck.models."*.py"]\nlr = "x"', "lr"),
])
def test_bad_optimizer_config_names_file_and_key(tmp_path, body, key):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    (tmp_path / "pyproject.toml").write_text("[tool.healthcheck]\n" + body + "\n")
    assert_usage_error(*run(str(path), "--no-probes"), "pyproject.toml", key)


def test_without_an_optimizer_every_format_says_once_that_stability_was_not_assessed():
    report = check(mlp(), torch.randn(8, WIDTH))
    assert report.stability is not None
    for fmt in ("text", "markdown", "json"):
        text = render(report, fmt)
        assert text.count(NOT_ASSESSED) == 1, (fmt, text)
    given = check(mlp(), torch.randn(8, WIDTH), optimizer="sgd", lr=0.05)
    for fmt in ("text", "markdown", "json"):
        assert NOT_ASSESSED not in render(given, fmt), fmt
    structure_only = check(mlp(), torch.randn(8, WIDTH), probes=False)
    assert structure_only.stability is None and structure_only.to_json()["stability"] is None


def test_reports_with_stability_fit_the_schema_and_old_baselines_still_load(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(healthcheck.__file__).parent / "report" / "report.schema.json").read_text())
    data = json.loads(render(check(mlp(), torch.randn(8, WIDTH), optimizer="adam", lr=1e-3), "json"))
    assert data["schema"] == "healthcheck/1" and data["stability"]["optimizer"]["kind"] == "adam"
    jsonschema.validate(data, schema)
    old = {k: v for k, v in data.items() if k != "stability"}  # written before the stability section existed
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(old))
    report = check(mlp(), torch.randn(8, WIDTH), baseline=path)
    assert report.stability is not None


# -- the training callbacks hand their optimizer to the check -----------------------------------------------

def test_lightning_callback_checks_with_the_trainers_optimizer(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from healthcheck.plugins.lightning import HealthCallback

    class Regressor(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.example_input_array = torch.randn(8, WIDTH)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.07, momentum=0.5)

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, WIDTH, generator=generator),
                                          torch.randint(0, 4, (32,), generator=generator))
    callback = HealthCallback(every=100)
    trainer = lightning.Trainer(max_steps=2, logger=False, callbacks=[callback], accelerator="cpu", devices=1,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 2
    spec = callback.report.to_json()["stability"]["optimizer"]
    assert (spec["kind"], spec["lr"], spec["momentum"]) == ("sgd", 0.07, 0.5)


def test_hf_callback_checks_with_the_trainers_optimizer_at_its_peak_lr(tmp_path):
    transformers = pytest.importorskip("transformers")
    from healthcheck.plugins.huggingface import HealthCallback

    class TokenDataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=5,
        adam_beta1=0.8, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    callback = HealthCallback(every=100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        trainer.train()
    assert trainer.state.global_step == 2
    spec = callback.report.to_json()["stability"]["optimizer"]
    # the Trainer's AdamW, at the lr its warm-up climbs to (at train begin the scheduler has set it to 0)
    assert spec["kind"] == "adamw" and spec["lr"] == pytest.approx(3e-3)
    assert spec["betas"][0] == pytest.approx(0.8)


def test_training_callbacks_core_picks_the_optimizer_that_trains_the_model():
    """A framework's list of optimizers (a GAN's): the one that trains the checked model is read; one
    the checks cannot use is a warning, and the rest of the check still runs."""
    from healthcheck.callbacks import TrainingHealth

    model, other = mlp(), mlp()
    optimizers = [torch.optim.Adam(other.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.03)]
    health = TrainingHealth()
    report = health.check_model(model, torch.randn(8, WIDTH), optimizer=optimizers)
    assert report.to_json()["stability"]["optimizer"]["kind"] == "sgd"
    with pytest.warns(HealthWarning, match="not assessed: optimizer: the Adam was built on other parameters"):
        report = health.check_model(model, torch.randn(8, WIDTH), optimizer=optimizers[0])
    assert report is not None and report.stability.optimizer is None


def test_hf_arguments_give_the_optimizer_before_the_trainer_builds_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    from healthcheck.plugins.huggingface import optimizer_from_args

    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, adam_beta1=0.85,
                                          weight_decay=0.1, use_cpu=True, report_to=[])
    spec = optimizer_from_args(args)
    assert (spec.kind, spec.lr, spec.betas[0], spec.weight_decay) == ("adamw", 2e-4, 0.85, 0.1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim="adafactor", use_cpu=True, report_to=[])
    assert optimizer_from_args(args) is None  # an update it cannot describe: not assessed, not guessed
