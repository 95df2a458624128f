"""The lowered MoE ops as Triton kernels: the ``moec_triton::`` namespace.

Contract: importing this module registers ``moec_triton::{gate, permute, grouped_gemm, activation,
grouped_gemm_act, grouped_gemm_combine}`` with exactly the signatures (argument names, order,
types) of the ``moec::`` ops in ``moec.ir.lowered`` and the same results up to floating-point
rounding, plus their backward ops ``moec_triton::*_backward*`` (``moec.ir.lowered.BACKWARD_OPS``),
used by their autograd formulas.
Each op is a ``torch.library.triton_op`` whose body builds a ``KernelSpec`` from its arguments
(E from the shapes, the dtype from the tensors, the rest from the attributes), fetches the
generated kernels from ``moec.codegen.cache`` and launches them through ``wrap_triton``; nothing
in a body synchronises with the device (grids are upper bounds, programs past the work exit).

Backward: ``grouped_gemm(_act)`` recomputes h with the grouped GEMM kernel, applies the activation
derivative with a Triton elementwise kernel, gets the input rows' gradient with the same grouped
GEMM kernel reading the weight the other way round, scatters it into x with ``index_add_`` (float
atomics on CUDA, so d_x is not bitwise deterministic there), and gets d_w (and d_b, the column
sums) with a grouped weight-gradient kernel that reduces each expert's rows in one program.
``grouped_gemm_combine`` recomputes y, then one row kernel gives d_y = weights[slot] * grad[token]
and d_weights[slot] = <y, grad[token]>, and the same two kernels give d_a, d_w_out, d_b_out.
The fused ops' backward is two ops each (``moec.ir.lowered``): ``*_backward_input`` launches
everything but the weight-gradient kernel and returns d_h (d_y; its rows past the counts zeroed
by a masked fill, no host sync), ``*_backward_weight`` launches that kernel on it: the kernels of
the fused backward, in its order.
The gate's backward is NOT Triton: ``moec_triton::gate_backward`` is the vjp of the reference
(``moec::gate_backward``); routing gradients are a [T, K] by [T, E] softmax/sigmoid derivative.
The gate kernel covers every token-choice router kind without an expert capacity (scores,
correction bias, group-limited top-k by top-2 sum or max, renormalisation by sum or p-norm);
routes with a capacity stay ``moec::route`` / ``moec::dispatch`` (reference) in every target.

Determinism: counts use integer atomics (exact); the permutation is a counting sort with a
fixed block order; the combine writes each weighted row once to a [T*K, H] buffer at its slot and
sums a token's K rows in k order afterwards (no float atomics), so forward outputs are bitwise
reproducible run to run.

Under ``TRITON_INTERPRET=1`` (CPU): kernels run in Triton's interpreter, which launches eagerly
and cannot be traced, so when a graph is traced these ops stay opaque custom-op nodes (the
FunctionalTensorMode decomposition that lets Inductor see the kernels is turned off) and fake
tensors skip the launches. On CUDA the ops decompose as ``triton_op`` intends.

Block sizes: ``launch_config`` has one table per GPU family (sm90, sm80, other) and small fixed
blocks under the interpreter. The GPU entries are defaults chosen from the shapes of the tiles,
not tuned on hardware here.

Legend: T tokens, H hidden, E experts, K top-k, N = T*K slots, F first-GEMM width, I expert hidden.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from moec import _torch
import moec.ir.lowered  # noqa: F401  (registers moec::gate_backward, the gate's backward)
from moec.codegen import cache
from moec.codegen.spec import KernelSpec, default_target, dtype_name
from moec.ir.lowered import FAKES, act_width, gate_kind, out_rows, out_width, register_autograd
from moec.ir.ops import GATED_ACTIVATIONS

FakeTensor = _torch.fake_tensor()
FunctionalTensor, FunctionalTensorMode = _torch.functional_tensor()

FORWARD_OPS = ("gate", "permute", "grouped_gemm", "activation", "grouped_gemm_act", "grouped_gemm_combine")


def _language_interpreted() -> bool:
    """Whether triton.language's own @jit helpers (tl.max, tl.cumsum, ...) can run in the
    interpreter: true when TRITON_INTERPRET=1 was set before triton was imported."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.cumsum, JITFunction)


def enable_interpreter() -> Callable[[], None]:
    """Run Triton kernels in the CPU interpreter from now on; returns a function undoing it.

    Triton decides at decoration time: ``TRITON_INTERPRET=1`` must be set before ``import triton``
    (``torch._dynamo`` imports it), else triton.language's own @jit helpers stay compiled-only and
    every interpreted kernel fails on its first ``tl.max``. When triton is already imported this
    rebinds those helpers in ``triton.language`` (process-global) to interpreted ones. Refused
    on a machine with CUDA, where that would break compiled kernels."""
    import triton.language as tl
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    previous_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    rebound: list[tuple[object, str, object]] = []
    if not _language_interpreted():
        if torch.cuda.is_available():
            raise RuntimeError("moec: triton was imported without TRITON_INTERPRET=1 on a CUDA machine; "
                               "set it in the environment before starting Python instead")
        for module in (tl, standard, tl.math):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    rebound.append((module, name, value))
                    setattr(module, name, InterpretedFunction(value.fn))

    def undo() -> None:
        for module, name, value in rebound:
            setattr(module, name, value)
        if previous_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous_env

    return undo


def interpreter_numpy_problem() -> str:
    """Why Triton's interpreter cannot run with the installed numpy, or ''. Triton before 3.7
    fails inside its interpreter with numpy 2.3 and newer ("only 0-dimensional arrays can be
    converted to Python scalars", seen with triton 3.6.0 and numpy 2.4.6; numpy 2.2.6 works)."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:2]]
        return (parts + [0, 0])[0], (parts + [0, 0])[1]

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 3):
        return (f"triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__} (numpy >= 2.3); "
                "install numpy<2.3 to run the Triton kernels on the CPU (a GPU is unaffected)")
    return ""


def available() -> tuple[bool, str]:
    """Whether the ``moec_triton::`` kernels can run in this process, and why (not)."""
    try:
        import triton
    except ImportError as err:  # pragma: no cover - triton is a test dependency
        return False, f"triton is not importable ({err})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        if not _language_interpreted():
            return False, ("TRITON_INTERPRET=1 was set after triton was imported; set it before starting Python "
                           "or call moec.codegen.triton_ops.enable_interpreter()")
        broken = interpreter_numpy_problem()
        if broken:
            return False, broken
        return True, f"TRITON_INTERPRET=1: triton {triton.__version__} runs the kernels in its CPU interpreter"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()} (triton {triton.__version__})"
    return False, "no CUDA device, and TRITON_INTERPRET is not 1 (set it to run the kernels on CPU)"


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_INTERPRET = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_T=16, BLOCK_S=16, num_warps=4, num_stages=1)
_GPU = {
    # (BLOCK_M, BLOCK_N, BLOCK_K) sized so that two weight tiles (the gated epilogue) plus the x
    # tile fit shared memory over num_stages at 2-byte elements; fp32 halves BLOCK_K.
    "sm90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_T=16, BLOCK_S=128, num_warps=8, num_stages=3),
    "sm80": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_T=16, BLOCK_S=128, num_warps=4, num_stages=3),
    "default": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_T=16, BLOCK_S=128, num_warps=4, num_stages=2),
}


def launch_config(device: torch.device, dtype: torch.dtype, *, gated: bool = False) -> dict:
    """Block sizes and launch options for kernels on ``device`` with elements of ``dtype``."""
    if default_target() == "interpret" or device.type != "cuda":
        return dict(_INTERPRET)
    major, _ = torch.cuda.get_device_capability(device)
    cfg = dict(_GPU["sm90" if major >= 9 else "sm80" if major == 8 else "default"])
    if dtype == torch.float32:
        cfg["BLOCK_K"] //= 2
    if gated:  # two accumulators
        cfg["BLOCK_N"] //= 2
    return cfg


def _cdiv(a, b):
    return (a + b - 1) // b


def _traced(args) -> bool:
    return any(isinstance(a, (FakeTensor, FunctionalTensor)) or (isinstance(a, Tensor) and a.device.type == "meta")
               for a in args)


def _launch(kernel, grid, *args, **meta) -> None:
    from triton.runtime.jit import JITFunction

    if any(isinstance(g, int) and g == 0 for g in grid):
        return
    if not isinstance(kernel, JITFunction):
        if _traced(args):
            return  # an interpreted kernel cannot run on fake tensors; the allocations are the meta result
        # Interpreted and not traced: launched directly (torch 2.11's wrap_triton takes JITFunctions only).
        kernel[grid](*args, **meta)
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _kernels(group: str, **fields):
    return cache.load(KernelSpec(**fields), group)


def _mm_meta(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}


def _offsets(counts_E: Tensor, block_m: int) -> tuple[Tensor, Tensor]:
    """[E + 1] row offsets and [E + 1] BLOCK_M-tile offsets of the experts, on the device."""
    E = int(counts_E.shape[0])
    expert_off = counts_E.new_zeros(E + 1, dtype=torch.int64)
    tile_off = counts_E.new_zeros(E + 1, dtype=torch.int64)
    mod = _kernels("offsets", num_experts=E)
    _launch(mod.moec_offsets_kernel, (1,), counts_E.contiguous(), expert_off, tile_off, BLOCK_M=block_m)
    return expert_off, tile_off


def _w_strides(w: Tensor, transposed: bool) -> tuple[int, int]:
    """Strides (reduction dim, output dim) of w[e] read as the right operand of ``rows @ W_e``."""
    return (w.stride(1), w.stride(2)) if transposed else (w.stride(2), w.stride(1))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _grouped_gemm(x2: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor],
                  transposed: bool) -> Tensor:
    """[rows, out] = each expert's (gathered) rows of x2 @ W_e (+ b_e); rows past the counts zero."""
    E = int(w.shape[0])
    rows = out_rows(x2, token_idx)
    out_dim = out_width(w, transposed)
    out = x2.new_zeros(rows, out_dim)
    cfg = launch_config(x2.device, x2.dtype)
    expert_off, tile_off = _offsets(counts, cfg["BLOCK_M"])
    mod = _kernels("grouped_gemm", num_experts=E, dtype=dtype_name(x2.dtype))
    stride_wk, stride_wn = _w_strides(w, transposed)
    grid = (_cdiv(rows, cfg["BLOCK_M"]) + E, _cdiv(out_dim, cfg["BLOCK_N"]))
    _launch(mod.moec_grouped_gemm_kernel, grid,
            x2, token_idx if token_idx is not None else expert_off, expert_off, tile_off, w,
            b if b is not None else w, out, x2.shape[1], out_dim, x2.stride(0), w.stride(0), stride_wk, stride_wn,
            b.stride(0) if b is not None else 0, out.stride(0),
            HAS_GATHER=token_idx is not None, HAS_BIAS=b is not None, **_mm_meta(cfg))
    return out


def _grouped_wgrad(dy2: Tensor, x2: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor,
                   b: Optional[Tensor], transposed: bool) -> tuple[Tensor, Tensor]:
    """(d_w like w, d_b like b or empty): d_W_e = dy_e^T x_e read into w's layout."""
    E = int(w.shape[0])
    P, Q = dy2.shape[1], x2.shape[1]
    dw = torch.empty_like(w)
    db = torch.empty_like(b) if b is not None else dy2.new_empty(0)
    cfg = launch_config(x2.device, x2.dtype)
    expert_off, _ = _offsets(counts, cfg["BLOCK_M"])
    mod = _kernels("grouped_wgrad", num_experts=E, dtype=dtype_name(x2.dtype))
    # d_W_e as [P (out), Q (in)]: w[E, out, in] when not transposed, w[E, in, out] when transposed.
    stride_p, stride_q = (dw.stride(2), dw.stride(1)) if transposed else (dw.stride(1), dw.stride(2))
    grid = (E, _cdiv(P, cfg["BLOCK_N"]), _cdiv(Q, cfg["BLOCK_K"]))
    _launch(mod.moec_grouped_wgrad_kernel, grid,
            dy2, x2, token_idx if token_idx is not None else expert_off, expert_off, dw, db if b is not None else dw,
            P, Q, dy2.stride(0), x2.stride(0), dw.stride(0), stride_p, stride_q,
            HAS_GATHER=token_idx is not None, HAS_BIAS=b is not None, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_P=cfg["BLOCK_N"], BLOCK_Q=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return dw, db


def _act_spec_fields(h: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> dict:
    return dict(activation=activation, interleaved=interleaved, alpha=float(alpha), limit=float(limit),
                dtype=dtype_name(h.dtype))


def _activation_backward_rows(grad2: Tensor, h2: Tensor, activation: str, interleaved: bool, alpha: float,
                              limit: float) -> Tensor:
    M, F = h2.shape
    width = grad2.shape[1]
    dh = torch.empty_like(h2)
    cfg = launch_config(h2.device, h2.dtype)
    mod = _kernels("activation", **_act_spec_fields(h2, activation, interleaved, alpha, limit))
    grid = (_cdiv(M, cfg["BLOCK_M"]), _cdiv(width, cfg["BLOCK_N"]))
    _launch(mod.moec_activation_backward_kernel, grid, grad2, h2, dh, M, width, h2.stride(0), grad2.stride(0),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return dh


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


def _register(name: str):
    """``triton_op`` that stays opaque under tracing while its kernels are interpreted."""

    def wrap(fn):
        op = triton_op(f"moec_triton::{name}", mutates_args=())(fn)

        def functional(mode, func, types, args, kwargs):
            from torch.export._trace import custom_triton_ops_decomposition_disabled

            if default_target() == "interpret" or custom_triton_ops_decomposition_disabled():
                return mode.__torch_dispatch__(func, types, args, kwargs)
            if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not Tensor for t in types):
                return NotImplemented
            with mode:
                return fn(*args, **kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, functional)
        return op

    return wrap


@_register("gate")
def gate(
    x: Tensor,
    router_weight: Optional[Tensor],
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused gating: (weights [..., K] float32, idx [..., K] int64, counts [E] int64)."""
    gate_kind(kind)  # routes with an expert capacity are never a gate
    # Shape-derived spec fields specialise (int() on a SymInt guards): the source depends on them.
    E = int(x.shape[-1] if router_weight is None else router_weight.shape[0])
    x2 = _rows(x)
    T, H = x2.shape
    spec = KernelSpec(router_kind=kind, num_experts=E, top_k=top_k, num_groups=num_groups, topk_groups=topk_groups,
                      renormalize=renormalize, scaling=float(scaling), has_router_weight=router_weight is not None,
                      has_router_bias=router_bias is not None, has_correction_bias=correction_bias is not None,
                      dtype=dtype_name(x.dtype))
    weights = x2.new_empty(T, top_k, dtype=torch.float32)
    idx = x2.new_empty(T, top_k, dtype=torch.int64)
    counts = x2.new_zeros(E, dtype=torch.int64)
    cfg = launch_config(x.device, x.dtype)
    w = router_weight.contiguous() if router_weight is not None else x2
    mod = cache.load(spec, "gate")
    _launch(mod.moec_gate_kernel, (_cdiv(T, cfg["BLOCK_T"]),),
            x2, w, router_bias if router_bias is not None else x2,
            correction_bias if correction_bias is not None else x2, weights, idx, counts, T, H, x2.stride(0),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return weights.reshape(*x.shape[:-1], top_k), idx.reshape(*x.shape[:-1], top_k), counts


@torch.library.custom_op("moec_triton::gate_backward", mutates_args=())
def gate_backward(
    grad_weights: Tensor,
    x: Tensor,
    router_weight: Optional[Tensor],
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (x, router_weight, router_bias): the reference vjp, in torch, not Triton."""
    return tuple(t.clone() for t in torch.ops.moec.gate_backward(
        grad_weights, x, router_weight, router_bias, correction_bias, kind, top_k, num_groups, topk_groups,
        renormalize, scaling))


gate_backward.register_fake(FAKES["gate_backward"])


@_register("permute")
def permute(idx: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Slots grouped by expert, stable in slot order: (token_N, slot_N). ``counts`` is not read:
    the kernels count the slots themselves, so the result matches ``moec::permute`` even when
    it is stale."""
    K, E = int(idx.shape[-1]), int(counts.shape[0])
    idx_N = idx.reshape(-1).contiguous()
    N = idx_N.shape[0]
    cfg = launch_config(idx.device, torch.float32)
    blocks = _cdiv(N, cfg["BLOCK_S"])
    hist = idx_N.new_empty(blocks, E, dtype=torch.int32)
    base = idx_N.new_empty(blocks, E, dtype=torch.int32)
    token_N = idx_N.new_empty(N, dtype=torch.int64)
    slot_N = idx_N.new_empty(N, dtype=torch.int64)
    mod = _kernels("permute", num_experts=E, top_k=K)
    _launch(mod.moec_permute_hist_kernel, (blocks,), idx_N, hist, N, BLOCK_S=cfg["BLOCK_S"])
    if not (isinstance(blocks, int) and blocks == 0):
        _launch(mod.moec_permute_scan_kernel, (1,), hist, base, blocks)
    _launch(mod.moec_permute_scatter_kernel, (blocks,), idx_N, base, token_N, slot_N, N, BLOCK_S=cfg["BLOCK_S"])
    return token_N, slot_N


@_register("grouped_gemm")
def grouped_gemm(
    x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool
) -> Tensor:
    """Each expert's rows times its weight (+ bias): [rows, out]; rows past the counts are zero."""
    return _grouped_gemm(_rows(x), token_idx, counts, w, b, transposed)


@_register("grouped_gemm_backward")
def grouped_gemm_backward(
    grad_out: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (x, w, b); an empty tensor for an absent bias."""
    x2, dh = _rows(x), grad_out.contiguous()
    dx = _input_grad(dh, x, x2, token_idx, counts, w, transposed)
    return (dx, *_grouped_wgrad(dh, x2, token_idx, counts, w, b, transposed))


def _input_grad(dh, x, x2, token_idx, counts, w, transposed):
    """d_x of rows = each expert's (gathered) rows of x2 @ W_e: dh @ W_e^T, scattered into x's shape."""
    dx_rows = _grouped_gemm(dh, None, counts, w, None, not transposed)
    if token_idx is None:
        return dx_rows.reshape(x.shape)
    return x2.new_zeros(x2.shape).index_add_(0, token_idx, dx_rows).reshape(x.shape)


def _zero_rows_past_counts(t: Tensor, counts: Tensor) -> Tensor:
    """Zero the rows at or past sum(counts) (dropped slots) without a host sync."""
    past = torch.arange(t.shape[0], device=t.device) >= counts.sum()
    return t.masked_fill_(past[:, None], 0)


@_register("activation")
def activation(h: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    """The expert activation on [rows, F]: [rows, I] (gated) or [rows, F]."""
    h2 = _rows(h)
    M, F = h2.shape
    width = act_width(F, activation)
    out = h2.new_empty(M, width)
    cfg = launch_config(h.device, h.dtype)
    mod = _kernels("activation", **_act_spec_fields(h, activation, interleaved, alpha, limit))
    grid = (_cdiv(M, cfg["BLOCK_M"]), _cdiv(width, cfg["BLOCK_N"]))
    _launch(mod.moec_activation_kernel, grid, h2, out, M, width, h2.stride(0), out.stride(0),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out.reshape(*h.shape[:-1], width)


@_register("activation_backward")
def activation_backward(grad_out: Tensor, h: Tensor, activation: str, interleaved: bool, alpha: float,
                        limit: float) -> Tensor:
    dh = _activation_backward_rows(_rows(grad_out), _rows(h), activation, interleaved, alpha, limit)
    return dh.reshape(h.shape)


@_register("grouped_gemm_act")
def grouped_gemm_act(
    x: Tensor,
    token_idx: Optional[Tensor],
    counts: Tensor,
    w_in: Tensor,
    b_in: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """``activation(grouped_gemm(x, token_idx, counts, w_in, b_in))`` in one kernel."""
    x2 = _rows(x)
    E = int(w_in.shape[0])
    gated = activation in GATED_ACTIVATIONS
    F = out_width(w_in, transposed)
    width = act_width(F, activation)
    rows = out_rows(x2, token_idx)
    out = x2.new_zeros(rows, width)
    cfg = launch_config(x.device, x.dtype, gated=gated)
    expert_off, tile_off = _offsets(counts, cfg["BLOCK_M"])
    mod = _kernels("grouped_gemm_act", num_experts=E, has_bias_in=b_in is not None,
                   **_act_spec_fields(x, activation, interleaved, alpha, limit))
    stride_wk, stride_wn = _w_strides(w_in, transposed)
    grid = (_cdiv(rows, cfg["BLOCK_M"]) + E, _cdiv(width, cfg["BLOCK_N"]))
    _launch(mod.moec_grouped_gemm_act_kernel, grid,
            x2, token_idx if token_idx is not None else expert_off, expert_off, tile_off, w_in,
            b_in if b_in is not None else w_in, out, x2.shape[1], width, x2.stride(0), w_in.stride(0), stride_wk,
            stride_wn, b_in.stride(0) if b_in is not None else 0, out.stride(0),
            HAS_GATHER=token_idx is not None, **_mm_meta(cfg))
    return out


@_register("grouped_gemm_act_backward_input")
def grouped_gemm_act_backward_input(
    grad_out: Tensor,
    x: Tensor,
    token_idx: Optional[Tensor],
    counts: Tensor,
    w_in: Tensor,
    b_in: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor]:
    """(d_x, d_h [rows, F]); d_h is zero past the counts."""
    x2 = _rows(x)
    h = _grouped_gemm(x2, token_idx, counts, w_in, b_in, transposed)
    dh = _activation_backward_rows(grad_out.contiguous(), h, activation, interleaved, alpha, limit)
    return _input_grad(dh, x, x2, token_idx, counts, w_in, transposed), _zero_rows_past_counts(dh, counts)


@_register("grouped_gemm_act_backward_weight")
def grouped_gemm_act_backward_weight(
    d_h: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w_in: Tensor, b_in: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_in, b_in); an empty tensor for an absent bias."""
    return _grouped_wgrad(d_h.contiguous(), _rows(x), token_idx, counts, w_in, b_in, transposed)


@_register("grouped_gemm_combine")
def grouped_gemm_combine(
    a: Tensor,
    slot_idx: Tensor,
    counts: Tensor,
    w_out: Tensor,
    b_out: Optional[Tensor],
    weights: Tensor,
    transposed: bool,
) -> Tensor:
    """``combine(grouped_gemm(a, None, counts, w_out, b_out), slot_idx, weights)`` in one op: [T, H]."""
    a2 = _rows(a)
    E, K = int(w_out.shape[0]), int(weights.shape[-1])
    T = weights.numel() // K
    H = w_out.shape[2] if transposed else w_out.shape[1]
    weights_flat = weights.reshape(-1).to(torch.float32).contiguous()
    cfg = launch_config(a.device, a.dtype)
    expert_off, tile_off = _offsets(counts, cfg["BLOCK_M"])
    mod = _kernels("grouped_gemm_combine", num_experts=E, top_k=K, has_bias_out=b_out is not None,
                   dtype=dtype_name(a.dtype))
    buf = a2.new_zeros(T * K, H)
    stride_wk, stride_wn = _w_strides(w_out, transposed)
    grid = (_cdiv(a2.shape[0], cfg["BLOCK_M"]) + E, _cdiv(H, cfg["BLOCK_N"]))
    _launch(mod.moec_grouped_gemm_combine_kernel, grid,
            a2, slot_idx.contiguous(), expert_off, tile_off, w_out, b_out if b_out is not None else w_out,
            weights_flat, buf, a2.shape[1], H, a2.stride(0), w_out.stride(0), stride_wk, stride_wn,
            b_out.stride(0) if b_out is not None else 0, buf.stride(0), **_mm_meta(cfg))
    out = a2.new_empty(T, H)
    _launch(mod.moec_combine_sum_kernel, (_cdiv(T, cfg["BLOCK_M"]), _cdiv(H, cfg["BLOCK_N"])), buf, out, T, H,
            BLOCK_T=cfg["BLOCK_M"], BLOCK_H=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out


@_register("grouped_gemm_combine_backward_input")
def grouped_gemm_combine_backward_input(
    grad_out: Tensor,
    a: Tensor,
    slot_idx: Tensor,
    counts: Tensor,
    w_out: Tensor,
    b_out: Optional[Tensor],
    weights: Tensor,
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_a, d_y [rows, H], d_weights); d_y is zero past the counts."""
    a2 = _rows(a)
    N = a2.shape[0]
    E, K = int(w_out.shape[0]), int(weights.shape[-1])
    grad2 = grad_out.contiguous()
    y = _grouped_gemm(a2, None, counts, w_out, b_out, transposed)  # unweighted, as the oracle's y
    H = y.shape[1]
    dy = torch.empty_like(y)
    dweights = weights.new_zeros(weights.numel(), dtype=torch.float32)
    cfg = launch_config(a.device, a.dtype)
    mod = _kernels("grouped_gemm_combine", num_experts=E, top_k=K, has_bias_out=b_out is not None,
                   dtype=dtype_name(a.dtype))
    _launch(mod.moec_combine_backward_kernel, (_cdiv(N, cfg["BLOCK_M"]),), y, slot_idx.contiguous(),
            weights.reshape(-1).to(torch.float32).contiguous(), grad2, dy, dweights, N, H,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_H=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    da = _input_grad(dy, a, a2, None, counts, w_out, transposed)
    return da, _zero_rows_past_counts(dy, counts), dweights.reshape(weights.shape).to(weights.dtype)


@_register("grouped_gemm_combine_backward_weight")
def grouped_gemm_combine_backward_weight(
    d_y: Tensor, a: Tensor, counts: Tensor, w_out: Tensor, b_out: Optional[Tensor], transposed: bool
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_out, b_out); an empty tensor for an absent bias."""
    return _grouped_wgrad(d_y.contiguous(), _rows(a), None, counts, w_out, b_out, transposed)


register_autograd("moec_triton", {"gate": gate, "grouped_gemm": grouped_gemm, "activation": activation,
                              "grouped_gemm_act": grouped_gemm_act, "grouped_gemm_combine": grouped_gemm_combine})
