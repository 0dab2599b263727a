"""Lightning callback: check the model when `fit` starts, then monitor it during training.

    from healthcheck.plugins.lightning import HealthCallback

    trainer = lightning.Trainer(callbacks=[HealthCallback(fail_on="error", every=100)])
    trainer.fit(model)

On fit start the LightningModule is checked on its device with `example_input` (default: its
`example_input_array`); the report goes to the trainer's TensorBoardLogger (`init/*` tags), its
findings are warned, and with `fail_on` a finding at that severity or worse raises `HealthError`
before the first step. The check reads the trainer's optimizer (the first from `configure_optimizers`
that trains the checked module) for its stability checks; it never steps it. During training a `HealthMonitor` samples every `every` optimizer steps and
logs `health/*` through the same logger, at the trainer's global step.

Works with `lightning.pytorch` and with `pytorch_lightning` (needs one: `pip install lightning`).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from healthcheck.callbacks import HealthView, TrainingHealth
from healthcheck.config import Config

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("healthcheck.plugins.lightning needs Lightning: pip install lightning "
                          "(or pip install 'healthcheck[lightning]')") from exc


def _tensorboard_logger_classes() -> tuple[type, ...]:
    """TensorBoardLogger from each Lightning namespace installed (a Trainer of either may run us)."""
    classes = []
    for name in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        classes.append(module.TensorBoardLogger)
    return tuple(classes)


def tensorboard_writer(trainer: Any) -> Any:
    """The SummaryWriter of the trainer's first TensorBoardLogger, on the global-zero process; else None."""
    if not trainer.is_global_zero:
        return None
    classes = _tensorboard_logger_classes()
    for logger in trainer.loggers:
        if isinstance(logger, classes):
            return logger.experiment
    return None


class HealthCallback(pl.Callback, HealthView):
    """Check the LightningModule on fit start, then monitor it (see the module docs).

    Args:
        example_input: the forward's input for the check (default: `pl_module.example_input_array`;
            without either the check is skipped with a warning).
        check: run the check before training.
        fail_on: "error", "warning" or "info": raise `HealthError` on fit start when the check has
            a finding at or above it; None (default) only warns.
        every: monitor every N optimizer steps (the first one is sampled).
        module: the submodule to check and monitor, by attribute path ("model.backbone") or as a
            module, when `training_step` does not call the LightningModule's own forward.
        config: thresholds and select/ignore (default: `[tool.healthcheck]` of the current directory
            for the check, the monitor's defaults for monitoring).
        **monitor_options: passed to `HealthMonitor` (include, exclude, detail, on_finding, …).
    """

    def __init__(self, example_input: Any = None, *, check: bool = True, fail_on: str | None = None,
                 every: int = 100, module: str | nn.Module | None = None, config: Config | None = None,
                 **monitor_options: Any) -> None:
        super().__init__()
        self.example_input = example_input
        self.module = module
        self.health = TrainingHealth(check=check, fail_on=fail_on, every=every, config=config,
                                     monitor_options=monitor_options)
        self._loss: torch.Tensor | None = None
        self._stepped = False

    def _watched(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        if isinstance(self.module, nn.Module):
            return self.module
        return pl_module.get_submodule(self.module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        example = self.example_input
        if example is None and self.module is None:
            example = getattr(pl_module, "example_input_array", None)
        # the optimizers exist by now (configure_optimizers runs in the strategy's setup, before fit start)
        self.health.check_model(self._watched(pl_module), example, writer=tensorboard_writer(trainer),
                                main_process=trainer.is_global_zero, optimizer=list(trainer.optimizers))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # here, not on fit start: a resumed run's global step is restored by now
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)  # "16-mixed": its GradScaler
        self.health.start(self._watched(pl_module), writer=tensorboard_writer(trainer), step=trainer.global_step,
                          scaler=scaler)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss  # micro-batches of one step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        loss, self._loss = self._loss, None
        self.health.step(loss)
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            self.health.after_optimizer_step()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.health.close()
        self._loss, self._stepped = None, False
