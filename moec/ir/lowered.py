"""Lowered MoE ops: the grouped-GEMM form the passes rewrite a captured layer into.

Contract: like the canonical ops (``moec.ir.ops``), every op here is a ``moec::`` custom op whose
body is the plain-PyTorch reference (the oracle every implementation is tested against), with a
fake implementation and an autograd formula whose backward is one or more ``moec::*_backward*``
ops computed from the reference. Implementations with the same signatures live in other namespaces
(``moec_cpu::`` in ``moec.codegen.cpu``, ``moec_triton::`` in ``moec.codegen.triton_ops``); the
``select_impl`` pass swaps a node's namespace, nothing else.

Backward of the fused expert ops: two ops each, the input gradient first, then the weight
gradient (Lancet's split), so that in a traced backward graph the weight-gradient GEMMs are a
node of their own that only the parameter gradients read::

    d_x, d_h_NF = grouped_gemm_act_backward_input(grad_NI, x, token_N, counts_E, w_in, b_in, <act attrs>)
    d_w_in, d_b_in = grouped_gemm_act_backward_weight(d_h_NF, x, token_N, counts_E, w_in, b_in, transposed)
    d_a, d_y_NH, d_weights = grouped_gemm_combine_backward_input(grad_TH, a, slot_N, counts_E, w_out, b_out,
                                                                 weights_TK, transposed)
    d_w_out, d_b_out = grouped_gemm_combine_backward_weight(d_y_NH, a, counts_E, w_out, b_out, transposed)

``d_h_NF`` is the gradient at the first GEMM's output (after the activation's backward) and
``d_y_NH`` the gradient at the second GEMM's output (routing weight applied): the intermediates
both halves need, handed over so that nothing is recomputed; rows at or past ``sum(counts_E)``
are zero. In an expert-parallel backward the input gradient feeds the reverse all-to-all, which
can then be issued before the weight gradient runs, so dW hides under its own chunk's exchange
(``moec.passes.schedule_overlap``). The routing-weight gradient goes with the combine's input
op: it needs y, the GEMM output the input op recomputes anyway, and ``grad_TH``, ``slot_N``
and ``weights_TK``, which the weight op would otherwise take as three more inputs; and it feeds
the router's gradient, which is input-gradient work that must not wait behind dW. The cost of
the split is the [N, F] and [N, H] intermediates, alive from one op to the other.

After the passes a layer reads::

    weights_TK, idx_TK, counts_E = gate(x_TH, router_w_EH, router_b_E, correction_bias_E, ...)
    token_N, slot_N = permute(idx_TK, counts_E)
    a_NI = grouped_gemm_act(x_TH, token_N, counts_E, w_in, b_in, activation, ...)
    out_TH = grouped_gemm_combine(a_NI, slot_N, counts_E, w_out, b_out, weights_TK, transposed)

and before the fusion passes the FFN is ``grouped_gemm -> activation -> grouped_gemm -> combine``.

Semantics shared by the grouped ops: rows are in expert order; expert ``e`` owns rows
``offsets[e]:offsets[e+1]`` with ``offsets = [0, cumsum(counts_E)]``; rows at or past
``sum(counts_E)`` (slots dropped by a capacity limit) are zero. ``token_N`` (optional) gathers the
input rows from the flattened ``x``; without it row ``n`` of the input is used. ``transposed``
selects the weight layout of ``moec.ir.ops`` (``False``: ``w [E, out, in]`` as nn.Linear;
``True``: ``w [E, in, out]``).

Legend: T tokens (leading dims flattened), H hidden, E experts, K top-k, N = T*K slots,
F first-GEMM width (2I when gated), I expert hidden.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moec.ir.ops import GATED_ACTIVATIONS, _apply_activation, _check, _grads, combine_reference, route_weights
from moec.ir.routing import RouterKind, has_capacity

# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def gate_reference(
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
    """Router GEMM (when ``router_weight`` is given; else ``x`` is the logits) + ``route`` without
    capacity + per-expert counts."""
    gate_kind(kind)
    logits = x if router_weight is None else F.linear(x, router_weight, router_bias)
    weights_TK, idx_TK = route_weights(logits, correction_bias, kind, top_k, num_groups, topk_groups, renormalize,
                                       scaling)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=logits.shape[-1])
    return weights_TK, idx_TK, counts_E


def gate_kind(kind: str) -> RouterKind:
    """The parsed kind of a ``gate``: any token-choice router without an expert capacity (routes
    with one keep ``route``/``dispatch``, see ``moec.passes.fuse_gating``)."""
    rk = RouterKind.parse(kind)
    _check(not has_capacity(rk, 0), f"gate computes routes without an expert capacity; router kind {kind!r} has one "
                                     "(expert choice, cf=F or renorm_kept): it keeps moec::route / moec::dispatch")
    return rk


def permute_reference(idx_TK: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
    """Stable grouping of the T*K slots by expert (no slot is dropped): (token_N, slot_N)."""
    K = idx_TK.shape[-1]
    slot_N = torch.sort(idx_TK.reshape(-1), stable=True).indices
    return torch.div(slot_N, K, rounding_mode="floor"), slot_N


def _rows(x: Tensor, token_N: Optional[Tensor]) -> Tensor:
    x_MD = x.reshape(-1, x.shape[-1])
    return x_MD if token_N is None else x_MD[token_N]


def grouped_gemm_reference(
    x: Tensor,
    token_N: Optional[Tensor],
    counts_E: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    transposed: bool,
) -> Tensor:
    x_ND = _rows(x, token_N)
    out_dim = out_width(w, transposed)
    parts, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count == 0:
            continue
        rows = x_ND[start : start + count]
        h = rows @ w[e] if transposed else F.linear(rows, w[e])
        if b is not None:
            h = h + b[e]
        parts.append(h.to(x.dtype))
        start += count
    parts.append(x_ND.new_zeros(x_ND.shape[0] - start, out_dim))
    return torch.cat(parts)


def activation_reference(h: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    return _apply_activation(h, activation, interleaved, alpha, limit).to(h.dtype)


def grouped_gemm_act_reference(x, token_N, counts_E, w_in, b_in, activation, transposed, interleaved, alpha, limit):
    h_NF = grouped_gemm_reference(x, token_N, counts_E, w_in, b_in, transposed)
    return activation_reference(h_NF, activation, interleaved, alpha, limit)


def grouped_gemm_combine_reference(a_NI, slot_N, counts_E, w_out, b_out, weights_TK, transposed):
    y_NH = grouped_gemm_reference(a_NI, None, counts_E, w_out, b_out, transposed)
    return combine_reference(y_NH, slot_N, weights_TK)


def out_rows(x: Tensor, token_N: Optional[Tensor]) -> int:
    """Rows of a grouped op's output: one per gathered slot, else one per input row."""
    return token_N.shape[0] if token_N is not None else x.numel() // x.shape[-1]


def out_width(w: Tensor, transposed: bool) -> int:
    """Output width of a product with expert weight ``w`` in either layout."""
    return w.shape[-1] if transposed else w.shape[-2]


def act_width(width: int, activation: str) -> int:
    """Width after the activation: gated activations halve it."""
    return width // 2 if activation in GATED_ACTIVATIONS else width


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::gate", mutates_args=())
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
    w, i, c = gate_reference(x, router_weight, router_bias, correction_bias, kind, top_k, num_groups, topk_groups,
                             renormalize, scaling)
    return w.contiguous(), i.contiguous(), c


def _gate_num_experts(x, router_weight):
    return x.shape[-1] if router_weight is None else router_weight.shape[0]


@gate.register_fake
def _gate_fake(x, router_weight, router_bias, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling):
    shape = (*x.shape[:-1], top_k)
    return (x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64),
            x.new_empty(_gate_num_experts(x, router_weight), dtype=torch.int64))


@torch.library.custom_op("moec::gate_backward", mutates_args=())
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
    """Gradients for (x, router_weight, router_bias); an empty tensor for an absent one."""

    def weights_of(x_, w_, b_):
        return gate_reference(x_, w_, b_, correction_bias, kind, top_k, num_groups, topk_groups, renormalize,
                              scaling)[0]

    return tuple(_grads(weights_of, grad_weights, [x, router_weight, router_bias]))


@gate_backward.register_fake
def _gate_backward_fake(grad_weights, x, router_weight, router_bias, correction_bias, kind, top_k, num_groups, topk_groups,
      renormalize, scaling):
    def like(t):
        return grad_weights.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(router_weight), like(router_bias)


@torch.library.custom_op("moec::permute", mutates_args=())
def permute(idx: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Slots grouped by expert, stable in slot order: (token_N, slot_N)."""
    return permute_reference(idx, counts)


@permute.register_fake
def _permute_fake(idx, counts):
    n = idx.numel()
    return idx.new_empty(n), idx.new_empty(n)


@torch.library.custom_op("moec::grouped_gemm", mutates_args=())
def grouped_gemm(
    x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool
) -> Tensor:
    """Each expert's rows times its weight (+ bias): [rows, out]; rows past the counts are zero."""
    return grouped_gemm_reference(x, token_idx, counts, w, b, transposed)


@grouped_gemm.register_fake
def _grouped_gemm_fake(x, token_idx, counts, w, b, transposed):
    return x.new_empty(out_rows(x, token_idx), out_width(w, transposed))


@torch.library.custom_op("moec::grouped_gemm_backward", mutates_args=())
def grouped_gemm_backward(
    grad_out: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w: Tensor, b: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (x, w, b); an empty tensor for an absent bias."""

    def out_of(x_, w_, b_):
        return grouped_gemm_reference(x_, token_idx, counts, w_, b_, transposed)

    return tuple(_grads(out_of, grad_out, [x, w, b]))


def _like(ref: Tensor, t: Optional[Tensor]) -> Tensor:
    return ref.new_empty(0) if t is None else torch.empty_like(t)


@grouped_gemm_backward.register_fake
def _grouped_gemm_backward_fake(grad_out, x, token_idx, counts, w, b, transposed):
    return _like(grad_out, x), _like(grad_out, w), _like(grad_out, b)


@torch.library.custom_op("moec::activation", mutates_args=())
def activation(h: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    """The expert activation on [rows, F]: [rows, I] (gated) or [rows, F]."""
    return activation_reference(h, activation, interleaved, alpha, limit)


@activation.register_fake
def _activation_fake(h, activation, interleaved, alpha, limit):
    return h.new_empty(*h.shape[:-1], act_width(h.shape[-1], activation))


@torch.library.custom_op("moec::activation_backward", mutates_args=())
def activation_backward(grad_out: Tensor, h: Tensor, activation: str, interleaved: bool, alpha: float,
                        limit: float) -> Tensor:
    return _grads(lambda h_: activation_reference(h_, activation, interleaved, alpha, limit), grad_out, [h])[0]


@activation_backward.register_fake
def _activation_backward_fake(grad_out, h, activation, interleaved, alpha, limit):
    return torch.empty_like(h)


@torch.library.custom_op("moec::grouped_gemm_act", mutates_args=())
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
    """``activation(grouped_gemm(x, token_idx, counts, w_in, b_in))`` in one op."""
    return grouped_gemm_act_reference(x, token_idx, counts, w_in, b_in, activation, transposed, interleaved, alpha,
                                      limit)


@grouped_gemm_act.register_fake
def _grouped_gemm_act_fake(x, token_idx, counts, w_in, b_in, activation, transposed, interleaved, alpha, limit):
    return x.new_empty(out_rows(x, token_idx), act_width(out_width(w_in, transposed), activation))


@torch.library.custom_op("moec::grouped_gemm_act_backward_input", mutates_args=())
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
    """(d_x, d_h): the gradient for x, and d_h [rows, F], the gradient at the GEMM's output
    (zero past the counts) that ``grouped_gemm_act_backward_weight`` reads."""
    h_NF = grouped_gemm_reference(x, token_idx, counts, w_in, b_in, transposed)
    d_h_NF = _grads(lambda h_: activation_reference(h_, activation, interleaved, alpha, limit), grad_out, [h_NF])[0]
    d_h_NF[int(counts.sum()):] = 0  # not GEMM outputs: dropped slots

    def out_of(x_):
        return grouped_gemm_reference(x_, token_idx, counts, w_in, b_in, transposed)

    return _grads(out_of, d_h_NF, [x])[0], d_h_NF


@grouped_gemm_act_backward_input.register_fake
def _grouped_gemm_act_backward_input_fake(grad_out, x, token_idx, counts, w_in, b_in, activation, transposed,
                                          interleaved, alpha, limit):
    return _like(grad_out, x), x.new_empty(out_rows(x, token_idx), out_width(w_in, transposed))


def _grouped_weight_grads(d_out, x, token_idx, counts, w, b, transposed):
    def out_of(w_, b_):
        return grouped_gemm_reference(x, token_idx, counts, w_, b_, transposed)

    return tuple(_grads(out_of, d_out, [w, b]))


@torch.library.custom_op("moec::grouped_gemm_act_backward_weight", mutates_args=())
def grouped_gemm_act_backward_weight(
    d_h: Tensor, x: Tensor, token_idx: Optional[Tensor], counts: Tensor, w_in: Tensor, b_in: Optional[Tensor],
    transposed: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_in, b_in) from d_h of ``grouped_gemm_act_backward_input``; an empty tensor
    for an absent bias. ``w_in`` and ``b_in`` give the layout and presence only."""
    return _grouped_weight_grads(d_h, x, token_idx, counts, w_in, b_in, transposed)


@grouped_gemm_act_backward_weight.register_fake
def _grouped_gemm_act_backward_weight_fake(d_h, x, token_idx, counts, w_in, b_in, transposed):
    return _like(d_h, w_in), _like(d_h, b_in)


@torch.library.custom_op("moec::grouped_gemm_combine", mutates_args=())
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
    return grouped_gemm_combine_reference(a, slot_idx, counts, w_out, b_out, weights, transposed)


@grouped_gemm_combine.register_fake
def _grouped_gemm_combine_fake(a, slot_idx, counts, w_out, b_out, weights, transposed):
    return a.new_empty(weights.numel() // weights.shape[-1], out_width(w_out, transposed))


@torch.library.custom_op("moec::grouped_gemm_combine_backward_input", mutates_args=())
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
    """(d_a, d_y, d_weights): the gradients for a and the routing weights, and d_y [rows, H], the
    gradient at the GEMM's output (zero past the counts) that ``grouped_gemm_combine_backward_weight``
    reads."""
    y_NH = grouped_gemm_reference(a, None, counts, w_out, b_out, transposed)
    d_y_NH, d_weights = _grads(lambda y_, weights_: combine_reference(y_, slot_idx, weights_), grad_out,
                               [y_NH, weights])
    d_y_NH[int(counts.sum()):] = 0  # not GEMM outputs: dropped slots

    def out_of(a_):
        return grouped_gemm_reference(a_, None, counts, w_out, b_out, transposed)

    return _grads(out_of, d_y_NH, [a])[0], d_y_NH, d_weights


@grouped_gemm_combine_backward_input.register_fake
def _grouped_gemm_combine_backward_input_fake(grad_out, a, slot_idx, counts, w_out, b_out, weights, transposed):
    return (_like(grad_out, a), a.new_empty(a.numel() // a.shape[-1], out_width(w_out, transposed)),
            torch.empty_like(weights))


@torch.library.custom_op("moec::grouped_gemm_combine_backward_weight", mutates_args=())
def grouped_gemm_combine_backward_weight(
    d_y: Tensor, a: Tensor, counts: Tensor, w_out: Tensor, b_out: Optional[Tensor], transposed: bool
) -> tuple[Tensor, Tensor]:
    """Gradients for (w_out, b_out) from d_y of ``grouped_gemm_combine_backward_input``; an empty
    tensor for an absent bias. ``w_out`` and ``b_out`` give the layout and presence only."""
    return _grouped_weight_grads(d_y, a, None, counts, w_out, b_out, transposed)


@grouped_gemm_combine_backward_weight.register_fake
def _grouped_gemm_combine_backward_weight_fake(d_y, a, counts, w_out, b_out, transposed):
    return _like(d_y, w_out), _like(d_y, b_out)


# The fakes of every op above by name, shared by the implementations in other namespaces.
LOWERED_OPS = ("gate", "permute", "grouped_gemm", "activation", "grouped_gemm_act", "grouped_gemm_combine")
# The backward ops every namespace registers (``register_autograd`` calls them).
BACKWARD_OPS = ("gate_backward", "grouped_gemm_backward", "activation_backward", "grouped_gemm_act_backward_input",
                "grouped_gemm_act_backward_weight", "grouped_gemm_combine_backward_input",
                "grouped_gemm_combine_backward_weight")
FAKES = {name: globals()[f"_{name}_fake"] for name in LOWERED_OPS + BACKWARD_OPS}

# ----------------------------------------------------------------------------------------------
# Autograd, shared by every namespace: the backward of ``ns::op`` calls ``ns::op_backward*``
# ----------------------------------------------------------------------------------------------
# Each entry: (setup(ctx, inputs) -> saved tensors, and backward(ctx, ns, grads) -> input grads), where
# ``ns`` holds the namespace's ``BACKWARD_OPS``.


def _gate_setup(ctx, inputs):
    x, router_weight, router_bias, correction_bias, *attrs = inputs
    ctx.attrs = attrs
    return x, router_weight, router_bias, correction_bias


def _gate_bwd(ctx, ns, grad_weights, grad_idx, grad_counts):
    x, router_weight, router_bias, correction_bias = ctx.saved_tensors
    gx, gw, gb = ns.gate_backward(grad_weights.contiguous(), x, router_weight, router_bias, correction_bias,
                                  *ctx.attrs)
    return (gx, gw if router_weight is not None else None, gb if router_bias is not None else None) + (None,) * 7


def _gg_setup(ctx, inputs):
    x, token_idx, counts, w, b, transposed = inputs
    ctx.transposed = transposed
    return x, token_idx, counts, w, b


def _gg_bwd(ctx, ns, grad_out):
    x, token_idx, counts, w, b = ctx.saved_tensors
    gx, gw, gb = ns.grouped_gemm_backward(grad_out.contiguous(), x, token_idx, counts, w, b, ctx.transposed)
    return gx, None, None, gw, gb if b is not None else None, None


def _act_setup(ctx, inputs):
    ctx.attrs = inputs[1:]
    return (inputs[0],)


def _act_bwd(ctx, ns, grad_out):
    (h,) = ctx.saved_tensors
    return (ns.activation_backward(grad_out.contiguous(), h, *ctx.attrs),) + (None,) * 4


def _wants_weight_grads(ctx, w_pos: int, b: Optional[Tensor]) -> bool:
    """Whether autograd asks for the expert weight's (or bias's) gradient: frozen experts skip the
    weight-gradient op."""
    return ctx.needs_input_grad[w_pos] or (b is not None and ctx.needs_input_grad[w_pos + 1])


def _gga_setup(ctx, inputs):
    x, token_idx, counts, w_in, b_in, *attrs = inputs
    ctx.attrs = attrs
    return x, token_idx, counts, w_in, b_in


def _gga_bwd(ctx, ns, grad_out):
    x, token_idx, counts, w_in, b_in = ctx.saved_tensors
    # Input gradient first: in an expert-parallel backward it is what the exchange waits for.
    gx, d_h = ns.grouped_gemm_act_backward_input(grad_out.contiguous(), x, token_idx, counts, w_in, b_in, *ctx.attrs)
    gw = gb = None
    if _wants_weight_grads(ctx, 3, b_in):
        transposed = ctx.attrs[1]
        gw, gb = ns.grouped_gemm_act_backward_weight(d_h, x, token_idx, counts, w_in, b_in, transposed)
    return (gx, None, None, gw, gb if b_in is not None else None) + (None,) * 5


def _ggc_setup(ctx, inputs):
    a, slot_idx, counts, w_out, b_out, weights, transposed = inputs
    ctx.transposed = transposed
    return a, slot_idx, counts, w_out, b_out, weights


def _ggc_bwd(ctx, ns, grad_out):
    a, slot_idx, counts, w_out, b_out, weights = ctx.saved_tensors
    ga, d_y, gweights = ns.grouped_gemm_combine_backward_input(grad_out.contiguous(), a, slot_idx, counts, w_out,
                                                               b_out, weights, ctx.transposed)
    gw = gb = None
    if _wants_weight_grads(ctx, 3, b_out):
        gw, gb = ns.grouped_gemm_combine_backward_weight(d_y, a, counts, w_out, b_out, ctx.transposed)
    return ga, None, None, gw, gb if b_out is not None else None, gweights, None


_AUTOGRAD = {
    "gate": (_gate_setup, _gate_bwd),
    "grouped_gemm": (_gg_setup, _gg_bwd),
    "activation": (_act_setup, _act_bwd),
    "grouped_gemm_act": (_gga_setup, _gga_bwd),
    "grouped_gemm_combine": (_ggc_setup, _ggc_bwd),
}


def register_autograd(namespace: str, forward_ops: dict) -> None:
    """Give each differentiable op of ``forward_ops`` (name -> the op object returned by
    ``custom_op``/``triton_op``) the autograd formula above, calling the ``BACKWARD_OPS`` of
    ``namespace``."""
    # Resolved now, so that a namespace missing one of them fails at import, not in a backward.
    ns = SimpleNamespace(**{op: getattr(getattr(torch.ops, namespace), op).default for op in BACKWARD_OPS})
    for name, (setup, bwd) in _AUTOGRAD.items():

        def setup_context(ctx, inputs, output, setup=setup):
            ctx.save_for_backward(*setup(ctx, inputs))

        def backward(ctx, *grads, bwd=bwd):
            return bwd(ctx, ns, *grads)

        forward_ops[name].register_autograd(backward, setup_context=setup_context)


register_autograd("moec", {"gate": gate, "grouped_gemm": grouped_gemm, "activation": activation,
                           "grouped_gemm_act": grouped_gemm_act, "grouped_gemm_combine": grouped_gemm_combine})
