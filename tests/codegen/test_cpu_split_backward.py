"""The split backward of ``moec_cpu::`` grouped GEMMs (an input-gradient op, then a weight-gradient
op) against the one-op backward it replaced, kept here as the reference: bitwise equal. The
backward has no native path, so unlike ``test_cpu.py`` these run once, on the PyTorch path."""

from __future__ import annotations

import pytest
import torch

import moec.codegen.cpu  # noqa: F401  (registers moec_cpu::)
from test_cpu import CASES, expert_weights, routing

# ----------------------------------------------------------------------------------------------
# The split backward (input-gradient op, then weight-gradient op) against the fused one
# ----------------------------------------------------------------------------------------------


def fused_act_backward(grad_out, x, token_idx, counts, w_in, b_in, activation, transposed, interleaved, alpha, limit):
    """The one-op backward of ``moec_cpu::grouped_gemm_act`` the split replaced (d_x, d_w, d_b),
    kept as the bitwise reference: per expert, recompute h, d_h, then d_W and d_x from it."""
    from moec.codegen.cpu import _act_grad, _empty_grad, _gathered_rows, _linear, _scatter_rows, _spans

    spans, total = _spans(counts)
    x_ND = _gathered_rows(x, token_idx, total)
    d_w, d_b = torch.zeros_like(w_in), _empty_grad(grad_out, b_in)
    d_x_ND = x.new_empty(total, x.shape[-1])
    for e, start, end in spans:
        x_MD = x_ND[start:end]
        h_MF = _linear(x_MD, w_in[e], None if b_in is None else b_in[e], transposed)
        d_h_MF = _act_grad(grad_out[start:end], h_MF, activation, interleaved, alpha, limit)
        d_x_ND[start:end] = _fused_gemm_grads(d_h_MF, x_MD, w_in, d_w, e, None if b_in is None else d_b, transposed)
    return _scatter_rows(d_x_ND, x, token_idx), d_w, d_b


def fused_combine_backward(grad_out, a, slot_idx, counts, w_out, b_out, weights, transposed):
    """The one-op backward of ``moec_cpu::grouped_gemm_combine`` the split replaced (d_a, d_w,
    d_b, d_weights), kept as the bitwise reference."""
    from moec.codegen.cpu import _empty_grad, _linear, _spans

    K = weights.shape[-1]
    spans, total = _spans(counts)
    slot_M = slot_idx[:total]
    weight_M = weights.reshape(-1).index_select(0, slot_M)
    grad_MH = grad_out.reshape(-1, grad_out.shape[-1]).index_select(0, torch.div(slot_M, K, rounding_mode="floor"))
    a_shape, a = a.shape, a.reshape(-1, a.shape[-1])
    d_a = torch.zeros_like(a)
    d_w, d_b = torch.zeros_like(w_out), _empty_grad(grad_out, b_out)
    d_weight_M = weights.new_empty(total)
    acc = torch.promote_types(torch.float32, a.dtype)
    for e, start, end in spans:
        y_MH = _linear(a[start:end], w_out[e], None if b_out is None else b_out[e], transposed)
        g_MH = grad_MH[start:end]
        d_weight_M[start:end] = (y_MH.to(acc) * g_MH.to(acc)).sum(dim=-1)
        d_y_MH = (g_MH * weight_M[start:end, None]).to(a.dtype)
        d_a[start:end] = _fused_gemm_grads(d_y_MH, a[start:end], w_out, d_w, e, None if b_out is None else d_b,
                                           transposed)
    d_weights = torch.zeros_like(weights).reshape(-1).index_copy_(0, slot_M, d_weight_M)
    return d_a.reshape(a_shape), d_w, d_b, d_weights.reshape(weights.shape)


def _fused_gemm_grads(d_h_MO, x_MD, w, d_w, e, d_b, transposed):
    if transposed:
        torch.mm(x_MD.t(), d_h_MO, out=d_w[e])
        d_x_MD = torch.mm(d_h_MO, w[e].t())
    else:
        torch.mm(d_h_MO.t(), x_MD, out=d_w[e])
        d_x_MD = torch.mm(d_h_MO, w[e])
    if d_b is not None:
        torch.sum(d_h_MO, dim=0, out=d_b[e])
    return d_x_MD


# Larger than CASES so that the GEMMs leave BLAS's small-matrix paths; one has a single expert.
SPLIT_CASES = {**CASES, "many_rows": (150, 96, 64, 6, 2, "random"), "one_expert": (40, 32, 24, 1, 1, "all_on_0")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear_layout", "transposed"])
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_backward_is_bitwise_the_fused_one(case, transposed, bias, activation, dtype):
    T, H, I, E, K, kind = SPLIT_CASES[case]
    g = torch.Generator().manual_seed(len(case) * 31 + T)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, activation, transposed, bias, dtype, g)
    x_TH = torch.randn(T, H, generator=g).to(dtype)
    a_NI = torch.randn(T * K, I, generator=g).to(dtype)
    ops = torch.ops.moec_cpu

    act_args = (torch.randn(T * K, I, generator=g).to(dtype), x_TH, token_N, counts_E, w_in, b_in, activation,
                transposed, False, 1.702, 1.5)
    d_x, d_h = ops.grouped_gemm_act_backward_input(*act_args)
    d_w, d_b = ops.grouped_gemm_act_backward_weight(d_h, x_TH, token_N, counts_E, w_in, b_in, transposed)
    for name, got, want in zip(("d_x", "d_w_in", "d_b_in"), (d_x, d_w, d_b), fused_act_backward(*act_args)):
        assert torch.equal(got, want), name

    comb_args = (torch.randn(T, H, generator=g).to(dtype), a_NI, slot_N, counts_E, w_out, b_out, weights_TK,
                 transposed)
    d_a, d_y, d_weights = ops.grouped_gemm_combine_backward_input(*comb_args)
    d_w, d_b = ops.grouped_gemm_combine_backward_weight(d_y, a_NI, counts_E, w_out, b_out, transposed)
    for name, got, want in zip(("d_a", "d_w_out", "d_b_out", "d_weights"), (d_a, d_w, d_b, d_weights),
                               fused_combine_backward(*comb_args)):
        assert torch.equal(got, want), name


