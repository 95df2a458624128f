"""Canonical MoE ops in the ``moec::`` namespace.

Contract: every op is a ``torch.library.custom_op`` whose body is the plain-PyTorch reference
(the oracle, and the default CPU lowering), with a fake implementation for tracing under
symbolic token counts and an autograd formula whose backward is itself a ``moec::*_backward``
op, so captured forward and backward graphs both show canonical ops.

A layer is ``route -> dispatch -> expert_ffn -> combine`` (plus ``shared_expert``):

- ``route(logits_TE)`` picks ``idx_TK`` and computes ``weights_TK`` (float32), as its ``kind``
  string says (``moec.ir.routing``: token choice with top-k per token, or expert choice with
  K = E slots per token, one per expert). An index of -1 marks a slot dropped by an expert
  capacity (or, in expert choice, an expert that did not take the token); nothing else is ever
  dropped.
- ``dispatch(idx_TK)`` groups the T*K slots by expert: ``token_N`` (the token of each slot, in
  expert order), ``slot_N`` (its flat t*K+k position) and ``counts_E``. Dropped slots sort last
  and are in no expert's count.
- ``expert_ffn(x_TH, token_N, counts_E, w_in, w_out, ...)`` gathers the tokens and runs each
  expert's FFN on its rows: ``y_NH``, zero for dropped slots.
- ``combine(y_NH, slot_N, weights_TK)`` is the weighted sum back into token order: ``out_TH``.
- ``shared_expert(x_TH, w_in, w_out, ...)`` is a dense FFN applied to every token.

A split layer (``moec.capture.split``: experts that are single projections, applied in two
methods with the model's own code between them) is ``route -> dispatch -> grouped_gemm`` (the
lowered op of ``moec.ir.lowered``, gathering rows by ``token_N``) put back in slot order, then
``grouped_gemm`` (gathering by ``slot_N``) -> ``combine``.

Legend: T tokens (any leading dims flattened), H hidden, E experts, K top-k (E in expert choice), I expert hidden,
F = 2I for gated activations else I, N = T*K routed slots.

Weight layouts: ``transposed=False`` stores nn.Linear-style ``w_in [E, F, H]``,
``w_out [E, H, I]`` (Mixtral, Qwen, DeepSeek); ``transposed=True`` stores ``w_in [E, H, F]``,
``w_out [E, I, H]`` (GPT-OSS). Gated ``w_in`` holds gate then up (``interleaved=False``) or
alternates gate/up columns (``interleaved=True``). ``shared_expert`` takes the same layouts
without the leading E.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moec.ir.routing import TOKEN_CHOICE_BASES, RouterKind

# The token-choice bases; the full vocabulary (modifiers, expert choice) is moec.ir.routing.
ROUTER_KINDS = TOKEN_CHOICE_BASES
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "clamped_swiglu", "reglu", "swiglu_limit",
                     "swiglu_limit_post", "softcap_swiglu")
UNGATED_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2")
ACTIVATIONS = GATED_ACTIVATIONS + UNGATED_ACTIVATIONS
# The expert ops' ``alpha`` / ``limit`` attributes each activation reads; the others ignore them.
ACTIVATION_ATTRS = {"clamped_swiglu": ("alpha", "limit"), "swiglu_limit": ("limit",),
                    "swiglu_limit_post": ("limit",), "softcap_swiglu": ("alpha", "limit")}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"moec: {msg}")


def check_activation_attrs(activation: str, alpha: float, limit: float) -> None:
    """``softcap_swiglu`` divides by its caps (``alpha`` for the gate, ``limit`` for up): both must
    be positive and finite. The clamps take any limit (``inf``: no clamp)."""
    if activation == "softcap_swiglu":
        _check(0 < alpha < math.inf and 0 < limit < math.inf,
               f"softcap_swiglu needs positive finite softcaps, got alpha={alpha} (gate) and limit={limit} (up)")


# ----------------------------------------------------------------------------------------------
# Reference semantics (differentiable plain PyTorch; the op bodies and backward formulas use them)
# ----------------------------------------------------------------------------------------------


def group_scores(grouped: Tensor, group_max: bool) -> Tensor:
    """Each expert group's score (``grouped`` [..., G, E/G]): the sum of its two best scores
    (DeepSeek-V3), or its best score (``group_max``, DeepSeek-V2)."""
    return grouped.amax(dim=-1) if group_max else grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def group_mask(choice_TE: Tensor, num_groups: int, topk_groups: int, group_max: bool) -> Tensor:
    """Keep the experts of the ``topk_groups`` best-scored groups (``group_scores``); the others
    get -inf."""
    T, E = choice_TE.shape[:-1], choice_TE.shape[-1]
    grouped = choice_TE.reshape(*T, num_groups, E // num_groups)
    group_score = group_scores(grouped, group_max)
    keep_group = torch.zeros_like(group_score, dtype=torch.bool)
    keep_group.scatter_(-1, group_score.topk(topk_groups, dim=-1).indices, True)
    keep = keep_group.unsqueeze(-1).expand_as(grouped).reshape(choice_TE.shape)
    return choice_TE.masked_fill(~keep, float("-inf"))


SCORES = ("softmax", "sigmoid", "sqrtsoftplus", "logits")


def scores_of(logits_f: Tensor, scores: str) -> Tensor:
    """The per-expert scores named ``scores`` (one of ``SCORES``) of the logits: softmax, sigmoid,
    sqrt(softplus) (DeepSeek-V4; torch's softplus, beta 1, threshold 20) or the logits themselves."""
    if scores == "softmax":
        return logits_f.softmax(dim=-1)
    if scores == "sigmoid":
        return logits_f.sigmoid()
    if scores == "sqrtsoftplus":
        return F.softplus(logits_f).sqrt()
    if scores == "logits":
        return logits_f
    raise ValueError(f"moec: unknown router scores {scores!r}; expected one of {', '.join(SCORES)}")


def route_scores(logits_f: Tensor, rk: RouterKind) -> Tensor:
    """What a router's weights are read from, per expert (``scores_of`` the kind's scores)."""
    return scores_of(logits_f, rk.scores)


def route_choice(logits_f: Tensor, correction_bias_E: Optional[Tensor], rk: RouterKind, top_k: int, num_groups: int,
                 topk_groups: int) -> tuple[Tensor, Tensor]:
    """(scores_TE, idx_TK) of a token-choice router: the top-k of the choice (the scores, plus the
    correction bias, group-limited), which is piecewise constant and carries no gradient. Every
    implementation that must pick the same experts (ties included) calls this."""
    scores_TE = route_scores(logits_f, rk)
    choice_TE = scores_TE.detach()
    if correction_bias_E is not None:
        choice_TE = choice_TE + correction_bias_E.float()
    if num_groups > 1:
        choice_TE = group_mask(choice_TE, num_groups, topk_groups, rk.group_max)
    return scores_TE, choice_TE.topk(top_k, dim=-1).indices


def renormalized(weights_TK: Tensor, pnorm: Optional[float]) -> Tensor:
    # The epsilon is below one ulp of any sum (or norm) of probabilities, so it only guards 0/0.
    if pnorm is None:
        return weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK / (torch.linalg.vector_norm(weights_TK, ord=pnorm, dim=-1, keepdim=True) + 1e-20)


def renormalized_kept(weights_TK: Tensor, kept_TK: Tensor) -> Tensor:
    """``renorm_kept``: the kept weights over their sum, floored at the float32 epsilon as NLLB-MoE
    does (so a token without a kept slot gets zeros, not 0/0); dropped slots weigh 0."""
    kept_w_TK = weights_TK * kept_TK
    return kept_w_TK / kept_w_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)


def _capacity_position(idx_TK: Tensor, num_experts: int, choice_first: bool) -> Tensor:
    """Each slot's 1-based arrival position at its expert along dim -2: token by token (t, k), as
    in Switch Transformers, or all first choices before all second ones (k, t), as in GShard."""
    onehot_TKE = F.one_hot(idx_TK, num_experts)
    order = onehot_TKE.transpose(-3, -2) if choice_first else onehot_TKE
    seen = order.flatten(-3, -2).cumsum(dim=-2).reshape(order.shape)
    seen_TKE = seen.transpose(-3, -2) if choice_first else seen
    return (seen_TKE * onehot_TKE).sum(dim=-1)


def _capacity_of(rk: RouterKind, capacity: int, shape: torch.Size, top_k: int) -> int:
    """The expert capacity of one call on logits of ``shape`` (T along dim -2); 0: unlimited."""
    if rk.expert_choice or capacity > 0 or rk.capacity_factor is not None:
        _check(len(shape) >= 2, f"an expert capacity counts tokens along dim -2; logits are {len(shape)}-d")
    T = shape[-2] if len(shape) >= 2 else 1
    return rk.capacity_for(capacity, T, top_k, shape[-1])


def _kept_slots(idx_TK: Tensor, rk: RouterKind, C: int, num_experts: int) -> Optional[Tensor]:
    """The token-choice slots an expert capacity ``C`` keeps (bool [..., K]); None when C is 0."""
    if C <= 0:
        return None
    return _capacity_position(idx_TK, num_experts, rk.choice_first) <= C


def _route(logits_TE, correction_bias_E, kind, top_k, num_groups, topk_groups, renormalize, scaling, capacity):
    """(weights, idx before the drops, kept slots or None): ``route_reference`` in parts."""
    rk = RouterKind.parse(kind)
    E = logits_TE.shape[-1]
    rk.check(num_experts=E, top_k=top_k, num_groups=num_groups, topk_groups=topk_groups, renormalize=renormalize,
             has_correction_bias=correction_bias_E is not None, capacity=capacity)
    logits_f = logits_TE.float()
    if rk.expert_choice:
        scores_TE = route_scores(logits_f, rk)
        idx_TE = torch.arange(E, device=logits_TE.device).expand(scores_TE.shape)
        return (scores_TE * scaling if scaling != 1.0 else scores_TE), idx_TE, None
    scores_TE, idx_TK = route_choice(logits_f, correction_bias_E, rk, top_k, num_groups, topk_groups)
    kept_TK = _kept_slots(idx_TK, rk, _capacity_of(rk, capacity, logits_TE.shape, top_k), E)
    weights_TK = scores_TE.gather(-1, idx_TK)
    if rk.base == "topk_softmax":
        weights_TK = weights_TK.softmax(dim=-1)
    if renormalize and rk.renorm_kept:
        weights_TK = renormalized_kept(weights_TK, kept_TK)
    elif renormalize:
        weights_TK = renormalized(weights_TK, rk.pnorm)
    if scaling != 1.0:
        weights_TK = weights_TK * scaling
    return weights_TK, idx_TK, kept_TK


def route_weights(
    logits_TE: Tensor,
    correction_bias_E: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
    capacity: int = 0,
) -> tuple[Tensor, Tensor]:
    """``route_reference``'s weights and its idx before the capacity drops: (weights [..., K]
    float32, idx [..., K]). The weights depend on the capacity only under ``renorm_kept`` (they are
    renormalised over the kept slots, which are piecewise constant in the logits); this is what
    the backward differentiates, given the route's own capacity."""
    weights_TK, idx_TK, _ = _route(logits_TE, correction_bias_E, kind, top_k, num_groups, topk_groups, renormalize,
                                   scaling, capacity)
    return weights_TK, idx_TK


def route_reference(
    logits_TE: Tensor,
    correction_bias_E: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
    capacity: int,
) -> tuple[Tensor, Tensor]:
    """``route_weights``, then the expert capacity (fixed, or from ``cf``) sets the idx of the
    slots past it to -1; for expert choice, each expert keeps its C best tokens."""
    rk = RouterKind.parse(kind)
    weights_TK, idx_TK, kept_TK = _route(logits_TE, correction_bias_E, kind, top_k, num_groups, topk_groups,
                                         renormalize, scaling, capacity)
    if rk.expert_choice:
        C = _capacity_of(rk, capacity, logits_TE.shape, top_k)
        _check(C > 0, f"router kind {kind!r} needs an expert capacity: capacity > 0 or cf=F in the kind")
        C = min(C, logits_TE.shape[-2])
        # A stable descending sort along the tokens: ties go to the lower token index.
        scores_TE = route_scores(logits_TE.detach().float(), rk)
        taken_CE = torch.sort(scores_TE, dim=-2, descending=True, stable=True).indices.narrow(-2, 0, C)
        taken_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(-2, taken_CE, True)
        return weights_TK, torch.where(taken_TE, idx_TK, torch.full_like(idx_TK, -1))
    if kept_TK is not None:
        idx_TK = torch.where(kept_TK, idx_TK, torch.full_like(idx_TK, -1))
    return weights_TK, idx_TK


def _apply_activation(h_MF: Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> Tensor:
    if activation in UNGATED_ACTIVATIONS:
        if activation == "relu":
            return F.relu(h_MF)
        if activation == "relu2":  # squared ReLU (Nemotron-H, Primer)
            return torch.square(F.relu(h_MF))
        if activation == "silu":
            return F.silu(h_MF)
        return F.gelu(h_MF, approximate="tanh" if activation == "gelu_tanh" else "none")
    _check(activation in GATED_ACTIVATIONS, f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if interleaved:
        gate_MI, up_MI = h_MF[..., ::2], h_MF[..., 1::2]
    else:
        gate_MI, up_MI = h_MF.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(gate_MI) * up_MI
    if activation == "reglu":
        return F.relu(gate_MI) * up_MI
    if activation == "clamped_swiglu":
        gate_MI = gate_MI.clamp(max=limit)
        up_MI = up_MI.clamp(min=-limit, max=limit)
        return (up_MI + 1) * (gate_MI * torch.sigmoid(gate_MI * alpha))
    if activation == "swiglu_limit":  # DeepSeek-V4, GLM-5-Next, HY-V4: clamp, then SwiGLU
        return F.silu(gate_MI.clamp(max=limit)) * up_MI.clamp(min=-limit, max=limit)
    if activation == "swiglu_limit_post":  # Step-3.7: the SiLU's output is clamped
        return F.silu(gate_MI).clamp(max=limit) * up_MI.clamp(min=-limit, max=limit)
    if activation == "softcap_swiglu":  # Inkling-2: the sigmoid sees the raw gate
        check_activation_attrs(activation, alpha, limit)
        return (alpha * torch.tanh(gate_MI / alpha)) * torch.sigmoid(gate_MI) * (limit * torch.tanh(up_MI / limit))
    return F.gelu(gate_MI, approximate="tanh" if activation == "geglu_tanh" else "none") * up_MI


def ffn_reference(
    x_MH: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """One expert's FFN on its rows (weights without the expert dim)."""
    h_MF = x_MH @ w_in if transposed else F.linear(x_MH, w_in)
    if b_in is not None:
        h_MF = h_MF + b_in
    a_MI = _apply_activation(h_MF, activation, interleaved, alpha, limit)
    y_MH = a_MI @ w_out if transposed else F.linear(a_MI, w_out)
    if b_out is not None:
        y_MH = y_MH + b_out
    return y_MH


def expert_ffn_reference(
    x_TH: Tensor,
    token_N: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    H = x_TH.shape[-1]
    x_TH = x_TH.reshape(-1, H)
    rows = []
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        if count == 0:
            continue
        x_MH = x_TH[token_N[start : start + count]]
        rows.append(
            ffn_reference(
                x_MH,
                w_in[e],
                w_out[e],
                None if b_in is None else b_in[e],
                None if b_out is None else b_out[e],
                activation,
                transposed,
                interleaved,
                alpha,
                limit,
            ).to(x_TH.dtype)
        )
        start += count
    dropped = token_N.shape[0] - start
    rows.append(x_TH.new_zeros(dropped, H))
    return torch.cat(rows)


def combine_reference(y_NH: Tensor, slot_N: Tensor, weights_TK: Tensor) -> Tensor:
    K = weights_TK.shape[-1]
    weights_N = weights_TK.reshape(-1)[slot_N]
    contrib_NH = (y_NH * weights_N.unsqueeze(-1)).to(y_NH.dtype)
    out_TH = y_NH.new_zeros(weights_TK.reshape(-1, K).shape[0], y_NH.shape[-1])
    return out_TH.index_add(0, torch.div(slot_N, K, rounding_mode="floor"), contrib_NH)


def _grads(fn, grad_out: Tensor, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    """Gradients of ``fn(*inputs)`` for every floating input; an empty tensor for the others.

    Op bodies run below the autograd dispatch key, so ``torch.autograd`` is unavailable here;
    ``torch.func.vjp`` differentiates the reference regardless.
    """
    diff_pos = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]

    def of_diff(*diff):
        args = list(inputs)
        for i, t in zip(diff_pos, diff):
            args[i] = t
        return fn(*args)

    _, vjp_fn = torch.func.vjp(of_diff, *(inputs[i] for i in diff_pos))
    got = dict(zip(diff_pos, vjp_fn(grad_out)))
    # Contiguous, as the fake implementations (``empty_like``) promise: vjp may hand back an
    # expanded or transposed view, and a traced backward that views it would then fail.
    return [got[i].contiguous() if i in got else grad_out.new_empty(0) for i in range(len(inputs))]


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::route", mutates_args=())
def route(
    logits: Tensor,
    correction_bias: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
    capacity: int,
) -> tuple[Tensor, Tensor]:
    """Routing as ``kind`` says (``moec.ir.routing``): (weights [..., K] float32, idx [..., K] int64,
    -1 where dropped); K is top_k, or E for ``expert_choice``."""
    weights, idx = route_reference(
        logits, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling, capacity
    )
    return weights.contiguous(), idx.contiguous()


@route.register_fake
def _(logits, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling, capacity):
    shape = (*logits.shape[:-1], RouterKind.parse(kind).out_k(top_k, logits.shape[-1]))
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("moec::route_backward", mutates_args=())
def route_backward(
    grad_weights: Tensor,
    logits: Tensor,
    correction_bias: Optional[Tensor],
    kind: str,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
    capacity: int,
) -> Tensor:
    """Gradient of ``route``'s weights with respect to the logits (the choice is piecewise
    constant). ``capacity`` matters to ``renorm_kept`` only: its weights are renormalised over the
    slots the capacity kept, which the reference recomputes from the logits as the forward did."""

    def weights_of(logits_):
        return route_weights(logits_, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling,
                             capacity)[0]

    return _grads(weights_of, grad_weights, [logits])[0]


@route_backward.register_fake
def _(grad_weights, logits, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling, capacity):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, correction_bias, *attrs = inputs
    ctx.save_for_backward(logits, correction_bias)
    ctx.attrs = attrs  # with the capacity: renorm_kept's weights depend on the kept slots


def _route_bwd(ctx, grad_weights, grad_idx):
    logits, correction_bias = ctx.saved_tensors
    grad_logits = torch.ops.moec.route_backward(grad_weights, logits, correction_bias, *ctx.attrs)
    return grad_logits, None, None, None, None, None, None, None, None


route.register_autograd(_route_bwd, setup_context=_route_setup)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::dispatch", mutates_args=())
def dispatch(idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group routed slots by expert: (token_N, slot_N, counts_E)."""
    K = idx.shape[-1]
    idx_N = idx.reshape(-1)
    _check(
        idx_N.numel() == 0 or int(idx_N.max()) < num_experts,
        f"routing chose expert {int(idx_N.max()) if idx_N.numel() else -1} but the layer has {num_experts}",
    )
    key_N = torch.where(idx_N < 0, num_experts, idx_N)
    slot_N = torch.sort(key_N, stable=True).indices
    token_N = torch.div(slot_N, K, rounding_mode="floor")
    counts_E = torch.bincount(key_N, minlength=num_experts + 1)[:num_experts].contiguous()
    return token_N, slot_N, counts_E


@dispatch.register_fake
def _(idx, num_experts):
    n = idx.numel()
    return idx.new_empty(n), idx.new_empty(n), idx.new_empty(num_experts)


# ----------------------------------------------------------------------------------------------
# expert_ffn
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::expert_ffn", mutates_args=())
def expert_ffn(
    x: Tensor,
    token_idx: Tensor,
    counts: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """Every expert's FFN on its dispatched rows: y [N, H] in expert order."""
    return expert_ffn_reference(
        x, token_idx, counts, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit
    )


@expert_ffn.register_fake
def _(x, token_idx, counts, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit):
    return x.new_empty(token_idx.shape[0], x.shape[-1])


@torch.library.custom_op("moec::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(
    grad_y: Tensor,
    x: Tensor,
    token_idx: Tensor,
    counts: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, w_in, w_out, b_in, b_out); an empty tensor for an absent bias."""

    def y_of(x_, w_in_, w_out_, b_in_, b_out_):
        return expert_ffn_reference(
            x_, token_idx, counts, w_in_, w_out_, b_in_, b_out_, activation, transposed, interleaved, alpha, limit
        )

    return tuple(_grads(y_of, grad_y, [x, w_in, w_out, b_in, b_out]))


@expert_ffn_backward.register_fake
def _(grad_y, x, token_idx, counts, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit):
    def like(t):
        return grad_y.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(w_in), like(w_out), like(b_in), like(b_out)


def _ffn_setup(ctx, inputs, output):
    x, token_idx, counts, w_in, w_out, b_in, b_out, *attrs = inputs
    ctx.save_for_backward(x, token_idx, counts, w_in, w_out, b_in, b_out)
    ctx.attrs = attrs


def _ffn_bwd(ctx, grad_y):
    x, token_idx, counts, w_in, w_out, b_in, b_out = ctx.saved_tensors
    gx, gw_in, gw_out, gb_in, gb_out = torch.ops.moec.expert_ffn_backward(
        grad_y, x, token_idx, counts, w_in, w_out, b_in, b_out, *ctx.attrs
    )
    return (gx, None, None, gw_in, gw_out, gb_in if b_in is not None else None,
            gb_out if b_out is not None else None, None, None, None, None, None)


expert_ffn.register_autograd(_ffn_bwd, setup_context=_ffn_setup)


# ----------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::combine", mutates_args=())
def combine(y: Tensor, slot_idx: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of each token's K expert outputs: out [T, H] in y's dtype."""
    return combine_reference(y, slot_idx, weights)


@combine.register_fake
def _(y, slot_idx, weights):
    return y.new_empty(weights.numel() // weights.shape[-1], y.shape[-1])


@torch.library.custom_op("moec::combine_backward", mutates_args=())
def combine_backward(grad_out: Tensor, y: Tensor, slot_idx: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients for (y, weights)."""
    gy, _, gw = _grads(lambda y_, s_, w_: combine_reference(y_, s_, w_), grad_out, [y, slot_idx, weights])
    return gy, gw


@combine_backward.register_fake
def _(grad_out, y, slot_idx, weights):
    return torch.empty_like(y), torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_bwd(ctx, grad_out):
    y, slot_idx, weights = ctx.saved_tensors
    gy, gw = torch.ops.moec.combine_backward(grad_out, y, slot_idx, weights)
    return gy, None, gw


combine.register_autograd(_combine_bwd, setup_context=_combine_setup)


# ----------------------------------------------------------------------------------------------
# shared_expert
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec::shared_expert", mutates_args=())
def shared_expert(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """A dense FFN applied to every token (the layer's always-on expert)."""
    return ffn_reference(x, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit).to(x.dtype)


@shared_expert.register_fake
def _(x, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit):
    return torch.empty_like(x)


@torch.library.custom_op("moec::shared_expert_backward", mutates_args=())
def shared_expert_backward(
    grad_y: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Optional[Tensor],
    b_out: Optional[Tensor],
    activation: str,
    transposed: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, w_in, w_out, b_in, b_out); an empty tensor for an absent bias."""

    def y_of(x_, w_in_, w_out_, b_in_, b_out_):
        return ffn_reference(x_, w_in_, w_out_, b_in_, b_out_, activation, transposed, interleaved, alpha, limit)

    return tuple(_grads(y_of, grad_y, [x, w_in, w_out, b_in, b_out]))


@shared_expert_backward.register_fake
def _(grad_y, x, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit):
    def like(t):
        return grad_y.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(w_in), like(w_out), like(b_in), like(b_out)


def _shared_setup(ctx, inputs, output):
    x, w_in, w_out, b_in, b_out, *attrs = inputs
    ctx.save_for_backward(x, w_in, w_out, b_in, b_out)
    ctx.attrs = attrs


def _shared_bwd(ctx, grad_y):
    x, w_in, w_out, b_in, b_out = ctx.saved_tensors
    gx, gw_in, gw_out, gb_in, gb_out = torch.ops.moec.shared_expert_backward(
        grad_y, x, w_in, w_out, b_in, b_out, *ctx.attrs
    )
    return (gx, gw_in, gw_out, gb_in if b_in is not None else None,
            gb_out if b_out is not None else None, None, None, None, None, None)


shared_expert.register_autograd(_shared_bwd, setup_context=_shared_setup)

FORWARD_OPS = ("route", "dispatch", "expert_ffn", "combine", "shared_expert")
BACKWARD_OPS = ("route_backward", "expert_ffn_backward", "combine_backward", "shared_expert_backward")
