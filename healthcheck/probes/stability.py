"""Stability under the optimizer (science.md, "Stability under the optimizer"): what the init-time
profile cannot see.

Three measurements on the example batch, all on a copy of the model (`copy.deepcopy`; the user's
parameters, buffers and inputs are never touched, the global RNG is forked):

1. **Output scale at init** (always): for a class output (logits), the expected cross-entropy under
   uniform random labels, E_y[logsumexp(z) − z_y] = logsumexp(z) − mean_c(z_c), against ln C, the
   loss of a uniform guess; the logit standard deviation; for any other output its RMS.
2. **Sharpness** (with an optimizer): the top eigenvalue λ_max of the Hessian of the training loss
   by the Lanczos method on Hessian-vector products (double backward through one recorded graph,
   at most `SHARPNESS_PRODUCTS` products; scaled-dot-product attention on its math kernel, which has
   a double backward), against the optimizer's stability limit
   (`OptimizerSpec.stability_limit`). For Adam/AdamW/NAdam/RMSprop the *preconditioned* sharpness
   λ_max(P⁻¹H) at the initial weights, P = diag(√v̂ + ε) with v̂ the optimizer's bias-corrected second
   moment after the trial steps (below; g², the first step's, when they did not finish) (Cohen et al.
   2022, "Adaptive gradient methods at the edge of stability"). The top Ritz value is a Rayleigh
   quotient, which never exceeds λ_max: the estimate is a *lower bound* whatever its convergence, so
   a verdict "sharpness above the limit" is never an artefact of too few iterations. (A custom
   autograd Function marked `once_differentiable` contributes no second-order term: torch cuts that
   graph silently, so the curvature through it is missing, and the estimate is lower still.)
3. **Trial steps** (with an optimizer): `TRIAL_STEPS` real steps of a fresh optimizer of the user's
   class and hyper-parameters on the copy, on the fixed example batch and the training loss below:
   the loss at every step, non-finite values, the relative update ‖Δw‖/‖w‖ of every parameter
   tensor after the first step and after all of them, and the ReLU/GELU units that are dead (never
   active on the batch) before and after the steps.

The training loss: `loss_fn(output)` when given; else the output's own `.loss` (a Hugging Face
model given `labels=`); else a surrogate. For a class output (a floating tensor of 2 or 3 dims whose
last dim ≥ 2: (batch, classes) or (batch, positions, classes); an HF output's `.logits`), the
cross-entropy against labels drawn uniformly from a seeded generator, masked and pad positions left
out (`measure.position_weights`); for any other output, the MSE against seeded random targets of
unit variance. Limits of the surrogate: random labels have no structure to learn, so the trial's
loss falls only by memorising the batch, and the Hessian at init is that of the real loss only in
its Gauss-Newton part when the real labels are not yet predicted (true at init for classification);
a regression model whose targets are not of unit scale, or a class output that is really a regression
of several values, gets a curvature of the wrong scale — pass `loss_fn` for those.

Decision (for the wiring, A2): when no optimizer is given this is a *report note*, not a finding:
`Stability.note` holds one sentence ("stability under the optimizer was not assessed: …") and
`to_json()["note"]` carries it; renderers print it once. A finding would fail `--fail-on info`
gates and enter baselines for something that is not a claim about the model.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from healthcheck.errors import UsageError, describe
from healthcheck.guard import copy_inputs, preserved
from healthcheck.probes.measure import position_weights
from healthcheck.tensors import first_float, forward_kwargs, tensors_of

#: Hessian-vector products the Lanczos iteration may use (each one double backward)
SHARPNESS_PRODUCTS = 20
#: relative change of the top Ritz value between iterations under which it has converged
SHARPNESS_TOLERANCE = 1e-2
#: optimizer steps of the trial on the copy
TRIAL_STEPS = 12

#: families whose stability limit science.md gives: plain/heavy-ball SGD, Adam-like (β₁ momentum on a
#: diagonal preconditioner), RMSprop (heavy ball on a diagonal preconditioner)
_ADAM_LIKE = ("adam", "adamw", "nadam")
_PRECONDITIONED = (*_ADAM_LIKE, "rmsprop")
#: names accepted from the CLI and config: the usual ones first, then the other torch.optim classes that
#: take (params, lr) and need no closure
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "nadam", "radam", "adamax", "adagrad")


def _torch_class(kind: str) -> type | None:
    return next((cls for name, cls in vars(torch.optim).items()
                 if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and name.lower() == kind), None)


def _number(value: Any, default: float = 0.0) -> float:
    """A hyper-parameter as a float; `default` for one that is not a number (None, or a tuple such as
    Adafactor's eps=(None, 1e-3)): the spec keeps what stability depends on, `defaults` the rest."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else default


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer the model will train with, as far as stability depends on it."""

    kind: str  # "sgd" | "adam" | "adamw" | "rmsprop" | other (lower-cased class name)
    lr: float
    momentum: float = 0.0  # SGD/RMSprop momentum (heavy ball); 0 for Adam (its β₁ is betas[0])
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    nesterov: bool = False
    optimizer_class: type | None = None  # the user's torch.optim class when built from an Optimizer
    defaults: dict | None = None  # that optimizer's param_groups[0] hyper-parameters (to rebuild it)
    dampening: float = 0.0  # SGD's: the momentum buffer adds (1 − dampening)·g

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """Read the first parameter group of a built optimizer (never stepped, never changed)."""
        group = optimizer.param_groups[0]
        kind = type(optimizer).__name__.lower()
        betas = group.get("betas", (0.9, 0.999))
        if not isinstance(betas, (tuple, list)) or len(betas) < 2:
            betas = (0.9, 0.999)
        momentum = group.get("momentum", 0.0) if kind not in _ADAM_LIKE else 0.0
        defaults = {k: v for k, v in group.items() if k != "params"}
        return cls(kind=kind, lr=_number(group["lr"], math.nan), momentum=_number(momentum),
                   betas=(_number(betas[0], 0.9), _number(betas[1], 0.999)),
                   weight_decay=_number(group.get("weight_decay", 0.0)),
                   eps=_number(group.get("eps", 1e-8), 1e-8), nesterov=bool(group.get("nesterov", False)),
                   optimizer_class=type(optimizer), defaults=defaults,
                   dampening=_number(group.get("dampening", 0.0)))

    @classmethod
    def parse(cls, optimizer: str | None, lr: float | None, momentum: float | None = None) -> OptimizerSpec | None:
        """The CLI/config form. None when neither a name nor lr is given. A name needs `lr` (there is
        no learning rate that suits every model; stability is decided by it). `lr` alone means SGD.
        `momentum` follows torch's defaults: 0 for SGD and RMSprop unless given (`optimizer="sgd",
        lr=0.1` is `torch.optim.SGD(params, lr=0.1)`); for the Adam family it sets β₁ (default 0.9).
        A bad name or value is a UsageError (one line)."""
        if optimizer is None and lr is None:
            if momentum is not None:
                raise UsageError("momentum needs a learning rate: give lr (and optimizer) too")
            return None
        from healthcheck.config import learning_rate, momentum_value, optimizer_name  # the one set of checks

        kind = optimizer_name("sgd" if optimizer is None else optimizer, "optimizer")
        if lr is None:
            raise UsageError(f"optimizer {kind!r} needs a learning rate: give lr (the peak lr, after warm-up)")
        lr = learning_rate(lr, "lr")
        momentum = None if momentum is None else momentum_value(momentum, "momentum")
        if kind in _ADAM_LIKE:
            beta1 = 0.9 if momentum is None else float(momentum)
            return cls(kind=kind, lr=float(lr), betas=(beta1, 0.999), optimizer_class=_torch_class(kind),
                       weight_decay=0.01 if kind == "adamw" else 0.0)
        return cls(kind=kind, lr=float(lr), momentum=float(momentum or 0.0), optimizer_class=_torch_class(kind))

    def build(self, params: Any) -> torch.optim.Optimizer:
        """A fresh optimizer of the same class and hyper-parameters (at `self.lr`) on `params`."""
        cls = self.optimizer_class or _torch_class(self.kind)
        if cls is None:
            raise ValueError(f"no torch.optim class for optimizer {self.kind!r}")
        if self.defaults is not None:
            accepted = inspect.signature(cls.__init__).parameters
            keyword = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
            options = {k: v for k, v in self.defaults.items()
                       if (k in accepted or keyword) and k not in ("params", "initial_lr")}
            options["lr"] = self.lr
            return cls(params, **options)
        options: dict[str, Any] = {"lr": self.lr}
        if self.kind in _ADAM_LIKE:
            options.update(betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        elif self.kind in ("sgd", "rmsprop"):
            options.update(momentum=self.momentum, weight_decay=self.weight_decay)
            if self.kind == "sgd":
                options.update(nesterov=self.nesterov and self.momentum > 0, dampening=self.dampening)
        return cls(params, **options)

    @property
    def preconditioned(self) -> bool:
        """Whether the limit applies to the preconditioned sharpness λ_max(P⁻¹H) (adaptive methods)."""
        return self.kind in _PRECONDITIONED

    def stability_limit(self) -> float:
        """The largest (preconditioned) sharpness for which the optimizer's steps on a quadratic with
        that curvature do not grow (science.md): 2/lr for gradient descent; 2(1+β)/((1−d)·lr) with
        heavy-ball momentum β and dampening d; 2(1+β)/((1+2β)·lr) with Nesterov momentum;
        (2+2β₁)/((1−β₁)·lr) for Adam-like methods (on λ_max(P⁻¹H)); 2(1+β)/lr for RMSprop. NaN when
        no limit is known for this optimizer."""
        if self.kind == "sgd":
            beta = self.momentum
            if beta > 0 and self.nesterov:
                return 2 * (1 + beta) / ((1 + 2 * beta) * self.lr)
            return 2 * (1 + beta) / (max(1 - self.dampening, 1e-12) * self.lr) if beta > 0 else 2 / self.lr
        if self.kind in _ADAM_LIKE:
            beta1 = self.betas[0]
            return (2 + 2 * beta1) / ((1 - beta1) * self.lr)
        if self.kind == "rmsprop":
            return 2 * (1 + self.momentum) / self.lr
        return float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum, "betas": list(self.betas),
                "weight_decay": self.weight_decay, "eps": self.eps, "nesterov": self.nesterov,
                "class": None if self.optimizer_class is None else
                f"{self.optimizer_class.__module__}.{self.optimizer_class.__qualname__}",
                "stability_limit": _finite_or_none(self.stability_limit()),
                "preconditioned": self.preconditioned}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class OutputScale:
    """How large the output is at init (science.md: a huge output makes the first steps large)."""

    kind: str  # "classes" (logits: cross-entropy) | "values" (anything else: MSE)
    classes: int | None  # C, for logits
    expected_loss: float | None  # E over uniform labels of the cross-entropy: logsumexp(z) − mean(z)
    uniform_loss: float | None  # ln C: the loss of a uniform guess
    logit_std: float | None  # standard deviation of the logits over classes, averaged over rows
    output_rms: float  # √E[y²] of the output
    head: str | None = None  # the last module with parameters that ran: where the output's scale is set

    @property
    def excess(self) -> float | None:
        """expected_loss / ln C: 1 for a uniform guess at init, ≫ 1 for a confident, random output."""
        if self.expected_loss is None or not self.uniform_loss:
            return None
        return self.expected_loss / self.uniform_loss

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "expected_loss": self.expected_loss,
                "uniform_loss": self.uniform_loss, "excess": self.excess, "logit_std": self.logit_std,
                "output_rms": self.output_rms, "head": self.head}


@dataclass(frozen=True)
class Sharpness:
    """λ_max of the loss Hessian (or of P⁻¹H for adaptive methods) against the optimizer's limit."""

    value: float  # the top Ritz value (a Rayleigh quotient): a lower bound on λ_max
    residual: float  # β_k·|y_k|: an eigenvalue of the operator lies within this of `value`
    products: int  # Hessian-vector products used
    converged: bool  # relative change of the last iteration below SHARPNESS_TOLERANCE
    preconditioned: bool
    limit: float  # the optimizer's stability limit (OptimizerSpec.stability_limit)
    lr: float
    loss: str  # which loss: "loss_fn" | "output.loss" | "cross_entropy" | "mse"
    preconditioner: str | None = None  # v̂ from: "trial" (after its steps) | "first step" (g²) | None (SGD)

    @property
    def ratio(self) -> float:
        """sharpness / limit: at 1 the step size is at the edge of stability; the lower bound's ratio."""
        return self.value / self.limit if self.limit > 0 and math.isfinite(self.limit) else float("nan")

    @property
    def stable_lr(self) -> float:
        """The lr at which this sharpness sits at the limit (the limit is ∝ 1/lr)."""
        return self.lr / self.ratio if self.ratio > 0 else float("inf")

    @property
    def upper(self) -> float:
        """value + residual: the top of the Ritz interval. Some eigenvalue lies in [value − residual,
        value + residual] (Kaniel-Paige); when the Ritz value has found the top of the spectrum (the usual
        case from a random start: measured on the trainability study, 5-10 products agree with an exhaustive
        Lanczos to within this residual), λ_max ∈ [value, upper]. The residual is the uncertainty of the
        estimate; no verdict uses the upper end (the lower bound alone never overstates the curvature)."""
        return self.value + self.residual

    @property
    def upper_ratio(self) -> float:
        """upper / limit: the ratio at the top of the Ritz interval."""
        return self.upper / self.limit if self.limit > 0 and math.isfinite(self.limit) else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "residual": self.residual, "products": self.products,
                "converged": self.converged, "preconditioned": self.preconditioned,
                "limit": _finite_or_none(self.limit), "ratio": _finite_or_none(self.ratio), "lr": self.lr,
                "stable_lr": _finite_or_none(self.stable_lr), "loss": self.loss,
                "upper": _finite_or_none(self.upper), "upper_ratio": _finite_or_none(self.upper_ratio),
                "preconditioner": self.preconditioner}


@dataclass(frozen=True)
class DeadUnits:
    """Units of one activation call (in call order) that are never active on the batch."""

    site: str  # "relu#3": the function and its call index in the forward
    units: int
    dead_before: int
    dead_after: int
    # the call's result is the model's output (a final ReLU of a non-negative regression): under the
    # surrogate loss its units are fitted to random targets, half of them negative, not to data
    at_output: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "units": self.units, "dead_before": self.dead_before, "dead_after": self.dead_after,
                "at_output": self.at_output}


@dataclass(frozen=True)
class Trial:
    """A few real optimizer steps on a copy of the model, on the fixed example batch."""

    steps: int  # steps taken (fewer when the loss became non-finite)
    losses: tuple[float, ...]  # the loss before each step, then after the last
    non_finite_at: int | None  # first step whose loss or parameters were NaN/Inf
    update_ratios: dict[str, float]  # weight (2+ dims) -> ‖Δw‖/‖w‖ after the first step
    total_update_ratios: dict[str, float]  # weight (2+ dims) -> ‖w_k − w_0‖/‖w_0‖ after all steps
    dead: tuple[DeadUnits, ...]
    loss: str

    @property
    def loss_start(self) -> float:
        return self.losses[0]

    @property
    def loss_end(self) -> float:
        return self.losses[-1]

    @property
    def loss_max(self) -> float:
        finite = [v for v in self.losses if math.isfinite(v)]
        return max(finite) if len(finite) == len(self.losses) else float("inf")

    def _relative(self, value: float) -> float:
        """`value` on the scale of the start, 1 + (value − start)/|start|: value/start for a positive
        start, and the same reading for a loss that starts below zero (a Gaussian NLL, a negative
        log-likelihood of continuous data), where a plain ratio would flip its sign; NaN at start 0."""
        start = self.loss_start
        if not math.isfinite(value):
            return float("inf")
        return 1 + (value - start) / abs(start) if start != 0 and math.isfinite(start) else float("nan")

    @property
    def growth(self) -> float:
        """loss_max / loss_start: how far the loss rose above where it started (≥ 1)."""
        return self._relative(self.loss_max)

    @property
    def end_ratio(self) -> float:
        """loss_end / loss_start (see `_relative` for a start below zero); inf when the loss became NaN/Inf."""
        return self._relative(self.loss_end)

    def dead_counts(self) -> tuple[int, int, int]:
        """(units, dead before, dead after) summed over the activation calls."""
        return (sum(d.units for d in self.dead), sum(d.dead_before for d in self.dead),
                sum(d.dead_after for d in self.dead))

    def to_json(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return v if math.isfinite(v) else None
        worst = max(self.update_ratios.items(), key=lambda kv: kv[1], default=(None, None))
        return {"steps": self.steps, "losses": [clean(v) for v in self.losses], "non_finite_at": self.non_finite_at,
                "loss_start": clean(self.loss_start), "loss_end": clean(self.loss_end),
                "growth": clean(self.growth), "end_ratio": clean(self.end_ratio),
                "max_update_ratio": worst[1], "max_update_parameter": worst[0],
                "update_ratios": self.update_ratios, "total_update_ratios": self.total_update_ratios,
                "dead": [d.to_json() for d in self.dead], "loss": self.loss}


NOT_ASSESSED = ("stability under the optimizer was not assessed: no optimizer given (pass optimizer= or lr= to "
                "check(), --optimizer/--lr on the command line, or optimizer/lr in [tool.healthcheck])")


@dataclass
class Stability:
    """What `assess_stability` measured; read by the HC5xx rules through RuleContext.stability."""

    output: OutputScale | None
    optimizer: OptimizerSpec | None
    sharpness: Sharpness | None = None
    trial: Trial | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # measurement -> why it could not run
    seconds: float = 0.0

    @property
    def note(self) -> str | None:
        """One sentence for the report when stability under the optimizer was not assessed (no optimizer)."""
        return NOT_ASSESSED if self.optimizer is None else None

    def to_json(self) -> dict[str, Any]:
        return {"output": None if self.output is None else self.output.to_json(),
                "optimizer": None if self.optimizer is None else self.optimizer.to_json(),
                "sharpness": None if self.sharpness is None else self.sharpness.to_json(),
                "trial": None if self.trial is None else self.trial.to_json(),
                "skipped": dict(self.skipped), "note": self.note, "seconds": self.seconds}


# --- the training loss ---------------------------------------------------------------------------------

def _logits(output: Any) -> torch.Tensor | None:
    """The output's logits: an HF output's `.logits`, else its first floating tensor, when that has 2
    or 3 dims and a last dim of at least 2 ((batch, classes) or (batch, positions, classes))."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        logits = first_float(tensors_of(output))
    if logits is None or not logits.is_floating_point() or logits.dim() not in (2, 3) or logits.shape[-1] < 2:
        return None
    return logits


def _main_output(output: Any) -> torch.Tensor:
    out = _logits(output)
    if out is None:
        out = first_float(tensors_of(output))
    if out is None:
        raise ValueError("the model returned no floating-point tensor to train on")
    return out


def _row_weights(logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
    """Position weights (batch × positions) that match a 3-dim logits tensor's rows, flattened."""
    if weights is None or logits.dim() != 3 or tuple(weights.shape) != tuple(logits.shape[:2]):
        return None
    return weights.reshape(-1).to(device=logits.device, dtype=torch.float32)


class _TrainingLoss:
    """The loss the measurements train on: the user's, the output's `.loss`, or the surrogate (module
    docstring), with its random labels/targets drawn once from `seed` so that every pass sees the same."""

    def __init__(self, loss_fn: Callable[[Any], torch.Tensor] | None, weights: torch.Tensor | None, seed: int) -> None:
        self.loss_fn = loss_fn
        self.weights = weights
        self.seed = seed
        self.targets: torch.Tensor | None = None
        self.kind = "loss_fn" if loss_fn is not None else "unknown"

    def __call__(self, output: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(output)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            return loss.reshape(())
        own = getattr(output, "loss", None)
        if isinstance(own, torch.Tensor) and own.numel() == 1 and own.is_floating_point():
            self.kind = "output.loss"
            return own.reshape(())
        logits = _logits(output)
        if logits is not None:
            self.kind = "cross_entropy"
            flat = logits.reshape(-1, logits.shape[-1]).float()
            if self.targets is None:
                generator = torch.Generator().manual_seed(self.seed + 7)
                self.targets = torch.randint(0, flat.shape[1], (flat.shape[0],), generator=generator).to(flat.device)
            losses = F.cross_entropy(flat, self.targets, reduction="none")
            rows = _row_weights(logits, self.weights)
            return losses.mean() if rows is None else (losses * rows).sum() / rows.sum()
        out = first_float(tensors_of(output))
        if out is None:
            raise ValueError("the model returned no floating-point tensor to train on")
        self.kind = "mse"
        if self.targets is None:
            generator = torch.Generator().manual_seed(self.seed + 7)
            self.targets = torch.randn(out.shape, generator=generator).to(out.device)
        return F.mse_loss(out.float(), self.targets)


def _output_scale(output: Any, weights: torch.Tensor | None, head: _HeadWatch) -> OutputScale:
    """The output's scale at init. Read as class logits (expected loss against ln C) only when the output
    names them (`.logits`) or is what the last layer with parameters returned: hidden states of a
    backbone (a residual stream after the last block) have no "uniform guess" to compare with."""
    logits = _logits(output)
    if logits is not None and not isinstance(getattr(output, "logits", None), torch.Tensor) and not head.made(logits):
        logits = None
    if logits is None:
        out = _main_output(output).detach().float()
        return OutputScale("values", None, None, None, None, float(out.square().mean().sqrt()), head.name)
    flat = logits.detach().reshape(-1, logits.shape[-1]).float()
    per_row = torch.logsumexp(flat, dim=1) - flat.mean(dim=1)  # E over uniform labels of the cross-entropy
    std = flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros(flat.shape[0], device=flat.device)
    rows = _row_weights(logits, weights)
    if rows is None:
        expected, logit_std = per_row.mean(), std.mean()
    else:
        expected, logit_std = (per_row * rows).sum() / rows.sum(), (std * rows).sum() / rows.sum()
    values = torch.stack([expected, logit_std, flat.square().mean().sqrt()]).tolist()  # one host copy
    classes = flat.shape[1]
    return OutputScale("classes", classes, values[0], math.log(classes), values[1], values[2], head.name)


@dataclass
class _HeadWatch:
    """The last module with parameters of its own whose forward ended (the head that sets the output's
    scale), and the storage of what it returned: an output is class logits only when it is that tensor
    (or a view of it), not a residual stream or pooled features computed after the last layer."""

    name: str | None = None
    storage: int | None = None

    def made(self, output: Any) -> bool:
        return isinstance(output, torch.Tensor) and self.storage is not None and \
            output.untyped_storage().data_ptr() == self.storage


@contextmanager
def _last_module_with_parameters(model: nn.Module) -> Iterator[_HeadWatch]:
    watch = _HeadWatch()

    def ended(name: str, result: Any) -> None:
        watch.name = name
        watch.storage = result.untyped_storage().data_ptr() if isinstance(result, torch.Tensor) else None

    handles = [m.register_forward_hook(lambda _m, _i, result, name=name: ended(name, result))
               for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


# --- sharpness --------------------------------------------------------------------------------------------

def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))


#: Lanczos keeps its basis (full reorthogonalization) while it takes at most this many bytes; beyond, the
#: three-term recurrence alone, whose top Ritz value still converges to λ_max (Paige 1976)
_BASIS_BYTES = 512 * 2**20


def _top_eigenvalue(product: Callable[[list[torch.Tensor]], list[torch.Tensor]], start: list[torch.Tensor],
                    budget: int) -> tuple[float, float, int, bool]:
    """The top algebraic eigenvalue of a symmetric operator by the Lanczos method: (top Ritz value,
    its residual bound, products used, converged). The top Ritz value is the largest Rayleigh quotient
    over the Krylov subspace, so it never exceeds λ_max (a lower bound that tightens every product), and
    some eigenvalue lies within the residual β_k·|y_k| of it. Unlike power iteration it is not misled by
    a negative eigenvalue of larger magnitude (the loss Hessian has them) and it converges in far fewer
    products when the top of the spectrum is crowded."""
    def norm(v: list[torch.Tensor]) -> torch.Tensor:
        return _dot(v, v).sqrt()

    size = sum(x.numel() for x in start)
    keep_basis = size * 4 * budget <= _BASIS_BYTES
    first_norm = norm(start).clamp_min(1e-30)
    q = [x / first_norm for x in start]
    basis: list[list[torch.Tensor]] = [q]
    previous: list[torch.Tensor] | None = None
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    top, residual, previous_top = float("nan"), float("nan"), None
    for used in range(1, budget + 1):
        w = product(q)
        alpha_t = _dot(w, q)
        w = [a - alpha_t * b for a, b in zip(w, q)]
        if previous is not None:
            w = [a - beta * b for a, b in zip(w, previous)]
        if keep_basis:  # full reorthogonalization against the basis so far
            for v in basis:
                overlap = _dot(w, v)
                w = [a - overlap * b for a, b in zip(w, v)]
        alpha, beta_next = (float(t) for t in torch.stack([alpha_t, norm(w)]).tolist())
        if not (math.isfinite(alpha) and math.isfinite(beta_next)):
            return float("nan"), float("nan"), used, False
        alphas.append(alpha)
        k = len(alphas)
        tridiagonal = torch.zeros(k, k, dtype=torch.float64)
        tridiagonal[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
        if k > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal[range(1, k), range(k - 1)] = off
            tridiagonal[range(k - 1), range(1, k)] = off
        values, vectors = torch.linalg.eigh(tridiagonal)
        top = float(values[-1])
        residual = beta_next * abs(float(vectors[-1, -1]))
        scale = max(abs(top), 1e-30)
        if beta_next <= 1e-7 * scale:  # an invariant subspace: the Ritz value is an eigenvalue
            return top, residual, used, True
        if previous_top is not None and (abs(top - previous_top) <= SHARPNESS_TOLERANCE * scale
                                         and residual <= math.sqrt(SHARPNESS_TOLERANCE) * scale):
            return top, residual, used, True
        previous_top = top
        previous, q = q, [a / beta_next for a in w]
        beta = beta_next
        betas.append(beta_next)
        if keep_basis:
            basis.append(q)
    return top, residual, budget, False


def _sharpness(model: nn.Module, args: tuple, kwargs: dict[str, Any], spec: OptimizerSpec, loss: _TrainingLoss,
               seed: int, moments: dict[int, torch.Tensor] | None = None) -> Sharpness:
    """λ_max of H (or of P⁻¹H) at the model's current weights. `moments`: id(parameter) -> the
    optimizer's bias-corrected second moment v̂ (from the trial steps) for the preconditioner; without
    them (or for a parameter it lacks), v̂ = g², Adam's after its first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    _seed(model, seed)  # the same dropout masks as the trial's first step
    # the fused attention kernels (flash, memory-efficient) have no double backward; the math one has
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        output = model(*copy_inputs(args), **copy_inputs(kwargs))
        value = loss(output)
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not used:
        raise ValueError("the loss does not depend on any trainable parameter")
    params, grads = [p for p, _ in used], [g for _, g in used]
    if not any(g.requires_grad for g in grads):
        raise ValueError("the gradient does not depend on the parameters (a model linear in them has no curvature "
                         "to measure, or double backward is not supported)")
    scale: list[torch.Tensor] | None = None
    preconditioner = None
    if spec.preconditioned:
        # P = √v̂ + ε: the operator P^(-1/2) H P^(-1/2) has the eigenvalues of P⁻¹H and stays symmetric.
        # v̂ after the trial's steps (an average of g² over them, as Adam's is a few steps in) when there is
        # one; else after the first step, v̂ = g², whose tiny entries make P⁻¹ (and the estimate) huge
        eps = spec.eps if spec.eps > 0 else 1e-8
        moments = moments or {}
        roots = [moments[id(p)].float().sqrt() if id(p) in moments else g.detach().abs().float()
                 for p, g in zip(params, grads)]
        scale = [(r + eps).rsqrt() for r in roots]
        preconditioner = "trial" if all(id(p) in moments for p in params) else "first step"

    def product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        w = v if scale is None else [x * s for x, s in zip(v, scale)]
        hv = torch.autograd.grad(grads, params, grad_outputs=[x.to(g.dtype) for x, g in zip(w, grads)],
                                 retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(x) if h is None else h.float() for h, x in zip(hv, w)]
        return hv if scale is None else [h * s for h, s in zip(hv, scale)]

    generator = torch.Generator().manual_seed(seed + 11)
    start = [torch.randn(p.shape, generator=generator).to(device=p.device, dtype=torch.float32) for p in params]
    top, residual, products, converged = _top_eigenvalue(product, start, SHARPNESS_PRODUCTS)
    return Sharpness(top, residual, products, converged, spec.preconditioned, spec.stability_limit(), spec.lr,
                     loss.kind, preconditioner)


# --- trial steps ------------------------------------------------------------------------------------------

#: activations whose units can die, and the input below which a unit counts as off (its gradient ~0)
_DYING = {F.relu: ("relu", 0.0), torch.relu: ("relu", 0.0), torch.relu_: ("relu", 0.0), F.relu_: ("relu", 0.0),
          F.relu6: ("relu6", 0.0), F.gelu: ("gelu", -3.0), F.silu: ("silu", -5.0)}


class _ActivationWatch(TorchFunctionMode):
    """Per call of a ReLU-family function in one forward: which units (channels) are never above the
    threshold on the whole batch. Units: dim 1 of 2-, 4- and 5-dim inputs, the last dim of 3-dim ones
    (transformers' (batch, tokens, features); a Conv1d's channels then count as positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead: list[tuple[str, torch.Tensor]] = []  # (site, bool mask of dead units)
        self._results: list[Any] = []  # weak references to each watched call's result
        self.output_calls: set[int] = set()  # indices of the calls whose result is the model's output

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        entry = _DYING.get(func)
        watched = entry is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2
        if watched:
            x = args[0].detach()
            unit_dim = x.dim() - 1 if x.dim() == 3 else 1
            active = (x > entry[1]).transpose(0, unit_dim).reshape(x.shape[unit_dim], -1).any(dim=1)
            self.dead.append((f"{entry[0]}#{len(self.dead)}", ~active))
        result = func(*args, **kwargs)
        if watched:
            self._results.append(weakref.ref(result) if isinstance(result, torch.Tensor) else lambda: None)
        return result

    def mark_output(self, output: Any) -> None:
        """Note which calls made the model's output (the same tensor, or a view of its storage)."""
        main = first_float(tensors_of(output))
        if main is None:
            return
        try:
            where = main.untyped_storage().data_ptr()
            for index, ref in enumerate(self._results):
                result = ref()
                if result is not None and (result is main or result.untyped_storage().data_ptr() == where):
                    self.output_calls.add(index)
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage (sparse, subclasses)
            pass


def _update_ratios(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """‖w − w₀‖/‖w₀‖ of every weight matrix or kernel (2+ dims; a bias or norm gain starting at 0 or 1
    has no scale of its own to compare with)."""
    ratios = {}
    for name, p in model.named_parameters():
        if name in before and p.dim() >= 2:
            ratios[name] = (p.detach().float() - before[name]).norm() / before[name].norm().clamp_min(1e-12)
    return ratios


def _second_moments(optimizer: torch.optim.Optimizer, spec: OptimizerSpec) -> dict[int, torch.Tensor]:
    """id(parameter) -> the preconditioner's second moment after the steps taken: Adam's bias-corrected
    v̂ = exp_avg_sq/(1 − β₂^t), RMSprop's square_avg; empty for other optimizers or states."""
    moments = {}
    for group in optimizer.param_groups:
        beta2 = group.get("betas", (0.9, 0.999))[1]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = _number(state.get("step", 0))
            if "exp_avg_sq" in state and step > 0:
                moments[id(p)] = state["exp_avg_sq"].detach() / (1 - beta2 ** step)
            elif "square_avg" in state and spec.kind == "rmsprop":
                moments[id(p)] = state["square_avg"].detach()
    return moments


def _trial(model: nn.Module, args: tuple, kwargs: dict[str, Any], spec: OptimizerSpec, loss: _TrainingLoss,
           seed: int, steps: int, moments: dict[int, torch.Tensor] | None = None) -> Trial:
    """`moments`, when given, receives the optimizer's second moments after the steps (if they stayed finite)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = spec.build(trained)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses: list[torch.Tensor] = []
    first_ratios: dict[str, torch.Tensor] = {}
    watch_before = _ActivationWatch()
    taken = steps
    for step in range(steps):
        _seed(model, seed + step)  # dropout masks: seeded, reproducible
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            if step == 0:
                with watch_before:
                    output = model(*copy_inputs(args), **copy_inputs(kwargs))
                watch_before.mark_output(output)
            else:
                output = model(*copy_inputs(args), **copy_inputs(kwargs))
            value = loss(output)
            value.backward()
        losses.append(value.detach().float())
        # one host sync per step: a non-finite loss ends the trial (steps on NaN weights mean nothing)
        if not bool(torch.isfinite(losses[-1])):
            taken = step
            break
        optimizer.step()
        if step == 0:
            first_ratios = _update_ratios(model, start)
    else:
        watch_after = _ActivationWatch()
        _seed(model, seed + steps)
        with torch.no_grad(), watch_after:
            output = model(*copy_inputs(args), **copy_inputs(kwargs))
            losses.append(loss(output).detach().float())
    finished = taken == steps
    if moments is not None and finished and spec.preconditioned:
        found = _second_moments(optimizer, spec)
        if found and bool(torch.stack([torch.isfinite(v).all() for v in found.values()]).all()):
            moments.update(found)
    total_ratios = _update_ratios(model, start)
    names = list(first_ratios)
    host = torch.stack([*losses, *(first_ratios[n] for n in names), *(total_ratios[n] for n in names)]).tolist()
    loss_values = tuple(host[:len(losses)])
    first = dict(zip(names, host[len(losses):len(losses) + len(names)]))
    total = dict(zip(names, host[len(losses) + len(names):]))
    non_finite = next((i for i, v in enumerate(loss_values) if not math.isfinite(v)), None)
    if non_finite is None and finished and not all(math.isfinite(v) for v in total.values()):
        non_finite = steps
    dead: list[DeadUnits] = []
    if finished and len(watch_before.dead) == len(watch_after.dead):
        counts = torch.stack([torch.stack([m.sum(), a.sum()]) for (_, m), (_, a) in
                              zip(watch_before.dead, watch_after.dead)]).tolist() if watch_before.dead else []
        dead = [DeadUnits(site, int(mask.numel()), int(b), int(a), i in watch_before.output_calls)
                for i, ((site, mask), (b, a)) in enumerate(zip(watch_before.dead, counts))]
    return Trial(taken, loss_values, non_finite, first, total, tuple(dead), loss.kind)


# --- the entry point --------------------------------------------------------------------------------------

@contextmanager
def _working_copy(model: nn.Module, skipped: dict[str, str]) -> Iterator[nn.Module]:
    """A deep copy to measure and step on; on an accelerator, or when the model cannot be copied, the
    model itself, its state restored on exit from a host copy (healthcheck.guard.preserved): a second
    copy on the GPU would double the memory training needs (the callbacks run this at train begin)."""
    if any(p.device.type not in ("cpu", "meta") for p in model.parameters()):
        with preserved(model):
            yield model
        return
    try:
        twin = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - some models hold uncopyable handles
        skipped["copy"] = f"the model could not be deep-copied ({describe(exc)}); measured on it, then restored"
        with preserved(model):
            yield model
        return
    yield twin


@contextmanager
def _forward_only(model: nn.Module) -> Iterator[nn.Module]:
    """The model itself for a no-grad forward (no copy: the output scale alone must not double the
    memory of a large model): its buffers (BatchNorm's running statistics) and train/eval modes are put
    back on exit. Python attributes a forward may change are the caller's guard's (guard.preserved)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        for module, training in modes:
            module.training = training


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _seed(model: nn.Module, seed: int) -> None:
    """Seed the generators `assess_stability`'s fork_rng restores (the CPU's, the model's CUDA devices'),
    not torch.manual_seed: that seeds every CUDA device, or queues a lazy seed that a later CUDA
    initialization would apply to the user's generators."""
    torch.default_generator.manual_seed(seed)
    for index in _devices(model):
        torch.cuda.default_generators[index].manual_seed(seed)


def assess_stability(model: nn.Module, args: tuple, kwargs: dict[str, Any], spec: OptimizerSpec | None, *,
                     seed: int = 0, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                     trial_steps: int = TRIAL_STEPS) -> Stability:
    """Measure the output scale at init; with `spec`, also the sharpness against its stability limit and
    `trial_steps` real steps of that optimizer (module docstring). The model's parameters, buffers, `.grad`,
    the caller's inputs and the global RNG are left unchanged (everything runs on a deep copy, under a
    forked RNG). A part that cannot run goes into `skipped` with its reason; the others stand."""
    start_time = time.perf_counter()
    kwargs = forward_kwargs(model, kwargs or {})
    skipped: dict[str, str] = {}
    output_scale = sharpness = trial = None
    working = _working_copy(model, skipped) if spec is not None else _forward_only(model)
    with torch.random.fork_rng(devices=_devices(model)), working as twin:
        twin.train()
        weights = position_weights(twin, args, kwargs)
        loss = _TrainingLoss(loss_fn, weights, seed)
        try:
            _seed(twin, seed)
            with torch.no_grad(), _last_module_with_parameters(twin) as head:
                output = twin(*copy_inputs(args), **copy_inputs(kwargs))
            output_scale = _output_scale(output, weights, head)
        except torch.OutOfMemoryError:
            skipped["output"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 - reported, the rest stands
            skipped["output"] = f"the model could not run forward: {describe(exc)}"
        if spec is not None:
            # the trial first (an adaptive optimizer's preconditioner comes from its steps), then the
            # sharpness at the initial weights, put back
            initial = {k: v.detach().clone() for k, v in twin.state_dict(keep_vars=True).items()
                       if isinstance(v, torch.Tensor)}
            moments: dict[int, torch.Tensor] = {}
            try:
                trial = _trial(twin, args, kwargs, spec, loss, seed, trial_steps, moments)
            except torch.OutOfMemoryError:
                skipped["trial"] = "out of memory"
            except Exception as exc:  # noqa: BLE001
                skipped["trial"] = f"the trial steps could not run: {describe(exc)}"
            with torch.no_grad():
                for key, value in twin.state_dict(keep_vars=True).items():
                    if key in initial:
                        value.copy_(initial[key])
            for p in twin.parameters():
                p.grad = None
            del initial
            if not math.isfinite(spec.stability_limit()):
                skipped["sharpness"] = f"no stability limit is known for {spec.kind}; the trial steps judge it"
            else:
                try:
                    sharpness = _sharpness(twin, args, kwargs, spec, loss, seed, moments)
                except torch.OutOfMemoryError:
                    skipped["sharpness"] = "out of memory (double backward keeps the graph of the gradient)"
                except Exception as exc:  # noqa: BLE001
                    skipped["sharpness"] = f"Hessian-vector products by double backward failed: {describe(exc)}"
    return Stability(output_scale, spec, sharpness, trial, skipped, time.perf_counter() - start_time)
