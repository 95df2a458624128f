"""Fast CPU lowering of the lowered MoE ops: ``moec_cpu::`` custom ops.

Contract: importing this module registers ``moec_cpu::{gate, permute, grouped_gemm, activation,
grouped_gemm_act, grouped_gemm_combine}`` with exactly the signatures (names, order, types) and
semantics of the ``moec::`` ops in ``moec.ir.lowered`` (the oracle), each with a fake and an
autograd formula whose backward is made of ``moec_cpu::*_backward*`` ops computed directly (GEMMs
per expert, hand-written or ``torch.func.vjp`` activation gradients), never by differentiating the
reference. The fused expert ops' backward is split as in ``moec.ir.lowered``: an input-gradient
op, then a weight-gradient op that reads the gradient at the GEMM output the first one kept; the
two run the same GEMMs on the same operands as one fused op would, so the gradients are bitwise
those of the fused computation. The ``select_impl`` pass swaps ``moec::`` for ``moec_cpu::`` and
nothing else.

Numerics: float32 results agree with the references to fp32 rounding (summation order differs:
fused bias add, per-expert GEMMs by a different BLAS); bfloat16 to bf16 rounding. Routing
(``gate``, ``permute``) is bit-identical: it runs the same reference code, so ties break the same.

How it is fast (CPU, float32/bfloat16):

- one host sync per op (``counts.tolist()``), then a loop over the *non-empty* experts only; the
  dropped rows past ``sum(counts)`` are never computed, only zeroed;
- the input rows are gathered once with ``index_select`` (sorted dispatch), each expert's rows are
  one contiguous slice;
- the per-expert GEMMs go through oneDNN (``mkldnn::_linear_pointwise``) for wide outputs (see
  ``_ONEDNN_MIN_OUT``; ``torch.mm`` for the rest) when it can take the operands (2-5 rows take BLAS's ``W @ x^T`` instead, see ``_SKINNY_ROWS``). On this project's AMD machines the default fp32 BLAS (MKL) runs a skinny GEMM on one
  thread at a third of DRAM speed and a large one at half of the cores' peak; oneDNN's JIT kernels
  stream the weights at memory speed for a few tokens and reach peak for many. Other dtypes
  (float64) and layouts fall back to ``torch.mm``/``addmm``;
- experts with tens of rows each and small products (``_padded_ok``) run as one batched product
  over a padded ``[E, C, D]`` layout (every expert's rows padded to the largest count ``C``)
  instead of one GEMM call per expert; the fused ``moe_inference`` keeps the activations padded
  between its two products, the two ops un-pad and re-pad them (the same values either way; the
  padding rows are never read). With MKL the rows come out bitwise as the per-expert GEMMs'; a
  BLAS may round a batched product otherwise, within fp32 rounding;
- at one to a few rows per expert the native kernels of ``cpu_native`` take the forward;
- the activation runs in place on each expert's GEMM output while it is in cache and writes its
  slice of a preallocated output; the combine scales each expert's rows by their routing weight in
  place and ``index_add_``s them into the token-order output (serial on CPU, so deterministic).

Legend: T tokens, H hidden, E experts, K top-k, N = T*K slots, F first-GEMM width, I expert hidden,
D the input width of a GEMM, O its output width, M one expert's rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moec import _torch
from moec.codegen import cpu_native
from moec.ir.lowered import (BACKWARD_OPS, FAKES, LOWERED_OPS, act_width, gate_kind, gate_reference, out_rows,
                              out_width, permute_reference, register_autograd)
from moec.ir.ops import (GATED_ACTIVATIONS, UNGATED_ACTIVATIONS, _apply_activation, _check, check_activation_attrs,
                         route_weights,
                         route_choice)

# oneDNN's bf16 linear needs AVX512-BF16/AMX; on other CPUs (AVX2 EPYCs) it refuses to build.
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
# Measured on the project's 2-core AMD EPYC (fp32, cold weights, GB/s of weight read):
#   rows            1    2-4   8    16   32
#   oneDNN x W^T    37   28    25   21   15
#   MKL    W x^T    15   43    22   12   8
# so 2-5 rows take the MKL form and the rest oneDNN.
_SKINNY_ROWS = (2, 5)
# oneDNN's linear costs tens of microseconds per call before any work, and past that beats
# torch.mm only on wide outputs. Measured on the project's idle 2-core EPYC (fp32, us, oneDNN / mm):
#   rows   [in 64 -> out 256]   [128 -> 64]   [512 -> 3584]   [1792 -> 512]   [256 -> 1024]
#   16        64 / 23            57 / 16        771 / 996       426 / 453       148 / 133
#   256      122 / 79           100 / 46       7153 / 7378     3826 / 3339      999 / 1005
#   1024     276 / 266          186 / 146     25806 / 29770   14621 / 12479    3928 / 3933
# so oneDNN takes products with an output at least ``_ONEDNN_MIN_OUT`` wide and an input at least
# ``_ONEDNN_MIN_IN`` wide, and torch.mm the rest.
_ONEDNN_MIN_OUT = 2048
_ONEDNN_MIN_IN = 256
# Up to this many output elements the epilogue (activation, routing weight, scatter) runs once over
# all experts' rows: per-expert calls cost more than the extra [rows, width] buffer (256 KiB fp32).
_BATCH_EPILOGUE_ELEMS = 1 << 16
# Up to this many elements of the combine's product rows ([rows, H], 16 MiB of fp32) the combine
# writes them all into one buffer, then scales and scatters them with one call each. Measured on
# the idle 2-core EPYC (fp32, H 64, I 128, 8 experts, top-2, us, per-expert / one buffer):
# 1024 tokens 687 / 473, 2048 tokens 965 / 710, 8192 tokens 2938 / 2727; H 512, I 1792: 256 tokens
# 8004 / 7705, 1024 tokens 23.8 / 23.2 ms (run to run +-5%).
_BATCH_COMBINE_ELEMS = 1 << 22
# Up to this many rows per expert the forward GEMMs run in ``cpu_native`` (matrix-vector products
# streaming each weight once on all threads, one call per op); module switch for tests/benchmarks.
_NATIVE_MAX_ROWS = 8
use_native = True
# Experts whose products are small run as one batched product over a padded layout: each expert's
# rows padded to the largest count C, ``[E, C, D] x [E, D, O]`` (``_padded``). Per-expert calls cost
# a dispatch and some Python each; at tens of rows per expert that is a third of the layer.
# Measured on the idle 2-core EPYC (fp32, hidden 64, 128-wide ReLU experts with biases, 8 experts,
# top-2, one layer, us, per-expert loop / padded): 128 tokens 512 / 342, 512 tokens 855 / 627,
# 1024 tokens 1394 / 982; at 2048 tokens (C ~ 560) the two swap places from run to run. So: at most
# ``_PADDED_MAX_MACS`` multiply-adds per expert product at C rows, padding at most
# ``_PADDED_MAX_WASTE`` x the rows, fp32/fp64 (bf16 keeps the per-expert roundings of the loop).
_PADDED_MAX_MACS = 1 << 22
_PADDED_MAX_WASTE = 1.5
_PADDED_MIN_ROWS = 16
_PADDED_DTYPES = (torch.float32, torch.float64)
use_padded = True
# Module switch so benchmarks can compare the oneDNN path with plain torch.mm in one process.
use_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _spans(counts_E: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    """``[(expert, start, end)]`` of the non-empty experts' rows, and the number of kept rows."""
    spans, start = [], 0
    for e, count in enumerate(counts_E.tolist()):  # the op's one host sync
        if count:
            spans.append((e, start, start + count))
            start += count
    return spans, start


def _linear(x_MD: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool, out: Optional[Tensor] = None) -> Tensor:
    """``x_MD @ W + b`` for one expert's weight (``w [O, D]``, or ``[D, O]`` when transposed),
    written into ``out`` when given."""
    w_OD = w.t() if transposed else w
    if (_SKINNY_ROWS[0] <= x_MD.shape[0] <= _SKINNY_ROWS[1] and x_MD.dtype == torch.float32 and w_OD.is_contiguous()
            and (b is None or b.dtype == x_MD.dtype)):
        # A few rows: BLAS's W @ x^T (weight as the long operand) streams W on all threads; the
        # result is returned as a transposed view, which the callers' in-place ops accept.
        h_OM = torch.mm(w_OD, x_MD.t()) if b is None else torch.addmm(b[:, None], w_OD, x_MD.t())
        return h_OM.t() if out is None else out.copy_(h_OM.t())
    if (use_onednn and w_OD.shape[0] >= _ONEDNN_MIN_OUT and w_OD.shape[1] >= _ONEDNN_MIN_IN
            and x_MD.dtype in _ONEDNN_DTYPES and w_OD.dtype == x_MD.dtype and w_OD.is_contiguous()
            and x_MD.is_contiguous() and (b is None or b.dtype == x_MD.dtype)):
        y = torch.ops.mkldnn._linear_pointwise(x_MD, w_OD, b, "none", [], "")
        return y if out is None else out.copy_(y)
    if out is None:
        return torch.mm(x_MD, w_OD.t()) if b is None else torch.addmm(b, x_MD, w_OD.t())
    return torch.mm(x_MD, w_OD.t(), out=out) if b is None else torch.addmm(b, x_MD, w_OD.t(), out=out)


def _operands(spans, x_ND: Tensor, w: Tensor, b: Optional[Tensor]):
    """Each non-empty expert's rows of ``x_ND``, and every expert's weight and bias, as views made by
    one split and one unbind each (a slice or select per expert costs a dispatch apiece)."""
    sizes = [end - start for _, start, end in spans]
    b_E = (None,) * w.shape[0] if b is None else b.unbind(0)
    return sizes, x_ND[:sum(sizes)].split(sizes), w.unbind(0), b_E


def _linears_into(x_ND: Tensor, spans, w: Tensor, b: Optional[Tensor], transposed: bool, out_NO: Tensor) -> None:
    """``out_NO[start:end] = x_ND[start:end] @ W_e + b_e`` for every span ``(e, start, end)``."""
    sizes, xs, w_E, b_E = _operands(spans, x_ND, w, b)
    for (e, _, _), x_MD, o_MO in zip(spans, xs, out_NO.split(sizes)):
        _linear(x_MD, w_E[e], b_E[e], transposed, out=o_MO)


def _per_expert(x_ND: Tensor, spans, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None):
    """``(rows of x_ND, rows of out, weight, bias)`` per span, from one split per operand."""
    sizes, xs, w_E, b_E = _operands(spans, x_ND, w, b)
    outs = out[:sum(sizes)].split(sizes) if out is not None else (None,) * len(spans)
    for (e, _, _), x_MD, o in zip(spans, xs, outs):
        yield x_MD, o, w_E[e], b_E[e]


def _padded_ok(spans, total: int, w: Tensor, dtype: torch.dtype) -> bool:
    """Whether the experts' products with weight ``w`` run padded (see ``_PADDED_MAX_MACS``)."""
    if not use_padded or len(spans) < 2 or dtype not in _PADDED_DTYPES or w.dtype != dtype:
        return False
    C = max(end - start for _, start, end in spans)
    return (C >= _PADDED_MIN_ROWS and w.shape[0] * C <= _PADDED_MAX_WASTE * total
            and C * w.shape[1] * w.shape[2] <= _PADDED_MAX_MACS)


def _padded_layout(spans, total: int, counts: Tensor) -> tuple[int, Tensor]:
    """``(C, dest_M)``: ``C`` rows per expert (the largest count), and ``dest_M`` the padded row
    ``e * C + i`` of each kept row (the ``i``-th of expert ``e``'s)."""
    C = max(end - start for _, start, end in spans)
    shift_E, start = [], 0
    for e, count in enumerate(counts.tolist()):
        shift_E.append(e * C - start)
        start += count
    shift_M = torch.repeat_interleave(torch.tensor(shift_E), counts, output_size=total)
    return C, shift_M.add_(torch.arange(total))


def _padded(spans, total: int, counts: Tensor, w: Tensor, dtype: torch.dtype) -> Optional[tuple[int, Tensor]]:
    """The padded layout when the products with ``w`` run padded, else None."""
    return _padded_layout(spans, total, counts) if _padded_ok(spans, total, w, dtype) else None


def _padded_linear(x_PD: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool, C: int) -> Tensor:
    """All experts' ``x @ W_e + b_e`` over the padded rows ``x_PD`` (``[E * C, D]``): ``[E, C, O]``."""
    E = w.shape[0]
    w_EDO = w if transposed else w.transpose(1, 2)
    x_ECD = x_PD.view(E, C, -1)
    return torch.bmm(x_ECD, w_EDO) if b is None else torch.baddbmm(b.unsqueeze(1), x_ECD, w_EDO)


def _padded_act(x: Tensor, token_idx: Optional[Tensor], total: int, padded: tuple[int, Tensor], w_in: Tensor,
                b_in: Optional[Tensor], activation: str, transposed: bool, interleaved: bool, alpha: float,
                limit: float) -> Tensor:
    """The activated first products of every expert in the padded layout: ``[E * C, I]``. Padding
    rows hold the products of token 0's row (or of zeros); readers take only ``dest_M``'s rows."""
    C, dest_M = padded
    x_TD = x.reshape(-1, x.shape[-1])
    rows = w_in.shape[0] * C
    if token_idx is not None:
        token_P = token_idx.new_zeros(rows).index_copy_(0, dest_M, token_idx[:total])
        x_PD = x_TD.index_select(0, token_P)
    else:
        x_PD = x_TD.new_zeros(rows, x_TD.shape[1]).index_copy_(0, dest_M, x_TD[:total])
    width = out_width(w_in, transposed)
    h_PF = _padded_linear(x_PD, w_in, b_in, transposed, C).view(rows, width)
    a_PI = x.new_empty(rows, act_width(width, activation))
    _act_into(h_PF, a_PI, activation, interleaved, alpha, limit)
    return a_PI


def _padded_combine(a_PI: Tensor, dest_M: Tensor, C: int, w_out: Tensor, b_out: Optional[Tensor],
                    weight_M: Tensor, token_M: Tensor, transposed: bool, out_TH: Tensor) -> Tensor:
    """``out_TH`` plus every kept row's second product times its routing weight, from the padded
    activations ``a_PI``; rows are added in expert order, as the per-expert loop adds them."""
    y_PH = _padded_linear(a_PI, w_out, b_out, transposed, C).view(-1, out_TH.shape[1])
    return out_TH.index_add_(0, token_M, y_PH.index_select(0, dest_M).mul_(weight_M[:, None]))


def _native_for(spans, x: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool):
    """The native extension when its kernels apply: fp32, nn.Linear layout, at most
    ``_NATIVE_MAX_ROWS`` rows per expert (matrix-vector territory), no autograd through the inputs."""
    if not use_native or not spans or transposed or x.dtype != torch.float32 or w.dtype != torch.float32:
        return None
    if max(end - start for _, start, end in spans) > _NATIVE_MAX_ROWS or not w.is_contiguous():
        return None
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
        return None
    return cpu_native.load()


def _spans_tensor(spans) -> Tensor:
    return torch.tensor(spans, dtype=torch.int64)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32) if t is None else t


def _gathered_rows(x: Tensor, token_N: Optional[Tensor], total: int) -> Tensor:
    x_MD = x.reshape(-1, x.shape[-1])
    if token_N is None:
        return x_MD[:total]
    return x_MD.index_select(0, token_N[:total])


def _halves(h_MF: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    if interleaved:
        return h_MF[:, ::2], h_MF[:, 1::2]
    half = h_MF.shape[-1] // 2
    return h_MF[:, :half], h_MF[:, half:]


def _act_into(h_MF: Tensor, out_MI: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> None:
    """``out_MI = activation(h_MF)``, overwriting ``h_MF`` (a scratch GEMM output) on the way.

    The op order is the reference's (``moec.ir.ops._apply_activation``), so each element rounds
    the same way; only the temporaries are gone.
    """
    if activation in UNGATED_ACTIVATIONS:
        if activation == "relu":
            torch.clamp_min(h_MF, 0, out=out_MI)
        elif activation == "relu2":
            torch.clamp_min(h_MF, 0, out=out_MI)
            out_MI.square_()
        elif activation == "silu":
            torch.ops.aten.silu.out(h_MF, out=out_MI)
        else:
            torch.ops.aten.gelu.out(h_MF, approximate="tanh" if activation == "gelu_tanh" else "none", out=out_MI)
        return
    _check(activation in GATED_ACTIVATIONS, f"unknown activation {activation!r}")
    gate_MI, up_MI = _halves(h_MF, interleaved)
    if activation == "swiglu":
        # Into the contiguous output, then scaled there: faster than SiLU in place on the strided
        # half, and bitwise the same values.
        torch.ops.aten.silu.out(gate_MI, out=out_MI)
        out_MI.mul_(up_MI)
    elif activation == "reglu":
        gate_MI.clamp_min_(0)
        torch.mul(gate_MI, up_MI, out=out_MI)
    elif activation == "clamped_swiglu":
        gate_MI.clamp_(max=limit)
        up_MI.clamp_(min=-limit, max=limit)
        gate_MI.mul_(torch.sigmoid(gate_MI * alpha))
        up_MI.add_(1)
        torch.mul(up_MI, gate_MI, out=out_MI)
    elif activation == "swiglu_limit":
        # The SiLU of the clamped copy, as the reference takes it: on a contiguous tensor SiLU
        # runs vectorised, on the strided half in place it does not, and the two round differently.
        silu_MI = torch.ops.aten.silu_(gate_MI.clamp(max=limit))
        torch.mul(silu_MI, up_MI.clamp_(min=-limit, max=limit), out=out_MI)
    elif activation == "swiglu_limit_post":
        torch.ops.aten.silu_(gate_MI).clamp_(max=limit)
        up_MI.clamp_(min=-limit, max=limit)
        torch.mul(gate_MI, up_MI, out=out_MI)
    elif activation == "softcap_swiglu":
        sig_MI = torch.sigmoid(gate_MI)  # of the raw gate, before it is capped in place
        gate_MI.div_(alpha).tanh_().mul_(alpha).mul_(sig_MI)
        up_MI.div_(limit).tanh_().mul_(limit)
        torch.mul(gate_MI, up_MI, out=out_MI)
    else:
        torch.ops.aten.gelu.out(gate_MI, approximate="tanh" if activation == "geglu_tanh" else "none", out=out_MI)
        out_MI.mul_(up_MI)


def _act_grad(grad_MI: Tensor, h_MF: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    """d activation(h) / d h applied to ``grad_MI``: [M, F]."""
    if activation == "relu":
        return grad_MI * (h_MF > 0)
    if activation == "relu2":  # d relu(h)^2 / dh = 2 relu(h)
        return grad_MI * (2 * h_MF.clamp_min(0))
    if activation in _HAND_WRITTEN_GATED:
        d_gate_MI, d_up_MI = _gated_grad(grad_MI, *_halves(h_MF, interleaved), activation, alpha, limit)
        if interleaved:
            return torch.stack([d_gate_MI, d_up_MI], dim=-1).reshape(h_MF.shape)
        return torch.cat([d_gate_MI, d_up_MI], dim=-1)
    # The others are rarer; the vjp of the reference activation alone is elementwise and cheap.
    _, vjp_fn = torch.func.vjp(lambda h_: _apply_activation(h_, activation, interleaved, alpha, limit), h_MF)
    return vjp_fn(grad_MI.to(h_MF.dtype))[0]


_HAND_WRITTEN_GATED = ("swiglu", "reglu", "swiglu_limit", "swiglu_limit_post", "softcap_swiglu")


def _gated_grad(grad_MI: Tensor, gate_MI: Tensor, up_MI: Tensor, activation: str, alpha: float,
                limit: float) -> tuple[Tensor, Tensor]:
    """(d_gate, d_up) of a gated activation. The clamps pass the gradient where their input lies
    within the bounds and stop it outside, as the installed torch.clamp's autograd does (ends
    included up to torch 2.13, excluded from 2.14: ``moec._torch.clamp_grad_at_bounds``)."""
    if activation == "reglu":
        return grad_MI * up_MI * (gate_MI > 0), grad_MI * gate_MI.clamp_min(0)
    if activation == "softcap_swiglu":
        check_activation_attrs(activation, alpha, limit)
        # c = a tanh(g / a), v = l tanh(u / l), out = c sigmoid(g) v:
        # d_g = v (c' s + c s (1 - s)) with c' = 1 - tanh^2;  d_u = c s v' with v' = 1 - tanh^2
        tg_MI, tu_MI, sig_MI = torch.tanh(gate_MI / alpha), torch.tanh(up_MI / limit), torch.sigmoid(gate_MI)
        cap_g_MI = alpha * tg_MI
        d_gate_MI = grad_MI * (limit * tu_MI) * ((1 - tg_MI * tg_MI) * sig_MI + cap_g_MI * sig_MI * (1 - sig_MI))
        return d_gate_MI, grad_MI * cap_g_MI * sig_MI * (1 - tu_MI * tu_MI)
    if activation == "swiglu":
        sig_MI = torch.sigmoid(gate_MI)
        # d silu(g) / dg = s + g s (1 - s) = s (1 + g (1 - s))
        return grad_MI * up_MI * sig_MI * (1 + gate_MI * (1 - sig_MI)), grad_MI * (gate_MI * sig_MI)
    # As the installed torch's clamp: ends included up to torch 2.13, excluded from 2.14.
    le = torch.le if _torch.clamp_grad_at_bounds() else torch.lt
    in_up_MI = torch.ge(up_MI, -limit) if _torch.clamp_grad_at_bounds() else torch.gt(up_MI, -limit)
    in_up_MI &= le(up_MI, limit)
    up_c_MI = up_MI.clamp(min=-limit, max=limit)
    if activation == "swiglu_limit":
        g_c_MI = gate_MI.clamp(max=limit)
        sig_MI = torch.sigmoid(g_c_MI)
        d_gate_MI = grad_MI * up_c_MI * sig_MI * (1 + g_c_MI * (1 - sig_MI))
        return torch.where(le(gate_MI, limit), d_gate_MI, 0), torch.where(in_up_MI, grad_MI * (g_c_MI * sig_MI), 0)
    # swiglu_limit_post: the clamp acts on the SiLU's output, computed as the forward does (F.silu),
    # so that an output exactly at the limit passes the gradient in both.
    sig_MI, silu_MI = torch.sigmoid(gate_MI), F.silu(gate_MI)
    d_gate_MI = grad_MI * up_c_MI * sig_MI * (1 + gate_MI * (1 - sig_MI))
    return (torch.where(le(silu_MI, limit), d_gate_MI, 0),
            torch.where(in_up_MI, grad_MI * silu_MI.clamp(max=limit), 0))


def _input_grad(d_h_MO: Tensor, w_e: Tensor, transposed: bool) -> Tensor:
    """For ``h = x @ W + b`` on one expert (weight ``w_e``): d_x_MD."""
    return torch.mm(d_h_MO, w_e.t()) if transposed else torch.mm(d_h_MO, w_e)


def _weight_grad_into(d_h_MO: Tensor, x_MD: Tensor, d_w_e: Tensor, d_b_e: Optional[Tensor], transposed: bool) -> None:
    """For ``h = x @ W + b`` on one expert: writes d_W into ``d_w_e`` (and d_b into ``d_b_e``)."""
    if transposed:  # w[e] is [D, O]: h = x w
        torch.mm(x_MD.t(), d_h_MO, out=d_w_e)
    else:  # w[e] is [O, D]: h = x w^T
        torch.mm(d_h_MO.t(), x_MD, out=d_w_e)
    if d_b_e is not None:
        torch.sum(d_h_MO, dim=0, out=d_b_e)


def _grouped_weight_grads(d_h_NO: Tensor, x: Tensor, token_N: Optional[Tensor], counts_E: Tensor, w: Tensor,
                          b: Optional[Tensor], transposed: bool) -> tuple[Tensor, Tensor]:
    """(d_w like w, d_b like b or empty) of a grouped GEMM from the gradient at its output: one
    GEMM (and a column sum) per non-empty expert; an expert without rows gets zeros."""
    spans, total = _spans(counts_E)
    x_ND = _gathered_rows(x, token_N, total)
    d_w, d_b = torch.zeros_like(w), _empty_grad(d_h_NO, b)
    for e, start, end in spans:
        _weight_grad_into(d_h_NO[start:end], x_ND[start:end], d_w[e], None if b is None else d_b[e], transposed)
    return d_w, d_b


def _scatter_rows(d_rows_MD: Tensor, x: Tensor, token_N: Optional[Tensor]) -> Tensor:
    """The gradient of ``_gathered_rows``: rows added back into x's shape (dropped rows give 0)."""
    d_x_MD = x.new_zeros(x.numel() // x.shape[-1], x.shape[-1])
    total = d_rows_MD.shape[0]
    if token_N is None:
        d_x_MD[:total] = d_rows_MD
    else:
        d_x_MD.index_add_(0, token_N[:total], d_rows_MD)
    return d_x_MD.reshape(x.shape)


def _empty_grad(ref: Tensor, t: Optional[Tensor], zero: bool = True) -> Tensor:
    if t is None:
        return ref.new_empty(0)
    return torch.zeros_like(t) if zero else torch.empty_like(t)


# ----------------------------------------------------------------------------------------------
# gate
# ----------------------------------------------------------------------------------------------


def _gate_impl(
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
    """Router GEMM + top-k + counts. Plain softmax routers (no correction bias, groups or p-norm)
    run the reference's own ops in the same order without its generality (a few microseconds a
    call at one token); the others run the reference code. Either way expert choices (ties
    included) and weights equal ``moec::gate``'s bitwise."""
    rk = gate_kind(kind)
    if (rk.base in ("softmax_topk", "top1", "topk_softmax") and correction_bias is None and num_groups <= 1
            and rk.pnorm is None):
        logits_TE = x if router_weight is None else F.linear(x, router_weight, router_bias)
        if rk.base == "topk_softmax":
            top_TK, idx_TK = logits_TE.float().topk(top_k, dim=-1)
            weights_TK = top_TK.softmax(dim=-1)
        else:
            weights_TK, idx_TK = logits_TE.float().softmax(dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if scaling != 1.0:
            weights_TK = weights_TK * scaling
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=logits_TE.shape[-1])
        return weights_TK, idx_TK, counts_E
    weights_TK, idx_TK, counts_E = gate_reference(x, router_weight, router_bias, correction_bias, kind, top_k,
                                                  num_groups, topk_groups, renormalize, scaling)
    return weights_TK.contiguous(), idx_TK.contiguous(), counts_E


gate = torch.library.custom_op("moec_cpu::gate", mutates_args=())(_gate_impl)


@torch.library.custom_op("moec_cpu::gate_backward", mutates_args=())
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
    """Gradients for (x, router_weight, router_bias); an empty tensor for an absent one.

    Written out: the top-k choice is piecewise constant, so the gradient flows through the chosen
    scores only (softmax / sigmoid / sqrt(softplus) / the logits, then the softmax over the k of
    ``topk_softmax``, renormalisation by sum or p-norm, and scaling); the router GEMM's gradient
    is two GEMMs."""
    x_TH = x.reshape(-1, x.shape[-1])
    logits_TE = x_TH if router_weight is None else F.linear(x_TH, router_weight, router_bias)
    d_logits_TE = _route_grad(grad_weights.reshape(-1, top_k).float(), logits_TE, correction_bias, kind, top_k,
                              num_groups, topk_groups, renormalize, scaling).to(logits_TE.dtype)
    if router_weight is None:
        return d_logits_TE.reshape(x.shape), x.new_empty(0), x.new_empty(0)
    d_x = torch.mm(d_logits_TE, router_weight).reshape(x.shape)
    d_w = torch.mm(d_logits_TE.t(), x_TH)
    d_b = d_logits_TE.sum(0) if router_bias is not None else x.new_empty(0)
    return d_x, d_w, d_b


def _route_grad(d_out_TK: Tensor, logits_TE: Tensor, correction_bias: Optional[Tensor], kind: str, top_k: int,
                num_groups: int, topk_groups: int, renormalize: bool, scaling: float) -> Tensor:
    """d route_weights(...).weights / d logits applied to ``d_out_TK``: [T, E] float32."""
    rk = gate_kind(kind)
    logits_f = logits_TE.float()
    # The same code picks the experts as in the forward, so ties break the same way.
    probs_TE, idx_TK = route_choice(logits_f, correction_bias, rk, top_k, num_groups, topk_groups)
    weights_TK = probs_TE.gather(-1, idx_TK)
    if rk.base == "topk_softmax":
        weights_TK = weights_TK.softmax(dim=-1)
    d_TK = d_out_TK * scaling
    if renormalize and rk.pnorm is None:
        sum_T1 = weights_TK.sum(dim=-1, keepdim=True) + 1e-20
        # w' = w / S:  dw_j = (dw'_j - sum_k dw'_k w'_k) / S
        d_TK = (d_TK - (d_TK * (weights_TK / sum_T1)).sum(dim=-1, keepdim=True)) / sum_T1
    elif renormalize:
        p = rk.pnorm
        norm_T1 = torch.linalg.vector_norm(weights_TK, ord=p, dim=-1, keepdim=True)
        den_T1 = norm_T1 + 1e-20
        # w' = w / (N + eps), N = ||w||_p:  dN/dw_j = sign(w_j) (|w_j| / N)^(p-1), so
        # dw_j = (dw'_j - (sum_k dw'_k w'_k) dN/dw_j) / (N + eps)
        dn_TK = weights_TK.sign() * (weights_TK.abs() / norm_T1.clamp_min(1e-30)).pow(p - 1)
        d_TK = (d_TK - (d_TK * (weights_TK / den_T1)).sum(dim=-1, keepdim=True) * dn_TK) / den_T1
    if rk.base == "topk_softmax":
        d_TK = weights_TK * (d_TK - (d_TK * weights_TK).sum(dim=-1, keepdim=True))
        return torch.zeros_like(logits_f).scatter_add_(-1, idx_TK, d_TK)
    d_probs_TE = torch.zeros_like(logits_f).scatter_add_(-1, idx_TK, d_TK)
    if rk.scores == "softmax":
        return probs_TE * (d_probs_TE - (d_probs_TE * probs_TE).sum(dim=-1, keepdim=True))
    if rk.scores == "sqrtsoftplus":
        # d sqrt(softplus(z)) / dz = softplus'(z) / (2 sqrt(softplus(z))), softplus' = sigmoid below
        # torch's threshold (20) and 1 above it. An unchosen expert (d = 0) gets 0 even where its
        # score underflowed to 0 (z < -103), where the reference's autograd would give 0/0.
        d_sp_TE = torch.where(logits_f > 20, 1.0, torch.sigmoid(logits_f))
        return torch.where(d_probs_TE != 0, d_probs_TE * d_sp_TE / (2 * probs_TE), 0.0)
    return d_probs_TE * probs_TE * (1 - probs_TE)


# ----------------------------------------------------------------------------------------------
# permute
# ----------------------------------------------------------------------------------------------


def _permute_impl(idx: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Slots grouped by expert, stable in slot order: (token_N, slot_N). One stable sort of the
    N expert ids (the reference's; it is already the fast form on CPU)."""
    return permute_reference(idx, counts)


permute = torch.library.custom_op("moec_cpu::permute", mutates_args=())(_permute_impl)


# ----------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec_cpu::grouped_gemm", mutates_args=())
def grouped_gemm(
    x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool
) -> Tensor:
    """Each expert's rows times its weight (+ bias): [rows, out]; rows past the counts are zero."""
    spans, total = _spans(counts)
    x_ND = _gathered_rows(x, token_idx, total)
    out_NO = x.new_empty(out_rows(x, token_idx), out_width(w, transposed))
    out_NO[total:].zero_()
    for e, start, end in spans:
        out_NO[start:end] = _linear(x_ND[start:end], w[e], None if b is None else b[e], transposed)
    return out_NO


@torch.library.custom_op("moec_cpu::grouped_gemm_backward", mutates_args=())
def grouped_gemm_backward(
    grad_out: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (x, w, b); an empty tensor for an absent bias."""
    spans, total = _spans(counts)
    x_ND = _gathered_rows(x, token_idx, total)
    d_w, d_b = torch.zeros_like(w), _empty_grad(grad_out, b)
    d_x_ND = x.new_empty(total, x.shape[-1])
    for e, start, end in spans:
        d_h_MO = grad_out[start:end]
        _weight_grad_into(d_h_MO, x_ND[start:end], d_w[e], None if b is None else d_b[e], transposed)
        d_x_ND[start:end] = _input_grad(d_h_MO, w[e], transposed)
    return _scatter_rows(d_x_ND, x, token_idx), d_w, d_b


# ----------------------------------------------------------------------------------------------
# activation
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec_cpu::activation", mutates_args=())
def activation(h: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    """The expert activation on [rows, F]: [rows, I] (gated) or [rows, F]."""
    check_activation_attrs(activation, alpha, limit)
    h_MF = h.reshape(-1, h.shape[-1])
    out_MI = h.new_empty(h_MF.shape[0], act_width(h.shape[-1], activation))
    # Gated activations overwrite their input's halves; the op's input is not ours to clobber.
    _act_into(h_MF.clone() if activation in GATED_ACTIVATIONS else h_MF, out_MI, activation, interleaved, alpha,
              limit)
    return out_MI.reshape(*h.shape[:-1], out_MI.shape[-1])


@torch.library.custom_op("moec_cpu::activation_backward", mutates_args=())
def activation_backward(grad_out: Tensor, h: Tensor, activation: str, interleaved: bool, alpha: float,
                        limit: float) -> Tensor:
    h_MF = h.reshape(-1, h.shape[-1])
    grad_MI = grad_out.reshape(h_MF.shape[0], -1)
    return _act_grad(grad_MI, h_MF, activation, interleaved, alpha, limit).reshape(h.shape)


# ----------------------------------------------------------------------------------------------
# grouped_gemm_act
# ----------------------------------------------------------------------------------------------


def _grouped_gemm_act_impl(
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
    """``activation(grouped_gemm(x, token_idx, counts, w_in, b_in))`` in one op: the [M, F]
    intermediate of each expert lives only while that expert runs."""
    check_activation_attrs(activation, alpha, limit)
    spans, total = _spans(counts)
    return _act_body(x, token_idx, spans, total, _padded(spans, total, counts, w_in, x.dtype), w_in, b_in,
                     activation, transposed, interleaved, alpha, limit)


grouped_gemm_act = torch.library.custom_op("moec_cpu::grouped_gemm_act", mutates_args=())(_grouped_gemm_act_impl)


def _act_body(x, token_idx, spans, total, padded, w_in, b_in, activation, transposed, interleaved, alpha,
              limit):
    """``_grouped_gemm_act_impl`` given its spans and padded layout (computed once per layer by
    ``moe_inference``)."""
    native = _native_for(spans, x, w_in, b_in, transposed)
    if native is not None:
        x_TD = x.reshape(-1, x.shape[-1]).contiguous()
        token = token_idx if token_idx is not None else x_TD.new_empty(0, dtype=torch.int64)
        return native.gemv_act(x_TD, token, _spans_tensor(spans), w_in, _or_empty(b_in, x),
                               cpu_native.ACT_CODES[activation], interleaved, alpha, limit, out_rows(x, token_idx))
    width = out_width(w_in, transposed)
    a_NI = x.new_empty(out_rows(x, token_idx), act_width(width, activation))
    a_NI[total:].zero_()
    if padded is not None:
        torch.index_select(_padded_act(x, token_idx, total, padded, w_in, b_in, activation, transposed, interleaved,
                                       alpha, limit), 0, padded[1], out=a_NI[:total])
        return a_NI
    x_ND = _gathered_rows(x, token_idx, total)
    if len(spans) > 1 and total * a_NI.shape[1] <= _BATCH_EPILOGUE_ELEMS:
        # Few rows: one activation over all experts' GEMM outputs instead of one per expert.
        h_MF = x_ND.new_empty(total, width)
        _linears_into(x_ND, spans, w_in, b_in, transposed, h_MF)
        _act_into(h_MF, a_NI[:total], activation, interleaved, alpha, limit)
        return a_NI
    for x_MD, a_MI, w_e, b_e in _per_expert(x_ND, spans, w_in, b_in, a_NI):
        _act_into(_linear(x_MD, w_e, b_e, transposed), a_MI, activation, interleaved, alpha, limit)
    return a_NI


@torch.library.custom_op("moec_cpu::grouped_gemm_act_backward_input", mutates_args=())
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
    """(d_x, d_h [rows, F]). Each expert's pre-activation is recomputed (one GEMM) rather than
    saved from the forward; its d_h gives d_x (one GEMM) and is kept for the weight op."""
    spans, total = _spans(counts)
    x_ND = _gathered_rows(x, token_idx, total)
    d_h_NF = x.new_empty(out_rows(x, token_idx), out_width(w_in, transposed))
    d_h_NF[total:].zero_()
    d_x_ND = x.new_empty(total, x.shape[-1])
    for e, start, end in spans:
        h_MF = _linear(x_ND[start:end], w_in[e], None if b_in is None else b_in[e], transposed)
        d_h_MF = _act_grad(grad_out[start:end], h_MF, activation, interleaved, alpha, limit)
        d_x_ND[start:end] = _input_grad(d_h_MF, w_in[e], transposed)
        d_h_NF[start:end] = d_h_MF
    return _scatter_rows(d_x_ND, x, token_idx), d_h_NF


@torch.library.custom_op("moec_cpu::grouped_gemm_act_backward_weight", mutates_args=())
def grouped_gemm_act_backward_weight(
    d_h: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w_in: Tensor, b_in: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_in, b_in); an empty tensor for an absent bias. x's rows are gathered
    again (cheaper to redo than to hand over from the input op)."""
    return _grouped_weight_grads(d_h, x, token_idx, counts, w_in, b_in, transposed)


# ----------------------------------------------------------------------------------------------
# grouped_gemm_combine
# ----------------------------------------------------------------------------------------------


def _grouped_gemm_combine_impl(
    a: Tensor,
    slot_idx: Tensor,
    counts: Tensor,
    w_out: Tensor,
    b_out: Optional[Tensor],
    weights: Tensor,
    transposed: bool,
) -> Tensor:
    """``combine(grouped_gemm(a, None, counts, w_out, b_out), slot_idx, weights)`` in one op: [T, H].
    No [N, H] intermediate: each expert's output rows are scaled in place and added into their
    tokens' rows; dropped slots add nothing."""
    a = a.reshape(-1, a.shape[-1])
    spans, total = _spans(counts)
    return _combine_body(a, slot_idx, spans, total, _padded(spans, total, counts, w_out, a.dtype), w_out, b_out,
                         weights, transposed)


grouped_gemm_combine = torch.library.custom_op("moec_cpu::grouped_gemm_combine", mutates_args=())(_grouped_gemm_combine_impl)


def _combine_rows(slot_idx: Tensor, total: int, weights: Tensor, w_out: Tensor, transposed: bool,
                  like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kept rows' routing weights and tokens, and the zeroed ``[T, H]`` output they add into."""
    K = weights.shape[-1]
    slot_M = slot_idx[:total]
    out_TH = like.new_zeros(weights.numel() // K, out_width(w_out, transposed))
    return weights.reshape(-1).index_select(0, slot_M), torch.div(slot_M, K, rounding_mode="floor"), out_TH


def _combine_body(a, slot_idx, spans, total, padded, w_out, b_out, weights, transposed):
    """``_grouped_gemm_combine_impl`` given its spans and padded layout."""
    K = weights.shape[-1]
    native = _native_for(spans, a, w_out, b_out, transposed)
    if native is not None and weights.dtype == torch.float32:
        return native.gemv_combine(a.contiguous(), _spans_tensor(spans), w_out, _or_empty(b_out, a),
                                   weights.contiguous(), slot_idx.contiguous(), K, weights.numel() // K)
    weight_M, token_M, out_TH = _combine_rows(slot_idx, total, weights, w_out, transposed, a)
    if padded is not None:
        C, dest_M = padded
        a_PI = a.new_zeros(w_out.shape[0] * C, a.shape[1]).index_copy_(0, dest_M, a[:total])
        return _padded_combine(a_PI, dest_M, C, w_out, b_out, weight_M, token_M, transposed, out_TH)
    if len(spans) > 1 and total * out_TH.shape[1] <= _BATCH_COMBINE_ELEMS:
        # One scale and one scatter for all experts instead of one per expert: ``index_add_`` runs
        # serially, and per call it costs more than the [rows, H] buffer does. The same rows are
        # added in the same order as by the per-expert loop.
        y_MH = a.new_empty(total, out_TH.shape[1])
        _linears_into(a, spans, w_out, b_out, transposed, y_MH)
        return out_TH.index_add_(0, token_M, y_MH.mul_(weight_M[:, None]))
    sizes = [end - start for _, start, end in spans]
    for (x_MD, _, w_e, b_e), weight_m, token_m in zip(_per_expert(a, spans, w_out, b_out), weight_M.split(sizes),
                                                     token_M.split(sizes)):
        y_MH = _linear(x_MD, w_e, b_e, transposed)
        out_TH.index_add_(0, token_m, y_MH.mul_(weight_m[:, None]))
    return out_TH


@torch.library.custom_op("moec_cpu::grouped_gemm_combine_backward_input", mutates_args=())
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
    """(d_a, d_y [rows, H], d_weights).

    Per expert: the unscaled output y is recomputed; d_weights[slot] = <y_row, grad_out[token]>;
    d_y = grad_out[token] * weight[slot] gives d_a (one GEMM) and is kept for the weight op."""
    K = weights.shape[-1]
    spans, total = _spans(counts)
    slot_M = slot_idx[:total]
    weight_M = weights.reshape(-1).index_select(0, slot_M)
    grad_MH = grad_out.reshape(-1, grad_out.shape[-1]).index_select(0, torch.div(slot_M, K, rounding_mode="floor"))
    a_shape, a = a.shape, a.reshape(-1, a.shape[-1])
    d_a = torch.zeros_like(a)
    d_y_NH = a.new_empty(a.shape[0], out_width(w_out, transposed))
    d_y_NH[total:].zero_()
    d_weight_M = weights.new_empty(total)
    acc = torch.promote_types(torch.float32, a.dtype)
    for e, start, end in spans:
        y_MH = _linear(a[start:end], w_out[e], None if b_out is None else b_out[e], transposed)
        g_MH = grad_MH[start:end]
        d_weight_M[start:end] = (y_MH.to(acc) * g_MH.to(acc)).sum(dim=-1)
        d_y_MH = (g_MH * weight_M[start:end, None]).to(a.dtype)
        d_a[start:end] = _input_grad(d_y_MH, w_out[e], transposed)
        d_y_NH[start:end] = d_y_MH
    d_weights = torch.zeros_like(weights).reshape(-1).index_copy_(0, slot_M, d_weight_M)
    return d_a.reshape(a_shape), d_y_NH, d_weights.reshape(weights.shape)


@torch.library.custom_op("moec_cpu::grouped_gemm_combine_backward_weight", mutates_args=())
def grouped_gemm_combine_backward_weight(
    d_y: Tensor, a: Tensor, counts: Tensor, w_out: Tensor, b_out: Optional[Tensor], transposed: bool
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_out, b_out); an empty tensor for an absent bias."""
    return _grouped_weight_grads(d_y, a, None, counts, w_out, b_out, transposed)


# ----------------------------------------------------------------------------------------------
# One whole layer, without gradients
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec_cpu::moe_inference", mutates_args=())
def moe_inference(
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
    x_ffn: Tensor,
    w_in: Tensor,
    b_in: Optional[Tensor],
    w_out: Tensor,
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """``gate -> permute -> grouped_gemm_act -> grouped_gemm_combine`` as one op: [T, H]. The same
    four bodies in the same order, so the result is bitwise theirs; one dispatch instead of four
    (at a few tokens a custom op's dispatch costs more than its arithmetic). No autograd: the
    ``fuse_inference`` pass uses it only in graphs that compute no gradients."""
    weights_TK, idx_TK, counts_E = _gate_impl(x, router_weight, router_bias, correction_bias, kind, top_k,
                                              num_groups, topk_groups, renormalize, scaling)
    token_N, slot_N = _permute_impl(idx_TK, counts_E)
    check_activation_attrs(activation, alpha, limit)
    spans, total = _spans(counts_E)
    # One padded layout for both products: the values each op computes for itself.
    pad_in, pad_out = (_padded_ok(spans, total, w, x_ffn.dtype) for w in (w_in, w_out))
    layout = _padded_layout(spans, total, counts_E) if pad_in or pad_out else None
    if pad_in and pad_out:
        # Both products padded: the activations stay in the padded layout between them (the two
        # ops would un-pad and re-pad them: the same values, two copies more).
        a_PI = _padded_act(x_ffn, token_N, total, layout, w_in, b_in, activation, transposed, interleaved, alpha,
                           limit)
        weight_M, token_M, out_TH = _combine_rows(slot_N, total, weights_TK, w_out, transposed, a_PI)
        return _padded_combine(a_PI, layout[1], layout[0], w_out, b_out, weight_M, token_M, transposed, out_TH)
    a_NI = _act_body(x_ffn, token_N, spans, total, layout if pad_in else None, w_in, b_in, activation,
                     transposed, interleaved, alpha, limit)
    return _combine_body(a_NI, slot_N, spans, total, layout if pad_out else None, w_out, b_out, weights_TK,
                         transposed)


@moe_inference.register_fake
def _moe_inference_fake(x, router_weight, router_bias, correction_bias, kind, top_k, num_groups, topk_groups,
                        renormalize, scaling, x_ffn, w_in, b_in, w_out, b_out, activation, transposed, interleaved,
                        alpha, limit):
    return x_ffn.new_empty(x.reshape(-1, x.shape[-1]).shape[0], out_width(w_out, transposed))


def slots_dense(
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
    x_ffn: Tensor,
    w_in: Tensor,
    b_in: Optional[Tensor],
    w_out: Tensor,
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """The same layer as ``moe_inference`` written as plain tensor ops for a handful of slots: each
    (token, choice) slot gathers its expert's matrices and all slots run as one batched product
    (``lower_small``). Not a custom op: the compiler traces it, so Inductor fuses the routing and
    the epilogues into a few kernels; with tiny experts that beats any per-op dispatch. Autograd
    works through it. Numerics: the references' ops, summed in another order (fp32 rounding)."""
    gate_kind(kind)
    logits_TE = x if router_weight is None else F.linear(x, router_weight, router_bias)
    weights_TK, idx_TK = route_weights(logits_TE, correction_bias, kind, top_k, num_groups, topk_groups, renormalize,
                                       scaling)  # the gate's routing, without its per-expert counts
    T, K = weights_TK.shape
    x_TD = x_ffn.reshape(T, -1)
    idx_N = idx_TK.reshape(-1)
    x_N1D = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
    w_in_N = w_in[idx_N]
    h_NF = torch.bmm(x_N1D, w_in_N if transposed else w_in_N.transpose(1, 2)).squeeze(1)
    if b_in is not None:
        h_NF = h_NF + b_in[idx_N]
    a_NI = _apply_activation(h_NF, activation, interleaved, alpha, limit)
    w_out_N = w_out[idx_N]
    y_NH = torch.bmm(a_NI.unsqueeze(1), w_out_N if transposed else w_out_N.transpose(1, 2)).squeeze(1)
    if b_out is not None:
        y_NH = y_NH + b_out[idx_N]
    contrib_TKH = (y_NH.reshape(T, K, -1) * weights_TK.unsqueeze(-1)).to(y_NH.dtype)
    return contrib_TKH.sum(dim=1)


CPU_OPS = ("gate", "permute", "grouped_gemm", "activation", "grouped_gemm_act", "grouped_gemm_combine")

for _name in LOWERED_OPS + BACKWARD_OPS:
    globals()[_name].register_fake(FAKES[_name])

register_autograd("moec_cpu", {"gate": gate, "grouped_gemm": grouped_gemm, "activation": activation,
                              "grouped_gemm_act": grouped_gemm_act, "grouped_gemm_combine": grouped_gemm_combine})
