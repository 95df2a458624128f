"""Trace a model once with its MoE layers captured, without compiling it.

Contract: ``capture_graphs(model, *args, **kwargs)`` converts ``model`` (``convert_model``, on
this call), runs one call under dynamo with capture active and grad off, and returns the FX
graphs dynamo handed to the backend: what ``moec_backend`` would receive, before any pass. The
call's outputs are discarded. ``moec codegen`` and the pass tests read graphs through it.

``share_layers=True`` (what ``moec.inspect`` asks for) traces each kind of repeated layer once:
the members of a module list of identical layers (a transformer's decoder layers) become one
``torch.compiler.nested_compile_region`` each, which dynamo traces for the first and reuses for
the others, so tracing costs what the distinct layer kinds cost. Their moec ops then sit in the
region's subgraph (``invoke_subgraph``). A region must trace without a graph break: when one
does not, the call is traced again layer by layer, and the graph breaks are what that shows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from moec import _torch
from moec.capture.convert import convert_model
from moec.capture.hook import active


def capture_graphs(model: torch.nn.Module, *args: Any, share_layers: bool = False,
                   **kwargs: Any) -> list[torch.fx.GraphModule]:
    convert_model(model, (args, kwargs))
    if share_layers:
        breaks = dict(_torch.counters["graph_break"])
        try:
            with _shared_layers(model):
                return _trace(model, args, kwargs)
        except _torch.uncaptured_hop_error():
            # A region graph-breaks: trace without regions, to show where (and count it once).
            torch.compiler.reset()
            _torch.counters["graph_break"].clear()
            _torch.counters["graph_break"].update(breaks)
    return _trace(model, args, kwargs)


def _trace(model, args, kwargs) -> list[torch.fx.GraphModule]:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    record._moec_backend = True  # the capture hook converts only for moec backends
    with active(), torch.no_grad():
        _torch.dynamo_optimize(record)(model)(*args, **kwargs)
    return graphs


def _shape_key(module: nn.Module) -> tuple:
    return type(module), tuple((n, tuple(t.shape), t.dtype) for n, t in module.named_parameters())


def _repeated_layers(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Lists of at least two members of one class and tensor shapes, outermost only. (Dynamo
    decides whether a region's trace fits another member: attributes it reads, a layer index
    say, are guarded, and a member that differs is traced anew.)"""
    taken: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) or any(name.startswith(t + ".") for t in taken):
            continue
        members = list(m.children())
        if len(members) >= 2 and len({_shape_key(c) for c in members}) == 1:
            taken.append(name)
            yield members


@contextlib.contextmanager
def _shared_layers(model: nn.Module):
    region_of = getattr(torch.compiler, "nested_compile_region", None)
    if region_of is None:  # a torch without hierarchical compilation traces layer by layer
        yield
        return
    wrapped = []
    for members in _repeated_layers(model):
        cls = type(members[0])
        region = region_of(lambda self, *a, _cls=cls, **k: _cls.forward(self, *a, **k))
        for member in members:
            if "forward" in member.__dict__:
                continue  # a converted layer: its own forward decides what runs
            member.forward = (lambda m: lambda *a, **k: region(m, *a, **k))(member)
            wrapped.append(member)
    try:
        yield
    finally:
        for member in wrapped:
            del member.forward
