"""Init-time probes for a model that does not fit in memory: one block at a time.

A model built on the meta device (`with torch.device("meta"): model = Model(config)`) has shapes
but no weights. The probes still need the numbers a real initialization gives, so the model is
materialized piece by piece, with its own initialization:

- the *blocks* are the repeated units of the model: the children of its `nn.ModuleList`s and
  `nn.Sequential`s (a container inside a container, a stage of blocks, is split into its blocks);
- the parameters outside every block (embeddings, final norm, head) are materialized up front and
  stay for the whole measurement;
- each block is materialized when it is called and freed (back to meta) when it returns. Its
  weights come from the model's own init — Hugging Face's `_init_weights`, else each module's
  `reset_parameters` — under a seed derived from the block's name, so a block materialized again
  has exactly the same weights. (A block that receives nothing carrying a gradient, an embedding
  listed among the blocks, stays real once made: its output's graph runs through its weights.)

With gradients on, a block call is an autograd function (as activation checkpointing is): its
forward runs without a graph and keeps only its inputs (the boundary activations); its backward
materializes the block again, recomputes it from those inputs under a recorder that replays the
forward's node numbering, registers the gradient hooks at the points inside the block, and
backpropagates the incoming boundary gradient. Statistics inside a block are taken once, in the
forward (the recorded forward is the whole model's, node for node); gradients at its points once,
in the recomputation. Forward-mode AD (sensitivity) needs no graph: the block simply runs between
materialize and free.

So `measure_blockwise` runs the very probes of `healthcheck.probes.measure`, on the same recorded
graph, and gives the same `Measurements` as the whole-model probes on the same weights
(`materialize_model` builds those weights in one piece, for a model that fits). Memory: the outer
parameters, one block, the boundary activations of every block, and one block's activations
during its recomputation. Time: each block is initialized five times (forward and backward of the
statistics pass and of the gradient-correlation line, forward of the sensitivity pass), which on a
CPU costs about as much as running it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from healthcheck.graph.ir import OpNode
from healthcheck.graph.recorder import Session, _OpRecorder
from healthcheck.probes.measure import Measurements, ProbeOptions, _FrozenBatchNorm
from healthcheck.probes.measure import measure as measure_whole
from healthcheck.probes.observer import StatsObserver
from healthcheck.probes.stability import OptimizerSpec, Stability

_CONTAINERS = (nn.ModuleList, nn.Sequential)
# the line of the gradient-correlation probe runs as one batch: with one block materialized at a time
# its activations are one block's, so the chunking that bounds a whole model's memory is not needed
_ONE_CHUNK = 2**62


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks, by qualified name, in module order: the children of its ModuleLists and
    Sequentials that lie inside no other block; a child that is itself such a container (a stage)
    gives its own children instead. A module listed twice (shared layers) is one block."""
    blocks: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module, in_container: bool) -> None:
        if in_container and not isinstance(module, _CONTAINERS):
            if id(module) not in seen and _holds_tensors(module):
                seen.add(id(module))
                blocks.append((prefix, module))
            return
        container = isinstance(module, _CONTAINERS)
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, container)

    visit("", model, isinstance(model, _CONTAINERS))
    return blocks


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _initializer(model: nn.Module, init: Callable[[nn.Module], None] | None) -> Callable[[nn.Module], None]:
    """How one module's own parameters and buffers are initialized: `init` if given; else, inside a
    Hugging Face model, the innermost PreTrainedModel's `_init_weights(module)` (what
    `initialize_weights` applies); else the module's `reset_parameters()`."""
    if init is not None:
        return init
    owners: dict[int, Any] = {}

    def walk(module: nn.Module, owner: Any) -> None:
        if callable(getattr(module, "_init_weights", None)) and hasattr(module, "config"):
            owner = module
        owners[id(module)] = owner
        for child in module.children():
            walk(child, owner)

    walk(model, None)

    def initialize(module: nn.Module) -> None:
        owner = owners.get(id(module))
        if owner is not None:
            owner._init_weights(module)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        elif callable(getattr(module, "_reset_parameters", None)):  # nn.MultiheadAttention
            module._reset_parameters()

    return initialize


def _post_order(module: nn.Module, skip: set[int]) -> Iterator[nn.Module]:
    """Children before their parent (as Hugging Face's `smart_apply` initializes), not entering
    the modules in `skip` (the blocks, when the outer parameters are materialized)."""
    for child in module.children():
        if id(child) not in skip:
            yield from _post_order(child, skip)
    yield module


@dataclass
class MemoryUsage:
    """Elements of materialized parameters and buffers: the outer ones, the largest block, and the
    most that were materialized at one time (the outer ones plus one block when blocks work)."""

    outer: int = 0
    largest_block: int = 0
    peak: int = 0
    live: int = 0
    materializations: int = 0  # block materializations, in all passes
    blocks: int = 0


@dataclass
class _Materialized:
    """What one scope made real: each (table, key, meta original, real stand-in), to put back."""

    placed: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    made: dict[int, torch.Tensor] = field(default_factory=dict)  # id of a meta original -> its real tensor
    elements: int = 0

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in self.made.values() if isinstance(t, nn.Parameter)]


class Materializer:
    """Materializes a scope (a block, or everything outside the blocks) on `device` with the model's
    own init under the scope's seed, and frees it back to meta. A meta tensor is replaced, in its
    module's `_parameters`/`_buffers`, by a real one (the same real one wherever it is tied), and
    the meta original is put back when the scope is freed: the caller's objects are never changed.
    (Swapping the tensors in place would keep their identity, but fails on any weak reference to
    them, and torch.export's fake tracing leaves one.)"""

    def __init__(self, model: nn.Module, seed: int, device: torch.device,
                 init: Callable[[nn.Module], None] | None = None, usage: MemoryUsage | None = None) -> None:
        self.model = model
        self.seed = seed
        self.device = device
        self.initialize = _initializer(model, init)
        self.usage = usage if usage is not None else MemoryUsage()

    def scope_seed(self, name: str) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63

    def materialize(self, name: str, modules: list[nn.Module], verify: bool = True) -> _Materialized:
        """Make the meta tensors of `modules` (their own, not their children's) real and initialize
        them, children before parents. `verify`: raise when the init leaves a tensor unwritten (each
        kind of block is verified once, `_check_init`: the NaN fill and scan cost a third of the init)."""
        done = _Materialized()
        for module in modules:
            for table in (module._parameters, module._buffers):
                for key, tensor in list(table.items()):
                    if tensor is None or not tensor.is_meta:
                        continue
                    real = done.made.get(id(tensor))
                    if real is None:
                        real = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
                        if verify and (real.is_floating_point() or real.is_complex()):
                            real.fill_(math.nan)  # unwritten by the init: found below
                        if isinstance(tensor, nn.Parameter):
                            real = nn.Parameter(real, requires_grad=tensor.requires_grad)
                        done.made[id(tensor)] = real
                        done.elements += real.numel()
                    table[key] = real
                    done.placed.append((table, key, tensor, real))
        self.usage.live += done.elements
        self.usage.peak = max(self.usage.peak, self.usage.live)
        try:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                seed = self.scope_seed(name)
                torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues a lazy CUDA seed
                for index in devices:
                    torch.cuda.default_generators[index].manual_seed(seed)
                made = {id(t) for t in done.made.values()}
                for module in modules:
                    # a module that owns a tensor made here, or none at all (a parent whose init may
                    # rescale its children, as GPT-2's does): never one whose tensors were real already
                    own = _own(module)
                    if not own or any(id(t) in made for t in own):
                        self.initialize(module)
            unwritten = [t for t in done.made.values() if verify and (t.is_floating_point() or t.is_complex())
                         and bool(torch.isnan(t).any())]
        except BaseException:
            self.free(done)
            raise
        if unwritten:
            names = _names_of(self.model, unwritten)
            self.free(done)
            raise ValueError(f"the model's init leaves {', '.join(names[:3])}"
                             f"{' and more' if len(names) > 3 else ''} unset on the meta device (no "
                             f"reset_parameters or _init_weights covers it): pass init= to initialize it, or "
                             f"build the model on a real device")
        return done

    def free(self, done: _Materialized) -> None:
        """Back to meta: the originals return to their tables, the real tensors are dropped."""
        for table, key, original, _ in reversed(done.placed):
            table[key] = original
        self.usage.live -= done.elements
        done.placed.clear()
        done.made.clear()
        done.elements = 0


def _own(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _names_of(model: nn.Module, tensors: list[torch.Tensor]) -> list[str]:
    ids = {id(t) for t in tensors}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return list(dict.fromkeys(name for name, t in named if id(t) in ids))


@contextmanager
def _outside_recording() -> Iterator[None]:
    """No torch-function mode while weights are made: the probes' recorder would otherwise record
    the init's ops and replace its random draws with neutral ones."""
    with torch._C.DisableTorchFunction():
        yield


def _active_recorder() -> _OpRecorder | None:
    stack = torch.overrides._get_current_function_mode_stack()
    return next((mode for mode in reversed(stack) if isinstance(mode, _OpRecorder)), None)


@dataclass
class _ForwardRecord:
    """What the recompute of one block call needs to replay its recorded forward exactly."""

    recorder: _OpRecorder
    start: int  # the first node the block's forward recorded in the whole model's graph
    end: int
    data_inputs: list[int]  # positions (among the call's tensors) of the inputs that were model data
    neutral_calls: int  # the random-op counter at the call: the recompute draws the same values
    replacements: dict[str, Any]


class _BlockCall(torch.autograd.Function):
    """A block call as one autograd node: forward without a graph, backward by recomputation."""

    @staticmethod
    def forward(ctx: Any, runner: _BlockRunner, spec: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        outputs, ctx.record, ctx.out_spec = runner.run_forward(spec, tensors)
        ctx.runner, ctx.spec = runner, spec
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*[o for o in outputs if not (o.is_floating_point() or o.is_complex())])
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[2:]
        inputs = ctx.runner.run_backward(ctx.spec, ctx.saved_tensors, needs, grads, ctx.record)
        return (None, None, *inputs)


class _Replay:
    """The recompute's observer: a node of the recompute is the forward's node `start + k` (k-th
    op); at the points the forward's StatsObserver measured inside the block, it registers that
    observer's gradient hook, so ‖∂L/∂y‖ lands under the whole graph's node index."""

    def __init__(self, record: _ForwardRecord, inputs: int) -> None:
        observer = record.recorder.observer
        self.stats = observer if isinstance(observer, StatsObserver) else None
        self.record = record
        self.inputs = inputs

    def on_node(self, node: OpNode, result: Any, operands: list[tuple[int, torch.Tensor]]) -> Any:
        index = self.record.start + node.index - self.inputs
        stats = self.stats
        if (stats is not None and index < self.record.end and index in stats.values and index not in stats.grads
                and isinstance(result, torch.Tensor) and result.requires_grad):
            result.register_hook(partial(stats._on_grad, index))
        return None


class _BlockRunner:
    """Runs the model's blocks one at a time: patches each block's `forward` for the duration."""

    def __init__(self, materializer: Materializer, blocks: list[tuple[str, nn.Module]]) -> None:
        self.materializer = materializer
        self.blocks = blocks
        self.originals: dict[int, Callable[..., Any]] = {}
        self.names = {id(block): name for name, block in blocks}
        self.pinned: dict[int, _Materialized] = {}  # blocks whose weights stay real (see `call`)

    @contextmanager
    def patched(self) -> Iterator[None]:
        try:
            for _, block in self.blocks:
                self.originals[id(block)] = block.forward
                block.forward = partial(self.call, block)
            yield
        finally:
            for _, block in self.blocks:
                if "forward" in vars(block):
                    del block.forward
            with _outside_recording():
                for done in self.pinned.values():
                    self.materializer.free(done)
            self.pinned.clear()

    @contextmanager
    def materialized(self, block: nn.Module, verify: bool = False) -> Iterator[None]:
        name = self.names[id(block)]
        with _outside_recording():
            done = self.materializer.materialize(name, list(_post_order(block, set())), verify)
        usage = self.materializer.usage
        usage.materializations += 1
        usage.largest_block = max(usage.largest_block, done.elements)
        # the recorder running now took the model's parameters when it started: tell it the new ones
        # (an op that touches a parameter is a weight layer, a scale by a parameter, ...)
        recorder = _active_recorder()
        ids = {id(p) for p in done.parameters()}
        if recorder is not None:
            recorder.params |= ids
        try:
            yield
        finally:
            if recorder is not None:
                recorder.params -= ids
            with _outside_recording():
                self.materializer.free(done)

    def call(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.originals[id(block)]
        if id(block) in self.pinned:
            return original(*args, **kwargs)
        if not torch.is_grad_enabled():  # no graph keeps the weights: run it between materialize and free
            with self.materialized(block):
                return original(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors = [leaves[i] for i in positions]
        if not any(t.requires_grad for t in tensors):
            # nothing that reaches the block carries a gradient (token ids into an embedding block; the
            # probes' input point is then made inside it): its output's graph runs through its own
            # weights only, so they stay real until the probes end, like the parameters outside blocks
            self.pinned[id(block)] = self.pin(block)
            return original(*args, **kwargs)
        outputs = _BlockCall.apply(self, (block, leaves, positions, spec), *tensors)
        out_leaves, out_spec = self.last_out
        out_positions = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
        out_leaves = list(out_leaves)
        recorder = _active_recorder()
        for i, tensor in zip(out_positions, outputs):
            raw = out_leaves[i]
            if recorder is not None and tensor is not raw:  # autograd gave a new object (an input returned)
                node = recorder.node_of(raw)
                if node is not None:
                    recorder._bind(tensor, recorder.nodes[node])
            out_leaves[i] = tensor
        return pytree.tree_unflatten(out_leaves, out_spec)

    def pin(self, block: nn.Module) -> _Materialized:
        with _outside_recording():
            done = self.materializer.materialize(self.names[id(block)], list(_post_order(block, set())))
        self.materializer.usage.materializations += 1
        recorder = _active_recorder()
        if recorder is not None:
            recorder.params |= {id(p) for p in done.parameters()}
        return done

    def run_forward(self, spec: Any, tensors: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], _ForwardRecord | None, Any]:
        block, leaves, positions, tree = spec
        args, kwargs = _rebuild(leaves, positions, tensors, tree)
        recorder = _active_recorder()
        record = None
        if recorder is not None:
            replacements = {k: (_FrozenBatchNorm(list(v.stats)) if isinstance(v, _FrozenBatchNorm) else v)
                            for k, v in recorder.replacements.items()}
            record = _ForwardRecord(recorder, len(recorder.nodes), 0,
                                    [i for i, t in enumerate(tensors) if recorder.node_of(t) is not None],
                                    recorder.neutral.calls, replacements)
        with self.materialized(block):
            output = self.originals[id(block)](*args, **kwargs)
        if record is not None:
            record.end = len(recorder.nodes)
            for name, value in record.replacements.items():  # keep only the batch statistics this block used
                live = recorder.replacements.get(name)
                if isinstance(value, _FrozenBatchNorm) and isinstance(live, _FrozenBatchNorm):
                    value.stats = value.stats[:len(value.stats) - len(live.stats)]
        out_leaves, out_spec = pytree.tree_flatten(output)
        self.last_out = (out_leaves, out_spec)
        return [leaf for leaf in out_leaves if isinstance(leaf, torch.Tensor)], record, out_spec

    def run_backward(self, spec: Any, saved: tuple[torch.Tensor, ...], needs: tuple[bool, ...],
                     grads: tuple[torch.Tensor | None, ...], record: _ForwardRecord | None) -> list[torch.Tensor | None]:
        block, leaves, positions, tree = spec
        inputs = [t.detach().requires_grad_(need) if need else t.detach() for t, need in zip(saved, needs)]
        args, kwargs = _rebuild(leaves, positions, inputs, tree)
        session = None
        with self.materialized(block), torch.enable_grad():
            if record is not None:
                forward = record.recorder
                session = Session(block, _Replay(record, len(record.data_inputs)), forward.skip_dropout,
                                  dict(record.replacements), forward.neutral.seed, forward.neutral.shared_rows)
                session.recorder.neutral.calls = record.neutral_calls
                session.start([inputs[i] for i in record.data_inputs])
            try:
                output = self.originals[id(block)](*args, **kwargs)
            finally:
                recording = session.stop(None) if session is not None else None
            if recording is not None:
                _check_replay(recording.graph.nodes[len(record.data_inputs):], record, self.names[id(block)])
            outs = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wanted = [t for t in inputs if t.requires_grad]
            if not pairs or not wanted:
                return [None] * len(inputs)
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        by_input = iter(found)
        return [next(by_input) if t.requires_grad else None for t in inputs]


def _rebuild(leaves: list[Any], positions: list[int], tensors: Any, tree: Any) -> tuple[tuple, dict[str, Any]]:
    leaves = list(leaves)
    for i, tensor in zip(positions, tensors):
        leaves[i] = tensor
    return pytree.tree_unflatten(leaves, tree)


def _check_replay(nodes: list[OpNode], record: _ForwardRecord, name: str) -> None:
    """The recompute must record the ops the forward recorded, in order: else its node numbers (and
    the gradients filed under them) would not be the forward's."""
    recorded = record.recorder.nodes[record.start:record.end]
    if len(nodes) != len(recorded) or any(a.op != b.op for a, b in zip(nodes, recorded)):
        raise RuntimeError(f"block {name} recomputed different ops ({len(nodes)}) than its forward recorded "
                           f"({len(recorded)}): it is not deterministic under the probes")


def _device_of(args: tuple, kwargs: dict[str, Any]) -> torch.device:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_meta]
    return tensors[0].device if tensors else torch.device("cpu")


def _outer_modules(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    return list(_post_order(model, {id(b) for _, b in blocks}))


@contextmanager
def materialized_outside_blocks(materializer: Materializer, blocks: list[tuple[str, nn.Module]]) -> Iterator[None]:
    with _outside_recording():
        done = materializer.materialize("", _outer_modules(materializer.model, blocks))
    materializer.usage.outer = done.elements
    try:
        yield
    finally:
        with _outside_recording():
            materializer.free(done)


def materialize_model(model: nn.Module, seed: int = 0, device: str | torch.device = "cpu",
                      init: Callable[[nn.Module], None] | None = None) -> None:
    """Materialize a meta-built model in place, in one piece, with exactly the weights
    `measure_blockwise` gives it block by block (same init, same per-block seeds): for a model that
    fits, the whole-model probes on it are the reference the blockwise ones must equal."""
    materializer = Materializer(model, seed, torch.device(device), init)
    blocks = find_blocks(model)
    with _outside_recording():
        materializer.materialize("", _outer_modules(model, blocks))
        for name, block in blocks:
            materializer.materialize(name, list(_post_order(block, set())))


def measure_blockwise(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None, *, at_joins: bool,
                      options: ProbeOptions | None = None, init: Callable[[nn.Module], None] | None = None,
                      usage: MemoryUsage | None = None) -> Measurements:
    """The probes of `healthcheck.probes.measure.measure` on a meta-built model, one block
    materialized at a time (module docstring). Same `Measurements` as the whole-model probes on the
    weights `materialize_model` gives. The model is left on meta, as it came; `usage` (if given)
    receives the materialized element counts. `init(module)` replaces the model's own init of one
    module's own tensors. The caller guards the model's state, as for `measure`."""
    options = options or ProbeOptions()
    kwargs = kwargs or {}
    usage = usage if usage is not None else MemoryUsage()
    blocks = find_blocks(model)
    usage.blocks = len(blocks)
    materializer = Materializer(model, options.seed, _device_of(args, kwargs), init, usage)
    runner = _BlockRunner(materializer, blocks)
    options = dataclasses.replace(options, line_chunk_bytes=_ONE_CHUNK)
    with materialized_outside_blocks(materializer, blocks):
        _check_init(runner, blocks)
        with runner.patched():
            return measure_whole(model, args, kwargs, at_joins=at_joins, options=options)


def _check_init(runner: _BlockRunner, blocks: list[tuple[str, nn.Module]]) -> None:
    """Materialize one block of each kind (class and tensor names) before the probes run, verifying
    that the init writes every tensor: a tensor it cannot reach is then one clear error here, not a
    failed probe (the probes catch their errors, see `measure`)."""
    kinds: set[tuple] = set()
    for _, block in blocks:
        kind = (type(block), *(name for name, _ in block.named_parameters()), *(n for n, _ in block.named_buffers()))
        if kind not in kinds:
            kinds.add(kind)
            with runner.materialized(block, verify=True):
                pass


def stability_not_assessed(optimizer: OptimizerSpec | None) -> Stability:
    """The stability record of a meta-built model: the output scale, the sharpness and the trial steps
    each need the whole model real at once (a working copy, a double backward, optimizer steps), so
    each is reported as not measured, with the reason; the depth profile is measured block by block."""
    why = "the weights are on the meta device and are only ever real one block at a time"
    parts = ("output", "sharpness", "trial") if optimizer is not None else ("output",)
    return Stability(output=None, optimizer=optimizer, skipped=dict.fromkeys(parts, why))
