"""The routing profiler: records which experts a model's routers pick, per MoE layer and window,
as a ``RoutingTrace`` (``moec.runtime.trace``, whose docstring documents the file format).

Legend: T tokens of one forward (on this rank), K top-k, E experts, W windows, L MoE layers,
R ranks.

Contract
--------
* ``RoutingProfiler(window_tokens=None, source=None)`` accumulates, per window and MoE layer:
  the slots routed to each expert (``load``), and for consecutive layers the (expert at l, expert
  at l+1) pairs of the same tokens (``affinity``). A dropped slot (index -1, expert capacity) is
  not counted.
* Recording, two ways that count the same:

  - compiled: ``moec.compile(model, profile=profiler)``. The pass ``moec.passes.profile_routing``
    puts ``moec::record_routing(idx_TK, profiler_id, layer, E)`` after every ``moec::route``: an
    op with a registered ordered side effect, so AOT autograd and Inductor keep it, in the same
    graph (no graph break). Forward only: the backward records nothing.
  - eager: ``with profiler.recording(model): model(x)`` runs the model's converted MoE layers
    (``moec.capture.convert_model``; they reproduce the model's own forward) and taps every
    ``moec::route`` as it runs (a ``TorchDispatchMode``), attributing it to the MoE layer module
    being run. Used by ``moec profile``.

  ``record(layer, idx_TK, num_experts)`` is what both call; tests and other runtimes may call it.
* Layers are named by their module path (``convert_model``'s ``MoELayer.name``) and ordered by
  first record, which is execution order. "Consecutive" means consecutive in that order.
* Pairs: token t with choices A_t at layer l and B_t at layer l+1 adds one to
  ``affinity[l, a, b]`` for each a in A_t and b in B_t: with top-k, a token contributes k*k pairs,
  so when every token reaches both layers ``affinity[l].sum(1) == k * load[l]`` and
  ``affinity[l].sum(0) == k * load[l+1]``. Tokens are matched by position: layer l+1's record is
  paired with the last record of layer l in the same forward when both have the same T (as in
  every transformer); a record with a different T, or whose previous layer was not recorded in this
  forward, adds load only.
* A forward starts when the first layer records. Windows: with ``window_tokens`` a new window
  opens at the start of a forward once the current one holds at least ``window_tokens`` tokens at
  the first layer (forwards are not split: a window holds whole forwards); without it, a window
  lasts until ``next_window()``. A trailing window with nothing recorded is left out of the trace.
* Distributed (``torch.distributed`` initialised, more than one rank in ``group``): ``trace()`` and
  ``save()`` are collective; every rank gets the same trace: load and affinity summed over ranks and
  ``source`` [W, L, R, E] holding each rank's own load (its tokens are the ones it fed). Ranks must
  record the same layers; a rank with fewer windows contributes zeros to the rest.
* ``trace()`` raises ``TraceError`` when nothing was recorded or layers differ in expert count.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import weakref
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from moec import _torch
from moec.runtime.trace import RoutingTrace, TraceError

EffectType = _torch.effect_type()
TorchDispatchMode = _torch.dispatch_mode()

__all__ = ["RoutingProfiler", "record_routing"]

_PROFILERS: "weakref.WeakValueDictionary[int, RoutingProfiler]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


@torch.library.custom_op("moec::record_routing", mutates_args=())
def record_routing(idx_TK: Tensor, profiler: int, layer: str, num_experts: int) -> None:
    """Hand one layer's top-k choices to the live profiler numbered ``profiler`` (nothing if it
    is gone)."""
    target = _PROFILERS.get(profiler)
    if target is not None:
        target.record(layer, idx_TK, num_experts)


@record_routing.register_fake
def _record_routing_fake(idx_TK, profiler, layer, num_experts) -> None:
    return None


# Without an effect the op (no outputs, no mutation) would be dead code to AOT autograd and Inductor.
torch.library._register_effectful_op("moec::record_routing", EffectType.ORDERED)


class _Window:
    """Counts of one window, by layer position."""

    def __init__(self) -> None:
        self.load: dict[int, np.ndarray] = {}  # position -> [E]
        self.pairs: dict[int, np.ndarray] = {}  # position l -> [E, E] between l and l+1
        self.tokens = 0  # tokens at the first layer

    def empty(self) -> bool:
        return not self.load


class RoutingProfiler:
    """Per-window expert loads and consecutive-layer pairs of a running model (module docstring)."""

    def __init__(self, window_tokens: Optional[int] = None, source: Optional[str] = None) -> None:
        if window_tokens is not None and (isinstance(window_tokens, bool) or not isinstance(window_tokens, int)
                                          or window_tokens < 1):
            raise ValueError(f"moec: window_tokens must be a positive int or None, got {window_tokens!r}")
        self.window_tokens = window_tokens
        self.source = source
        self.id = next(_IDS)
        _PROFILERS[self.id] = self
        self.bound_layers: dict[str, int] = {}  # module path -> E, from bind()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (bound layers are kept)."""
        self.layers: list[str] = []
        self._experts: list[int] = []
        self._top_k: list[set[int]] = []
        self._windows: list[_Window] = [_Window()]
        self._prev: dict[int, np.ndarray] = {}

    # -- recording -----------------------------------------------------------------------------

    def bind(self, model: torch.nn.Module) -> list[str]:
        """Learn ``model``'s MoE layers (converting it, as ``moec.compile`` does) so that compiled
        graphs name layers as eager recording does. Returns the layer names."""
        from moec.capture import convert_model

        for layer in convert_model(model).layers:
            self.bound_layers[layer.name] = layer.num_experts
        return list(self.bound_layers)

    def next_window(self) -> None:
        """Close the current window (if it holds anything) and start the next."""
        if not self._windows[-1].empty():
            self._windows.append(_Window())
        self._prev.clear()

    def record(self, layer: str, idx_TK: Tensor | np.ndarray, num_experts: int) -> None:
        """Count one forward of one MoE layer: ``idx_TK`` the experts each token chose (-1:
        dropped)."""
        if isinstance(idx_TK, Tensor):
            idx_TK = idx_TK.detach().to("cpu", torch.int64).numpy()
        idx_TK = np.asarray(idx_TK, dtype=np.int64)
        idx_TK = idx_TK.reshape(-1, idx_TK.shape[-1] if idx_TK.ndim else 1)
        E = int(num_experts)
        bad = idx_TK[(idx_TK >= E) | (idx_TK < -1)]
        if bad.size:
            raise ValueError(f"moec: layer {layer} routed to expert {int(bad[0])} but has {E} experts "
                             f"(0..{E - 1}, or -1 for a dropped slot)")
        if layer not in self.layers:
            self.layers.append(layer)
            self._experts.append(E)
            self._top_k.append(set())
        pos = self.layers.index(layer)
        if self._experts[pos] != E:
            raise ValueError(f"moec: layer {layer} recorded with {E} experts, earlier with {self._experts[pos]}")
        T, K = idx_TK.shape
        self._top_k[pos].add(K)
        if pos == 0:  # a forward starts
            if self.window_tokens is not None and self._windows[-1].tokens >= self.window_tokens:
                self._windows.append(_Window())
            self._prev.clear()
            self._windows[-1].tokens += T
        window = self._windows[-1]
        valid_TK = idx_TK >= 0
        window.load[pos] = window.load.get(pos, 0) + np.bincount(idx_TK[valid_TK], minlength=E)
        prev_TK = self._prev.get(pos - 1)
        if prev_TK is not None and prev_TK.shape[0] == T and self._experts[pos - 1] == E:
            # token t's (a, b) for each of its choices a at layer pos-1 and b at pos: k*k pairs
            valid_TKK = (prev_TK >= 0)[:, :, None] & valid_TK[:, None, :]
            pair_TKK = prev_TK[:, :, None] * E + idx_TK[:, None, :]
            pairs_EE = np.bincount(pair_TKK[valid_TKK], minlength=E * E).reshape(E, E)
            window.pairs[pos - 1] = window.pairs.get(pos - 1, 0) + pairs_EE
        self._prev[pos] = idx_TK

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator["RoutingProfiler"]:
        """Eager recording: inside the block, calls of ``model`` run its converted MoE layers and
        every route they take is recorded."""
        from moec.capture import hook

        self.bind(model)
        modules = dict(model.named_modules())
        running: list[str] = []
        handles = []

        def leave(module, args, out) -> None:  # returns None: the module's output is kept
            running.pop()

        for name in self.bound_layers:
            module = model if name == "<root>" else modules.get(name)
            if module is None:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: running.append(_n)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        try:
            with hook.active(), _RouteTap(self, running):
                yield self
        finally:
            for h in handles:
                h.remove()

    # -- the trace -----------------------------------------------------------------------------

    def _local_state(self) -> dict[str, Any]:
        windows = list(self._windows)
        while windows and windows[-1].empty():
            windows.pop()
        return dict(layers=list(self.layers), experts=list(self._experts),
                    top_k=[sorted(k) for k in self._top_k],
                    windows=[(dict(w.load), dict(w.pairs)) for w in windows])

    def trace(self, group: Any = None) -> RoutingTrace:
        """The recorded trace; collective over ``group`` (default: the world) when distributed."""
        state = self._local_state()
        states = [state]
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            states = [None] * dist.get_world_size(group)
            dist.all_gather_object(states, state, group=group)
        return _build_trace(states, self._meta(), distributed=len(states) > 1)

    def _meta(self) -> dict:
        return dict(source=self.source or "profile", window_tokens=self.window_tokens)

    def save(self, path: str | os.PathLike, group: Any = None) -> str:
        """``trace(group).save(path)`` (collective when distributed; every rank writes ``path``
        unless only rank 0 should: then call ``trace()`` everywhere and save on rank 0)."""
        return self.trace(group).save(path)


def _build_trace(states: list[dict], meta: dict, distributed: bool) -> RoutingTrace:
    recorded = [s for s in states if s["layers"]]
    if not recorded:
        raise TraceError("the profiler recorded nothing: run the model (compiled with profile=, or inside "
                         "profiler.recording(model)) before asking for its trace")
    layers, experts = recorded[0]["layers"], recorded[0]["experts"]
    for r, s in enumerate(states):
        if s["layers"] and (s["layers"] != layers or s["experts"] != experts):
            raise TraceError(f"rank {r} recorded layers {s['layers']} but another rank {layers}; every rank "
                             "must run the same MoE layers")
    if len(set(experts)) != 1:
        raise TraceError(f"the MoE layers have different expert counts {dict(zip(layers, experts))}; a trace "
                         "holds layers of one expert count: profile them separately")
    E, L, R = experts[0], len(layers), len(states)
    W = max(len(s["windows"]) for s in states)
    source_WLRE = np.zeros((W, L, R, E), dtype=np.int64)
    affinity_WLEE = np.zeros((W, max(L - 1, 0), E, E), dtype=np.int64)
    for r, s in enumerate(states):
        for w, (load, pairs) in enumerate(s["windows"]):
            for pos, load_E in load.items():
                source_WLRE[w, pos, r] += load_E
            for pos, pairs_EE in pairs.items():
                affinity_WLEE[w, pos] += pairs_EE
    top_ks = set().union(*(set(k) for s in recorded for k in s["top_k"]))
    meta = dict(meta, top_k=top_ks.pop() if len(top_ks) == 1 else None, layer_names=list(layers))
    return RoutingTrace(source_WLRE.sum(axis=2), affinity_WLEE, source_WLRE if distributed else None, meta)


class _RouteTap(TorchDispatchMode):
    """Records the output of every ``moec::route`` run while a bound MoE layer module runs."""

    def __init__(self, profiler: RoutingProfiler, running: list[str]) -> None:
        super().__init__()
        self.profiler, self.running = profiler, running

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.moec.route.default and self.running:
            layer = self.running[-1]
            self.profiler.record(layer, out[1], self.profiler.bound_layers.get(layer, args[0].shape[-1]))
        return out


_STACK_KEY = re.compile(r"^[LG]\['[^']*'\]\.?")


def module_path(stack_path: str) -> str:
    """A dynamo ``nn_module_stack`` path (``L['self'].layers[0].moe``) as a module path
    (``layers.0.moe``), relative to the compiled module."""
    path = _STACK_KEY.sub("", stack_path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".") or "<root>"
