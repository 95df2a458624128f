"""``moec place TRACE --world-size N --ranks-per-node M --slots S``: plan expert placement on a
routing trace with moec's optimiser and score it beside the baselines (contiguous, round-robin,
EPLB hierarchical and global).

Contract: ``place_main(opts)`` plans every method on window ``--window`` i of TRACE (a ``.npz``
trace or ``synthetic:NAME``) and scores all of them on window i+1 (the same window only when the
trace has one, which the output then says), with ``moec.passes.placement_score``. With ``--history D`` (default 0.5) every method, moec and each
baseline alike, plans on the moving average of windows 0..i (window j weighted D^(i-j)), never on
window i+1; the output says which. Scores: per layer and in
total, max/mean rank load, cross-rank and cross-node pair fractions, all-to-all bytes, simulated
step time (cost model; ``Calibration.default()``, assumed H100-class constants, unless
``--calibration``), weights moved from ``--previous``; moec's plan is scored with the
``--replica-balance`` it is written with (adaptive: the runtime re-balances replicas per step,
``moec.compile``'s ``replica_balance``; static; default auto, the one predicted faster on the
planning windows), the baselines with their own shares; and the traffic floor of the scored window
(``traffic_floor``: no plan with S slots per rank and max/mean <= 1.05 crosses ranks or nodes
less). It writes moec's plan as JSON (format in
``moec.runtime.plan``) to ``--out`` (default ``moec-plan-<trace>.json`` in the current directory)
and, with ``--plot``, a load heat map PNG. ``--json`` prints one JSON document and nothing else on
stdout. A problem the user can fix raises ``PlaceError`` (one line; ``moec`` exits 2).

The heat map is written without matplotlib (not a dependency): an 8-bit greyscale PNG, one block
per method in the printed order, separated by a white band; in a block, one row of cells per layer
(layer 0 on top) and one column per rank; darker is more load: white 0, black >= 2x the mean rank
load, mid-grey the mean.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

DEFAULT_TOKENS = 4096
FLOOR_MAX_MEAN = 1.05  # the balance the printed traffic floor assumes (issue 6's max/mean target)


class PlaceError(Exception):
    """A bad option, trace or plan for ``moec place``; the message is one line."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help="a routing trace: a .npz file (moec profile, moec.runtime.trace) "
                                                  "or synthetic:NAME (a shipped preset, e.g. synthetic:zipf64-affinity)")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="expert-parallel ranks")
    p.add_argument("--ranks-per-node", type=int, required=True, metavar="M", help="ranks per node")
    p.add_argument("--slots", type=int, required=True, metavar="S",
                   help="expert slots per rank; N*S must cover the experts, the rest holds replicas")
    p.add_argument("--previous", metavar="PLAN", help="the plan in use: moec keeps weights where they are when it "
                                                      "costs at most 2%% predicted step time; weights moved are counted from it")
    p.add_argument("--out", metavar="PLAN.json", help="where to write moec's plan (default: moec-plan-<trace>.json)")
    p.add_argument("--window", type=int, default=0, metavar="I",
                   help="plan on window I, score on window I+1 (default: %(default)s)")
    p.add_argument("--history", type=float, default=None, metavar="D",
                   help="every method (moec and each baseline) plans on the moving average of windows <= I, window "
                        "j weighted D^(I-j); 0 plans on window I alone (default: 0.5); never on window I+1")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="T",
                   help="tokens per rank per step the scores are scaled to (default: %(default)s)")
    p.add_argument("--calibration", metavar="FILE", help="a calibration JSON (default: the assumed H100-class constants)")
    p.add_argument("--replica-balance", choices=("auto", "adaptive", "static"), default="auto",
                   help="how moec's plan splits a replicated expert's tokens at run time, written into the plan and "
                        "scored so: adaptive (shares re-balanced on every step's routing, at an all-reduce and host "
                        "time per layer), static (the plan's shares), auto (the one of lower predicted step time on "
                        "the planning windows) (default: %(default)s)")
    p.add_argument("--plot", metavar="FILE.png", help="also write a load heat map (ranks x layers per method)")
    p.add_argument("--json", action="store_true", help="print one JSON document (and nothing else) on stdout")
    # `moec` fills a missing model spec for the commands that take one; this one takes a trace.
    p.set_defaults(spec="")


def _check(opts) -> None:
    for flag, value in (("--world-size", opts.world_size), ("--ranks-per-node", opts.ranks_per_node),
                        ("--slots", opts.slots), ("--tokens", opts.tokens)):
        if value < 1:
            raise PlaceError(f"{flag} must be at least 1, got {value}")
    if opts.world_size > opts.ranks_per_node and opts.world_size % opts.ranks_per_node:
        raise PlaceError(f"--world-size {opts.world_size} does not fill nodes of --ranks-per-node "
                         f"{opts.ranks_per_node}: use a multiple of it, or at most one node")


def _default_out(trace_arg: str) -> str:
    stem = trace_arg.removeprefix("synthetic:")
    stem = Path(stem).stem if stem.endswith(".npz") else stem
    return f"moec-plan-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem) or 'trace'}.json"


def place_main(opts) -> int:
    from moec.passes.placement import DEFAULT_HISTORY, PlacementOptions, compare, scoring_window
    from moec.passes.placement_score import ScoreConfig, traffic_floor
    from moec.runtime.cost_model import Calibration
    from moec.runtime.plan import PlacementPlan, PlanError
    from moec.runtime.trace import RoutingTrace, TraceError

    _check(opts)
    history = DEFAULT_HISTORY if getattr(opts, "history", None) is None else opts.history
    if not 0.0 <= history < 1.0:
        raise PlaceError(f"--history is a decay in [0, 1), got {history}")
    try:
        trace = RoutingTrace.load(opts.trace)
    except TraceError as e:
        raise PlaceError(str(e)) from None
    N, M, S = opts.world_size, opts.ranks_per_node, opts.slots
    E, L, W = trace.num_experts, trace.num_layers, trace.num_windows
    if N * S < E:
        raise PlaceError(f"slots fewer than experts: {N} rank(s) x {S} slot(s) = {N * S} < {E} experts; "
                         f"use --slots {math.ceil(E / N)} or more")
    if not -W <= opts.window < W:
        raise PlaceError(f"--window {opts.window} is out of range: {opts.trace} has {W} window(s) (0-{W - 1})")
    window = opts.window % W
    if opts.calibration:
        try:
            calib, calib_source = Calibration.load(opts.calibration), f"--calibration {opts.calibration}"
        except ValueError as e:
            raise PlaceError(str(e).removeprefix("moec: ")) from None
    else:
        calib, calib_source = Calibration.default(), "assumed H100-class defaults (Calibration.default())"
    config = ScoreConfig.from_trace(trace, tokens_per_rank=opts.tokens, calibration=calib)
    previous = None
    try:
        if opts.previous:
            previous = PlacementPlan.load(opts.previous)
            if previous.world_size != N:
                raise PlaceError(f"--previous {opts.previous} is for {previous.world_size} ranks, not --world-size {N}")
            previous.validate(num_experts=E, num_layers=L)
        results = compare(trace, N, M, S, window=window, previous=previous, config=config, history=history,
                          options=PlacementOptions(replica_balance=getattr(opts, "replica_balance", "auto")))
    except PlanError as e:
        raise PlaceError(str(e)) from None
    scored_on = scoring_window(trace, window)
    floor = traffic_floor(trace.affinity_WLEE[scored_on] if trace.affinity_WLEE is not None else None, N, M, S,
                          max_mean=FLOOR_MAX_MEAN, load_LE=trace.load_WLE[scored_on], top_k=trace.top_k)
    plan = results["moec"][0]
    plan.meta.update(trace=opts.trace, window=window, scored_on=scored_on, ranks_per_node=M, slots_per_rank=S)
    out = Path(opts.out or _default_out(opts.trace))
    try:
        plan.save(out)
    except OSError as e:
        raise PlaceError(f"cannot write the plan to {out}: {e.strerror or e}") from None
    if opts.plot:
        try:
            write_heatmap(opts.plot, [_rows(s) for _, (_, s) in results.items()])
        except OSError as e:
            raise PlaceError(f"cannot write the heat map to {opts.plot}: {e.strerror or e}") from None

    if opts.json:
        doc = dict(trace=opts.trace, trace_meta=trace.meta, world_size=N, ranks_per_node=M, slots_per_rank=S,
                   planned_on=window, history=history, scored_on=scored_on, tokens_per_rank=opts.tokens,
                   layer_shape=dict(hidden=config.hidden, expert_hidden=config.expert_hidden, gated=config.gated,
                                    dtype_bytes=config.dtype_bytes),
                   calibration_source=calib_source, calibration=calib.to_dict(), plan_path=str(out),
                   previous=opts.previous, plot=opts.plot,
                   traffic_floor=dict(floor, max_mean=FLOOR_MAX_MEAN),
                   methods={name: dict(score.to_dict(), meta=p.meta) for name, (p, score) in results.items()},
                   plan=plan.to_dict())
        print(json.dumps(doc, indent=1, default=_json_default))
        return 0

    same = " (the trace has one window: scored on the planning window)" if scored_on == window else ""
    print(f"moec place {opts.trace}: {E} experts, {L} layer(s), {W} window(s); {N} rank(s), "
          f"{min(M, N)} per node, {S} slot(s) per rank ({N * S - E} for replicas)")
    planned = (f"the moving average of windows 0-{window} (decay {history}; every method, baselines included)"
               if history and window > 0 else f"window {window}")
    print(f"planned on {planned}, scored on window {scored_on}{same}; simulated forward step of the MoE "
          f"layers at {opts.tokens} tokens/rank, H={config.hidden}, I={config.expert_hidden}, "
          f"{config.dtype_bytes}-byte elements")
    print(f"calibration: {calib_source}")
    chosen = plan.meta.get("replica_balance_scores")
    why = (f" (--replica-balance auto: predicted {chosen['static'] * 1e3:.3f} ms static, {chosen['adaptive'] * 1e3:.3f} ms "
           f"adaptive on the {plan.meta.get('replica_balance_judged_on')})" if chosen else "")
    print(f"moec's plan runs with replica_balance={plan.replica_balance}{why}, and is scored so; the baselines split "
          f"replicas by their plans' shares (EPLB: evenly, as published)")
    if previous is not None:
        print(f"previous plan: {opts.previous} (weights moved are counted from it)")
    print()
    print(_total_table(results))
    if floor["cross_rank"] is not None:
        node = f", x-node {_pct(floor['cross_node'])}" if N > M else ""
        print(f"traffic floor on window {scored_on}: no plan with {S} slot(s) per rank and max/mean <= "
              f"{FLOOR_MAX_MEAN} crosses less than x-rank {_pct(floor['cross_rank'])}{node} "
              f"(moec.passes.placement_score.traffic_floor, a bound)")
    print()
    print(_layer_table(results))
    print()
    print(f"plan written to {out}" + (f"; heat map to {opts.plot}" if opts.plot else ""))
    return 0


def _json_default(o: Any):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(heads: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def _total_table(results) -> str:
    base = results["moec"][1].time_s
    heads = ["method", "max/mean load", "x-rank", "x-node", "a2a GB", "step ms", "vs moec", "moved (GB)"]
    body = []
    for name, (_, s) in results.items():
        body.append([name, f"{s.max_mean_load:.3f} (avg {s.mean_max_mean_load:.3f})", _pct(s.cross_rank),
                     _pct(s.cross_node), f"{s.a2a_bytes / 1e9:.2f}", f"{s.time_s * 1e3:.3f}",
                     f"{s.time_s / base:.3f}x", f"{s.moved} ({s.moved_bytes / 1e9:.2f})"])
    return ("totals (max/mean: worst layer; x-rank / x-node: consecutive-layer expert pairs on different "
            "ranks / nodes):\n" + _table(heads, body))


def _layer_table(results) -> str:
    heads = ["layer", "method", "max/mean", "x-rank", "x-node", "a2a MB", "compute ms", "a2a ms", "step ms", "moved"]
    body = []
    L = len(next(iter(results.values()))[1].layers)
    for l in range(L):
        for name, (_, s) in results.items():
            x = s.layers[l]
            body.append([str(l), name, f"{x.max_mean_load:.3f}", _pct(x.cross_rank), _pct(x.cross_node),
                         f"{x.a2a_bytes / 1e6:.1f}", f"{x.compute_s * 1e3:.3f}", f"{x.a2a_s * 1e3:.3f}",
                         f"{x.time_s * 1e3:.3f}", str(x.moved)])
    return "per layer (x-rank / x-node of layer l: the pairs from layer l-1):\n" + _table(heads, body)


def _rows(score) -> np.ndarray:
    """``load_LN`` over the mean of each layer."""
    rows = []
    for x in score.layers:
        mean = float(np.mean(x.load_N)) if x.load_N is not None else 0.0
        rows.append(np.asarray(x.load_N, dtype=np.float64) / mean if mean > 0 else np.zeros(len(x.load_N)))
    return np.stack(rows)


def write_heatmap(path, blocks: list[np.ndarray], cell: int = 12, gap: int = 6) -> Path:
    """Greyscale PNG of load/mean blocks ([layers, ranks] each), as the module docstring says."""
    width = max(b.shape[1] for b in blocks) * cell
    rows: list[bytes] = []
    for k, block in enumerate(blocks):
        if k:
            rows += [bytes([255]) * width] * gap
        grey = np.clip(255 - np.rint(np.asarray(block) * 127.5), 0, 255).astype(np.uint8)
        for layer in grey:
            line = np.full(width, 255, dtype=np.uint8)
            line[:len(layer) * cell] = np.repeat(layer, cell)
            rows += [line.tobytes()] * cell
    return write_png(path, rows, width)


def write_png(path, rows: list[bytes], width: int) -> Path:
    """An 8-bit greyscale PNG from ``rows`` of ``width`` bytes (filter 0 on every row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, len(rows), 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path
