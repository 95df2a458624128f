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
from moec.passes.pipeline import PASS_NAMES, run_pipeline

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
    """A checked target (see ``check_options``), with "auto" decided by the inputs' device."""
    if target != "auto":
        return target
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "triton" if on_cuda else "cpu"


def check_options(options: Optional[dict[str, Any]], who: str = "moec") -> dict[str, Any]:
    """The backend options with their defaults, after checking each (``who`` prefixes the errors)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"{who}: unknown backend options {unknown}; known: {list(_OPTIONS)}")
    inner = options.setdefault("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"{who}: unknown inner compiler {inner!r}; expected one of {INNER_COMPILERS}")
    target = options.setdefault("target", "auto")
    if target not in TARGETS:
        raise ValueError(f"{who}: unknown target {target!r}; expected one of {TARGETS}")
    options["disable"] = tuple(options.get("disable", ()))
    unknown_passes = sorted(set(options["disable"]) - set(PASS_NAMES))
    if unknown_passes:
        raise ValueError(f"{who}: unknown passes {unknown_passes} in disable; passes: {list(PASS_NAMES)}")
    return options


def moec_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = check_options(options)
    target = resolve_target(options["target"], example_inputs)
    verify(gm)
    gm, records = run_pipeline(gm, example_inputs, target=target, disable=options["disable"],
                               check=os.environ.get("MOEC_CHECK") == "1")
    gm.meta["moec_passes"] = records
    return lower(gm, example_inputs, options["inner"])


moec_backend._moec_backend = True
