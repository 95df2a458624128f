#!/usr/bin/env python3
"""The expert-parallel cost model against gloo measurements: predicted vs measured forward time of
``moec.runtime.ep_moe`` at 2 and 4 ranks on this machine.

Contract: ``python benchmarks/ep_cost_model.py [--world-sizes 2 4] [--layers tiny small ...]
[--trials N] [--repeat R] [--warmup W] [--out NAME]`` prints one table (layer, ranks, schedule,
measured ms, predicted ms, relative error, each trial's error) and writes
``benchmarks/results/<NAME>.json`` (default ``cpu-ep-cost-model-<host>.json``): the machine (CPU,
torch, threads, load average before and after), every trial's calibration, every timed call.
Exit status 0; the acceptance target (|error| <= 25% at 2 and 4 ranks) is reported, not enforced.

Method, per world size W (one spawned group of W gloo ranks over TCP on 127.0.0.1), ``--trials``
times (default 3; on a shared machine one calibration can land in a busy second and the timings
in a quiet one, so each trial first waits until the CPUs are quiet (other processes below
``--max-busy`` of them over 2 s, at most ``--max-wait`` s; both recorded) and calibrates right
before it times; the table shows the median over trials of the measured and of the predicted
time, and every trial's error):

1. ``torch.set_num_threads(1)`` on every rank: the W ranks share this machine's cores (2 here), and
   one thread each keeps OpenMP teams from fighting over them; at W=4 two ranks share a core,
   which the calibration sees too, since all ranks measure at once.
2. ``moec.runtime.calibrate.calibrate()`` on the group (compute at the representative shape, the
   all-to-all's alpha/beta at W ranks); one calibration per trial, used for every layer.
3. Per layer: the same seeded global tokens, uniform random top-k routing (top-k of uniform scores)
   and weights on every rank; each rank keeps its tokens and its experts (contiguous placement).
   ``--warmup`` untimed runs, then ``--repeat`` timed runs under ``torch.no_grad()``, with the
   lowered CPU ops (``impl="moec_cpu"``: the GEMMs the compiled layer and the calibration use); a run is a
   barrier and then ``--calls`` (default 5) back-to-back forward calls, as a model runs its layers,
   timed with ``perf_counter`` per call; its time is the slowest rank's (all-reduced MAX); the
   median over runs is reported. (A barrier before every single call would add the ranks' skew
   leaving it, 0.1-1 ms on this machine, to every call's first exchange.)
4. Prediction: ``moec.runtime.cost_model.predict`` for the sequential schedule with W ranks on one
   node and the routing's real skew (the busiest rank's received slots over the mean; uniform
   routing at these sizes gives ~1.0-1.1).

Schedules: ``sequential`` is ``ep_moe`` as it is. When ``ep_moe`` takes ``chunks=`` (the chunked
pipeline; checked on its signature, or on ``_ep_moe``'s, which it forwards to), ``chunks=2`` and
``chunks=4`` are measured too and compared with ``predict(chunks=r)``: ``SCHEDULES`` below is the
list to extend.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moec.runtime import contiguous_placement, ep_moe
from moec.runtime.calibrate import calibrate
from moec.runtime.cost_model import Calibration, LayerShape, predict
from moec.runtime.jsonfile import write_json

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET = 0.25

# tokens per rank; fp32 SwiGLU, no bias, nn.Linear weight layout. tiny: the exchanges' latency and
# the per-op overheads dominate; small: a mix; medium: the expert GEMMs dominate; wide: a large
# hidden size, so the most bytes exchanged per FLOP.
LAYERS = {
    "tiny": LayerShape(tokens=32, hidden=64, expert_hidden=128, num_experts=8, top_k=2, name="tiny"),
    "small": LayerShape(tokens=256, hidden=128, expert_hidden=256, num_experts=8, top_k=2, name="small"),
    "medium": LayerShape(tokens=1024, hidden=256, expert_hidden=512, num_experts=8, top_k=2, name="medium"),
    "wide": LayerShape(tokens=512, hidden=1024, expert_hidden=256, num_experts=8, top_k=2, name="wide"),
}


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name``; ``ep_moe`` forwards ``**kwargs`` to ``_ep_moe`` in its
    module, so that one's signature counts too."""
    if name in inspect.signature(fn).parameters:
        return True
    impl = getattr(inspect.getmodule(fn), "_" + fn.__name__, None)
    return impl is not None and name in inspect.signature(impl).parameters


# (label, ep_moe keyword arguments, predict keyword arguments); chunked entries only when ep_moe has them.
SCHEDULES = [("sequential", {}, {})]
if _accepts(ep_moe, "chunks"):
    SCHEDULES += [(f"chunks={r}", {"chunks": r}, {"chunks": r}) for r in (2, 4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_data(shape: LayerShape, world: int) -> dict:
    """The global tokens, routing and weights, the same on every rank (seeded by the layer)."""
    g = torch.Generator().manual_seed(zlib.crc32(shape.name.encode()) + world)
    T, H, I, E, K = world * shape.tokens, shape.hidden, shape.expert_hidden, shape.num_experts, shape.top_k
    return dict(
        x_TH=torch.randn(T, H, generator=g),
        idx_TK=torch.rand(T, E, generator=g).topk(K, dim=-1).indices,
        weights_TK=torch.rand(T, K, generator=g),
        w_in_EFH=torch.randn(E, 2 * I, H, generator=g) * H**-0.5,
        w_out_EHI=torch.randn(E, H, I, generator=g) * I**-0.5,
    )


def _skew(idx_TK: torch.Tensor, shape: LayerShape, world: int) -> float:
    """Busiest rank's received slots over the mean (contiguous placement)."""
    per_rank = torch.bincount(idx_TK.reshape(-1) // (shape.num_experts // world), minlength=world).double()
    return float(per_rank.max() / per_rank.mean())


def _time_layer(shape: LayerShape, world: int, rank: int, kwargs: dict, warmup: int, repeat: int,
                calls: int) -> list[float]:
    """Seconds per call of ``repeat`` timed runs of ``calls`` back-to-back calls each."""
    data = _layer_data(shape, world)
    tok = slice(rank * shape.tokens, (rank + 1) * shape.tokens)
    experts = contiguous_placement(shape.num_experts, world)[rank]
    mine = slice(experts.start, experts.stop)
    args = (data["x_TH"][tok].contiguous(), data["idx_TK"][tok].contiguous(), data["weights_TK"][tok].contiguous(),
            data["w_in_EFH"][mine].contiguous(), data["w_out_EHI"][mine].contiguous(), None, None)

    def call():
        return ep_moe(*args, num_experts=shape.num_experts, activation="swiglu", impl="moec_cpu", **kwargs)

    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            dt = torch.tensor([(time.perf_counter() - t0) / calls], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times.append(float(dt.item()))
    return times


def _cpu_busy(seconds: float) -> float:
    """Fraction of the machine's CPU time spent busy over the next ``seconds`` (``/proc/stat``);
    NaN where there is no ``/proc/stat``."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return float("nan")
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_until_quiet(max_busy: float, max_wait_s: float) -> dict:
    """Rank 0 waits (the others at a barrier) until other processes use less than ``max_busy`` of
    the CPUs over 2 s, or ``max_wait_s`` passed: on a shared machine another job's burst would
    otherwise land in some trials and not others."""
    waited, busy = 0.0, float("nan")
    if dist.get_rank() == 0:
        start = time.perf_counter()
        while True:
            busy = _cpu_busy(2.0)
            waited = time.perf_counter() - start
            if not busy >= max_busy or waited >= max_wait_s:
                break
    dist.barrier()
    return dict(cpu_busy_before=busy, waited_s=waited)


def _worker(rank: int, world: int, port: int, out: str, layers: list[str], warmup: int, repeat: int,
            calls: int, trials: int, max_busy: float, max_wait_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=max_wait_s + 300))
    try:
        results = []
        for _ in range(trials):
            quiet = _wait_until_quiet(max_busy, max_wait_s)
            calib = calibrate()
            runs = {}
            for name in layers:
                for label, ep_kwargs, _ in SCHEDULES:
                    runs[f"{name}/{label}"] = _time_layer(LAYERS[name], world, rank, ep_kwargs, warmup, repeat,
                                                          calls)
            results.append(dict(calibration=calib.to_dict(), runs=runs, **quiet))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_world(world: int, layers: list[str], opts) -> list[dict]:
    """One spawned group; per trial, a wait for a quiet machine, a calibration, the timings."""
    with tempfile.TemporaryDirectory(prefix="moec-ep-bench-") as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(world, _free_port(), out, layers, opts.warmup, opts.repeat, opts.calls, opts.trials,
                                opts.max_busy, opts.max_wait), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def compare(world: int, layers: list[str], trials: list[dict]) -> list[dict]:
    """One row per layer and schedule: the median over trials of each trial's median time and of
    its prediction (from that trial's calibration), and every trial's error."""
    rows = []
    for name in layers:
        shape = LAYERS[name]
        skew = _skew(_layer_data(shape, world)["idx_TK"], shape, world)
        for label, _, predict_kwargs in SCHEDULES:
            per_trial = []
            for trial in trials:
                calib = Calibration.from_dict(trial["calibration"])
                measured = statistics.median(trial["runs"][f"{name}/{label}"])
                pred = predict(shape, world, world, calib, skew=skew, **predict_kwargs)
                per_trial.append(dict(measured_s=measured, predicted_s=pred["time"],
                                      rel_error=pred["time"] / measured - 1,
                                      terms_s={k: pred[k] for k in ("t_cnt", "d_1", "c_1", "m_1")},
                                      times_s=trial["runs"][f"{name}/{label}"]))
            measured = statistics.median(t["measured_s"] for t in per_trial)
            predicted = statistics.median(t["predicted_s"] for t in per_trial)
            rows.append(dict(layer=name, shape=shape.describe(), world_size=world, schedule=label, skew=skew,
                             measured_s=measured, predicted_s=predicted, rel_error=predicted / measured - 1,
                             trial_errors=[t["rel_error"] for t in per_trial], trials=per_trial))
    return rows


def format_table(rows: list[dict]) -> str:
    heads = ["layer", "ranks", "schedule", "skew", "measured ms", "predicted ms", "error", "within 25%",
             "per-trial errors"]
    body = [[r["layer"], str(r["world_size"]), r["schedule"], f"{r['skew']:.2f}", f"{r['measured_s'] * 1e3:.3f}",
             f"{r['predicted_s'] * 1e3:.3f}", f"{r['rel_error']:+.1%}",
             "yes" if abs(r["rel_error"]) <= TARGET else "NO",
             " ".join(f"{e:+.0%}" for e in r["trial_errors"])] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], metavar="W")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="back-to-back calls per timed run")
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="before each trial wait until other processes use less than this fraction of the CPUs")
    parser.add_argument("--max-wait", type=float, default=180, help="longest wait for that, seconds")
    parser.add_argument("--trials", type=int, default=3,
                        help="calibrate-then-time rounds per world size; rows report medians over them")
    parser.add_argument("--out", help="results name (default: cpu-ep-cost-model-<host>)")
    opts = parser.parse_args(argv)

    from moec.cli.bench import machine_info

    torch.set_num_threads(1)
    machine = machine_info(torch.device("cpu"))
    machine.update(torch_threads_per_rank=1, load_average_before=os.getloadavg())
    rows, calibrations = [], {}
    for world in opts.world_sizes:
        print(f"W={world}: spawning {world} gloo ranks ({opts.trials} x: calibrate, then time {len(opts.layers)} "
              f"layer(s))...",
              file=sys.stderr, flush=True)
        trials = run_world(world, opts.layers, opts)
        calibrations[str(world)] = [t["calibration"] for t in trials]
        for t in trials:
            print(f"  CPU busy before {t['cpu_busy_before']:.0%} (waited {t['waited_s']:.0f} s); calibration: "
                  f"{Calibration.from_dict(t['calibration']).describe()}", file=sys.stderr)
        rows += compare(world, opts.layers, trials)
    machine["load_average_after"] = os.getloadavg()
    print(format_table(rows))
    worst = max(abs(r["rel_error"]) for r in rows)
    print(f"worst |error| {worst:.1%} (target <= {TARGET:.0%}); schedules measured: "
          f"{', '.join(s[0] for s in SCHEDULES)}")

    name = opts.out or f"cpu-ep-cost-model-{platform.node() or 'host'}"
    path = write_json(os.path.join(RESULTS_DIR, f"{name}.json"),
                      dict(machine=machine, settings=vars(opts), target=TARGET, calibrations=calibrations, rows=rows),
                      indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
