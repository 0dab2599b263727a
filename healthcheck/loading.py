"""Load `FILE[:NAME]`: import the user's file, find the model and its example inputs.

Every failure is a `UsageError` with one line that says what went wrong and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from healthcheck.errors import UsageError, describe

MODEL_NAMES = ("model", "build_model", "get_model")
#: the start of the private module name a model file is imported as (never clashes with a real module)
USER_MODULE_PREFIX = "_healthcheck_user_"
INPUT_NAMES = ("example_inputs", "example_input")


@dataclass
class Target:
    model: nn.Module
    name: str
    args: tuple
    kwargs: dict[str, Any]
    path: Path
    source: str  # "file:line" of the definition the model came from


def definition_line(path: Path, name: str | None) -> int:
    """The line of FILE that defines `name` at module level (def, class or assignment), else 1."""
    import ast

    if name is None:
        return 1
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return 1
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node.lineno
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.lineno
    return 1


def split_spec(spec: str) -> tuple[Path, str | None]:
    path, sep, name = spec.rpartition(":")
    if sep and name.isidentifier() and path:
        return Path(path), name
    return Path(spec), None


def import_file(path: Path) -> ModuleType:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file (give the path of a Python file that defines the model)")
    resolved = path.resolve()
    name = f"{USER_MODULE_PREFIX}{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path}: cannot import this file (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - any import failure is the user's to see
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"{path}:{_error_line(exc, resolved)}: importing the file raised {describe(exc)}") from exc
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _error_line(exc: BaseException, path: Path) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return str(exc.lineno)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == path:
            return str(frame.lineno)
    return "?"


def _defined_here(module: ModuleType) -> list[str]:
    out = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, nn.Module):
            out.append(f"{key} ({type(value).__name__} instance)")
        elif inspect.isclass(value) and getattr(value, "__module__", None) == module.__name__:
            out.append(f"class {key}")
        elif inspect.isfunction(value) and value.__module__ == module.__name__:
            out.append(f"{key}()")
    return out


def find_model(module: ModuleType, path: Path, name: str | None) -> tuple[nn.Module, str]:
    if name is not None:
        if not hasattr(module, name):
            found = ", ".join(_defined_here(module)) or "nothing"
            raise UsageError(f"{path}: no {name!r} in the file; it defines: {found}")
        return _materialize(getattr(module, name), name, path), name
    for candidate in MODEL_NAMES:
        if hasattr(module, candidate):
            return _materialize(getattr(module, candidate), candidate, path), candidate
    instances = [k for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")]
    if len(instances) == 1:
        return getattr(module, instances[0]), instances[0]
    if len(instances) > 1:
        raise UsageError(f"{path}: several models ({', '.join(instances)}); pick one with {path}:NAME")
    classes = [k for k, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
               and v.__module__ == module.__name__]
    if len(classes) == 1:
        return _materialize(getattr(module, classes[0]), classes[0], path), classes[0]
    found = ", ".join(_defined_here(module)) or "nothing"
    hint = f"several nn.Module classes ({', '.join(classes)})" if classes else "no model"
    raise UsageError(f"{path}: {hint} found; define `model` (an nn.Module or a zero-argument factory) "
                     f"or pass {path}:NAME (the file defines: {found})")


def _materialize(obj: Any, name: str, path: Path) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"{path}: {name} is a {type(obj).__name__}, not an nn.Module or a function that returns one")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise UsageError(f"{path}: {name}() needs arguments; give a zero-argument factory or a module-level "
                         "nn.Module instance") from None
    except ValueError:
        pass
    try:
        result = obj()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}:{_error_line(exc, path.resolve())}: {name}() raised {describe(exc)}") from exc
    if not isinstance(result, nn.Module):
        raise UsageError(f"{path}: {name}() returned a {type(result).__name__}, not an nn.Module")
    return result


def as_call_args(example: Any) -> tuple[tuple, dict[str, Any]]:
    """A tensor, a tuple/list of positional inputs, a dict of keyword inputs, or (args, kwargs)."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        if len(example) == 2 and isinstance(example[0], (tuple, list)) and isinstance(example[1], dict):
            return tuple(example[0]), dict(example[1])
        return tuple(example), {}
    raise UsageError(f"example inputs must be a tensor, a tuple of tensors or a dict, not {type(example).__name__}")


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.modules.rnn.RNNBase)):
            return name, module
    return None


def expected_input(model: nn.Module) -> str:
    """What the model's first weight layer wants, in words."""
    found = first_layer(model)
    if found is None:
        return "the model has no Conv, Linear or Embedding layer to infer the input shape from"
    name, layer = found
    if isinstance(layer, nn.Embedding):
        return (f"the first layer {name} (Embedding) expects integer token ids below {layer.num_embeddings}, "
                "shape (N, L)")
    if isinstance(layer, nn.modules.conv._ConvNd):
        spatial = ", ".join("HWD"[i] for i in range(len(layer.kernel_size)))
        return f"the first layer {name} ({type(layer).__name__}) expects shape (N, {layer.in_channels}, {spatial})"
    if isinstance(layer, nn.Linear):
        return f"the first layer {name} (Linear) expects shape (N, ..., {layer.in_features})"
    return f"the first layer {name} ({type(layer).__name__}) expects input_size {layer.input_size}"


#: `--input-shape` draws at least this many inputs (the first dimension) for the probes: the effective rank
#: (HC203) counts directions among independent inputs, and the tokens or pixels of one input are alike,
#: so 2 sequences show ~2 directions whatever the model (stats.directions_band)
PROBE_INPUTS = 16
#: ... unless one input is large: the enlarged tensor keeps at most this many elements (or the user's own)
PROBE_ELEMENTS = 1 << 20
#: ... or the model is: above this many parameters the shapes stay as given (a trial forward on the CPU
#: checks that the model takes the larger batch, and more inputs cost more)
PROBE_MAX_PARAMETERS = 100_000_000


def probe_shape(shape: tuple[int, ...], model: nn.Module) -> tuple[int, ...]:
    """The shape `--input-shape` draws for the probes: the first dimension (the inputs) raised to
    PROBE_INPUTS within PROBE_ELEMENTS; the other dimensions (sequence length, image size, channels)
    are the user's. A 1-d shape and a time-first RNN input (its first dimension is time) are kept."""
    found = first_layer(model)
    time_first = found is not None and isinstance(found[1], nn.modules.rnn.RNNBase) and not found[1].batch_first
    if len(shape) < 2 or time_first or shape[0] >= PROBE_INPUTS:
        return shape
    per_input = math.prod(shape[1:])
    inputs = min(PROBE_INPUTS, max(shape[0], PROBE_ELEMENTS // max(per_input, 1)))
    return (inputs, *shape[1:])


def special_token_ids(model: nn.Module, vocabulary: int) -> set[int]:
    """Ids a random token input must not contain: the config's pad/bos/eos/unk/sep/cls/mask/... ids (any
    `*_token_id(s)` of `model.config` or its sub-configs) and the Embedding's `padding_idx`. A pad id
    among random tokens gives a position that no real loss counts."""
    ids: set[int] = set()
    configs = [getattr(model, "config", None)]
    configs += [getattr(configs[0], key, None) for key in ("text_config", "decoder", "encoder")]
    for config in configs:
        if config is None:
            continue
        keys = list(config) if isinstance(config, dict) else [k for k in dir(config) if not k.startswith("__")]
        for key in keys:
            if not key.endswith(("_token_id", "_token_ids")):
                continue
            try:
                value = config[key] if isinstance(config, dict) else getattr(config, key)
            except Exception:  # noqa: BLE001 - a config property that cannot be read names no id
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocabulary:
                    ids.add(v)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            ids.add(module.padding_idx % module.num_embeddings)
    return {i for i in ids if i < vocabulary}


def random_inputs(model: nn.Module, shapes: tuple[tuple[int, ...], ...], seed: int) -> tuple:
    """Inputs for `--input-shape`: token ids when the model starts with an Embedding (never a pad or
    other special id), else N(0, 1). The first dimension is raised to PROBE_INPUTS (`probe_shape`), the
    same for every shape that shares it, so that the probes see enough independent inputs, when the
    model's forward accepts that (else the shapes as given); a user's own `example_input` is never changed."""
    # a model on the meta device cannot run the trial forward (and is checked without probes)
    small = sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)) \
        <= PROBE_MAX_PARAMETERS and not any(p.is_meta for p in model.parameters())
    enlarged = tuple(probe_shape(shape, model) for shape in shapes) if small else shapes
    if any(len(a) >= 2 and len(b) >= 2 and a[0] == b[0] and ea[0] != eb[0]
           for a, ea in zip(shapes, enlarged) for b, eb in zip(shapes, enlarged)):
        enlarged = shapes  # inputs that share a batch must keep sharing it
    if enlarged != shapes:
        inputs = _draw_inputs(model, enlarged, seed)
        if _runs(model, inputs):
            return inputs
    # the user's shapes as given: a model that cannot take more inputs (a fixed batch in a reshape) keeps
    # working, and a wrong shape is reported as the user typed it
    return _draw_inputs(model, shapes, seed)


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether the model's forward accepts `inputs`: one pass without gradients, in eval mode so that no
    BatchNorm running statistic moves; every module's train/eval flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the shapes the user gave
        return False
    finally:
        for module, training in modes:
            module.training = training


def _draw_inputs(model: nn.Module, shapes: tuple[tuple[int, ...], ...], seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    found = first_layer(model)
    out = []
    for shape in shapes:
        if found is not None and isinstance(found[1], nn.Embedding):
            vocabulary = found[1].num_embeddings
            allowed = torch.ones(vocabulary, dtype=torch.bool)
            allowed[sorted(special_token_ids(model, vocabulary))] = False
            pool = allowed.nonzero().squeeze(1) if allowed.any() else torch.arange(vocabulary)
            out.append(pool[torch.randint(0, len(pool), shape, generator=generator)])
        else:
            out.append(torch.randn(shape, generator=generator))
    return tuple(out)


def find_inputs(module: ModuleType, model: nn.Module, path: Path) -> tuple[tuple, dict[str, Any]]:
    for name in INPUT_NAMES:
        if hasattr(module, name):
            value = getattr(module, name)
            if callable(value) and not isinstance(value, torch.Tensor):
                try:
                    params = inspect.signature(value).parameters
                    value = value(model) if len(params) == 1 else value()
                except Exception as exc:  # noqa: BLE001
                    raise UsageError(f"{path}:{_error_line(exc, path.resolve())}: {name}() raised {describe(exc)}") from exc
            try:
                return as_call_args(value)
            except UsageError as exc:
                raise UsageError(f"{path}: {name}: {exc}") from None
    raise UsageError(f"{path}: no example input; define example_input in the file (a tensor, tuple or "
                     f"zero-argument function) or pass --input-shape ({expected_input(model)})")


def load_target(spec: str, input_shapes: tuple[tuple[int, ...], ...] = (), seed: int = 0) -> Target:
    path, name = split_spec(spec)
    module = import_file(path)
    model, found_name = find_model(module, path, name)
    if input_shapes:
        args, kwargs = random_inputs(model, input_shapes, seed), {}
    else:
        args, kwargs = find_inputs(module, model, path)
    source = f"{path.resolve()}:{definition_line(path, found_name)}"
    return Target(model, found_name if found_name not in MODEL_NAMES else type(model).__name__, args, kwargs, path,
                  source)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers such as 8,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: expected positive integers such as 8,3,32,32")
    return shape
