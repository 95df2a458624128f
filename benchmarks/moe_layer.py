#!/usr/bin/env python3
"""Per-layer MoE benchmark: one HF MoE block, moec beside its baselines in one process.

Contract: ``python benchmarks/moe_layer.py [--shapes S ...] [--tokens N ...] [--hot] [--ops] [--out NAME]``
prints one table per shape and, with ``--out``, writes ``benchmarks/results/<NAME>.json`` (the machine,
the settings, every row with every timed run). It exits 1 when a moec row's output differs from eager.

Rows (same input, same weights, same process; forward only, ``--dtype`` float32 (default) or
bfloat16, no grad):

- ``hf-eager``: the transformers block with ``config._experts_implementation = "eager"`` (a Python
  loop over the experts hit, one ``F.linear`` pair each);
- ``hf-grouped_mm``: the same block with ``"grouped_mm"`` (``torch._grouped_mm``);
- ``inductor``: ``torch.compile`` (default backend) of the block with eager experts;
- ``moec``: ``moec.compile(block, inner="inductor", target=<cpu|triton>)``;
- ``moec-cpu-ops`` (CPU): the ``moec_cpu::`` ops composed by hand on the block's weights
  (gate -> permute -> grouped_gemm_act -> grouped_gemm_combine), i.e. moec's lowering without the
  compiler around it;
- ``dense-mm`` / ``dense-onednn`` (CPU) / ``dense-mm`` (GPU): plain GEMMs of the layer's FLOPs,
  ``[T*K, H] x [H, 2I]`` then ``[T*K, I] x [I, H]`` (torch.mm, and on CPU also oneDNN's linear), the
  throughput reference for "moec reaches >= 85% of plain GEMM";
- ``stream-read``: ``sum()`` over exactly the expert weights the routing hits, the memory floor of
  the layer at small token counts.

Method. Weights must not sit in the cache between calls, as in a real model that streams each
layer's weights once per step: by default ("cold") every backend cycles through L deep copies of the
block, L chosen so that the experts one token touches in all copies together are at least 4x the
last-level cache (and all copies' weights at least 4x too); ``--hot`` uses one copy. Per row:
``--warmup`` untimed calls after the first (compiling) one, then ``--repeat`` timed calls,
``time.perf_counter`` per call on CPU, CUDA events (``triton.testing.do_bench``) on GPU; the median is
reported. ``torch.set_num_threads(--threads)`` (default 2) on CPU.

Columns: median ms; TFLOP/s = 2*T*K*(H*F + I*H) / time (F = 2I; routed experts only);
GB/s = bytes of the experts the routing of that call hits (plus the shared expert) / time;
``x best`` = best baseline time / this time (baselines: hf-eager, hf-grouped_mm, inductor);
error = max|out - eager| / max|eager|, ``ok`` at <= 1e-4 (fp32) or 2e-2 (bf16).
``--target cpu|triton`` picks moec's kernels (default: cpu on CPU, triton on GPU; triton on CPU
needs ``TRITON_INTERPRET=1``).

``--ops`` adds a per-op table: each lowered op, ``moec::`` reference body vs ``moec_cpu::``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINES = ("hf-eager", "hf-grouped_mm", "inductor")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Shape:
    family: str  # "mixtral" | "qwen3_moe" | "deepseek_v3"
    hidden: int
    inter: int
    experts: int
    top_k: int
    groups: int = 1
    topk_groups: int = 1
    shared: int = 0  # shared experts (DeepSeek)


SHAPES = {
    # Full-size layers (GPU).
    "mixtral-8x7b": Shape("mixtral", 4096, 14336, 8, 2),
    "deepseek-v3": Shape("deepseek_v3", 7168, 2048, 256, 8, 8, 4, shared=1),
    "qwen3-30b-a3b": Shape("qwen3_moe", 2048, 768, 128, 8),
    # Scaled-down layers of the same structure (CPU).
    "cpu-mixtral": Shape("mixtral", 512, 1024, 8, 2),
    "cpu-deepseek": Shape("deepseek_v3", 1024, 256, 64, 8, 8, 4, shared=1),
    "cpu-qwen": Shape("qwen3_moe", 512, 256, 64, 8),
    # Tiny layers of the same structure: benchmarks/gpu_check.sh --dry-run (Triton interpreted).
    "tiny-mixtral": Shape("mixtral", 64, 64, 8, 2),
    "tiny-deepseek": Shape("deepseek_v3", 64, 32, 16, 4, 4, 2, shared=1),
    "tiny-qwen": Shape("qwen3_moe", 64, 32, 16, 4),
}
GPU_SHAPES = ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b")
CPU_SHAPES = ("cpu-mixtral",)
GPU_TOKENS = (1, 16, 128, 1024, 4096, 16384)
CPU_TOKENS = (1, 16, 2048)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def build_block(shape: Shape, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """The transformers MoE block of ``shape.family``, weights scale-preserving (outputs O(1)),
    built and filled on ``device`` (a full-size DeepSeek-V3 layer is 45 GB in fp32: on the CPU its
    random fill alone took longer than the GPU check's step)."""
    with torch.device(device):
        return _fill(_new_block(shape), seed, device)


def _new_block(shape: Shape) -> nn.Module:
    if shape.family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.inter,
                            num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
        block = MixtralSparseMoeBlock(cfg)
    elif shape.family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, num_experts=shape.experts,
                             num_experts_per_tok=shape.top_k, norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(cfg)
    elif shape.family == "deepseek_v3":
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        cfg = DeepseekV3Config(hidden_size=shape.hidden, moe_intermediate_size=shape.inter,
                               n_routed_experts=shape.experts, num_experts_per_tok=shape.top_k, n_group=shape.groups,
                               topk_group=shape.topk_groups, n_shared_experts=shape.shared, norm_topk_prob=True)
        block = DeepseekV3MoE(cfg)
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    return block


def _fill(block: nn.Module, seed: int, device: torch.device | str) -> nn.Module:
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(fan_in))
        for name, buf in block.named_buffers():
            if "correction_bias" in name:
                buf.copy_(torch.randn(buf.shape, generator=g, device=device) * 0.01)
    return block.eval()


def set_experts_impl(block: nn.Module, impl: str) -> None:
    # The experts module reads config._experts_implementation on every call.
    block.experts.config._experts_implementation = impl


def expert_bytes(shape: Shape, dtype_bytes: int = 4) -> int:
    return 3 * shape.hidden * shape.inter * dtype_bytes


def routed_experts(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, _, idx = block.gate(x.reshape(-1, x.shape[-1]))
    return torch.unique(idx.reshape(-1))


def active_bytes(shape: Shape, n_experts_hit: int, dtype_bytes: int = 4) -> int:
    return expert_bytes(shape, dtype_bytes) * (n_experts_hit + shape.shared)


def layer_flops(shape: Shape, tokens: int) -> int:
    # Routed experts: x [T*K, H] @ [H, 2I], a [T*K, I] @ [I, H]; the shared expert adds T tokens.
    per_row = shape.hidden * 2 * shape.inter + shape.inter * shape.hidden
    return 2 * per_row * (tokens * shape.top_k + tokens * shape.shared)


# ----------------------------------------------------------------------------------------------
# moec rows
# ----------------------------------------------------------------------------------------------


def moec_cpu_ops_forward(block: nn.Module, shape: Shape, x_BSH: torch.Tensor) -> torch.Tensor:
    """The lowered layer written out with ``moec_cpu::`` ops on the HF block's weights."""
    import moec.codegen.cpu  # noqa: F401

    ops = torch.ops.moec_cpu
    x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
    experts = block.experts
    if shape.family == "deepseek_v3":
        router = block.gate
        weights_TK, idx_TK, counts_E = ops.gate(x_TH, router.weight, None, router.e_score_correction_bias,
                                                "sigmoid_bias_grouped_topk", shape.top_k, shape.groups,
                                                shape.topk_groups, router.norm_topk_prob,
                                                float(router.routed_scaling_factor))
    else:
        weights_TK, idx_TK, counts_E = ops.gate(x_TH, block.gate.weight, None, None, "softmax_topk", shape.top_k, 1,
                                                1, True, 1.0)
    token_N, slot_N = ops.permute(idx_TK, counts_E)
    a_NI = ops.grouped_gemm_act(x_TH, token_N, counts_E, experts.gate_up_proj, None, "swiglu", False, False, 1.0, 7.0)
    out_TH = ops.grouped_gemm_combine(a_NI, slot_N, counts_E, experts.down_proj, None, weights_TK, False)
    if shape.shared:
        mlp = block.shared_experts
        out_TH = out_TH + mlp.down_proj(F.silu(mlp.gate_proj(x_TH)) * mlp.up_proj(x_TH))
    return out_TH.reshape(x_BSH.shape)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[int], Any], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """``step(i)`` runs call i (on copy i mod L); returns the ``repeat`` timed calls in ms."""
    counter = iter(range(10**9))
    for _ in range(warmup):
        step(next(counter))
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            ms = do_bench(lambda: step(next(counter)), warmup=0, rep=max(25, repeat), return_mode="all")
            return list(ms)
        except ImportError:
            pass
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        step(next(counter))
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    scale = ref.float().abs().max().item()
    return (out.float() - ref.float()).abs().max().item() / max(scale, 1e-30)


def _llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 1024**2


def num_copies(shape: Shape, device: torch.device, hot: bool, budget_bytes: int, dtype_bytes: int = 4) -> int:
    if hot:
        return 1
    cache = _llc_bytes() if device.type == "cpu" else 50 * 1024**2  # H100 L2 50 MB, H200 the same
    per_copy_active = active_bytes(shape, shape.top_k, dtype_bytes)  # what one token reads
    per_copy_total = expert_bytes(shape, dtype_bytes) * (shape.experts + shape.shared)
    need = max(math.ceil(4 * cache / per_copy_active), math.ceil(4 * cache / per_copy_total), 2)
    return max(1, min(need, budget_bytes // per_copy_total))


def machine(device: torch.device) -> dict[str, Any]:
    from moec.cli.bench import machine_info

    info = machine_info(device)
    info["llc_bytes"] = _llc_bytes()
    return info


# ----------------------------------------------------------------------------------------------
# The layer benchmark
# ----------------------------------------------------------------------------------------------


def bench_shape(name: str, shape: Shape, tokens: list[int], args, device: torch.device,
                log: Callable[[str], None], rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Appends the rows of one shape to ``rows``, calling ``save()`` after each token count (a run
    stopped at a time limit keeps what it measured)."""
    dtype = DTYPES[args.dtype]
    el = torch.finfo(dtype).bits // 8
    base = build_block(shape, device=device).to(dtype=dtype)
    L = num_copies(shape, device, args.hot, int(args.budget_gb * 1024**3), el)
    log(f"{name}: {L} cop{'y' if L == 1 else 'ies'} of the block ({L * expert_bytes(shape, el) * shape.experts / 1e6:.0f} MB "
        f"of expert weights), {'hot' if args.hot else 'cold'}")
    blocks = [base] + [copy.deepcopy(base) for _ in range(L - 1)]
    wanted = set(args.backends.split(","))

    # Compiled callables take the block as an argument so every copy shares one compiled graph.
    for tokens_n in tokens:
        g = torch.Generator().manual_seed(tokens_n)
        x = torch.randn(1, tokens_n, shape.hidden, generator=g).to(device=device, dtype=dtype)
        hit = routed_experts(base, x)
        nbytes = active_bytes(shape, len(hit), el)
        flops = layer_flops(shape, tokens_n)
        with torch.no_grad():
            for b in blocks:
                set_experts_impl(b, "eager")
            ref = base(x)

        def record(backend: str, step: Callable[[int], Any], out: torch.Tensor | None = None, **extra):
            times = time_calls(step, device, args.warmup, args.repeat)
            med = statistics.median(times)
            row = {"shape": name, "backend": backend, "tokens": tokens_n, "median_ms": med, "times_ms": times,
                   "tflops": flops / med / 1e9, "gbps": nbytes / med / 1e6, "experts_hit": len(hit),
                   "active_bytes": nbytes, "copies": L, **extra}
            if out is not None:
                err = _error(out, ref)
                row["rel_err"] = None if math.isinf(err) else err  # strict JSON has no infinity
                row["ok"] = err <= REL_TOL[dtype]
            rows.append(row)
            log(f"  {backend:14s} T={tokens_n:<6d} {med:9.3f} ms  {row['tflops']:7.3f} TFLOP/s  {row['gbps']:7.1f} GB/s"
                + (f"  err {err:.1e}" if out is not None else ""))

        with torch.no_grad():
            for impl, backend in (("eager", "hf-eager"), ("grouped_mm", "hf-grouped_mm")):
                if backend not in wanted:
                    continue
                for b in blocks:
                    set_experts_impl(b, impl)
                out = base(x)
                record(backend, lambda i: blocks[i % L](x), out)
            for b in blocks:
                set_experts_impl(b, "eager")

            if "moec" in wanted:
                fn, out, compile_s, err = _moec_row(blocks, x, device, args.target)
                if err:
                    log(f"  moec: {err}")
                    rows.append({"shape": name, "backend": "moec", "tokens": tokens_n, "error": err})
                else:
                    record("moec", lambda i: fn(blocks[i % L], x), out, compile_s=compile_s)

            if "inductor" in wanted:
                torch.compiler.reset()
                fn = torch.compile(lambda blk, inp: blk(inp))
                t0 = time.perf_counter()
                out = fn(base, x)
                record("inductor", lambda i: fn(blocks[i % L], x), out, compile_s=time.perf_counter() - t0)

            if "moec-cpu-ops" in wanted and device.type == "cpu":
                out = moec_cpu_ops_forward(base, shape, x)
                record("moec-cpu-ops", lambda i: moec_cpu_ops_forward(blocks[i % L], shape, x), out)

            if "dense" in wanted:
                _dense_rows(record, blocks, shape, tokens_n, device, dtype)
            if "stream-read" in wanted:
                weights = [_hit_weights(b, hit) for b in blocks]
                record("stream-read", lambda i: [w.sum() for w in weights[i % L]])
        _add_ratios([r for r in rows if r["shape"] == name and r["tokens"] == tokens_n and "median_ms" in r])
        save()


def _moec_row(blocks, x, device, target: str = "auto"):
    """Compile once with moec (target cpu or triton) and run it on the first copy."""
    import moec
    from moec.capture import convert_model

    if target == "auto":
        target = "cpu" if device.type == "cpu" else "triton"
    try:
        torch.compiler.reset()
        found = [convert_model(b, ((x,), {})) for b in blocks][0]
        if not found.layers:  # never time the layer's own code under moec's name
            why = "; ".join(f"{f.location}: {f.reason}" for f in found.fallbacks) or "no reason given"
            return None, None, None, f"moec recognised no MoE layer ({why})"
        fn = moec.compile(lambda blk, inp: blk(inp), inner="inductor", target=target)
        t0 = time.perf_counter()
        out = fn(blocks[0], x)
        _sync(device)
        return fn, out, time.perf_counter() - t0, None
    except Exception as e:  # a moec failure is a result row, not the end of the benchmark
        return None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _hit_weights(block: nn.Module, hit: torch.Tensor) -> list[torch.Tensor]:
    ex = block.experts
    out = []
    for e in hit.tolist():
        out += [ex.gate_up_proj[e], ex.down_proj[e]]
    if getattr(block, "shared_experts", None) is not None:
        out += [p for p in block.shared_experts.parameters()]
    return out


def _dense_rows(record, blocks, shape: Shape, tokens_n: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> None:
    """Plain GEMMs with the layer's routed FLOPs: [N, H] x [H, 2I], [N, I] x [I, H], N = T*K(+T shared)."""
    L = len(blocks)
    N = tokens_n * (shape.top_k + shape.shared)
    g = torch.Generator().manual_seed(1)
    x_NH = torch.randn(N, shape.hidden, generator=g).to(device=device, dtype=dtype)
    a_NI = torch.randn(N, shape.inter, generator=g).to(device=device, dtype=dtype)
    w = [(b.experts.gate_up_proj[0], b.experts.down_proj[0]) for b in blocks]  # [2I, H], [H, I]

    def dense_mm(i):
        w_in, w_out = w[i % L]
        return torch.mm(x_NH, w_in.t()), torch.mm(a_NI, w_out.t())

    record("dense-mm", dense_mm)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        lin = torch.ops.mkldnn._linear_pointwise
        record("dense-onednn", lambda i: (lin(x_NH, w[i % L][0], None, "none", [], ""),
                                          lin(a_NI, w[i % L][1], None, "none", [], "")))


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = [r["median_ms"] for r in rows if r["backend"] in BASELINES]
    eager = next((r["median_ms"] for r in rows if r["backend"] == "hf-eager"), None)
    dense = [r["median_ms"] for r in rows if r["backend"].startswith("dense")]
    for r in rows:
        # > 1 is faster than the best baseline / than HF eager.
        r["x_best_baseline"] = min(base) / r["median_ms"] if base else None
        r["x_eager"] = eager / r["median_ms"] if eager else None
        # Fraction of the best plain-GEMM throughput at the same FLOPs.
        r["of_dense_gemm"] = min(dense) / r["median_ms"] if dense else None


def format_table(rows: list[dict[str, Any]]) -> str:
    heads = ["shape", "backend", "tokens", "median ms", "TFLOP/s", "GB/s", "x eager", "x best", "of GEMM", "check"]
    table = []
    for r in rows:
        if "median_ms" not in r:
            table.append([r["shape"], r["backend"], str(r["tokens"]), "-", "-", "-", "-", "-", "-", r["error"][:60]])
            continue
        check = "-" if "ok" not in r else ("ok" if r["ok"] else f"MISMATCH {r['rel_err']}")
        table.append([r["shape"], r["backend"], str(r["tokens"]), f"{r['median_ms']:.3f}", f"{r['tflops']:.3f}",
                      f"{r['gbps']:.1f}", f"{r['x_eager']:.2f}" if r["x_eager"] else "-",
                      f"{r['x_best_baseline']:.2f}" if r["x_best_baseline"] else "-",
                      f"{r['of_dense_gemm']:.2f}" if r["of_dense_gemm"] else "-", check])
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Per-op benchmark
# ----------------------------------------------------------------------------------------------


def bench_ops(name: str, shape: Shape, tokens: list[int], args, device: torch.device,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each lowered op, ``moec::`` (reference body) vs ``moec_cpu::``, on the layer's real inputs
    and cold weights (the same L copies as the layer benchmark)."""
    import moec.codegen.cpu  # noqa: F401
    import moec.ir  # noqa: F401

    base = build_block(shape)
    L = num_copies(shape, device, args.hot, int(args.budget_gb * 1024**3))
    blocks = [base] + [copy.deepcopy(base) for _ in range(L - 1)]
    rows = []
    for tokens_n in tokens:
        x = torch.randn(tokens_n, shape.hidden, generator=torch.Generator().manual_seed(tokens_n))
        rw = base.gate.weight
        with torch.no_grad():
            w_TK, idx_TK, counts_E = torch.ops.moec.gate(x, rw, None, None, "softmax_topk", shape.top_k, 1, 1, True, 1.0)
            token_N, slot_N = torch.ops.moec.permute(idx_TK, counts_E)
            a_NI = torch.ops.moec.grouped_gemm_act(x, token_N, counts_E, base.experts.gate_up_proj, None, "swiglu",
                                                   False, False, 1.0, 7.0)
            cases = {
                "gate": lambda ns, b: ns.gate(x, b.gate.weight, None, None, "softmax_topk", shape.top_k, 1, 1, True,
                                              1.0),
                "permute": lambda ns, b: ns.permute(idx_TK, counts_E),
                "grouped_gemm_act": lambda ns, b: ns.grouped_gemm_act(x, token_N, counts_E, b.experts.gate_up_proj,
                                                                      None, "swiglu", False, False, 1.0, 7.0),
                "grouped_gemm_combine": lambda ns, b: ns.grouped_gemm_combine(a_NI, slot_N, counts_E,
                                                                              b.experts.down_proj, None, w_TK, False),
            }
            for op_name, call in cases.items():
                meds = {}
                for ns_name in ("moec", "moec_cpu"):
                    ns = getattr(torch.ops, ns_name)
                    times = time_calls(lambda i: call(ns, blocks[i % L]), device, args.warmup, args.repeat)
                    meds[ns_name] = statistics.median(times)
                    rows.append({"shape": name, "op": op_name, "impl": ns_name, "tokens": tokens_n,
                                 "median_ms": meds[ns_name], "times_ms": times})
                log(f"  op {op_name:22s} T={tokens_n:<6d} moec {meds['moec']:8.3f} ms  moec_cpu {meds['moec_cpu']:8.3f} ms"
                    f"  x{meds['moec'] / meds['moec_cpu']:.2f}")
    return rows


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _write(doc: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda if available)")
    p.add_argument("--shapes", nargs="+", default=None, help=f"of {sorted(SHAPES)}; default by device")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"token counts (default {list(CPU_TOKENS)} on CPU, {list(GPU_TOKENS)} on GPU)")
    p.add_argument("--backends", default="hf-eager,hf-grouped_mm,inductor,moec,moec-cpu-ops,dense,stream-read")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--target", default="auto", choices=["auto", "cpu", "triton"],
                   help="moec's kernels (auto: cpu on CPU, triton on GPU)")
    p.add_argument("--hot", action="store_true", help="one copy of the weights (they stay cached between calls)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--budget-gb", type=float, default=4.0, help="memory for the weight copies")
    p.add_argument("--ops", action="store_true", help="also the per-op benchmark (CPU)")
    p.add_argument("--out", default=None, help="NAME: write benchmarks/results/NAME.json (or a path ending in .json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = args.shapes or list(CPU_SHAPES if device.type == "cpu" else GPU_SHAPES)
    tokens = args.tokens or list(CPU_TOKENS if device.type == "cpu" else GPU_TOKENS)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass

    rows, op_rows = [], []
    doc = {"benchmark": "moe_layer", "mode": "hot" if args.hot else "cold", "dtype": args.dtype, "target": args.target,
           "repeat": args.repeat, "warmup": args.warmup, "machine": machine(device), "results": rows, "ops": op_rows,
           "complete": False}
    path = None
    if args.out:
        path = args.out if args.out.endswith(".json") else os.path.join(RESULTS_DIR, f"{args.out}.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for name in shapes:
        bench_shape(name, SHAPES[name], tokens, args, device, log, rows, lambda: path and _write(doc, path))
        if args.ops and device.type == "cpu" and SHAPES[name].family != "deepseek_v3":
            op_rows += bench_ops(name, SHAPES[name], tokens, args, device, log)
    doc["complete"] = True
    print(format_table(rows))
    if path:
        _write(doc, path)
        print(f"wrote {path}")
    bad = [r for r in rows if r["backend"].startswith("moec") and (r.get("ok") is False or "error" in r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
