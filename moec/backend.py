"""The ``moec`` dynamo backend.

Contract: ``moec_backend(gm, example_inputs, options=None)`` receives a dynamo graph in which
every recognised MoE layer already appears as ``moec::`` ops (the capture hook converted the
model before tracing, see ``moec.capture.hook``), checks it with the IR verifier, and lowers it
with the inner compiler named by ``options["inner"]``:

- ``"inductor"`` (default): Inductor compiles the graph; moec ops run as their registered
  lowering (the reference on CPU) and the rest of the graph fuses around them.
- ``"aot_eager"``: AOT autograd traces forward and backward graphs, which run eagerly.
- ``"eager"``: the dynamo graph runs as is.

Before lowering, the pass pipeline (``moec.passes.pipeline``) rewrites the graph into the
grouped-GEMM form and picks the implementation of the lowered ops by ``options["target"]``:
``"auto"`` (default: ``"triton"`` when the graph's inputs are on a CUDA device, else ``"cpu"``),
``"cpu"``, ``"triton"`` or ``"reference"`` (the ops' plain-PyTorch bodies). ``options["disable"]``
names passes to skip; ``MOEC_CHECK=1`` verifies the graph after every pass.

Registered as the ``torch_dynamo_backends`` entry point ``moec``, so
``torch.compile(model, backend="moec", options={...})`` works without importing moec.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

import moec.capture  # noqa: F401  (installs the capture hook)
from moec.ir.verify import verify
from moec.passes.pipeline import run_pipeline

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def lower(gm: torch.fx.GraphModule, example_inputs: list, inner: str):
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


TARGETS = ("auto", "cpu", "triton", "reference")
_OPTIONS = ("inner", "target", "disable")


def resolve_target(target: str, example_inputs: list) -> str:
    if target not in TARGETS:
        raise ValueError(f"moec: unknown target {target!r}; expected one of {TARGETS}")
    if target != "auto":
        return target
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "triton" if on_cuda else "cpu"


def moec_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"moec: unknown backend options {unknown}; known: {list(_OPTIONS)}")
    inner = options.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"moec: unknown inner compiler {inner!r}; expected one of {INNER_COMPILERS}")
    target = resolve_target(options.get("target", "auto"), example_inputs)
    verify(gm)
    gm, records = run_pipeline(gm, example_inputs, target=target, disable=tuple(options.get("disable", ())),
                               check=os.environ.get("MOEC_CHECK") == "1")
    gm.meta["moec_passes"] = records
    return lower(gm, example_inputs, inner)


moec_backend._moec_backend = True
