"""The pass pipeline: an explicit, ordered list of named passes.

Contract: ``run_pipeline(gm, example_inputs, target=..., disable=(), check=False)`` runs, in
order, ``fuse_gating``, ``lower_grouped``, ``fuse_activation``, ``fuse_combine``,
``expert_parallel(group_name, chunks)`` (does nothing without a group), ``schedule_overlap`` (does
nothing without collectives), ``select_impl(target)``, ``lower_small`` (CPU layers with a few
tiny expert products) and ``fuse_inference`` (CPU graphs that compute no gradient) on a captured graph and returns the graph and one ``PassRecord`` per pass
(name, places changed, seconds, moec op counts before and after). A pass named in ``disable`` is
skipped (recorded with ``skipped=True``). With ``check=True`` (tests, and ``MOEC_CHECK=1``) the
verifier runs after every pass, including a fake-tensor re-propagation of the whole graph, so a
pass that breaks a shape or dtype is caught at that pass.

Every pass is ``pass_(gm, example_inputs, **cfg) -> (gm, changes)``; running a pass a second time
changes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import torch

from moec import _torch
from moec.ir.verify import moec_op_name, moec_op_namespace, node_value, verify
from moec.passes.fuse_activation import fuse_activation
from moec.passes.fuse_combine import fuse_combine
from moec.passes.fuse_gating import fuse_gating
from moec.passes.fuse_inference import fuse_inference
from moec.passes.expert_parallel import Chunks, expert_parallel
from moec.passes.lower_grouped import lower_grouped
from moec.passes.lower_small import lower_small
from moec.passes.schedule_overlap import schedule_overlap
from moec.passes.select_impl import select_impl

PassFn = Callable[..., tuple[torch.fx.GraphModule, int]]


def passes(target: str, group_name: Optional[str] = None, chunks: Chunks = 1,
           nodes: Optional[tuple[str, str, int]] = None, replica_balance: str = "static") -> list[tuple[str, PassFn]]:
    return [
        ("fuse_gating", fuse_gating),
        ("lower_grouped", lower_grouped),
        ("fuse_activation", fuse_activation),
        ("fuse_combine", fuse_combine),
        ("expert_parallel", functools.partial(expert_parallel, group_name=group_name, chunks=chunks, nodes=nodes,
                                              replica_balance=replica_balance)),
        ("schedule_overlap", schedule_overlap),
        ("select_impl", functools.partial(select_impl, target=target)),
        ("lower_small", lower_small),
        ("fuse_inference", fuse_inference),
    ]


PASS_NAMES = tuple(name for name, _ in passes("reference"))


@dataclasses.dataclass
class PassRecord:
    name: str
    changes: int
    seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    skipped: bool = False


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """moec op nodes by ``namespace::name``."""
    counts = collections.Counter(
        f"{moec_op_namespace(n)}::{moec_op_name(n)}" for n in gm.graph.nodes if moec_op_name(n) is not None
    )
    return dict(sorted(counts.items()))


def repropagate(gm: torch.fx.GraphModule) -> None:
    """Re-run fake-tensor propagation over the graph from its placeholders' recorded values."""
    FakeTensor = _torch.fake_tensor()
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [node_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {id(t.fake_mode): t.fake_mode for t in inputs if isinstance(t, FakeTensor)}
    if len(modes) != 1 or any(i is None for i in inputs):
        return  # a graph traced without fake values (hand-built in tests): nothing to re-propagate
    (mode,) = modes.values()
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def check_graph(gm: torch.fx.GraphModule) -> None:
    repropagate(gm)
    verify(gm)


def run_pipeline(
    gm: torch.fx.GraphModule,
    example_inputs: Optional[list] = None,
    *,
    target: str,
    disable: Sequence[str] = (),
    check: bool = False,
    group_name: Optional[str] = None,
    chunks: Chunks = 1,
    nodes: Optional[tuple[str, str, int]] = None,
    replica_balance: str = "static",
) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
    unknown = sorted(set(disable) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"moec: unknown passes {unknown} in disable; passes: {list(PASS_NAMES)}")
    records = []
    for name, fn in passes(target, group_name, chunks, nodes, replica_balance):
        before = op_counts(gm)
        if name in disable:
            records.append(PassRecord(name, 0, 0.0, before, before, skipped=True))
            continue
        start = time.perf_counter()
        gm, changes = fn(gm, example_inputs)
        seconds = time.perf_counter() - start
        if check:
            check_graph(gm)
        records.append(PassRecord(name, changes, seconds, before, op_counts(gm)))
    return gm, records
