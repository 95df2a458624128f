#!/usr/bin/env python3
"""moec against eager and Inductor on every builtin model at every token count, and moec's
overhead per call and per layer.

Usage::

    python benchmarks/builtin_sweep.py --out benchmarks/results/builtin-sweep-cpu.json

1. Sweep: ``moec bench`` (``moec.cli.bench.run_bench``, its method: fresh compile per token count,
   seeded inputs, medians) on each model of ``BUILTIN_MODELS`` at its default size (hidden 64,
   8 experts, top-2, 2 layers) at ``--tokens`` (default 1, 16, 128, 2048). The check (issue 14):
   moec's median is at most 1/0.9 of eager's on every row (``x eager >= 0.9``); exit 1 if not.
2. Overhead: the default model (``moe-mlp``) at 1 token and hidden 64 with 1, 4 and 16 layers,
   eager and moec. At one token the work is a few hundred FLOPs, so the time is overhead; a
   least-squares line through (layers, median ms) gives each backend's cost per call (the
   intercept: for moec the dynamo guards and the compiled region's entry and exit) and per layer
   (the slope: for moec its ops' dispatch and glue, for eager the layer's Python).

Timings depend on the machine and its load: compare rows of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from moec.cli.bench import BenchSettings, format_table, run_bench
from moec.models.builtin import BUILTIN_MODELS

TOKENS = (1, 16, 128, 2048)
OVERHEAD_LAYERS = (1, 4, 16)
FLOOR = 0.9  # moec at least this fraction of eager's speed


def _rows(doc: dict, backend: str) -> dict[int, dict]:
    return {r["tokens"]: r for r in doc["results"] if r["backend"] == backend}


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def sweep(tokens: tuple[int, ...], repeat: int, log) -> dict:
    models = {}
    for name in sorted(BUILTIN_MODELS):
        log(f"{name} ...")
        model, args = BUILTIN_MODELS[name]()
        models[name] = run_bench(model, args, BenchSettings(tokens=tokens, repeat=repeat), name=name,
                                 spec=f"builtin:{name}")
    return models


def overhead(layers: tuple[int, ...], repeat: int, log) -> dict:
    points = {"eager": [], "moec": []}
    docs = []
    for n in layers:
        log(f"overhead: moe-mlp with {n} layers at 1 token ...")
        model, args = BUILTIN_MODELS["moe-mlp"](num_layers=n)
        doc = run_bench(model, args, BenchSettings(tokens=(1,), repeat=repeat, backends=("eager", "moec")),
                        name=f"moe-mlp-{n}-layers", spec=f"builtin:moe-mlp:num_layers={n}")
        docs.append(doc)
        for backend in points:
            points[backend].append(_rows(doc, backend)[1]["median_ms"])
    fit = {}
    for backend, ys in points.items():
        per_call, per_layer = _line(list(layers), ys)
        fit[backend] = {"per_call_ms": per_call, "per_layer_ms": per_layer, "median_ms": ys}
    return {"layers": list(layers), "tokens": 1, "fit": fit, "runs": docs}


def _source() -> dict:
    """The commit the numbers were measured at, and whether the checkout had changes."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "moec"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--overhead-layers", type=int, nargs="+", default=list(OVERHEAD_LAYERS))
    p.add_argument("--out", help="JSON file to write")
    opts = p.parse_args(argv)
    log = lambda msg: print(f"builtin_sweep: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    models = sweep(tuple(opts.tokens), opts.repeat, log)
    over = overhead(tuple(opts.overhead_layers), opts.repeat, log)
    worst = []
    for name, doc in models.items():
        print(format_table(doc))
        for t, r in _rows(doc, "moec").items():
            worst.append((r["speedup_vs_eager"], name, t, r["ok"]))
    print("\nmoec x eager per model and token count:")
    print("model".ljust(14) + "".join(f"{t:>9}" for t in opts.tokens))
    for name, doc in models.items():
        m = _rows(doc, "moec")
        print(name.ljust(14) + "".join(f"{m[t]['speedup_vs_eager']:>9.2f}" for t in opts.tokens))
    print(f"\noverhead at 1 token, moe-mlp hidden 64, {over['layers']} layers:")
    for backend, f in over["fit"].items():
        print(f"  {backend:6} per call {f['per_call_ms'] * 1e3:7.1f} us, per layer {f['per_layer_ms'] * 1e3:7.1f} us"
              f"  (medians {', '.join(f'{y:.3f}' for y in f['median_ms'])} ms)")
    below = [w for w in worst if w[0] < FLOOR]
    wrong = [w for w in worst if not w[3]]
    summary = {"floor": FLOOR, "min_speedup_vs_eager": min(w[0] for w in worst),
               "below_floor": [{"model": n, "tokens": t, "speedup_vs_eager": s} for s, n, t, _ in below],
               "mismatches": [{"model": n, "tokens": t} for _, n, t, _ in wrong]}
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"benchmark": "builtin_sweep", "source": _source(), "summary": summary, "models": models,
                       "overhead": over}, f, indent=1, allow_nan=False)
            f.write("\n")
        print(f"wrote {opts.out}")
    for s, n, t, _ in below:
        print(f"builtin_sweep: moec at {s:.2f}x eager on {n} at {t} tokens (floor {FLOOR})", file=sys.stderr)
    for _, n, t, _ in wrong:
        print(f"builtin_sweep: moec output differs from eager on {n} at {t} tokens", file=sys.stderr)
    return 1 if below or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
