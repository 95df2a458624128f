"""select_impl: run each lowered op with the implementation for the target.

Contract: ``select_impl(gm, example_inputs, target=...)`` retargets every lowered ``moec::`` op
node (``moec.ir.lowered.LOWERED_OPS``) to the same op in the target's namespace: ``"cpu"`` ->
``moec_cpu::`` (``moec.codegen.cpu``: sorted dispatch, one GEMM per non-empty expert, in-place
combine), ``"triton"`` -> ``moec_triton::`` (``moec.codegen.triton_ops``: kernels generated per
layer and cached on disk), ``"reference"`` -> unchanged. Signatures are identical, so only the
target changes. Canonical ops left unlowered (a ``route`` with capacity, ``dispatch``,
``shared_expert``) keep their reference bodies. Returns the graph and the number of nodes
retargeted. Numerics: implementations differ from the references by floating-point rounding
only; their tests bound it.
"""

from __future__ import annotations

import importlib
import os

import torch

from moec.ir.lowered import LOWERED_OPS
from moec.passes.util import mark, op, op_nodes

NAME = "select_impl"
TARGETS = {"reference": None, "cpu": "moec_cpu", "triton": "moec_triton"}
_MODULES = {"moec_cpu": "moec.codegen.cpu", "moec_triton": "moec.codegen.triton_ops"}


def load_target(target: str) -> str | None:
    """Import the target's implementations and return its namespace; raise if it cannot run here."""
    if target not in TARGETS:
        raise ValueError(f"moec: unknown target {target!r}; expected one of {sorted(TARGETS)}")
    namespace = TARGETS[target]
    if namespace is None:
        return None
    module = importlib.import_module(_MODULES[namespace])
    if namespace == "moec_triton":
        ok, why = module.available()
        if not ok and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
            # The user asked for the interpreter, but triton was imported before the variable was
            # set (torch._dynamo imports it): rebind triton.language's helpers to interpreted ones.
            module.enable_interpreter()
            ok, why = module.available()
        if not ok:
            raise RuntimeError(f"moec: target 'triton' cannot run here: {why}")
    return namespace


def select_impl(gm: torch.fx.GraphModule, example_inputs=None, *, target: str) -> tuple[torch.fx.GraphModule, int]:
    namespace = load_target(target)
    if namespace is None:
        return gm, 0
    changed = 0
    for name in LOWERED_OPS:
        for node in op_nodes(gm, name):
            node.target = op(name, namespace)
            mark(node, NAME, node)
            changed += 1
    gm.recompile()
    return gm, changed
