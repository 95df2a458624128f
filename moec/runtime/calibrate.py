"""Measure the cost model's constants on this machine: a micro-benchmark of a few seconds.

Contract
--------
* ``calibrate(shape=None, group=None)`` is collective: every rank of an initialised process group
  calls it, and every rank gets the same ``Calibration``. It measures, on all ranks at once (so
  ranks sharing cores are measured sharing them): the per-op overhead (tiny ops of the kinds the
  layer issues), the local memory bandwidth (a row gather of the layer's size), the GEMM
  throughput (the layer's two expert GEMMs at a few row counts, least-squares slope, through the
  GEMM the lowered CPU layer uses), and ``all_to_all_single`` at several message sizes (each after
  a little compute and into a fresh output buffer, as in a layer: see ``measure_a2a``), from which
  ``fit_alpha_beta`` fits the intra-node link's alpha and beta; on CPU, ``measure_wake`` measures
  the extra cost of an exchange issued after a long compute phase and ``measure_overlap`` how much
  of an exchange hides under compute run at the same time. The slowest rank's numbers are kept (a
  collective layer waits for it). The inter-node link cannot be measured on one machine: it is the assumed
  one (``Calibration.with_assumed_inter``). With one rank only the compute is measured and both
  links are assumed.
* ``calibrate_spawned(world_size)`` spawns the ranks itself (``torch.multiprocessing``; gloo over
  TCP on 127.0.0.1 and a free port; NCCL when there are enough GPUs) and returns rank 0's result.
* ``python -m moec.runtime.calibrate --world-size N`` does that and saves the result to
  ``moec.runtime.cost_model.calibration_path()``, where ``moec optimize`` finds it.

Threads: each rank runs ``torch.set_num_threads(threads)``, by default ``cpu_count // world_size``
(at least 1), so that the ranks do not oversubscribe the cores; run the layer the same way, or
the compute throughput measured here is not the one it gets.

Timing: ``time.perf_counter`` around bursts of back-to-back calls (after a barrier; CUDA
synchronised), the median of several bursts per size. An all-to-all's time is the burst's time per
call, so the ranks' skew leaving the barrier is spread over the burst.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moec.runtime.cost_model import Calibration, LayerShape, calibration_path, cpu_model

__all__ = ["calibrate", "calibrate_spawned", "fit_alpha_beta", "fit_line", "main", "measure_overlap"]

# Bytes one rank sends in all, per all-to-all (split evenly over the ranks).
DEFAULT_A2A_BYTES = (256, 4096, 32768, 131072, 524288, 2097152, 4194304)
# The layer the compute is measured at when none is given: mid-sized, fp32.
REPRESENTATIVE = LayerShape(tokens=1024, hidden=512, expert_hidden=1024, num_experts=8, top_k=2, name="representative")
BURSTS = 5
# The row gather that measures memory bandwidth cycles over copies of the rows adding up to this
# many bytes: more than a CPU's last-level cache (32 MB on this project's EPYC).
COLD_BYTES = 128 << 20
BURST_S = 0.02  # aim for bursts this long; at most MAX_CALLS calls
MAX_CALLS = 50


# ----------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------


def fit_line(xs: Sequence[float], ys: Sequence[float],
             weights: Optional[Sequence[float]] = None) -> tuple[float, float]:
    """Weighted least squares ``y ~ a + b*x``: ``(a, b)``."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("moec: a line fit needs at least two (x, y) pairs")
    w = list(weights) if weights is not None else [1.0] * len(xs)
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    if sxx == 0:
        raise ValueError("moec: a line fit needs at least two different x")
    b = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / sxx
    return my - b * mx, b


def fit_alpha_beta(sizes_bytes: Sequence[float], seconds: Sequence[float], world_size: int) -> tuple[float, float]:
    """alpha (s per peer) and beta (s per byte) of ``t = (W-1)*alpha + n*(W-1)/W*beta``, the
    pairwise all-to-all of ``n`` bytes per rank split evenly, all peers on one link class. The fit
    weighs relative errors (weights 1/t^2) so the small messages, which decide alpha, count as much
    as the large ones; a negative coefficient (noise) is clamped to 0 and the other refitted."""
    if world_size < 2:
        raise ValueError("moec: alpha and beta need at least two ranks")
    peers = world_size - 1
    xs = [n * peers / world_size for n in sizes_bytes]
    w = [1.0 / (t * t) for t in seconds]
    a, b = fit_line(xs, seconds, w)
    if a < 0:  # through the origin
        a, b = 0.0, sum(wi * x * t for wi, x, t in zip(w, xs, seconds)) / sum(wi * x * x for wi, x in zip(w, xs))
    if b <= 0:  # latency only; keep beta positive for the model's divisions
        a, b = sum(wi * t for wi, t in zip(w, seconds)) / sum(w), 1e-15
    return a / peers, b


# ----------------------------------------------------------------------------------------------
# Measurements (one rank)
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call(fn: Callable[[], object], calls: int, device: torch.device, barrier: Callable[[], None] = lambda: None,
              bursts: int = BURSTS) -> float:
    """Median over ``bursts`` of a burst's seconds per call."""
    times = []
    for _ in range(bursts):
        barrier()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def _calls_for(fn: Callable[[], object], device: torch.device) -> int:
    fn()  # warm
    t = _per_call(fn, 1, device, bursts=1)
    return max(2, min(MAX_CALLS, int(BURST_S / max(t, 1e-7))))


def measure_compute(shape: Optional[LayerShape] = None, device: torch.device | str = "cpu") -> dict:
    """This rank's ``op_overhead_s``, ``mem_bytes_per_s`` and ``flops_per_s`` (see the module
    docstring), and the samples behind them."""
    device = torch.device(device)
    shape = shape or REPRESENTATIVE
    dtype = {4: torch.float32, 2: torch.bfloat16, 8: torch.float64}.get(shape.dtype_bytes, torch.float32)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU bf16 GEMMs are not what a CPU run of the layer uses
    g = torch.Generator().manual_seed(0)
    H, I = shape.hidden, shape.expert_hidden
    F_ = 2 * I if shape.gated else I

    mix, mix_ops = _op_mix(device)
    overhead = _per_call(mix, 100, device) / mix_ops

    rows = shape.tokens * shape.top_k  # R at uniform routing
    x_RH = torch.randn(rows, H, generator=g).to(device, dtype)
    perm_R = torch.randperm(rows, generator=g).to(device)
    # index_select, as the lowered ops and ep_moe gather rows (advanced indexing is ~3x slower on
    # CPU), from sources rotated over COLD_BYTES: a layer's rows are not in cache when it moves
    # them (one source gathered again and again measured 4x the bandwidth, from L3).
    copies = -(-COLD_BYTES // max(1, x_RH.numel() * x_RH.element_size()))
    sources = [x_RH] + [x_RH.clone() for _ in range(copies - 1)]
    turn = itertools.cycle(sources)
    gather = lambda: next(turn).index_select(0, perm_R)  # noqa: E731
    t_gather = _per_call(gather, _calls_for(gather, device), device)
    del sources, turn, gather  # the copies (128 MB) go before the GEMM timings
    mem = 2 * x_RH.numel() * x_RH.element_size() / max(t_gather - overhead, 1e-9)

    linear = _expert_linear(device)
    w_in_FH = torch.randn(F_, H, generator=g).to(device, dtype)
    w_out_HI = torch.randn(H, I, generator=g).to(device, dtype)
    per_expert = max(1, rows // shape.num_experts)
    gemm_rows = sorted({max(1, per_expert // 4), max(1, per_expert // 2), per_expert, min(4 * per_expert, rows)})
    flops, seconds = [], []
    for m in gemm_rows:
        a_MH = torch.randn(m, H, generator=g).to(device, dtype)
        a_MI = torch.randn(m, I, generator=g).to(device, dtype)

        def gemms():
            linear(a_MH, w_in_FH)
            linear(a_MI, w_out_HI)

        flops.append(2 * m * H * (F_ + I))
        seconds.append(_per_call(gemms, _calls_for(gemms, device), device))
    _, slope = fit_line(flops, seconds) if len(flops) > 1 else (0.0, 0.0)
    # Noise can flatten the slope on a busy machine: then the largest GEMM's throughput.
    flops_per_s = 1 / slope if slope > 0 else flops[-1] / seconds[-1]
    return dict(op_overhead_s=overhead, mem_bytes_per_s=mem, flops_per_s=flops_per_s,
                samples=dict(gather_bytes=2 * x_RH.numel() * x_RH.element_size(), gather_s=t_gather,
                             gemm_flops=flops, gemm_s=seconds, dtype=str(dtype).removeprefix("torch.")))


def _expert_linear(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One expert's GEMM as the lowered layer runs it: on CPU ``moec.codegen.cpu``'s (oneDNN with
    its dispatch by row count; 2.4x ``F.linear``'s throughput at [512, 256] x [256, 1024] on this
    project's VM), elsewhere ``F.linear``."""
    if device.type == "cpu":
        from moec.codegen.cpu import _linear

        return lambda x, w: _linear(x, w, None, False)
    return F.linear


def _op_mix(device: torch.device) -> tuple[Callable[[], object], int]:
    """One of each kind of op an ``ep_moe`` forward issues, on tiny tensors, and their number: its
    time per op is the per-op overhead (a lone ``torch.add`` would give half of it: the layer's ops
    include sorts, gathers, host syncs and ``moec::`` custom ops)."""
    import moec.ir.lowered  # noqa: F401  (registers moec::permute)

    x_MD = torch.randn(8, 16, device=device)
    w_DD = torch.randn(16, 16, device=device)
    idx_M = torch.arange(8, device=device)
    ids_M1 = torch.zeros(8, 1, dtype=torch.int64, device=device)
    counts_1 = torch.tensor([8], device=device)

    def mix():
        torch.sort(idx_M, stable=True)
        torch.bincount(idx_M, minlength=8)
        x_MD[idx_M]
        F.linear(x_MD, w_DD)
        torch.cat([x_MD, x_MD])
        torch.empty_like(x_MD).index_copy(0, idx_M, x_MD)
        torch.ops.moec.permute(ids_M1, counts_1)
        F.silu(x_MD) * x_MD
        x_MD.sum(dim=0)
        idx_M.tolist()

    return mix, 12


def measure_a2a(sizes_bytes: Sequence[int] = DEFAULT_A2A_BYTES, group=None, device: torch.device | str = "cpu",
                interleave: bool = True) -> list[float]:
    """Seconds per ``all_to_all_single`` of each size (bytes one rank sends, split evenly; float32
    elements), the slowest rank's; collective.

    With ``interleave`` (the default) each exchange follows a little compute (``_work``, ~0.1 ms
    on a CPU core) and its time is that of the (compute, exchange) burst less the compute's alone:
    a layer issues its exchanges between compute, and on a CPU machine whose cores the ranks
    share such an exchange was measured at several times the cost of one in a tight loop (the
    peer's process and gloo's threads must be woken first), which is the cost the layer pays.
    Each exchange writes a fresh output buffer, as a layer's does (functional collectives
    allocate theirs): where the allocator hands large blocks back to the OS, the pages are
    faulted in again on every call, and the layer pays that too."""
    device = torch.device(device)
    world = dist.get_world_size(group)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    work = _work(device)
    t_work = 0.0
    if interleave:
        t_work = _agree(_per_call(work, 20, device, barrier=barrier), group, device, dist.ReduceOp.MAX)
    out = []
    for n in sizes_bytes:
        elems = max(world, n // 4 // world * world)
        send = torch.randn(elems, device=device)

        def step():
            if interleave:
                work()
            dist.all_to_all_single(torch.empty_like(send), send, group=group)

        calls = int(_agree(_calls_for(step, device), group, device, dist.ReduceOp.MIN))
        t = _per_call(step, calls, device, barrier=barrier)
        # Floor at a tenth of the burst: noise in the subtraction must not give a free exchange.
        out.append(max(_agree(t, group, device, dist.ReduceOp.MAX) - t_work, 0.1 * t))
    return out


def measure_wake(group=None, device: torch.device | str = "cpu") -> float:
    """Extra seconds of a small exchange issued after ~1 ms of compute over one issued after
    ~0.1 ms (``Calibration.wake_s``); the slowest rank's, at least 0; collective."""
    device = torch.device(device)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    world = dist.get_world_size(group)
    send = torch.randn(world * 16, device=device)
    recv = torch.empty_like(send)
    cost = []
    for repeats in (20, 200):  # ~0.1 ms and ~1 ms of 64x64 products on a CPU core
        work = _work(device, repeats)

        def step():
            work()
            dist.all_to_all_single(recv, send, group=group)

        step()
        t_work = _per_call(work, 5, device, barrier=barrier, bursts=2 * BURSTS)
        t_step = _per_call(step, 5, device, barrier=barrier, bursts=2 * BURSTS)
        cost.append(_agree(t_step - t_work, group, device, dist.ReduceOp.MAX))
    return max(0.0, cost[1] - cost[0])


def measure_overlap(group=None, device: torch.device | str = "cpu", nbytes: int = 1 << 22) -> float:
    """Overlap efficiency eta (``Calibration.overlap``): the fraction of the shorter of an
    exchange of ``nbytes`` per rank and a stretch of compute of similar length that is hidden when
    the exchange is issued asynchronously and the compute runs before its wait:
    ``(t_compute + t_exchange - t_both) / min(t_compute, t_exchange)``, clamped to [0, 1]; the
    slowest rank's (MIN over ranks); collective."""
    device = torch.device(device)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    world = dist.get_world_size(group)
    send = torch.randn(max(world, nbytes // 4 // world * world), device=device)

    def exchange(async_op=False):
        return dist.all_to_all_single(torch.empty_like(send), send, group=group, async_op=async_op)

    t_x = _agree(_per_call(exchange, 5, device, barrier=barrier), group, device, dist.ReduceOp.MAX)
    # Compute of about the exchange's length: 64x64 products, ~5 us each on a CPU core.
    probe = _work(device, 20)
    t_probe = _agree(_per_call(probe, 5, device, barrier=barrier), group, device, dist.ReduceOp.MAX)
    work = _work(device, max(1, int(20 * t_x / max(t_probe, 1e-9))))
    t_w = _agree(_per_call(work, 5, device, barrier=barrier), group, device, dist.ReduceOp.MAX)

    def both():
        handle = exchange(async_op=True)
        work()
        handle.wait()

    both()
    t_both = _agree(_per_call(both, 5, device, barrier=barrier, bursts=2 * BURSTS), group, device,
                    dist.ReduceOp.MAX)
    eta = (t_w + t_x - t_both) / max(min(t_w, t_x), 1e-12)
    return min(1.0, max(0.0, eta))


def _work(device: torch.device, repeats: int = 20) -> Callable[[], object]:
    a_MM = torch.randn(64, 64, device=device)

    def work():
        for _ in range(repeats):
            a_MM @ a_MM

    return work


def _agree(value: float, group, device: torch.device, op) -> float:
    """The ranks' ``op`` (MIN or MAX) of a number: every rank then uses the same."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def _device_description(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{name} ({device.type}, {os.cpu_count()} CPUs)"


def calibrate(shape: Optional[LayerShape] = None, group=None, device: torch.device | str | None = None,
              sizes_bytes: Sequence[int] = DEFAULT_A2A_BYTES) -> Calibration:
    """Collective when a process group is initialised (see the module docstring); without one,
    measures the compute of this process only."""
    distributed = dist.is_available() and dist.is_initialized()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            distributed and dist.get_backend(group) == "nccl") else torch.device("cpu")
    device = torch.device(device)
    world = dist.get_world_size(group) if distributed else 1
    if distributed:
        dist.barrier(group=group)  # every rank measures its compute at the same time
    comp = measure_compute(shape, device)
    if distributed:
        comp["flops_per_s"] = _agree(comp["flops_per_s"], group, device, dist.ReduceOp.MIN)
        comp["mem_bytes_per_s"] = _agree(comp["mem_bytes_per_s"], group, device, dist.ReduceOp.MIN)
        comp["op_overhead_s"] = _agree(comp["op_overhead_s"], group, device, dist.ReduceOp.MAX)
    default = Calibration.default()
    calib = Calibration(
        device=_device_description(device), flops_per_s=comp["flops_per_s"], op_overhead_s=comp["op_overhead_s"],
        mem_bytes_per_s=comp["mem_bytes_per_s"], alpha_s=dict(default.alpha_s),
        beta_s_per_byte=dict(default.beta_s_per_byte), measured=["flops_per_s", "op_overhead_s", "mem_bytes_per_s"],
        threads=torch.get_num_threads(), host=socket.gethostname(), torch_version=torch.__version__,
        samples=dict(compute=comp["samples"]),
    )
    if world > 1:
        seconds = measure_a2a(sizes_bytes, group, device)
        alpha, beta = fit_alpha_beta(sizes_bytes, seconds, world)
        calib.alpha_s["intra"], calib.beta_s_per_byte["intra"] = alpha, beta
        if device.type == "cpu":
            calib.wake_s = measure_wake(group, device)
            calib.overlap = measure_overlap(group, device)
            calib.measured += ["intra", "wake_s", "overlap"]
        else:  # NCCL's kernels neither sleep nor share the SMs' work: both assumed
            calib.measured += ["intra"]
        calib.world_size, calib.backend = world, dist.get_backend(group)
        calib.samples["a2a"] = dict(bytes_per_rank=list(sizes_bytes), seconds=seconds)
    return calib.with_assumed_inter()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, shape: Optional[LayerShape], threads: int,
            backend: str, sizes_bytes: Sequence[int]) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        calib = calibrate(shape, sizes_bytes=sizes_bytes)
        if rank == 0:
            calib.save(out)
    finally:
        dist.destroy_process_group()


def default_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def calibrate_spawned(world_size: int, shape: Optional[LayerShape] = None, threads: Optional[int] = None,
                      backend: Optional[str] = None, sizes_bytes: Sequence[int] = DEFAULT_A2A_BYTES) -> Calibration:
    """Spawn ``world_size`` ranks on this machine, calibrate, return the result (nothing saved)."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"moec: world size must be at least 1, got {world_size}")
    threads = threads or default_threads(world_size)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    with tempfile.TemporaryDirectory(prefix="moec-calib-") as tmp:
        out = os.path.join(tmp, "calibration.json")
        mp.spawn(_worker, args=(world_size, _free_port(), out, shape, threads, backend, tuple(sizes_bytes)),
                 nprocs=world_size, join=True)
        return Calibration.load(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moec.runtime.calibrate",
        description="Measure compute throughput, per-op overhead, memory bandwidth and the all-to-all's alpha/beta "
                    "on this machine (a few seconds) and store them for `moec optimize`.")
    parser.add_argument("--world-size", type=int, default=2, metavar="N", help="ranks to spawn (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch threads per rank (default: CPUs / ranks, at least 1)")
    parser.add_argument("--out", metavar="FILE", help=f"where to write it (default: {calibration_path()})")
    opts = parser.parse_args(argv)
    if opts.world_size < 1:
        print(f"moec: --world-size must be at least 1, got {opts.world_size}", file=sys.stderr)
        return 2
    calib = calibrate_spawned(opts.world_size, threads=opts.threads)
    path = calib.save(opts.out)
    print(calib.describe())
    print(f"saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
