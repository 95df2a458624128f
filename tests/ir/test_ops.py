"""The moec:: ops against naive per-token loops, opcheck, and degenerate routing."""

import pytest
import torch
import torch.nn.functional as F

import moec  # noqa: F401
from moec.ir import ops

T, H, E, I = 9, 8, 4, 5


def naive_layer(x_TH, w_TK, idx_TK, w_in, w_out, activation, alpha=1.702, limit=7.0):
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            if e < 0:
                continue
            y = ops.ffn_reference(x_TH[t : t + 1], w_in[e], w_out[e], None, None, activation, False, False, alpha, limit)
            out[t] += (w_TK[t, k] * y[0]).to(out.dtype)
    return out


def layer(x_TH, w_TK, idx_TK, w_in, w_out, activation, alpha=1.702, limit=7.0):
    token_N, slot_N, counts_E = torch.ops.moec.dispatch(idx_TK, w_in.shape[0])
    y = torch.ops.moec.expert_ffn(x_TH, token_N, counts_E, w_in, w_out, None, None, activation, False, False, alpha, limit)
    return torch.ops.moec.combine(y, slot_N, w_TK)


def weights(gated, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    w_in = torch.randn(E, (2 if gated else 1) * I, H, generator=g, dtype=dtype)
    return w_in, torch.randn(E, H, I, generator=g, dtype=dtype)


ROUTINGS = {
    "random": lambda: torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:2] for t in range(T)]),
    "all_on_one_expert": lambda: torch.stack([torch.tensor([0, 1 + t % (E - 1)]) for t in range(T)]),
    "expert_without_tokens": lambda: torch.stack([torch.tensor([t % 2, 2]) for t in range(T)]),
    "top_k_equals_experts": lambda: torch.arange(E).expand(T, E).clone(),
    "dropped_slots": lambda: torch.stack([torch.tensor([t % E, -1]) for t in range(T)]),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_layer_matches_naive_loop(routing, activation):
    idx = ROUTINGS[routing]()
    x = torch.randn(T, H, dtype=torch.float64) * 3
    w = torch.rand(idx.shape, dtype=torch.float64)
    w_in, w_out = weights(activation in ops.GATED_ACTIVATIONS)
    torch.testing.assert_close(layer(x, w, idx, w_in, w_out, activation), naive_layer(x, w, idx, w_in, w_out, activation))


def test_single_token():
    x = torch.randn(1, H, dtype=torch.float64)
    idx, w = torch.tensor([[3, 1]]), torch.rand(1, 2, dtype=torch.float64)
    w_in, w_out = weights(True)
    torch.testing.assert_close(layer(x, w, idx, w_in, w_out, "swiglu"), naive_layer(x, w, idx, w_in, w_out, "swiglu"))


def test_dispatch_groups_by_expert_and_counts():
    idx = torch.tensor([[2, 0], [2, -1], [1, 2]])
    token, slot, counts = torch.ops.moec.dispatch(idx, 4)
    assert counts.tolist() == [1, 1, 3, 0]
    assert token.tolist() == [0, 2, 0, 1, 2, 1]
    assert slot.tolist() == [1, 4, 0, 2, 5, 3]


def test_dispatch_rejects_expert_out_of_range():
    with pytest.raises(ValueError, match="expert 5"):
        torch.ops.moec.dispatch(torch.tensor([[5, 0]]), 4)


def hf_style_routes(logits, kind):
    """The routers as Mixtral / GPT-OSS / DeepSeek-V3 / Switch / DeepSeek-V4 write them."""
    if kind == "softmax_topk":
        v, i = logits.softmax(-1).topk(2, -1)
        return v / v.sum(-1, keepdim=True), i
    if kind == "topk_softmax":
        v, i = logits.topk(2, -1)
        return v.softmax(-1), i
    if kind == "top1":
        p = logits.softmax(-1)
        return p.max(-1).values.unsqueeze(-1), p.argmax(-1, keepdim=True)
    bias = torch.linspace(-0.1, 0.1, logits.shape[-1], dtype=logits.dtype)
    s = F.softplus(logits).sqrt() if kind == "sqrtsoftplus_topk" else logits.sigmoid()
    choice = s + bias
    if kind == "sigmoid_bias_grouped_topk":
        gs = choice.view(-1, 2, E // 2).topk(2, -1)[0].sum(-1)
        mask = torch.zeros_like(gs).scatter_(1, gs.topk(1, -1)[1], 1)
        choice = choice.masked_fill(~mask.unsqueeze(-1).expand(-1, 2, E // 2).reshape(-1, E).bool(), float("-inf"))
    i = choice.topk(2, -1)[1]
    v = s.gather(1, i)
    return 2.5 * v / (v.sum(-1, keepdim=True) + 1e-20), i


@pytest.mark.parametrize("kind", ops.ROUTER_KINDS)
def test_route_matches_hand_written_routers(kind):
    logits = torch.randn(T, E, dtype=torch.float64)
    sigmoid = kind.startswith("sigmoid") or kind == "sqrtsoftplus_topk"  # biased, renormalised and scaled
    bias = torch.linspace(-0.1, 0.1, E, dtype=torch.float64) if sigmoid else None
    w, idx = torch.ops.moec.route(
        logits, bias, kind, 1 if kind == "top1" else 2, 2 if kind == "sigmoid_bias_grouped_topk" else 1, 1,
        kind in ("softmax_topk",) or sigmoid, 2.5 if sigmoid else 1.0, 0,
    )
    w_ref, idx_ref = hf_style_routes(logits, kind)
    order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
    assert torch.equal(idx.gather(-1, order), idx_ref.gather(-1, order_ref))
    torch.testing.assert_close(w.gather(-1, order), w_ref.gather(-1, order_ref).float())


def test_route_capacity_drops_late_tokens_per_expert():
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    _, idx = torch.ops.moec.route(logits, None, "top1", 1, 1, 1, False, 1.0, 2)
    assert idx.squeeze(-1).tolist() == [0, 0, 1, -1]


def test_bad_router_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown router kind"):
        torch.ops.moec.route(torch.randn(2, 4), None, "nope", 2, 1, 1, False, 1.0, 0)


def _opcheck_cases():
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    w_TK, idx = torch.ops.moec.route(logits.detach(), None, "softmax_topk", 2, 1, 1, True, 1.0, 0)
    token, slot, counts = torch.ops.moec.dispatch(idx, E)
    w_in, w_out = (t.requires_grad_() for t in weights(True))
    b_in = torch.randn(E, 2 * I, dtype=torch.float64, requires_grad=True)
    b_out = torch.randn(E, H, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T * 2, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(E, dtype=torch.float64)
    return {
        "route_softmax": (torch.ops.moec.route.default, (logits, None, "softmax_topk", 2, 1, 1, True, 1.0, 0)),
        "route_grouped": (torch.ops.moec.route.default, (logits, bias, "sigmoid_bias_grouped_topk", 2, 2, 1, True, 2.5, 0)),
        "route_top1_capacity": (torch.ops.moec.route.default, (logits, None, "top1", 1, 1, 1, False, 1.0, 3)),
        "dispatch": (torch.ops.moec.dispatch.default, (idx, E)),
        "expert_ffn": (torch.ops.moec.expert_ffn.default,
                       (x, token, counts, w_in, w_out, b_in, b_out, "clamped_swiglu", False, True, 1.702, 7.0)),
        "combine": (torch.ops.moec.combine.default, (y, slot, w_TK.double().requires_grad_())),
        "shared_expert": (torch.ops.moec.shared_expert.default,
                          (x, w_in[0].detach().requires_grad_(), w_out[0].detach().requires_grad_(), None, None,
                           "swiglu", False, False, 1.0, 0.0)),
    }


@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_backward_matches_autograd_of_reference():
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    w_in, w_out = (t.requires_grad_() for t in weights(True))

    def run(route, dispatch, ffn, combine):
        w, idx = route(logits, None, "softmax_topk", 2, 1, 1, True, 1.0, 0)
        token, slot, counts = dispatch(idx, E)
        y = ffn(x, token, counts, w_in, w_out, None, None, "swiglu", False, False, 1.0, 0.0)
        out = combine(y, slot, w)
        return torch.autograd.grad(out.pow(2).sum(), [x, logits, w_in, w_out])

    def ref_dispatch(idx, n):
        return torch.ops.moec.dispatch(idx, n)

    got = run(torch.ops.moec.route, torch.ops.moec.dispatch, torch.ops.moec.expert_ffn, torch.ops.moec.combine)
    want = run(ops.route_reference, ref_dispatch, ops.expert_ffn_reference, ops.combine_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Lowered ops (moec.ir.lowered): the split backward of the fused expert ops
# ----------------------------------------------------------------------------------------------


def _lowered_case(dropped: bool):
    """float64 args of grouped_gemm_act / grouped_gemm_combine; with ``dropped`` the counts leave
    the last slots to no expert (a capacity limit upstream)."""
    g = torch.Generator().manual_seed(3)
    K = 2
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    token, slot = torch.ops.moec.permute(idx, counts)
    if dropped:
        counts = counts.clone()
        counts[-1] = 0  # the rows of the last expert (at the end) are past the counts
    w_in, w_out = weights(True)
    b_in = torch.randn(E, 2 * I, dtype=torch.float64, generator=g)
    b_out = torch.randn(E, H, dtype=torch.float64, generator=g)
    x = torch.randn(T, H, dtype=torch.float64, generator=g)
    a = torch.randn(T * K, I, dtype=torch.float64, generator=g)
    w_TK = torch.rand(T, K, dtype=torch.float64, generator=g)
    act = (x, token, counts, w_in, b_in, "clamped_swiglu", False, True, 1.702, 0.8)
    comb = (a, slot, counts, w_out, b_out, w_TK, False)
    return act, comb, g


@pytest.mark.parametrize("dropped", [False, True], ids=["dropless", "dropped_slots"])
def test_split_backward_equals_the_fused_vjp(dropped):
    """The input op then the weight op give the gradients of one vjp of the whole reference (what
    the fused backward op computed), and the intermediate is zero past the counts."""
    from moec.ir import lowered

    (x, token, counts, w_in, b_in, *attrs), comb, g = _lowered_case(dropped)
    kept = int(counts.sum())
    grad_a = torch.randn(T * 2, I, dtype=torch.float64, generator=g)
    fused = ops._grads(lambda x_, w_, b_: lowered.grouped_gemm_act_reference(x_, token, counts, w_, b_, *attrs),
                       grad_a, [x, w_in, b_in])
    d_x, d_h = torch.ops.moec.grouped_gemm_act_backward_input(grad_a, x, token, counts, w_in, b_in, *attrs)
    d_w, d_b = torch.ops.moec.grouped_gemm_act_backward_weight(d_h, x, token, counts, w_in, b_in, attrs[1])
    assert d_h.shape == (T * 2, 2 * I) and (kept == T * 2 or d_h[kept:].abs().max() == 0)
    for got, want in zip((d_x, d_w, d_b), fused):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    a, slot, counts, w_out, b_out, w_TK, transposed = comb
    grad_out = torch.randn(T, H, dtype=torch.float64, generator=g)
    fused = ops._grads(lambda a_, w_, b_, wt_: lowered.grouped_gemm_combine_reference(a_, slot, counts, w_, b_, wt_,
                                                                                      transposed),
                       grad_out, [a, w_out, b_out, w_TK])
    d_a, d_y, d_weights = torch.ops.moec.grouped_gemm_combine_backward_input(grad_out, *comb)
    d_w, d_b = torch.ops.moec.grouped_gemm_combine_backward_weight(d_y, a, counts, w_out, b_out, transposed)
    assert d_y.shape == (T * 2, H) and (kept == T * 2 or d_y[kept:].abs().max() == 0)
    for got, want in zip((d_a, d_w, d_b, d_weights), fused):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lowered_ops_opcheck():
    """The fused expert ops, whose autograd (test_autograd_registration, test_aot_dispatch_dynamic)
    calls the split backward ops. The backward references themselves are not opchecked: they
    differentiate the forward reference with torch.func.vjp, whose wrapper tensors opcheck's
    modes cannot inspect (as for the fused backward reference before them); their
    implementations are (tests/codegen)."""
    act, comb, _ = _lowered_case(dropped=False)
    x, token, counts, w_in, b_in, *attrs = act
    a, slot, counts, w_out, b_out, w_TK, transposed = comb
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(torch.ops.moec.grouped_gemm_act, (leaf(x), token, counts, leaf(w_in), leaf(b_in), *attrs))
    torch.library.opcheck(torch.ops.moec.grouped_gemm_combine,
                          (leaf(a), slot, counts, leaf(w_out), leaf(b_out), leaf(w_TK), transposed))



def test_verifier_checks_the_split_backward_ops():
    """The op spec table covers the split backward ops: a backward graph passes, a weight op fed
    a gradient of the wrong width is refused."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moec.ir.verify import IRError, verify

    (x, token, counts, w_in, b_in, *attrs), comb, g = _lowered_case(dropped=False)
    grad_a = torch.randn(T * 2, I, dtype=torch.float64, generator=g)

    def backward(grad_a, x, token, counts, w_in, b_in, width):
        _, d_h = torch.ops.moec.grouped_gemm_act_backward_input(grad_a, x, token, counts, w_in, b_in, *attrs)
        return torch.ops.moec.grouped_gemm_act_backward_weight(d_h[:, :width], x, token, counts, w_in, b_in, attrs[1])

    args = (grad_a, x, token, counts, w_in, b_in)
    good = make_fx(lambda *t: backward(*t, 2 * I), tracing_mode="fake")(*args)
    assert verify(good) == 2
    bad = make_fx(lambda *t: backward(*t, I), tracing_mode="fake")(*args)
    with pytest.raises(IRError, match="grouped_gemm_act_backward_weight.*out width"):
        verify(bad)
