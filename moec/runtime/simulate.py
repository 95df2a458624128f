"""Predicted step time of a model's MoE layers at scale, from the cost model: sequential vs moec's
chosen schedule vs Tutel-style fixed chunking.

Contract: ``simulate(shapes, calib)`` returns one row (a dict) per world size (8 to 2,048 ranks,
powers of two), node size (4 or 8 ranks per node) and group of identical layers, plus a ``model``
row per world and node size summing every layer; times are seconds per forward of the layer (per
layer of the group) or of all the model's MoE layers. ``format_table(rows)`` prints them. Nothing
is run: every number is ``moec.runtime.cost_model.predict`` / ``choose_schedule``.

Columns:

- ``sequential``: ``ep_moe`` as it is: counts, dispatch, experts, combine, shared expert, one
  after the other, flat all-to-all.
- ``tutel r=2`` / ``tutel r=4``: Tutel's overlap with a fixed chunk count r (its
  ``overlap_degree``), flat all-to-all (Tutel's 2D-hierarchical all-to-all is an opt-in flag,
  ``use_2dh``, off by default and so off here), shared expert not overlapped.
- ``moec``: ``choose_schedule`` (r up to ``max_chunks``, hierarchical when it wins, shared expert
  under the dispatch), with its schedule in ``moec_schedule`` (e.g. ``r=2 H`` = two chunks,
  hierarchical; ``+S`` = shared expert overlapped).

What the model leaves out is listed in ``moec.runtime.cost_model``'s docstring: the step time here is
the MoE layers' forward only, with uniform routing unless ``skew`` says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moec.runtime.cost_model import Calibration, LayerShape, choose_schedule, predict

__all__ = ["NODE_SIZES", "TUTEL_CHUNKS", "WORLD_SIZES", "format_table", "simulate"]

WORLD_SIZES = tuple(2**i for i in range(3, 12))  # 8 .. 2048
NODE_SIZES = (4, 8)
TUTEL_CHUNKS = (2, 4)


def _groups(shapes: Sequence[LayerShape]) -> list[tuple[str, LayerShape, int]]:
    """Identical layers (all but the name) once: ``(label, shape, count)`` in first-seen order."""
    groups: dict[LayerShape, list[str]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(dataclasses.replace(s, name=""), []).append(s.name or f"layer {i}")
    out = []
    for shape, names in groups.items():
        label = names[0] if len(names) == 1 else f"{names[0]} (x{len(names)})"
        out.append((label, dataclasses.replace(shape, name=names[0]), len(names)))
    return out


def _schedule_label(chunks: int, hierarchical: bool, overlap_shared: bool) -> str:
    return f"r={chunks}" + (" H" if hierarchical else "") + (" +S" if overlap_shared else "")


def simulate(shapes: Sequence[LayerShape], calib: Calibration, *, world_sizes: Sequence[int] = WORLD_SIZES,
             node_sizes: Sequence[int] = NODE_SIZES, tutel_chunks: Sequence[int] = TUTEL_CHUNKS,
             max_chunks: int = 8, skew: float = 1.0) -> list[dict[str, Any]]:
    """Rows as described in the module docstring; keys: ``world_size``, ``ranks_per_node``,
    ``layer``, ``count``, ``sequential_s``, ``tutel_s`` ({r: seconds}), ``moec_s``,
    ``moec_schedule``, ``exposed_comm_s``, ``exposed_comm_sequential_s``."""
    if not shapes:
        raise ValueError("moec: nothing to simulate: no MoE layer")
    rows = []
    groups = _groups(shapes)
    for nodes in node_sizes:
        for world in world_sizes:
            total = dict(sequential_s=0.0, moec_s=0.0, exposed_comm_s=0.0, exposed_comm_sequential_s=0.0,
                         tutel_s={r: 0.0 for r in tutel_chunks})
            schedules = []
            for label, shape, count in groups:
                sched = choose_schedule(shape, world, nodes, calib, max_chunks, skew=skew)
                tutel = {r: predict(shape, world, nodes, calib, chunks=min(r, shape.tokens), skew=skew)["time"]
                         for r in tutel_chunks}
                label_s = _schedule_label(sched.chunks, sched.hierarchical, sched.overlap_shared)
                schedules.append(label_s)
                row = dict(world_size=world, ranks_per_node=nodes, layer=label, count=count,
                           sequential_s=sched.predicted["sequential"], tutel_s=tutel, moec_s=sched.predicted["moec"],
                           moec_schedule=label_s, exposed_comm_s=sched.predicted["exposed_comm"],
                           exposed_comm_sequential_s=sched.predicted["exposed_comm_sequential"])
                rows.append(row)
                for k in ("sequential_s", "moec_s", "exposed_comm_s", "exposed_comm_sequential_s"):
                    total[k] += count * row[k]
                for r in tutel_chunks:
                    total["tutel_s"][r] += count * tutel[r]
            rows.append(dict(world_size=world, ranks_per_node=nodes, layer="model",
                             count=sum(c for _, _, c in groups), moec_schedule=" | ".join(schedules), **total))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Milliseconds; ``x seq`` / ``x tutel`` are moec's speedups over sequential and over the
    better Tutel column."""
    tutel_rs = sorted({r for row in rows for r in row["tutel_s"]})
    heads = (["ranks", "node", "layer", "sequential ms"] + [f"tutel r={r} ms" for r in tutel_rs]
             + ["moec ms", "moec schedule", "x seq", "x tutel", "exposed comm ms (seq)"])
    body = []
    for row in rows:
        best_tutel = min(row["tutel_s"].values()) if row["tutel_s"] else float("nan")
        body.append([
            str(row["world_size"]), str(row["ranks_per_node"]), row["layer"], f"{row['sequential_s'] * 1e3:.4g}",
            *(f"{row['tutel_s'][r] * 1e3:.4g}" for r in tutel_rs),
            f"{row['moec_s'] * 1e3:.4g}", row["moec_schedule"], f"{row['sequential_s'] / row['moec_s']:.2f}",
            f"{best_tutel / row['moec_s']:.2f}",
            f"{row['exposed_comm_s'] * 1e3:.3g} ({row['exposed_comm_sequential_s'] * 1e3:.3g})",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
