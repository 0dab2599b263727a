"""Hugging Face `Trainer` callback: check the model when training begins, then monitor it.

    from healthcheck.plugins.huggingface import HealthCallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[HealthCallback(fail_on="error")])
    trainer.train()

On train begin the model is checked on its device with `example_input` (default: the first
`per_device_train_batch_size` examples of the training set, collated by the trainer's own data
collator, labels dropped); the report goes to the trainer's TensorBoard writer (`init/*` tags), its
findings are warned, and with `fail_on` a finding at that severity or worse raises `HealthError`
before the first step. The check reads the Trainer's optimizer (or, before it is built, `args.optim`
and `args.learning_rate`) for its stability checks, at the lr its warm-up climbs to; it never steps
it. During training a `HealthMonitor` samples every `every` optimizer steps and logs `health/*` at
the trainer's global step through the same writer (with `report_to` including "tensorboard"), or
through `writer=` when given.

The Trainer clips gradients (`max_grad_norm`) before its optimizer-step callbacks run, so gradient
norms, SNR and update ratios are those of the clipped gradients, the ones the optimizer uses; the
Trainer's own `grad_norm` log is the norm before clipping. Needs transformers: `pip install
transformers accelerate` (or `pip install 'healthcheck[huggingface]'`).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from healthcheck.callbacks import HealthView, TrainingHealth
from healthcheck.config import Config

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:
    raise ImportError("healthcheck.plugins.huggingface needs transformers: pip install transformers accelerate "
                      "(or pip install 'healthcheck[huggingface]')") from exc

#: batch keys that are targets, not forward inputs, when `args.label_names` does not say
LABEL_KEYS = ("labels", "label", "label_ids", "start_positions", "end_positions")


def example_batch(dataloader: Any, size: int, label_names: list[str] | None = None) -> dict[str, Any] | None:
    """The first `size` training examples collated as the trainer would, without iterating the
    dataloader (which would draw from the sampler's random generator); labels removed. None for
    datasets without indexing (iterable datasets)."""
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    if dataset is None or collate is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        count = min(size, len(dataset))
        batch = collate([dataset[i] for i in range(count)])
    except Exception:  # noqa: BLE001 - a dataset or collator we cannot drive: the check asks for example_input
        return None
    if not isinstance(batch, Mapping):
        return None
    labels = set(label_names or LABEL_KEYS)
    return {k: v for k, v in batch.items() if k not in labels}


def optimizer_from_args(args: Any) -> Any:
    """An OptimizerSpec from `TrainingArguments` (`optim`, `learning_rate`, Adam's betas, weight decay) for
    the optimizers whose update it names plainly (AdamW and SGD variants); None for the others."""
    from healthcheck.probes.stability import OptimizerSpec

    name = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "")))
    kind = "adamw" if "adamw" in name else "sgd" if name == "sgd" else None
    if kind is None or not getattr(args, "learning_rate", 0):
        return None
    return OptimizerSpec(kind=kind, lr=float(args.learning_rate), weight_decay=float(args.weight_decay),
                         betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=float(args.adam_epsilon))


class HealthCallback(TrainerCallback, HealthView):
    """Check the model on train begin, then monitor it (see the module docs).

    Args:
        example_input: the model's input for the check: a dict of keyword inputs, a tensor or a
            tuple (default: the first batch of the training set).
        check: run the check before training.
        fail_on: "error", "warning" or "info": raise `HealthError` on train begin when the check has
            a finding at or above it; None (default) only warns.
        every: monitor every N optimizer steps (the first one is sampled).
        writer: a SummaryWriter to log to (default: the trainer's TensorBoard writer).
        config: thresholds and select/ignore (default: `[tool.healthcheck]` of the current directory
            for the check, the monitor's defaults for monitoring).
        **monitor_options: passed to `HealthMonitor` (include, exclude, detail, on_finding, …).
    """

    def __init__(self, example_input: Any = None, *, check: bool = True, fail_on: str | None = None,
                 every: int = 100, writer: Any = None, config: Config | None = None,
                 **monitor_options: Any) -> None:
        self.example_input = example_input
        self.writer = writer
        self.health = TrainingHealth(check=check, fail_on=fail_on, every=every, config=config,
                                     monitor_options=monitor_options)
        self._own_writer: Any = None
        self._loss_hook: Any = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    # -- the trainer's TensorBoard writer ------------------------------------------------------------
    def _sibling_callbacks(self) -> list[Any]:
        """The other callbacks of the trainer that calls us: the Trainer passes callbacks no reference
        to itself or its handler, so the handler is found in the calling frames."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                owner = frame.f_locals.get("self")
                if isinstance(owner, CallbackHandler) and any(cb is self for cb in owner.callbacks):
                    return list(owner.callbacks)
                frame = frame.f_back
        finally:
            del frame
        return []

    def _writer(self, args: Any, state: Any) -> Any:
        if not state.is_world_process_zero:
            return None
        if self.writer is not None:
            return self.writer
        for callback in self._sibling_callbacks():
            if getattr(callback, "tb_writer", None) is not None:
                return callback.tb_writer
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        if "tensorboard" not in report_to and "all" not in report_to:
            return None
        with warnings.catch_warnings():  # torch.utils.tensorboard's imports warn about torch.jit
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
        log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "healthcheck")
        self._own_writer = SummaryWriter(log_dir=log_dir)
        return self._own_writer

    # -- the loss of each step, from the model's output (the Trainer passes callbacks no loss) ------
    def _capture_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().mean()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1

    # -- TrainerCallback events ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("HealthCallback needs the trainer to pass its model")
        self._detach()  # a run that ended in an exception left its hooks (the Trainer has no teardown event)
        writer = self._writer(args, state)
        example = self.example_input
        if example is None and self.health.check and train_dataloader is not None:
            example = example_batch(train_dataloader, args.per_device_train_batch_size, args.label_names)
        # the Trainer builds its optimizer (and scheduler) before train begin; from its arguments otherwise
        optimizer = kwargs.get("optimizer") or optimizer_from_args(args)
        try:
            self.health.check_model(model, example, writer=writer, main_process=state.is_world_process_zero,
                                    optimizer=optimizer)
        except BaseException:
            self._detach()
            raise
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)  # fp16: accelerate's GradScaler
        self.health.start(model, writer=writer, step=state.global_step, scaler=scaler)
        self._loss_hook = model.register_forward_hook(self._capture_loss)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = None
        if self._loss_sum is not None:
            loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        self.health.step(loss)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.health.after_optimizer_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        """Remove every hook from the model and close the writer this callback opened (not the Trainer's)."""
        self.health.close()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None
        self._loss_sum, self._loss_count = None, 0
