#!/usr/bin/env python3
"""Expert-parallel overlap on gloo: the overlapped schedule against the sequential one, same run.

Contract: ``python benchmarks/ep_overlap.py [--world 2] [--tokens 4096] [--hidden 1024]
[--expert-hidden 32] [--experts 8] [--top-k 2] [--chunks 2 4] [--repeat 15] [--trials 1] [--fresh-buffers] [--no-predict] [--out NAME]`` spawns
``--world`` gloo ranks on this machine, compiles one communication-heavy MoE layer (wide hidden,
narrow experts: the all-to-alls move ``T*K*H`` floats each way while the experts do
``~6*T*K*H*I`` FLOPs) with ``moec.compile(..., expert_parallel=True, inner="aot_eager")`` in each
schedule, and times forward steps. Prints a table and, with ``--out``, writes
``benchmarks/results/<NAME>.json``.

Rows (each rank feeds its own tokens; a step ends when every rank is done, by a barrier):

- ``sequential``: ``chunks=1`` with ``schedule_overlap`` disabled: each exchange is waited for at
  once, nothing overlaps;
- ``overlap r=1``: one chunk, scheduled: only independent work (here: none but the bookkeeping)
  can run under the exchanges;
- ``overlap r=R``: R chunks pipelined by ``schedule_overlap`` (dispatch of chunk i+1 and combine of
  chunk i-1 under the experts of chunk i);
- ``comm only``: the same four exchanges per step (counts, rows out, expert ids out, rows back,
  sizes taken from the step's routing), without the experts: the time the all-to-alls take.

Hidden fraction of the all-to-all for a schedule: ``(sequential - schedule) / comm only``.

Prediction (unless ``--no-predict``): after the timings, the same ranks run
``moec.runtime.calibrate.calibrate`` at the layer's shape, with all-to-all sizes up to the layer's
row exchange (``T*K*H*4`` bytes per rank), and every row gets ``moec.runtime.cost_model.predict``'s
time for its schedule (``sequential`` and ``overlap r=1``: r=1; ``overlap r=R``: ``chunks=R``;
``comm only``: the exchange terms ``t_cnt + d_1 + m_1`` at r=1, wake-up included) with the
routing's measured skew, and its error ``predicted / measured - 1``.

Method: every schedule is compiled once, warmed up, then the schedules are timed round-robin,
``--repeat`` rounds (so drift of this shared machine hits all alike); each step is a
``time.perf_counter`` interval between two barriers on rank 0; medians are reported.
``torch.set_num_threads(1)`` per rank (the ranks share the machine's cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from moec.runtime.jsonfile import write_json
from moec.runtime.launch import spawn_gloo

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _layer(opts) -> nn.Module:
    from moec.models.builtin import LoopMoE

    torch.manual_seed(0)
    return LoopMoE(opts.hidden, opts.expert_hidden, opts.experts, opts.top_k).eval()


def _schedules(opts) -> dict[str, dict]:
    rows = {"sequential": dict(chunks=1, disable=("schedule_overlap",))}
    rows["overlap r=1"] = dict(chunks=1, disable=())
    for r in opts.chunks:
        rows[f"overlap r={r}"] = dict(chunks=r, disable=())
    return rows


def _comm_only(x_TH, idx_TK, opts, group):
    """The four exchanges of one sequential step, with the step's own split sizes."""
    W = dist.get_world_size(group)
    L = opts.experts // W
    owner_N = torch.div(idx_TK.reshape(-1), L, rounding_mode="floor")
    send_W = torch.bincount(owner_N, minlength=W)
    recv_W = torch.empty_like(send_W)
    dist.all_to_all_single(recv_W, send_W, group=group)
    send, recv = send_W.tolist(), recv_W.tolist()
    rows = x_TH[torch.sort(owner_N, stable=True).indices // opts.top_k]
    got = rows.new_empty(sum(recv), rows.shape[1])
    dist.all_to_all_single(got, rows, recv, send, group=group)
    ids = owner_N.new_empty(sum(recv), 1)
    dist.all_to_all_single(ids, owner_N.unsqueeze(1), recv, send, group=group)
    back = torch.empty_like(rows)
    dist.all_to_all_single(back, got, send, recv, group=group)


def _reuse_large_buffers() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep them (no mmap per block, no
    trim): a freed 32 MB buffer is then reused by the next one instead of being unmapped and
    faulted in again page by page, which on this project's VM costs ~16 ms per 32 MB (2 GB/s)
    and would dominate every row. tcmalloc or jemalloc, which PyTorch recommends for CPU runs, do
    the same. False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _worker(rank: int, world: int, opts) -> dict:
    if opts.reuse_large_buffers:
        _reuse_large_buffers()
    import moec
    from moec.runtime import ep_group

    group = ep_group(timeout_s=300)
    g = torch.Generator().manual_seed(1 + rank)
    x_TH = torch.randn(opts.tokens, opts.hidden, generator=g)
    layer = _layer(opts)
    with torch.no_grad():
        want = layer.routed(x_TH) if rank == 0 else None
    steps = {}
    with torch.no_grad():
        for name, sched in _schedules(opts).items():
            torch._dynamo.reset()
            compiled = moec.compile(layer, expert_parallel=True, group=group, inner="aot_eager", **sched)
            out = compiled(x_TH.unsqueeze(0))[0]
            if rank == 0:
                torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
            steps[name] = compiled
        _, idx_TK = layer.route(x_TH)
        steps["comm only"] = lambda x: _comm_only(x[0], idx_TK, opts, group)
        trials = []
        for _ in range(opts.trials):
            times = {name: [] for name in steps}
            for _ in range(2):  # warm-up rounds
                for step in steps.values():
                    step(x_TH.unsqueeze(0))
            for _ in range(opts.repeat):
                for name, step in steps.items():
                    dist.barrier(group)
                    start = time.perf_counter()
                    step(x_TH.unsqueeze(0))
                    dist.barrier(group)
                    times[name].append(time.perf_counter() - start)
            trials.append(dict(times=times, prediction=_predict(layer, x_TH, opts, group) if opts.predict else None))
    return trials


def _shape(opts):
    from moec.runtime.cost_model import LayerShape

    return LayerShape(tokens=opts.tokens, hidden=opts.hidden, expert_hidden=opts.expert_hidden,
                      num_experts=opts.experts, top_k=opts.top_k, gated=True, dtype_bytes=4, name="ep_overlap")


def _predict(layer, x_TH, opts, group) -> dict:
    """Calibrate on these ranks (sizes up to the layer's exchanges) and predict every row."""
    from moec.runtime.calibrate import DEFAULT_A2A_BYTES, calibrate
    from moec.runtime.cost_model import predict

    W = dist.get_world_size(group)
    shape = _shape(opts)
    row_bytes = opts.tokens * opts.top_k * opts.hidden * 4
    sizes = sorted({*DEFAULT_A2A_BYTES, *(row_bytes // d for d in (16, 4, 2, 1))})
    calib = calibrate(shape, group=group, sizes_bytes=sizes)
    with torch.no_grad():
        _, idx_TK = layer.route(x_TH)
    received_W = torch.bincount(idx_TK.reshape(-1) // (opts.experts // W), minlength=W)
    dist.all_reduce(received_W, group=group)
    skew = float(received_W.max() / received_W.double().mean())
    rows = {}
    for name, sched in _schedules(opts).items():
        rows[name] = predict(shape, W, W, calib, chunks=sched["chunks"], skew=skew)["time"]
    seq = predict(shape, W, W, calib, skew=skew)
    rows["comm only"] = seq["t_cnt"] + seq["d_1"] + seq["m_1"]
    return dict(seconds=rows, skew=skew, calibration=calib.to_dict(), terms_s={k: seq[k] for k in
                                                                               ("t_cnt", "d_1", "c_1", "m_1")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--expert-hidden", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--trials", type=int, default=1,
                   help="time-then-calibrate rounds in the same ranks; rows report medians over them")
    p.add_argument("--fresh-buffers", dest="reuse_large_buffers", action="store_false",
                   help="leave glibc's malloc as it is (large buffers unmapped and faulted in again each step)")
    p.add_argument("--no-predict", dest="predict", action="store_false",
                   help="skip the calibration and the cost model's predictions")
    p.add_argument("--out", help="write benchmarks/results/<OUT>.json")
    opts = p.parse_args(argv)
    trials = spawn_gloo(_worker, opts.world, opts, timeout_s=900)[0]  # rank 0's clock
    # Per row: the median over trials of each trial's median time (and of its prediction).
    names = list(trials[0]["times"])
    med = {name: statistics.median(statistics.median(t["times"][name]) for t in trials) for name in names}
    times = {name: [x for t in trials for x in t["times"][name]] for name in names}
    prediction = None
    if opts.predict:
        prediction = dict(seconds={name: statistics.median(t["prediction"]["seconds"][name] for t in trials)
                                   for name in names},
                          skew=trials[0]["prediction"]["skew"], trials=[t["prediction"] for t in trials],
                          terms_s={k: statistics.median(t["prediction"]["terms_s"][k] for t in trials)
                                   for k in trials[0]["prediction"]["terms_s"]})
    comm = med["comm only"]
    seq = med["sequential"]
    print(f"# {opts.world} gloo ranks, {opts.tokens} tokens/rank, H={opts.hidden}, I={opts.expert_hidden}, "
          f"E={opts.experts}, K={opts.top_k}, forward, median of {opts.repeat} rounds"
          + (f", median over {opts.trials} trials" if opts.trials > 1 else ""))
    print(f"{'schedule':<14} {'ms':>9} {'vs seq':>8} {'a2a hidden':>11}"
          + (f" {'predicted ms':>13} {'error':>7}" if prediction else ""))
    rows = []
    for name, t in med.items():
        hidden = None if name in ("comm only", "sequential") else (seq - t) / comm
        row = dict(schedule=name, median_s=t, speedup_vs_sequential=seq / t, a2a_hidden_fraction=hidden,
                   times_s=times[name])
        line = f"{name:<14} {t * 1e3:9.2f} {seq / t:7.2f}x {'' if hidden is None else f'{hidden:10.0%}':>11}"
        if prediction:
            p_s = prediction["seconds"][name]
            per_trial = [tr["prediction"]["seconds"][name] / statistics.median(tr["times"][name]) - 1 for tr in trials]
            row.update(predicted_s=p_s, rel_error=p_s / t - 1, trial_errors=per_trial)
            line += f" {p_s * 1e3:13.2f} {p_s / t - 1:+7.0%}"
            if len(trials) > 1:
                line += "  (" + " ".join(f"{e:+.0%}" for e in per_trial) + ")"
        rows.append(row)
        print(line)
    if prediction:
        print(f"routing skew {prediction['skew']:.3f}; terms at r=1: "
              + ", ".join(f"{k}={v * 1e3:.2f} ms" for k, v in prediction["terms_s"].items()))
    if opts.out:
        doc = dict(benchmark="ep_overlap", settings=vars(opts), torch=torch.__version__, python=sys.version.split()[0],
                   machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   device="cpu (gloo, one machine)", rows=rows, prediction=prediction)
        path = write_json(os.path.join(RESULTS, f"{opts.out}.json"), doc)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
