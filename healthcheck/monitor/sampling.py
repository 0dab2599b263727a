"""Sampling: the hooks that record the training forward of a sampled step, the parameters watched
(resolved again on every sample), and the device-side measurements of gradients, weights, update
ratios and the gradient SNR. Nothing here copies to the host."""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from healthcheck.graph.recorder import Recording, Session
from healthcheck.monitor.reduction import Squares, is_sharded, local_coordinates, local_part, shares
from healthcheck.probes.observer import StatsObserver

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP(1) and torch.compile wrappers."""
    while True:
        if type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass
class Watched:
    """The parameters watched on one sample, with the coordinates each is subsampled on."""

    names: list[str]
    params: list[torch.Tensor]
    coords: list[torch.Tensor | None]

    def subset(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The sampled coordinates of each watched tensor (all of them for small tensors)."""
        # a sharded (FSDP2) tensor is read on this rank's shard: its coordinates index the shard
        return [local_part(t).reshape(-1) if idx is None else local_part(t).reshape(-1).index_select(0, idx)
                for t, idx in zip(tensors, self.coords)]


class ParameterSet:
    """The parameters matching include/exclude that require gradients, resolved again on every
    sample: parameters replaced after construction (`load_state_dict(assign=True)`, `.to()` that
    makes new tensors, unfreezing) are followed."""

    def __init__(self, model: nn.Module, include: Iterable[str], exclude: Iterable[str],
                 coordinates: int | None) -> None:
        if coordinates is not None and coordinates < 1:
            raise ValueError(f"coordinates must be ≥ 1 or None, not {coordinates}")
        self.model, self.coordinates = model, coordinates
        self.include, self.exclude = tuple(include), tuple(exclude)
        if not any(self.matches(n) for n, _ in model.named_parameters()):
            raise ValueError("no parameter matches include/exclude; nothing to watch")
        self._coords: dict[tuple[str, int, torch.device], torch.Tensor | None] = {}

    def matches(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    def resolve(self) -> Watched:
        pairs = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and self.matches(n)]
        return Watched([n for n, _ in pairs], [p for _, p in pairs], [self._coordinates(n, p) for n, p in pairs])

    def _coordinates(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        key = (name, param.numel(), param.device, local_part(param).shape)
        if key not in self._coords:
            if self.coordinates is None or param.numel() <= self.coordinates:
                self._coords[key] = None
            else:  # a fixed random subset per tensor, the same whichever tensors are watched
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                # clone: a slice would keep the whole permutation alive (8 bytes per parameter, cached)
                chosen = torch.randperm(param.numel(), generator=generator)[:self.coordinates].clone()
                # of a sharded tensor, the part of the same subset that lies in this rank's shard
                self._coords[key] = local_coordinates(param, chosen) if is_sharded(param) else chosen.to(param.device)
        return self._coords[key]


class ForwardRecorder:
    """Records the first training forward (grad enabled, module in train mode) of a sampled step.

    The hooks stay on the root module; on unsampled steps they return at once. Inside code that
    torch.compile traces they return before reading any monitor state, so that the compiled graph
    gets neither a graph break nor a guard on the step counter (activations of a compiled forward
    are not measured; gradients, weights and the loss are)."""

    def __init__(self, model: nn.Module, ranks: bool) -> None:
        self.model, self.ranks = model, ranks
        self.armed = False  # set by the monitor: the coming step is sampled
        self.at_joins: bool | None = None  # profile at joins, or at layers: known after the first sample
        self.session: Session | None = None
        self.observer: StatsObserver | None = None
        self.recording: Recording | None = None
        self.compiled_forward = False  # a forward ran inside torch.compile while armed
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # constant while tracing: no guard, no graph break
            return
        if not self.armed or self.session is not None or self.recording is not None:
            return
        if not torch.is_grad_enabled() or not module.training:  # evaluation, not the training step
            return
        # joins, or layers when the model has none; until the first sample has told, both
        self.observer = StatsObserver(at_joins=self.at_joins is not False, at_layers=self.at_joins is not True,
                                      ranks=self.ranks, dead_units=True)
        self.session = Session(self.model, self.observer)
        self.session.start((args, kwargs))

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.session is None:
            return
        session, self.session = self.session, None
        self.recording = session.stop(output)
        if self.observer is not None and self.observer.at_layers:
            self.observer.measure_output(self.recording.graph, output)

    def take(self) -> tuple[Recording | None, StatsObserver | None]:
        """The recorded forward of this sample (None when no training forward ran), cleared."""
        recording, observer = self.recording, self.observer if self.recording is not None else None
        self.recording, self.observer = None, None
        return recording, observer

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.armed = False


class LossScale:
    """A `torch.amp.GradScaler` as the monitor needs it: by what factor the gradients are scaled
    right now (device tensor, read without a host sync)."""

    def __init__(self, scaler: Any) -> None:
        if scaler is not None and not all(hasattr(scaler, a) for a in ("scale", "update", "is_enabled")):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, not {type(scaler).__name__}")
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def value(self) -> torch.Tensor | None:
        """The scaler's current scale (None before its first `scale()` call or without a scaler)."""
        return getattr(self.scaler, "_scale", None) if self.scaler is not None else None

    def factor(self) -> torch.Tensor | None:
        """What `.grad` is multiplied by now: the scale, or None when the gradients are unscaled
        (no scaler, or `scaler.unscale_(optimizer)` already ran for this step)."""
        scale = self.value()
        if scale is None:
            return None
        from torch.amp.grad_scaler import OptState

        states = getattr(self.scaler, "_per_optimizer_states", {})
        if any(s.get("stage") is OptState.UNSCALED for s in states.values()):
            return None
        return scale


class GradientStats:
    """Device-side gradient, weight, update-ratio and SNR measurements between two host copies.

    `pending` holds what waits for the next copy: "grad" (names, ‖g‖, ‖w‖), "update" (names, ratio,
    measured), "snr" (names, ratio), "loss", "nonfinite_grad", "nonfinite_weight", "scale"."""

    def __init__(self, snr_window: int, loss_scale: LossScale) -> None:
        self.snr_window, self.loss_scale = snr_window, loss_scale
        self.pending: dict[str, Any] = {}
        self._snapshot: tuple[Watched, list[torch.Tensor]] | None = None
        self._snr: tuple[Watched, list[torch.Tensor], torch.Tensor, int] | None = None  # sum, Σ‖g‖², count

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def sample(self, watched: Watched, loss: torch.Tensor | None) -> None:
        """The sampled step, after backward: norms, non-finite flags, a weight snapshot, a new SNR window."""
        factor = self.loss_scale.factor()
        if any(p.grad is not None for p in watched.params):
            # squared norms over every watched tensor (a rank-independent layout; a gradient this rank
            # lacks is absent here), of this rank's shard where sharded: reduced over ranks, not gathered
            device = watched.params[0].device
            if factor is None:
                g = Squares.of([p.grad for p in watched.params], device)
            else:  # the gradients the optimizer will apply; the norm of scaled ones may overflow float32
                wide = torch.float32 if factor.device.type == "mps" else torch.float64
                g = Squares.of([p.grad for p in watched.params], device, divide=factor, dtype=wide)
            w = Squares.of(list(watched.params), device)
            self.pending["grad"] = (watched.names, g, w)
            self.pending["nonfinite_grad"] = g.nonfinite()
            self.pending["nonfinite_weight"] = w.nonfinite()
        if self.loss_scale.value() is not None:
            self.pending["scale"] = self.loss_scale.value()
        self._snapshot = (watched, [t.clone() for t in watched.subset(p.detach() for p in watched.params)])
        if loss is not None:
            self.pending["loss"] = loss
        if self.snr_window:
            self._snr = None
            self.accumulate_snr(watched)

    def measure_update(self) -> None:
        """‖Δw‖/‖w‖ since the snapshot; tensors that did not change (the optimizer did not step
        them: gradient accumulation, a skipped AMP step, frozen) are marked not measured."""
        if self._snapshot is None:
            return
        (watched, snapshot), self._snapshot = self._snapshot, None
        current = watched.subset(p.detach() for p in watched.params)
        delta = torch.stack(torch._foreach_norm(torch._foreach_sub(current, snapshot)))
        base = torch.stack(torch._foreach_norm(snapshot))
        sharded, share = shares(watched.params)  # ratio of norms reduced over shards (FSDP2)
        self.pending["update"] = (watched.names, Squares.of_norms(delta, sharded, share),
                                  Squares.of_norms(base, sharded, share))

    def final_flags(self, watched: Watched) -> dict[str, torch.Tensor]:
        """At the end of the run: device flags for NaN/Inf anywhere in the weights and, without a
        GradScaler, in the gradients (one pass over the parameters, only at close)."""
        params = [local_part(p.detach()) for p in watched.params]  # no collective
        flags: dict[str, torch.Tensor] = {}
        if params:
            device = params[0].device
            weights = torch.stack([(~torch.isfinite(p).all()).to(device) for p in params]).any()
            flags["nonfinite_weight"] = weights | self.pending["nonfinite_weight"] \
                if "nonfinite_weight" in self.pending else weights
        grads = [local_part(p.grad.detach()) for p in watched.params if p.grad is not None]
        if grads and self.loss_scale.scaler is None:
            nonfinite = torch.stack([(~torch.isfinite(g).all()).to(grads[0].device) for g in grads]).any()
            flags["nonfinite_grad"] = nonfinite | self.pending["nonfinite_grad"] \
                if "nonfinite_grad" in self.pending else nonfinite
        return flags

    def drop_snapshot(self) -> None:
        self._snapshot = None

    def accumulate_snr(self, watched: Watched | None = None) -> None:
        """Add this step's gradients to the running SNR window (started by `sample`)."""
        if watched is None:
            if self._snr is None:
                return
            watched = self._snr[0]
        if any(p.grad is None for p in watched.params) or not watched.params:
            self._snr = None
            return
        grads = [g.float() for g in watched.subset(p.grad.detach() for p in watched.params)]
        factor = self.loss_scale.factor()
        if factor is not None:  # unscale, or a change of scale inside the window reads as noise
            grads = torch._foreach_div(grads, factor.float())
        norms = torch.stack(torch._foreach_norm(grads)).pow(2)
        if self._snr is None:
            self._snr = (watched, [g.clone() for g in grads], norms, 1)
        else:
            _, total, squares, count = self._snr
            torch._foreach_add_(total, grads)
            self._snr = (watched, total, squares + norms, count + 1)
        _, total, squares, k = self._snr
        if k == self.snr_window:
            # ‖mean g‖² and E‖g‖² are sums over coordinates: reduced over shards (FSDP2) before the
            # ratio mean² / variance is taken on the host (`snr_ratios`)
            sharded, share = shares(watched.params)
            mean_norm = torch.stack(torch._foreach_norm(total)) / k
            self.pending["snr"] = (watched.names, Squares.of_norms(mean_norm, sharded, share),
                                   Squares.of_norms((squares / k).sqrt(), sharded, share), k)
            self._snr = None

    def take(self) -> dict[str, Any]:
        pending, self.pending = self.pending, {}
        return pending
