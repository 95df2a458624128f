"""The ``moec`` dynamo backend.

Contract: ``moec_backend(gm, example_inputs, options=None)`` receives a dynamo graph in which
every recognised MoE layer already appears as ``moec::`` ops (the capture hook converted the
model before tracing, see ``moec.capture.hook``), checks it with the IR verifier, and lowers it
with the inner compiler named by ``options["inner"]``:

- ``"inductor"`` (default): Inductor compiles the graph; moec ops run as their registered
  lowering (the reference on CPU) and the rest of the graph fuses around them.
- ``"aot_eager"``: AOT autograd traces forward and backward graphs, which run eagerly.
- ``"eager"``: the dynamo graph runs as is.

Registered as the ``torch_dynamo_backends`` entry point ``moec``, so
``torch.compile(model, backend="moec", options={...})`` works without importing moec.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import moec.capture  # noqa: F401  (installs the capture hook)
from moec.ir.verify import verify

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def lower(gm: torch.fx.GraphModule, example_inputs: list, inner: str):
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


def moec_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"moec: unknown inner compiler {inner!r}; expected one of {INNER_COMPILERS}")
    if options:
        raise ValueError(f"moec: unknown backend options {sorted(options)}; known: ['inner']")
    verify(gm)
    return lower(gm, example_inputs, inner)


moec_backend._moec_backend = True
