"""Compact printing of the moec ops of a graph (golden tests, ``moec inspect --graph``).

Contract: ``format_moec_ops(gm)`` lists the moec op nodes in graph order, one per line, as
``opN = namespace::op(args)``. Names do not depend on how the graph was traced: a moec op's
result is ``opN`` (N counts that op), an output of it ``opN[i]``, any other value its fake
tensor's dtype and shape (``f32[16, 64]``) or ``%`` when the graph recorded none. The rest of the
graph is omitted.
"""

from __future__ import annotations

import operator

import torch

from moec.ir.verify import moec_op_name, moec_op_namespace, node_value


_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
           torch.float64: "f64", torch.int32: "i32", torch.bool: "b8"}


def format_moec_ops(gm: torch.fx.GraphModule) -> str:
    names: dict[torch.fx.Node, str] = {}
    seen: dict[str, int] = {}
    lines = []

    def arg(a) -> str:
        if isinstance(a, torch.fx.Node):
            if a in names:
                return names[a]
            if a.op == "call_function" and a.target is operator.getitem and a.args[0] in names:
                return f"{names[a.args[0]]}[{a.args[1]}]"
            val = node_value(a)
            if isinstance(val, torch.Tensor):
                return f"{_DTYPES.get(val.dtype, str(val.dtype))}{list(val.shape)}"
            return "%"
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        return repr(a)

    for node in gm.graph.nodes:
        name = moec_op_name(node)
        if name is None:
            continue
        names[node] = f"{name}{seen.get(name, 0)}"
        seen[name] = seen.get(name, 0) + 1
        lines.append(f"{names[node]} = {moec_op_namespace(node)}::{name}({', '.join(arg(a) for a in node.args)})")
    return "\n".join(lines)
