"""Trace a model once with its MoE layers captured, without compiling it.

Contract: ``capture_graphs(model, *args, **kwargs)`` converts ``model`` (``convert_model``, cached),
runs one call under dynamo with capture active and grad off, and returns the FX graphs dynamo
handed to the backend: what ``moec_backend`` would receive, before any pass. The call's outputs
are discarded. ``moec.inspect``, ``moec codegen`` and the pass tests read graphs through it.
"""

from __future__ import annotations

from typing import Any

import torch

from moec.capture.convert import convert_model
from moec.capture.hook import active


def capture_graphs(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[torch.fx.GraphModule]:
    convert_model(model)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    record._moec_backend = True  # the capture hook converts only for moec backends
    with active(), torch.no_grad():
        torch._dynamo.optimize(record)(model)(*args, **kwargs)
    return graphs
