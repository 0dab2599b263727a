"""The guarantee against models whose forward changes things: `check`, `fix` and `check_file` leave
the model, its state and the caller's inputs exactly as they were (design.md, Guarantees), also when
the forward fails halfway through. Everything is compared by value and by object."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import healthcheck
from healthcheck.guard import copy_inputs, preserved

# --- a full picture of a model, and an exact comparison -------------------------------------------


@dataclass
class Picture:
    state: dict[str, torch.Tensor]  # state_dict values, copied
    state_ids: dict[str, int]  # state_dict objects (parameters and buffers)
    non_persistent: dict[str, tuple[int, torch.Tensor]]  # buffers left out of state_dict, by object and value
    classes: list[type]  # module classes (a LazyModule turns into its cls_to_become)
    param_classes: list[type]
    attributes: list[dict[str, int]]  # every module's __dict__, by object
    plain_tensors: dict[tuple[int, str], torch.Tensor]  # tensor attributes that are not parameters/buffers
    modes: list[bool]
    requires_grad: list[bool]
    grads: list[tuple[int, torch.Tensor] | None]
    hooks: list[tuple]
    rng: torch.Tensor
    py_rng: Any
    grad_enabled: bool


def picture(model: nn.Module) -> Picture:
    modules = list(model.modules())
    named_buffers = dict(model.named_buffers(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    lazy = nn.parameter.UninitializedTensorMixin
    return Picture(
        state={k: v.detach().clone() for k, v in state.items() if not isinstance(v, lazy)},
        state_ids={k: id(v) for k, v in state.items()},
        non_persistent={k: (id(v), v.detach().clone()) for k, v in named_buffers.items()
                        if k not in state and v is not None and not isinstance(v, lazy)},
        classes=[type(m) for m in modules],
        param_classes=[type(p) for p in model.parameters()],
        attributes=[{k: id(v) for k, v in vars(m).items()} for m in modules],
        plain_tensors={(i, k): v.detach().clone() for i, m in enumerate(modules) for k, v in vars(m).items()
                       if isinstance(v, torch.Tensor)},
        modes=[m.training for m in modules],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[None if p.grad is None else (id(p.grad), p.grad.clone()) for p in model.parameters()],
        hooks=[(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                dict(m._forward_pre_hooks_with_kwargs)) for m in modules],
        rng=torch.get_rng_state().clone(),
        py_rng=random.getstate(),
        grad_enabled=torch.is_grad_enabled(),
    )


def assert_unchanged(before: Picture, after: Picture) -> None:
    assert before.state.keys() == after.state.keys()
    for key, value in before.state.items():
        assert value.dtype == after.state[key].dtype and torch.equal(value, after.state[key]), key
    assert before.state_ids == after.state_ids
    assert before.non_persistent.keys() == after.non_persistent.keys()
    for key, (identity, value) in before.non_persistent.items():
        assert after.non_persistent[key][0] == identity and torch.equal(after.non_persistent[key][1], value), key
    assert before.classes == after.classes
    assert before.param_classes == after.param_classes
    assert before.attributes == after.attributes
    assert before.plain_tensors.keys() == after.plain_tensors.keys()
    for key, value in before.plain_tensors.items():
        assert torch.equal(value, after.plain_tensors[key]), key
    assert before.modes == after.modes
    assert before.requires_grad == after.requires_grad
    for g0, g1 in zip(before.grads, after.grads, strict=True):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert g0[0] == g1[0] and torch.equal(g0[1], g1[1])
    assert before.hooks == after.hooks
    assert torch.equal(before.rng, after.rng)
    assert before.py_rng == after.py_rng
    assert before.grad_enabled == after.grad_enabled


# --- models whose forward changes them ----------------------------------------------------------


class CountingEMA(nn.Module):
    """Reassigns its buffers on every forward: a call counter and an EMA of the input's mean, plus a
    plain (unregistered) tensor attribute and a non-persistent buffer."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(width))
        self.register_buffer("scratch", torch.zeros(width), persistent=False)
        self.last_norm = torch.zeros(())  # a plain attribute, not a buffer
        self.history: list[torch.Tensor] = []  # python containers, changed in place
        self.stats = {"seen": torch.zeros(())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count = self.count + 1
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        self.scratch.add_(1.0)
        self.last_norm = x.detach().norm()
        self.cache = {"h": x.detach()}  # a new python attribute
        self.history.append(x.detach())
        self.stats["seen"].add_(x.shape[0])
        self.stats["last"] = x.detach()
        return x + self.outer(torch.tanh(self.inner(x)))


class InPlaceParams(nn.Module):
    """Parameters changed in place by forward, as real models do under no_grad: embedding rows
    renormalised (max_norm), a clamped weight, a weight rescaled through .data."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, max_norm=1.0)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, width)
        with torch.no_grad():
            self.embed.weight.mul_(3.0)  # rows well above max_norm: the renorm must bite
            self.head.weight.mul_(5.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.head.weight.clamp_(-0.1, 0.1)
        self.block.weight.data.mul_(0.5)
        h = self.embed(ids)
        return self.head(h + self.block(torch.relu(h)))


class LazyResidual(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.LazyLinear(width)
        self.branch = nn.Sequential(nn.LazyBatchNorm1d(), nn.LazyLinear(width), nn.ReLU(), nn.LazyLinear(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return h + self.branch(h)


class InPlaceOnInput(nn.Module):
    def __init__(self, width: int = 8, op: str = "mul_") -> None:
        super().__init__()
        self.op = op
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.op == "mul_":
            x.mul_(2.0)
        elif self.op == "iadd":
            x += 1.0
        else:
            x = F.relu(x, inplace=True)
        if scale is not None:
            scale.add_(1.0)
            x = x * scale
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tied(nn.Module):
    """Tied parameters, a weight-normed and a parametrized layer, a spectral-normed layer (its
    power iteration updates buffers in place in train mode)."""

    def __init__(self, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = torch.nn.utils.weight_norm(nn.Linear(width, width))
        self.orth = parametrize.register_parametrization(nn.Linear(width, width), "weight", _Symmetric())
        self.spec = torch.nn.utils.spectral_norm(nn.Linear(width, width))
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.mix(torch.relu(self.orth(h)))
        h = h + self.spec(torch.relu(h))
        return self.out(h)


class _Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.t()) / 2


@dataclass
class CallCounter:
    calls: int = 0


class FailsOnCall(nn.Module):
    """Wraps a model; from call `fail_at` on, changes it (mode, a hook, every parameter's value) and raises."""

    def __init__(self, inner: nn.Module, fail_at: int = 2) -> None:
        super().__init__()
        self.inner = inner
        self.fail_at = fail_at
        self.calls = 0  # a plain attribute: the guard puts it back too
        self.counter = CallCounter()  # an object outside the model's state, for the test to read

    def forward(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        self.counter.calls += 1
        if self.calls >= self.fail_at:
            self.inner.train()
            self.inner.register_forward_hook(lambda m, a, o: None)
            for p in self.inner.parameters():
                p.data.add_(1.0)
            raise RuntimeError(f"fails on call {self.calls}")
        return self.inner(*args)


def prepared(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """As users have it: train mode, grads, a frozen parameter, a hook; eval on half the modules."""
    model.train()
    model(*copy_inputs(inputs))[0].float().sum().backward()
    next(model.parameters()).requires_grad_(False)
    list(model.modules())[1].register_forward_hook(lambda m, a, o: None)
    for m in list(model.modules())[::2]:
        m.eval()
    return model


# --- the cases --------------------------------------------------------------------------------------

Builder = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
CASES: dict[str, Builder] = {
    "reassigned_buffers": lambda: (prepared(CountingEMA(), x := torch.randn(6, 8)), (x,)),
    "in_place_parameters": lambda: (prepared(InPlaceParams(), ids := torch.randint(0, 20, (4, 5))), (ids,)),
    "lazy": lambda: (LazyResidual(), (torch.randn(6, 5),)),
    "tied_weightnorm_parametrize_spectral": lambda: (prepared(Tied(), ids := torch.randint(0, 16, (4, 5))), (ids,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_restores_forward_mutating_model(case):
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    before, saved_inputs = picture(model), [t.clone() for t in inputs]
    healthcheck.check(model, inputs[0] if len(inputs) == 1 else inputs)
    assert_unchanged(before, picture(model))
    assert all(torch.equal(a, b) for a, b in zip(inputs, saved_inputs, strict=True))


@pytest.mark.parametrize("fail_at", [2, 4])  # 2: while tracing; 4: inside the probes (hooks on, train mode)
@pytest.mark.parametrize("case", sorted(CASES))
def test_check_restores_when_forward_fails_halfway(case, fail_at):
    torch.manual_seed(0)
    inner, inputs = CASES[case]()
    model = FailsOnCall(inner, fail_at=fail_at)
    before, saved_input = picture(model), inputs[0].clone()
    try:
        healthcheck.check(model, inputs[0], trace="hooks")
    except healthcheck.UsageError:
        pass  # a failing trace stops the check; a failing probe may only drop its measurement
    assert model.counter.calls >= fail_at  # it did fail, halfway
    assert model.calls == 0
    assert_unchanged(before, picture(model))
    assert torch.equal(inputs[0], saved_input)


def test_reassigned_buffers_keep_their_objects_and_values():
    torch.manual_seed(0)
    model, x = CountingEMA(), torch.randn(6, 8)
    count, ema, scratch, last_norm = model.count, model.ema, model.scratch, model.last_norm
    history, stats, seen = model.history, model.stats, model.stats["seen"]
    healthcheck.check(model, x)
    assert model.count is count and int(count) == 0
    assert model.ema is ema and torch.equal(ema, torch.zeros(8))
    assert model.scratch is scratch and torch.equal(scratch, torch.zeros(8))  # persistent=False
    assert model.last_norm is last_norm and not hasattr(model, "cache")
    assert model.history is history and history == []
    assert model.stats is stats and list(stats) == ["seen"] and stats["seen"] is seen and int(seen) == 0
    model(x)  # and the model still works as the user's
    assert int(model.count) == 1


def test_in_place_parameter_updates_are_undone():
    torch.manual_seed(0)
    model, ids = InPlaceParams(), torch.randint(0, 20, (4, 5))
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    healthcheck.check(model, ids)
    for name, (param, value) in weights.items():
        assert model.get_parameter(name) is param and torch.equal(param, value), name
    with torch.no_grad():  # the changes the forward makes really are in place (the test would catch them)
        model(ids)
    assert not torch.equal(model.head.weight, weights["head.weight"][1])
    assert not torch.equal(model.embed.weight, weights["embed.weight"][1])


def lazy(model: nn.Module) -> bool:
    return any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in [*model.parameters(), *model.buffers()])


def test_lazy_model_comes_back_lazy_and_still_materializes():
    torch.manual_seed(0)
    model, x = LazyResidual(), torch.randn(6, 5)
    lazy_params = list(model.parameters())
    before = picture(model)
    report = healthcheck.check(model, x)
    assert report.measurements is not None
    assert_unchanged(before, picture(model))
    assert lazy(model) and isinstance(model.stem, nn.LazyLinear)
    out = model(x)  # a later forward materializes it as usual, into the same parameter objects
    assert out.shape == (6, 8) and not lazy(model)
    assert type(model.stem) is nn.Linear and model.stem.in_features == 5
    assert all(a is b for a, b in zip(lazy_params, model.parameters(), strict=True))
    assert not model.stem._forward_pre_hooks  # the lazy pre-hook is gone once materialized
    out.sum().backward()
    assert model.stem.weight.grad is not None


def test_materialized_lazy_model_is_left_as_it_was():
    torch.manual_seed(0)
    model, x = LazyResidual(), torch.randn(6, 5)
    model(x)
    before = picture(model)
    healthcheck.check(model, x)
    assert_unchanged(before, picture(model))
    assert not model.stem._forward_pre_hooks and type(model.stem) is nn.Linear


@pytest.mark.parametrize("op", ["mul_", "iadd", "relu_inplace"])
def test_in_place_op_on_input_never_reaches_callers_tensors(op):
    torch.manual_seed(0)
    model = InPlaceOnInput(op=op)
    x, scale = torch.randn(6, 8), torch.rand(6, 8)
    args, kwargs = (x,), {"scale": scale}
    x0, scale0 = x.clone(), scale.clone()
    before = picture(model)
    report = healthcheck.check(model, (args, kwargs))
    assert report.measurements is not None and report.measurements.profile
    assert torch.equal(x, x0) and torch.equal(scale, scale0)
    assert args == (x,) and kwargs.keys() == {"scale"} and kwargs["scale"] is scale  # containers too
    assert_unchanged(before, picture(model))


def test_input_that_requires_grad_gets_no_grad_from_probes():
    torch.manual_seed(0)
    leaf = torch.randn(6, 8, requires_grad=True)  # a leaf the caller owns
    healthcheck.check(CountingEMA(), leaf)
    assert leaf.grad is None and leaf.requires_grad


def test_copy_inputs_keeps_containers_and_never_aliases():
    x, mask = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long)
    value = ((x, [mask]), {"mask": mask, "n": 3})
    copied = copy_inputs(value)
    assert isinstance(copied[0][1], list) and copied[1]["n"] == 3
    assert copied[0][0] is not x and torch.equal(copied[0][0], x)
    assert copied[1]["mask"].data_ptr() != mask.data_ptr() and torch.equal(copied[1]["mask"], mask)


def test_tied_parameters_keep_their_tie():
    torch.manual_seed(0)
    model, ids = Tied(), torch.randint(0, 16, (4, 5))
    healthcheck.check(model, ids)
    assert model.out.weight is model.embed.weight
    assert parametrize.is_parametrized(model.orth, "weight")


class DoublingWithEMA(nn.Module):
    """A residual stack without normalization (its variance doubles per block: `fix` has transforms
    to try) whose forward also keeps an EMA buffer, clamps a weight in place and scales its input in place."""

    def __init__(self, width: int = 16, blocks: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        for block in self.blocks:
            for layer in (block[0], block[2]):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.register_buffer("ema", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(1.5)
        with torch.no_grad():
            self.blocks[0][0].weight.clamp_(-0.5, 0.5)
        for block in self.blocks:
            x = x + block(x)
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        return x


def test_fix_leaves_forward_mutating_model_and_input_unchanged():
    torch.manual_seed(0)
    model, x = DoublingWithEMA(), torch.randn(32, 16)
    model = prepared(model, x)
    x0, before = x.clone(), picture(model)
    report, results = healthcheck.fix(model, x)
    assert results, "fix tried transforms (built copies, measured them) on this model"
    assert_unchanged(before, picture(model))
    assert torch.equal(x, x0)
    for result in results:  # the copies are the user's too now: each is separate from the original
        assert all(p is not q for p in result.model.parameters() for q in model.parameters())


def test_guard_restores_what_a_body_does_to_module_and_global_state():
    """The guard alone, on changes no forward makes by itself: a swapped submodule, a new
    parameter, a changed .data, a tensor hook, a global hook, grad mode, RNG, and a raise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[0].weight.grad = torch.ones(4, 4)
    grad = model[0].weight.grad
    before = picture(model)
    with pytest.raises(ValueError), preserved(model):
        model[1] = nn.Identity()
        model[0].extra = nn.Parameter(torch.ones(1))
        model[0].weight.data = torch.zeros(2)
        model[0].bias.register_hook(lambda g: g)
        nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
        model[0].weight.grad = None
        torch.set_grad_enabled(False)
        torch.rand(3)
        random.random()
        raise ValueError("halfway")
    assert_unchanged(before, picture(model))
    assert model[0].weight.grad is grad and model[0].bias._backward_hooks is None
    assert not nn.modules.module._global_forward_hooks


def test_check_file_leaves_the_files_model_and_input_unchanged(tmp_path):
    path = tmp_path / "guard_ema_model.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(8, 8)\n"
        "        self.register_buffer('ema', torch.zeros(8))\n\n"
        "    def forward(self, x):\n"
        "        x.mul_(2.0)\n"
        "        self.ema = 0.5 * self.ema + x.detach().mean(0)\n"
        "        return x + self.fc(torch.relu(x))\n\n"
        "model = Model()\nema = model.ema\nexample_input = torch.ones(4, 8)\n"
    )
    try:
        healthcheck.check_file(str(path))
    except healthcheck.UsageError:
        pass  # as above: the in-place op on the input may stop the probes, never the guarantee
    loaded = [m for name, m in sys.modules.items() if name.startswith("_healthcheck_user_guard_ema_model_")]
    assert loaded, "the file's module is where check_file left it"
    module = loaded[-1]
    assert module.model.ema is module.ema and torch.equal(module.ema, torch.zeros(8))
    assert torch.equal(module.example_input, torch.ones(4, 8))
