"""``moec optimize [SPEC] --world-size N``: the expert-parallel schedule the cost model picks for each
MoE layer of a model, and why; ``--simulate`` adds the predicted step times at 8 to 2,048 ranks.

Contract: ``optimize_main(opts)`` prints, per MoE layer, the chosen chunk count r, flat or
hierarchical all-to-all, what overlaps what, the predicted sequential and moec times and exposed
communication, and the cost model's explanation (its sympy expression and the numbers that
decided), then the model's totals. ``--json`` prints one JSON document instead, and nothing else on
stdout. The calibration is ``--calibration FILE``, else the one stored for this machine
(``python -m moec.runtime.calibrate``), else the documented assumed defaults; the output says which.
A problem the user can fix raises ``OptimizeError`` (one line; ``moec`` exits 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

DEFAULT_TOKENS = 4096
DEFAULT_RANKS_PER_NODE = 8
DEFAULT_MAX_CHUNKS = 8


class OptimizeError(Exception):
    """A bad option value or model for ``moec optimize``; the message is one line."""


def add_arguments(p: argparse.ArgumentParser, spec_help: str) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC", help=spec_help)
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="expert-parallel ranks")
    p.add_argument("--ranks-per-node", type=int, default=DEFAULT_RANKS_PER_NODE, metavar="M",
                   help="ranks per node (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="T",
                   help="tokens per rank per step (default: %(default)s)")
    p.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS, metavar="R",
                   help="most chunks the pipeline may use (default: %(default)s)")
    p.add_argument("--skew", type=float, default=1.0, metavar="S",
                   help="busiest rank's routed load over the mean; 1 is uniform routing (default: %(default)s)")
    p.add_argument("--calibration", metavar="FILE",
                   help="a calibration JSON (default: the one stored for this machine by "
                        "`python -m moec.runtime.calibrate`, else assumed defaults)")
    p.add_argument("--simulate", action="store_true",
                   help="also predict step times at 8..2048 ranks, 4 or 8 per node: sequential, Tutel-style "
                        "fixed r, moec")
    p.add_argument("--json", action="store_true", help="print one JSON document (and nothing else) on stdout")


def _check(opts) -> None:
    for flag, value, least in (("--world-size", opts.world_size, 1), ("--ranks-per-node", opts.ranks_per_node, 1),
                               ("--tokens", opts.tokens, 1), ("--max-chunks", opts.max_chunks, 1)):
        if value < least:
            raise OptimizeError(f"{flag} must be at least {least}, got {value}")
    if opts.skew < 1:
        raise OptimizeError(f"--skew is the busiest rank's load over the mean, at least 1; got {opts.skew}")
    if opts.world_size > opts.ranks_per_node and opts.world_size % opts.ranks_per_node:
        raise OptimizeError(f"--world-size {opts.world_size} does not fill nodes of --ranks-per-node "
                            f"{opts.ranks_per_node}: use a multiple of it, or at most one node")


def _calibration(opts):
    from moec.runtime.cost_model import Calibration

    if opts.calibration:
        try:
            return Calibration.load(opts.calibration), f"--calibration {opts.calibration}"
        except ValueError as e:
            raise OptimizeError(str(e).removeprefix("moec: ")) from None
    try:
        return Calibration.for_this_machine()
    except ValueError as e:
        why = str(e).removeprefix("moec: ")
        raise OptimizeError(f"{why} (delete it, recalibrate, or pass --calibration)") from None


def optimize_main(opts) -> int:
    from moec.models.spec import load_spec
    from moec.runtime.cost_model import LayerShape, choose_schedule
    from moec.runtime.simulate import format_table, simulate

    _check(opts)
    calib, source = _calibration(opts)
    with contextlib.redirect_stdout(sys.stderr):  # chatter from model code stays off stdout
        model, _, _ = load_spec(opts.spec)
        shapes = LayerShape.from_model(model, tokens=opts.tokens)
    if not shapes:
        raise OptimizeError(f"no MoE layer found in {opts.spec} (`moec inspect {opts.spec}` says why)")
    schedules = [choose_schedule(s, opts.world_size, opts.ranks_per_node, calib, opts.max_chunks, skew=opts.skew)
                 for s in shapes]
    model_seq = sum(s.predicted["sequential"] for s in schedules)
    model_moec = sum(s.predicted["moec"] for s in schedules)
    rows = simulate(shapes, calib, max_chunks=opts.max_chunks, skew=opts.skew) if opts.simulate else None

    if opts.json:
        doc = dict(spec=opts.spec, world_size=opts.world_size, ranks_per_node=opts.ranks_per_node,
                   tokens_per_rank=opts.tokens, skew=opts.skew, calibration_source=source,
                   calibration=calib.to_dict(), layers=[s.to_dict() for s in schedules],
                   model=dict(sequential_s=model_seq, moec_s=model_moec))
        if rows is not None:
            doc["simulation"] = rows
        print(json.dumps(doc, indent=2))
        return 0

    P = min(opts.ranks_per_node, opts.world_size)
    print(f"moec optimize {opts.spec}: {len(shapes)} MoE layer(s), {opts.world_size} rank(s), {P} per node, "
          f"{opts.tokens} tokens per rank, forward")
    print(f"calibration: {source}")
    print(f"  {calib.describe()}")
    print()
    print(_layer_table(schedules))
    print(f"model (MoE layers): sequential {model_seq * 1e3:.4g} ms, moec {model_moec * 1e3:.4g} ms "
          f"({model_seq / model_moec:.2f}x)")
    seen: dict = {}
    for s in schedules:
        print()
        key = dataclasses.replace(s.shape, name="")
        if key in seen:
            print(f"{s.shape.name}: same shape as {seen[key]}, same schedule and reasons")
            continue
        seen[key] = s.shape.name
        print(s.explain())
    if rows is not None:
        print()
        print(f"simulated forward step (MoE layers, {opts.tokens} tokens per rank; Tutel: fixed r, flat a2a):")
        print(format_table(rows))
    return 0


def _layer_table(schedules) -> str:
    heads = ["layer", "r", "a2a", "overlaps", "sequential ms", "moec ms", "exposed comm ms (seq)"]
    body = [[s.shape.name, str(s.chunks), "hierarchical" if s.hierarchical else "flat", "; ".join(s.overlaps()),
             f"{s.predicted['sequential'] * 1e3:.4g}", f"{s.predicted['moec'] * 1e3:.4g}",
             f"{s.predicted['exposed_comm'] * 1e3:.3g} ({s.predicted['exposed_comm_sequential'] * 1e3:.3g})"]
            for s in schedules]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
