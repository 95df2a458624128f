#!/usr/bin/env python3
"""Expert placement on the shipped synthetic traces: moec's optimiser against contiguous,
round-robin and EPLB (hierarchical, global), every plan made on window i and scored on window i+1.

Contract: ``python benchmarks/placement.py [--presets ...] [--world-sizes 8 16 32]
[--ranks-per-node 8] [--replicas 0.25] [--out NAME]`` prints one table (preset, ranks, slots,
method: worst-layer max/mean load, cross-rank and cross-node pair fractions, a2a GB, simulated
step ms, weights moved), then the issue-6 acceptance checks per preset and world size, and writes
``benchmarks/results/<NAME>.json`` (default ``placement-synthetic.json``). Exit status 0: the
targets are reported, not enforced (the tests enforce what is met).

Nothing runs on a device: step times are the cost model's predictions
(``moec.passes.placement_score``: slowest rank's expert compute + all-to-all per layer, summed) with
``Calibration.default()``, assumed H100-class constants, 4096 tokens per rank, DeepSeek-V3-sized
experts (H=7168, I=2048, bf16). Slots per rank S = ceil((1 + replicas) * E / N).

Method per preset and world size: ``moec.passes.placement.evaluate_windows``: for each window i
but the last, every method plans on the moving average of windows 0..i (``--history``, decay 0.5;
the same input for moec and every baseline) and is scored on window i+1. From window 1 on,
``moec`` plans from its own previous plan (the deployed chain) and ``moec-scratch`` is the same
optimiser without it; weights moved are counted from the deployed plan of window i-1 for every
method. Numbers are means over the scored windows (weights moved: over windows >= 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moec.passes.placement import DEFAULT_HISTORY, evaluate_windows  # noqa: E402
from moec.passes.placement_score import ScoreConfig, score_plan, traffic_floor  # noqa: E402
from moec.runtime.jsonfile import write_json  # noqa: E402
from moec.runtime.trace import RoutingTrace  # noqa: E402

RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
DEFAULT_PRESETS = ["zipf64", "zipf64-affinity", "zipf64-group-affinity", "zipf256", "zipf256-affinity",
                   "zipf256-group-affinity", "deepseek-v3-like"]
EPLB = ("eplb-hierarchical", "eplb-global")
BASELINES = ("contiguous", "round-robin", *EPLB)
FLOOR_MAX_MEAN = 1.05  # the traffic floor is for plans as balanced as issue 6's target


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def run_case(trace: RoutingTrace, N: int, M: int, S: int, history: float) -> dict:
    t0 = time.perf_counter()
    config = ScoreConfig.from_trace(trace)
    rows = evaluate_windows(trace, N, M, S, config=config, history=history)
    seconds = time.perf_counter() - t0
    # moec's plan forced to each replica balancing, and EPLB's plans run with moec's adaptive one
    # (not baselines: how much of the balance is the runtime's), scored on the same windows
    for r in rows:
        for name, mode in (("moec", "static"), ("moec", "adaptive"), *((e, "adaptive") for e in EPLB)):
            plan = dataclasses.replace(r["plans"][name], replica_balance=mode)
            r["scores"][f"{name}+{mode}"] = score_plan(plan, trace, r["scored_on"], ranks_per_node=M, config=config,
                                                       previous=r.get("previous"))
    methods = list(rows[-1]["scores"])
    summary = {}
    for name in methods:
        scored = [r["scores"][name] for r in rows if name in r["scores"]]
        later = [r["scores"][name] for r in rows[1:] if name in r["scores"]]
        summary[name] = dict(
            max_mean_load=_mean([s.max_mean_load for s in scored]),
            max_mean_load_worst=float(max(s.max_mean_load for s in scored)),
            mean_max_mean_load=_mean([s.mean_max_mean_load for s in scored]),
            cross_rank=_mean([s.cross_rank for s in scored]),
            cross_node=_mean([s.cross_node for s in scored]),
            a2a_bytes=_mean([s.a2a_bytes for s in scored]),
            time_s=_mean([s.time_s for s in scored]),
            moved=_mean([s.moved for s in later]) if later else None,
            moved_bytes=_mean([s.moved_bytes for s in later]) if later else None,
        )
    aff = trace.affinity_WLEE
    floors = [traffic_floor(None if aff is None else aff[r["scored_on"]], N, M, S, max_mean=FLOOR_MAX_MEAN,
                            load_LE=trace.load_WLE[r["scored_on"]], top_k=trace.top_k) for r in rows]
    windows = [dict(window=r["window"], scored_on=r["scored_on"],
                    methods={k: s.totals() for k, s in r["scores"].items()}, traffic_floor=f,
                    moec_meta=dict(r["plans"]["moec"].meta, replica_balance=r["plans"]["moec"].replica_balance))
               for r, f in zip(rows, floors)]
    floor = {k: _mean([f[k] for f in floors]) for k in ("cross_rank", "cross_node")}
    return dict(world_size=N, ranks_per_node=M, slots_per_rank=S, seconds=seconds, summary=summary,
                traffic_floor=dict(floor, max_mean=FLOOR_MAX_MEAN), windows=windows)


def _balance_checks(case: dict, name: str) -> dict:
    """max/mean and step-time checks of method ``name`` against EPLB and every baseline."""
    s, windows = case["summary"], case["windows"]
    return dict(
        max_mean_load=s[name]["max_mean_load"],
        max_mean_le_1_05=s[name]["max_mean_load_worst"] <= 1.05,
        max_mean_not_worse_than_eplb_windows=sum(
            r["methods"][name]["max_mean_load"] <= min(r["methods"][e]["max_mean_load"] for e in EPLB) + 1e-12
            for r in windows),
        step_time_better_windows=sum(
            r["methods"][name]["time_s"] < min(r["methods"][b]["time_s"] for b in BASELINES) for r in windows),
        windows=len(windows),
    )


def acceptance(case: dict, has_affinity: bool) -> dict:
    s = case["summary"]
    m = s["moec"]
    # per-window counts for moec as deployed and its plan forced to each mode: _balance_checks
    out = dict(
        modes={name: _balance_checks(case, name) for name in ("moec", "moec+static", "moec+adaptive")},
        max_mean_vs_best_eplb=m["max_mean_load"] - min(s[e]["max_mean_load"] for e in EPLB),
        max_mean_vs_best_eplb_adaptive=m["max_mean_load"] - min(s[f"{e}+adaptive"]["max_mean_load"] for e in EPLB),
        step_time_vs_best_baseline=m["time_s"] / min(s[b]["time_s"] for b in BASELINES),
    )
    if has_affinity and s["contiguous"]["cross_rank"]:
        out["cross_rank_reduction_vs_contiguous"] = 1 - m["cross_rank"] / s["contiguous"]["cross_rank"]
        out["cross_rank_reduction_ge_40pct"] = out["cross_rank_reduction_vs_contiguous"] >= 0.40
        # the most any plan with these slots and max/mean <= 1.05 can cut (placement_score.traffic_floor)
        out["cross_rank_reduction_bound"] = 1 - case["traffic_floor"]["cross_rank"] / s["contiguous"]["cross_rank"]
    if has_affinity and s["contiguous"]["cross_node"]:
        out["cross_node_reduction_vs_contiguous"] = 1 - m["cross_node"] / s["contiguous"]["cross_node"]
    if "moec-scratch" in s and s["moec-scratch"]["moved"]:
        out["moved_ratio_vs_scratch"] = m["moved"] / s["moec-scratch"]["moved"]
        later = case["windows"][1:]
        out["step_time_cost_vs_scratch"] = _mean([r["methods"]["moec"]["time_s"] / r["methods"]["moec-scratch"]["time_s"] - 1
                                                  for r in later])
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--replicas", type=float, default=0.25, help="replica slots as a fraction of the experts")
    p.add_argument("--history", type=float, default=DEFAULT_HISTORY,
                   help="every method plans on the moving average of windows <= i with this decay (0: window i only)")
    p.add_argument("--out", default="placement-synthetic")
    opts = p.parse_args(argv)

    cases = []
    heads = ["preset", "N", "S", "method", "max/mean", "worst", "x-rank", "x-node", "a2a GB", "step ms", "moved"]
    lines = []
    for preset in opts.presets:
        t0 = time.process_time()
        trace = RoutingTrace.load(f"synthetic:{preset}")
        generated_s = time.process_time() - t0  # CPU seconds to generate the preset
        for N in opts.world_sizes:
            S = math.ceil((1 + opts.replicas) * trace.num_experts / N)
            case = run_case(trace, N, opts.ranks_per_node, S, opts.history)
            case.update(preset=preset, trace_generation_cpu_s=generated_s, num_experts=trace.num_experts, num_layers=trace.num_layers,
                        num_windows=trace.num_windows, top_k=trace.top_k,
                        acceptance=acceptance(case, trace.affinity_WLEE is not None and
                                              (trace.meta.get("generator") or {}).get("affinity", 1) > 0))
            cases.append(case)
            for name, s in case["summary"].items():
                lines.append([preset, str(N), str(S), name, _fmt(s["max_mean_load"], ".4f"),
                              _fmt(s["max_mean_load_worst"], ".4f"), _fmt(s["cross_rank"], ".4f"),
                              _fmt(s["cross_node"], ".4f"), _fmt(s["a2a_bytes"] / 1e9, ".2f"),
                              _fmt(s["time_s"] * 1e3, ".3f"), _fmt(s["moved"], ".1f")])
            print(f"  {preset} N={N}: {case['seconds']:.1f}s", file=sys.stderr, flush=True)
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(heads)]
    print("simulated (cost model, assumed H100-class constants; nothing run on a GPU); plan on window i, score on i+1;")
    print(f"every method plans on the moving average of windows <= i (decay {opts.history}), never on window i+1;")
    print("max/mean: worst layer, mean over windows (worst: over windows); moved: experts placed where the deployed")
    print("previous plan did not hold them, mean over windows >= 1")
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for r in lines:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print()
    print("acceptance (issue 6):")
    for c in cases:
        a = c["acceptance"]
        parts = [f"max/mean vs best EPLB {a['max_mean_vs_best_eplb']:+.4f}, vs EPLB's plans balanced adaptively "
                 f"{a['max_mean_vs_best_eplb_adaptive']:+.4f}",
                 f"step time / best baseline {a['step_time_vs_best_baseline']:.4f}"]
        if "cross_rank_reduction_vs_contiguous" in a:
            parts.append(f"cross-rank {100 * a['cross_rank_reduction_vs_contiguous']:.1f}% below contiguous "
                         f"(any plan: at most {100 * a['cross_rank_reduction_bound']:.1f}%)")
        if "cross_node_reduction_vs_contiguous" in a:
            parts.append(f"cross-node {100 * a['cross_node_reduction_vs_contiguous']:.1f}% below contiguous")
        if "moved_ratio_vs_scratch" in a:
            parts.append(f"moved {a['moved_ratio_vs_scratch']:.3f}x scratch at {100 * a['step_time_cost_vs_scratch']:+.2f}% step time")
        print(f"  {c['preset']} N={c['world_size']} S={c['slots_per_rank']}: " + "; ".join(parts))
        for name, m in a["modes"].items():
            print(f"      {name}: max/mean {m['max_mean_load']:.4f} (<=1.05 every window: {m['max_mean_le_1_05']}), "
                  f"not worse than EPLB in {m['max_mean_not_worse_than_eplb_windows']}/{m['windows']} windows, "
                  f"faster than every baseline in {m['step_time_better_windows']}/{m['windows']}")

    path = os.path.join(RESULTS_DIR, f"{opts.out}.json")
    doc = dict(benchmark="placement", kind="simulated (cost model; nothing run on a device)",
               date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
               python=platform.python_version(), numpy=np.__version__,
               settings=dict(presets=opts.presets, world_sizes=opts.world_sizes, ranks_per_node=opts.ranks_per_node,
                             replicas=opts.replicas, history=opts.history, tokens_per_rank=ScoreConfig().tokens_per_rank,
                             hidden=ScoreConfig().hidden, expert_hidden=ScoreConfig().expert_hidden,
                             dtype_bytes=ScoreConfig().dtype_bytes, calibration="Calibration.default() (assumed)"),
               cases=cases)
    write_json(path, doc)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
