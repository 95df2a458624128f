"""The router vocabulary (moec.ir.routing) and its semantics in moec::route, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

import moec.ir.lowered  # noqa: F401  (registers moec::gate)
from moec.ir import ops
from moec.ir.routing import BASES, RouterKind, canonical, has_capacity


def route(logits, kind, top_k, *, bias=None, groups=1, topk_groups=1, renorm=False, scaling=1.0, capacity=0):
    return torch.ops.moec.route(logits, bias, kind, top_k, groups, topk_groups, renorm, scaling, capacity)


def probs_logits(*rows):
    """Logits whose softmax is exactly the given probability rows (up to fp32 rounding)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------

CANONICAL = [
    *BASES[:-1],
    "softmax_topk+group_max",
    "sigmoid_bias_grouped_topk+group_max+pnorm=2.0",
    "softmax_topk+pnorm=1.5",
    "top1+cf=1.25",
    "softmax_topk+cf=2.0+cfloor+cmin=4+choice_first",
    "topk_softmax+choice_first",
    "expert_choice+cf=1.0",
    "expert_choice+cf=0.5+cfloor+cmin=2+sigmoid",
    "expert_choice",
    "sigmoid_topk+pnorm=1e-05",
    "sqrtsoftplus_topk+group_max+pnorm=2.0",
    "softmax_topk+cf=1.25+choice_first+renorm_kept",
    "top1+renorm_kept",
]


@pytest.mark.parametrize("kind", CANONICAL)
def test_canonical_kinds_round_trip(kind):
    rk = RouterKind.parse(kind)
    assert str(rk) == kind
    assert RouterKind.parse(str(rk)) == rk
    assert hash(rk) == hash(RouterKind.parse(kind))


def test_existing_names_are_bare_bases():
    for name in ops.ROUTER_KINDS:
        assert RouterKind.parse(name) == RouterKind(name) and str(RouterKind(name)) == name


def test_spellings_print_canonically():
    # Any modifier order and float spelling in; one order and repr(float) out.
    assert canonical("softmax_topk+choice_first+cf=2+group_max") == "softmax_topk+group_max+cf=2.0+choice_first"
    assert canonical("sigmoid_topk+pnorm=2") == "sigmoid_topk+pnorm=2.0"
    assert canonical("expert_choice+sigmoid+cmin=3+cf=.5") == "expert_choice+cf=0.5+cmin=3+sigmoid"
    assert RouterKind.parse("top1+cf=1.0") == RouterKind.parse("top1+cf=1")
    assert canonical("sigmoid_topk+renorm_kept+choice_first+cf=1") == "sigmoid_topk+cf=1.0+choice_first+renorm_kept"


@pytest.mark.parametrize("kind,match", [
    ("nope", "unknown router kind 'nope'"),
    ("softmax_topk+nope", "unknown modifier 'nope'"),
    ("softmax_topk+pnorm", "unknown modifier 'pnorm'"),  # a value modifier without its value
    ("softmax_topk+group_max=1", "unknown modifier 'group_max=1'"),
    ("softmax_topk+pnorm=two", "pnorm='two' is not a float"),
    ("softmax_topk+cmin=1.5+cf=1", "cmin='1.5' is not an integer"),
    ("softmax_topk+cf=1+cmin=0", "cmin=0 must be at least 1"),
    ("softmax_topk+pnorm=-1", "pnorm=-1.0 must be a positive finite float"),
    ("softmax_topk+cf=inf", "cf=inf must be a positive finite float"),
    ("softmax_topk+pnorm=nan", "pnorm=nan"),
    ("softmax_topk+group_max+group_max", "'group_max' given twice"),
    ("softmax_topk+cfloor", "need cf=F"),
    ("top1+cmin=2", "need cf=F"),
    ("softmax_topk+sigmoid", "sigmoid applies to expert_choice only"),
    ("expert_choice+group_max", "group_max applies to token-choice"),
    ("expert_choice+pnorm=2", "pnorm applies to token-choice"),
    ("expert_choice+choice_first", "choice_first applies to token-choice"),
    ("expert_choice+cf=1+renorm_kept", "renorm_kept applies to token-choice"),
    ("softmax_topk+renorm_kept=1", "unknown modifier 'renorm_kept=1'"),
    ("softmax_topk+pnorm=2+cf=1+renorm_kept", "does not combine with pnorm"),
    ("sqrtsoftplus", "unknown router kind 'sqrtsoftplus'"),
    ("sqrtsoftplus_topk+sigmoid", "sigmoid applies to expert_choice only"),
    ("", "unknown router kind ''"),
])
def test_bad_kinds_name_the_problem_and_the_forms(kind, match):
    with pytest.raises(ValueError, match=match) as err:
        RouterKind.parse(kind)
    assert "valid forms" in str(err.value) and "expert_choice" in str(err.value)


def test_capacity_for():
    rk = RouterKind.parse("softmax_topk+cf=0.7")
    assert rk.capacity_for(0, 3, 2, 3) == 2  # ceil(1.4)
    assert RouterKind.parse("softmax_topk+cf=0.7+cfloor").capacity_for(0, 3, 2, 3) == 1
    assert RouterKind.parse("softmax_topk+cf=0.7+cmin=5").capacity_for(0, 3, 2, 3) == 5
    assert rk.capacity_for(7, 3, 2, 3) == 7  # a fixed capacity wins
    assert RouterKind.parse("softmax_topk").capacity_for(0, 3, 2, 3) == 0  # unlimited
    assert RouterKind.parse("top1+cf=0.1+cfloor").capacity_for(0, 4, 1, 8) == 1  # at least one slot
    assert not has_capacity("softmax_topk+group_max", 0) and has_capacity("softmax_topk", 3)
    assert has_capacity("top1+cf=1.0", 0) and has_capacity("expert_choice+cf=1.0", 0)
    assert has_capacity(RouterKind("expert_choice"), 0)
    # renorm_kept is only valid with a capacity, so such a kind always names a capacity route.
    assert has_capacity("softmax_topk+renorm_kept", 0) and not has_capacity("sqrtsoftplus_topk", 0)


# ----------------------------------------------------------------------------------------------
# Token choice: scores, correction bias, groups, renormalisation
# ----------------------------------------------------------------------------------------------


def test_group_max_and_top2_sum_choose_different_groups():
    # Groups {0, 1} and {2, 3}; topk_softmax ranks the logits themselves. Best-two sums: 1.0 vs
    # 1.15 (the second group); maxima: 0.9 vs 0.6 (the first).
    logits = torch.tensor([[0.9, 0.1, 0.6, 0.55]])
    w, idx = route(logits, "topk_softmax", 2, groups=2, topk_groups=1)
    assert idx.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.55]]).softmax(-1))
    w, idx = route(logits, "topk_softmax+group_max", 2, groups=2, topk_groups=1)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.1]]).softmax(-1))
    # The same with softmax scores (group-limited top-k now applies to every base).
    p = probs_logits([0.35, 0.05, 0.31, 0.29])
    assert route(p, "softmax_topk", 1, groups=2, topk_groups=1)[1].tolist() == [[2]]
    assert route(p, "softmax_topk+group_max", 1, groups=2, topk_groups=1)[1].tolist() == [[0]]


def test_pnorm_renormalisation():
    logits = probs_logits([0.5, 0.3, 0.2])
    w, idx = route(logits, "softmax_topk+pnorm=2.0", 2, renorm=True)
    assert idx.tolist() == [[0, 1]]
    n = math.sqrt(0.5**2 + 0.3**2)
    torch.testing.assert_close(w, torch.tensor([[0.5 / n, 0.3 / n]]))
    w, _ = route(logits, "softmax_topk+pnorm=3.0", 2, renorm=True, scaling=2.0)
    n3 = (0.5**3 + 0.3**3) ** (1 / 3)
    torch.testing.assert_close(w, torch.tensor([[1.0 / n3, 0.6 / n3]]))
    w_sum, _ = route(logits, "softmax_topk", 2, renorm=True)
    torch.testing.assert_close(w_sum, torch.tensor([[0.625, 0.375]]))
    with pytest.raises(ValueError, match="needs renormalize=True"):
        route(logits, "softmax_topk+pnorm=2.0", 2)


def _sqrt_softplus(z: float) -> float:
    return math.sqrt(z if z > 20 else math.log1p(math.exp(z)))  # torch's threshold 20, beta 1


def test_sqrtsoftplus_scores():
    # Scores sqrt(softplus(z)), highest first: z = 25 is past the threshold (score 5 exactly), and
    # z = -30 keeps its tiny score sqrt(exp(-30)) instead of a 0 tying it with nothing else.
    z = [0.0, 1.0, -1.0, 2.0, 25.0, -30.0]
    w, idx = route(torch.tensor([z]), "sqrtsoftplus_topk", 6)
    assert idx.tolist() == [[4, 3, 1, 0, 2, 5]]
    torch.testing.assert_close(w, torch.tensor([[_sqrt_softplus(z[i]) for i in (4, 3, 1, 0, 2, 5)]]),
                               rtol=2e-7, atol=0)
    assert w[0, 0].item() == 5.0
    # top-2, renormalised by the sum and scaled, as sigmoid_topk is.
    w, idx = route(torch.tensor([z[:4]]), "sqrtsoftplus_topk", 2, renorm=True, scaling=2.5)
    s3, s1 = _sqrt_softplus(2.0), _sqrt_softplus(1.0)
    assert idx.tolist() == [[3, 1]]
    torch.testing.assert_close(w, torch.tensor([[2.5 * s3 / (s3 + s1), 2.5 * s1 / (s3 + s1)]]))


def test_sqrtsoftplus_with_correction_bias_and_groups():
    # Scores s = sqrt(softplus(z)): 1.146, 1.114, 0.833, 0.987 | 1.458, 0.560, 0.893, 0.863.
    z = torch.tensor([[1.0, 0.9, 0.0, 0.5, 2.0, -1.0, 0.2, 0.1]])
    s = [_sqrt_softplus(v) for v in z[0].tolist()]
    # The bias lifts expert 2's choice to 1.333, past expert 0; its weight stays its unbiased score.
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    w, idx = route(z, "sqrtsoftplus_topk", 2, bias=bias)
    assert idx.tolist() == [[4, 2]]
    torch.testing.assert_close(w, torch.tensor([[s[4], s[2]]]))
    # Groups {0,1}, {2,3}, {4,5}, {6,7}; best-two sums 2.26, 1.82, 2.02, 1.76 keep {0,1} and {4,5}:
    # top-4 takes expert 5 (0.560) where the global top-4 takes expert 3 (0.987).
    w, idx = route(z, "sqrtsoftplus_topk", 4, groups=4, topk_groups=2, renorm=True)
    assert idx.tolist() == [[4, 0, 1, 5]]
    total = s[4] + s[0] + s[1] + s[5]
    torch.testing.assert_close(w, torch.tensor([[s[4] / total, s[0] / total, s[1] / total, s[5] / total]]))
    assert route(z, "sqrtsoftplus_topk", 4)[1].tolist() == [[4, 0, 1, 3]]
    # With the bias, the choice's best-two sums are 2.26, 2.32, 2.02, 1.76: groups {2,3} and {0,1};
    # its group maxima 1.146, 1.333, 1.458, 0.893 (group_max) keep {4,5} and {2,3} instead.
    assert route(z, "sqrtsoftplus_topk", 2, bias=bias, groups=4, topk_groups=2)[1].tolist() == [[2, 0]]
    w, idx = route(z, "sqrtsoftplus_topk+group_max", 2, bias=bias, groups=4, topk_groups=2)
    assert idx.tolist() == [[4, 2]]
    torch.testing.assert_close(w, torch.tensor([[s[4], s[2]]]))


def test_correction_bias_steers_the_choice_of_every_base():
    # Softmax scores [0.5, 0.3, 0.2]; the bias lifts expert 2's choice to 0.55, its weight stays 0.2.
    logits = probs_logits([0.5, 0.3, 0.2])
    bias = torch.tensor([0.0, 0.0, 0.35])
    for kind in ("softmax_topk", "top1"):
        w, idx = route(logits, kind, 1, bias=bias)
        assert idx.tolist() == [[2]]
        torch.testing.assert_close(w, torch.tensor([[0.2]]))
    # topk_softmax: the bias moves the choice on the logits; the weights are the softmax of the
    # two picked unbiased logits.
    w, idx = route(torch.tensor([[2.0, 1.0, 0.0]]), "topk_softmax", 2, bias=torch.tensor([0.0, 0.0, 1.5]))
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0]]).softmax(-1))


# ----------------------------------------------------------------------------------------------
# Capacity: fixed, from cf (ceil, floor, minimum), and its priority order
# ----------------------------------------------------------------------------------------------

# Three tokens, three experts, top-2: token 0 picks (0, 1), token 1 (1, 0), token 2 (0, 2).
CAP_LOGITS = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 0.0, 1.0]])
TOKEN_MAJOR_C1 = [[0, 1], [-1, -1], [-1, 2]]  # slots (t, k) in order; one slot per expert
CHOICE_FIRST_C1 = [[0, -1], [1, -1], [-1, 2]]  # first choices of all tokens first
TOKEN_MAJOR_C2 = [[0, 1], [1, 0], [-1, 2]]


@pytest.mark.parametrize("kind,capacity,expected", [
    ("softmax_topk", 1, TOKEN_MAJOR_C1),
    ("softmax_topk+choice_first", 1, CHOICE_FIRST_C1),
    ("softmax_topk+cf=0.5", 0, TOKEN_MAJOR_C1),  # ceil(0.5 * 3 * 2 / 3) = 1
    ("softmax_topk+cf=0.5+choice_first", 0, CHOICE_FIRST_C1),
    ("softmax_topk+cf=0.7", 0, TOKEN_MAJOR_C2),  # ceil(1.4) = 2
    ("softmax_topk+cf=0.7+cfloor", 0, TOKEN_MAJOR_C1),  # floor(1.4) = 1
    ("softmax_topk+cf=0.5+cmin=2", 0, TOKEN_MAJOR_C2),
    ("softmax_topk+cf=0.5", 2, TOKEN_MAJOR_C2),  # the fixed capacity wins over cf
    ("softmax_topk+choice_first", 0, [[0, 1], [1, 0], [0, 2]]),  # no capacity: nothing dropped
])
def test_capacity_drops_the_right_slots(kind, capacity, expected):
    w, idx = route(CAP_LOGITS, kind, 2, capacity=capacity)
    assert idx.tolist() == expected
    # The weights never depend on the capacity.
    torch.testing.assert_close(w, route(CAP_LOGITS, "softmax_topk", 2)[0])


def test_cf_capacity_counts_tokens_per_leading_index():
    # Two sequences of the three tokens: each gets its own capacity (T = 3 along dim -2).
    w, idx = route(torch.stack([CAP_LOGITS, CAP_LOGITS]), "softmax_topk+cf=0.5+choice_first", 2)
    assert idx.tolist() == [CHOICE_FIRST_C1, CHOICE_FIRST_C1]


# ----------------------------------------------------------------------------------------------
# renorm_kept: renormalise over the slots the capacity kept (NLLB-MoE)
# ----------------------------------------------------------------------------------------------


def renorm_kept_by_hand(logits, top_k, capacity, scaling=1.0, choice_first=False):
    """NLLB-MoE's top-k with normalize_router_prob_before_dropping=False, written out: softmax, top-k,
    slots kept in arrival order up to the capacity, kept probabilities over their sum floored at
    the float32 epsilon. (weights, idx with -1 where dropped)."""
    probs = logits.float().softmax(dim=-1)
    T, E = probs.shape
    idx = probs.topk(top_k, dim=-1).indices
    order = ([(t, j) for j in range(top_k) for t in range(T)] if choice_first
             else [(t, j) for t in range(T) for j in range(top_k)])
    load, kept = [0] * E, torch.zeros(T, top_k, dtype=torch.bool)
    for t, j in order:
        load[idx[t, j]] += 1
        kept[t, j] = load[idx[t, j]] <= capacity
    picked = probs.gather(-1, idx) * kept
    weights = picked / picked.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps) * scaling
    return weights, torch.where(kept, idx, -1)


def test_renorm_kept_renormalises_over_the_kept_slots():
    # Capacity 1, token by token: token 0 keeps both slots, token 1 loses both, token 2 its first.
    p0 = CAP_LOGITS[0].softmax(-1)
    w, idx = route(CAP_LOGITS, "softmax_topk+renorm_kept", 2, renorm=True, scaling=2.0, capacity=1)
    assert idx.tolist() == TOKEN_MAJOR_C1
    torch.testing.assert_close(w, torch.tensor([[2 * p0[0] / (p0[0] + p0[1]), 2 * p0[1] / (p0[0] + p0[1])],
                                                [0.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(w, renorm_kept_by_hand(CAP_LOGITS, 2, 1, 2.0)[0])
    # Without renorm_kept the k weights are renormalised before the drops, whatever the capacity.
    w_before, _ = route(CAP_LOGITS, "softmax_topk", 2, renorm=True, scaling=2.0, capacity=1)
    assert torch.equal(w_before, route(CAP_LOGITS, "softmax_topk", 2, renorm=True, scaling=2.0)[0])
    assert (w_before[1] > 0).all()
    # The capacity from cf, and GShard's priority: every token keeps exactly one slot, weight 1.
    w, idx = route(CAP_LOGITS, "softmax_topk+cf=0.5+choice_first+renorm_kept", 2, renorm=True)
    assert idx.tolist() == CHOICE_FIRST_C1
    assert w.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert torch.equal(w, renorm_kept_by_hand(CAP_LOGITS, 2, 1, choice_first=True)[0])


def test_renorm_kept_gradient_matches_autograd_of_a_direct_implementation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, generator=g, requires_grad=True)
    w, idx = route(logits, "softmax_topk+renorm_kept", 2, renorm=True, scaling=1.5, capacity=2)
    w_hand, idx_hand = renorm_kept_by_hand(logits, 2, 2, 1.5)
    kept = (idx >= 0).sum(-1).tolist()
    assert 0 in kept and 1 in kept and 2 in kept  # tokens that lost every slot, one slot, none
    assert torch.equal(idx, idx_hand)
    torch.testing.assert_close(w, w_hand)
    assert not w.isnan().any() and (w[idx < 0] == 0).all()
    cot = torch.randn(w.shape, generator=g)
    (got,) = torch.autograd.grad(w, [logits], cot)
    (want,) = torch.autograd.grad(w_hand, [logits], cot)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want)
    lost_all = torch.tensor(kept) == 0
    assert (got[lost_all] == 0).all()  # no expert computes for them: nothing to learn


def test_renorm_kept_needs_a_capacity_and_renormalize():
    with pytest.raises(ValueError, match="needs renormalize=True"):
        route(CAP_LOGITS, "softmax_topk+renorm_kept", 2, capacity=1)
    with pytest.raises(ValueError, match="capacity > 0 or cf=F"):
        route(CAP_LOGITS, "softmax_topk+renorm_kept", 2, renorm=True)
    RouterKind.parse("softmax_topk+renorm_kept").check(num_experts=3, top_k=2, num_groups=1, topk_groups=1,
                                                       renormalize=True, has_correction_bias=False)  # unknown capacity


# ----------------------------------------------------------------------------------------------
# Expert choice
# ----------------------------------------------------------------------------------------------

# Token 0 is every expert's favourite, token 1 nobody's; expert 2 sees tokens 2 and 3 tied.
EC_LOGITS = torch.tensor([[5.0, 5.0, 5.0], [-5.0, -5.0, -5.0], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])


def test_expert_choice_takes_each_experts_best_tokens():
    w, idx = route(EC_LOGITS, "expert_choice+sigmoid", 1, capacity=2)
    assert idx.tolist() == [[0, 1, 2], [-1, -1, -1], [0, -1, 2], [-1, 1, -1]]  # the tie goes to token 2
    torch.testing.assert_close(w, EC_LOGITS.sigmoid())  # every expert's score, taken or not
    torch.testing.assert_close(route(EC_LOGITS, "expert_choice", 1, capacity=2)[0], EC_LOGITS.softmax(-1))


def test_expert_choice_softmax_ties_go_to_the_lower_token():
    # Softmax over the experts: tokens 0 and 1 score 1/3 everywhere (exactly tied), token 2 scores
    # (0.665, 0.090, 0.245), token 3 (0.090, 0.665, 0.245).
    _, idx = route(EC_LOGITS, "expert_choice", 1, capacity=1)
    assert idx.tolist() == [[-1, -1, 2], [-1, -1, -1], [0, -1, -1], [-1, 1, -1]]
    _, idx = route(EC_LOGITS, "expert_choice", 1, capacity=2)
    assert idx.tolist() == [[0, 1, 2], [-1, -1, 2], [0, -1, -1], [-1, 1, -1]]


def test_expert_choice_capacity_from_cf_and_clamped_to_the_tokens():
    _, idx = route(EC_LOGITS, "expert_choice+cf=1.0+sigmoid", 1)  # ceil(4 * 1 / 3) = 2
    assert idx.tolist() == route(EC_LOGITS, "expert_choice+sigmoid", 1, capacity=2)[1].tolist()
    _, idx = route(EC_LOGITS, "expert_choice+cf=1.0+sigmoid", 2)  # ceil(4 * 2 / 3) = 3
    assert (idx >= 0).sum(0).tolist() == [3, 3, 3]
    _, idx = route(EC_LOGITS, "expert_choice+cf=0.5+cfloor+cmin=1+sigmoid", 1)  # floor(0.67) -> 1
    assert (idx >= 0).sum(0).tolist() == [1, 1, 1] and idx[0].tolist() == [0, 1, 2]
    _, idx = route(EC_LOGITS, "expert_choice+sigmoid", 1, capacity=10)  # C > T: every token, every expert
    assert idx.tolist() == [[0, 1, 2]] * 4
    _, idx = route(torch.stack([EC_LOGITS, EC_LOGITS.flip(0)]), "expert_choice+sigmoid", 1, capacity=1)
    assert idx[1].flip(0).tolist() == [[0, 1, 2], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]


def test_expert_choice_rejects_what_makes_no_sense():
    with pytest.raises(ValueError, match="needs an expert capacity"):
        route(EC_LOGITS, "expert_choice", 1)
    with pytest.raises(ValueError, match="does not renormalise"):
        route(EC_LOGITS, "expert_choice", 1, capacity=2, renorm=True)
    with pytest.raises(ValueError, match="no group-limited"):
        route(torch.randn(4, 4), "expert_choice", 1, capacity=2, groups=2)
    with pytest.raises(ValueError, match="no correction bias"):
        route(EC_LOGITS, "expert_choice", 1, capacity=2, bias=torch.zeros(3))


def test_expert_choice_layer_matches_a_naive_loop():
    """route -> dispatch (K = E slots per token) -> expert_ffn -> combine, with gradients."""
    from tests.ir.test_ops import naive_layer

    g = torch.Generator().manual_seed(0)
    T, H, E, I = 6, 8, 4, 5
    x = torch.randn(T, H, dtype=torch.float64, generator=g, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64, generator=g, requires_grad=True)
    w_in = torch.randn(E, 2 * I, H, dtype=torch.float64, generator=g)
    w_out = torch.randn(E, H, I, dtype=torch.float64, generator=g)
    w, idx = route(logits, "expert_choice+cf=1.0", 2, scaling=1.5)  # C = 3 tokens per expert
    assert w.shape == idx.shape == (T, E) and ((idx >= 0).sum(0) == 3).all()
    token, slot, counts = torch.ops.moec.dispatch(idx, E)
    assert counts.tolist() == [3] * E
    y = torch.ops.moec.expert_ffn(x, token, counts, w_in, w_out, None, None, "swiglu", False, False, 1.0, 0.0)
    out = torch.ops.moec.combine(y, slot, w)
    ref = naive_layer(x, w, idx, w_in, w_out, "swiglu")
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.square().sum(), [x, logits], retain_graph=True)  # the route is shared
    want = torch.autograd.grad(ref.square().sum(), [x, logits])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Every kind through the op: backward, gate, opcheck
# ----------------------------------------------------------------------------------------------

# kind, top_k, groups, topk_groups, correction bias, renormalize, scaling, capacity
OP_CASES = {
    "group_max": ("softmax_topk+group_max", 2, 4, 2, True, True, 1.0, 0),
    "pnorm": ("sigmoid_bias_grouped_topk+group_max+pnorm=2.0", 3, 2, 1, True, True, 2.5, 0),
    "topk_softmax_groups": ("topk_softmax+pnorm=1.5", 2, 4, 2, True, True, 1.0, 0),
    "cf_choice_first": ("top1+cf=1.5+choice_first", 2, 1, 1, False, False, 1.0, 0),
    "expert_choice": ("expert_choice+cf=1.0", 2, 1, 1, False, False, 2.0, 0),
    "expert_choice_sigmoid": ("expert_choice+sigmoid", 1, 1, 1, False, False, 1.0, 3),
    "sqrtsoftplus": ("sqrtsoftplus_topk+group_max", 3, 4, 2, True, True, 2.5, 0),
    "renorm_kept": ("softmax_topk+renorm_kept", 3, 1, 1, False, True, 1.5, 1),
    "renorm_kept_cf": ("sigmoid_topk+cf=0.5+choice_first+renorm_kept", 2, 1, 1, True, True, 1.0, 0),
}


def _op_args(case, dtype=torch.float64):
    kind, k, G, TG, corr, renorm, scaling, cap = OP_CASES[case]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 8, dtype=dtype, generator=g, requires_grad=True)
    bias = torch.randn(8, dtype=dtype, generator=g) * 0.1 if corr else None
    return logits, (bias, kind, k, G, TG, renorm, scaling, cap)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_route_backward_for_every_kind(case):
    logits, rest = _op_args(case)
    w, idx = torch.ops.moec.route(logits, *rest)
    w_ref, idx_ref = ops.route_reference(logits, *rest)
    assert torch.equal(idx, idx_ref) and torch.equal(w, w_ref)
    cot = torch.randn_like(w)
    (got,) = torch.autograd.grad(w, [logits], cot)
    (want,) = torch.autograd.grad(w_ref, [logits], cot)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_opcheck_route(case):
    logits, rest = _op_args(case)
    torch.library.opcheck(torch.ops.moec.route.default, (logits, *rest))


@pytest.mark.parametrize("case", ["group_max", "pnorm", "topk_softmax_groups", "sqrtsoftplus"])
def test_opcheck_gate(case):
    logits, (bias, *attrs, _cap) = _op_args(case)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    rw = torch.randn(8, 6, dtype=torch.float64, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.moec.gate.default, (x, rw, None, bias, *attrs))
    w, idx, counts = torch.ops.moec.gate(x, rw, None, bias, *attrs)
    w_ref, idx_ref = ops.route_reference(torch.nn.functional.linear(x, rw), bias, *attrs, 0)
    assert torch.equal(idx, idx_ref) and torch.equal(w, w_ref)
    assert counts.tolist() == torch.bincount(idx.reshape(-1), minlength=8).tolist()


@pytest.mark.parametrize("kind", ["top1+cf=1.0", "expert_choice+cf=1.0", "softmax_topk+renorm_kept"])
def test_gate_refuses_routes_with_a_capacity(kind):
    with pytest.raises(ValueError, match="keeps moec::route"):
        torch.ops.moec.gate(torch.randn(4, 8), None, None, None, kind, 1, 1, 1, True, 1.0)


def test_verifier_reads_the_kind():
    from torch.fx.experimental.proxy_tensor import make_fx

    from moec.ir.verify import IRError, verify

    def f(logits, kind, renorm):
        return torch.ops.moec.route(logits, None, kind, 2, 1, 1, renorm, 1.0, 0)

    logits = torch.randn(4, 8)
    assert verify(make_fx(lambda t: f(t, "softmax_topk+pnorm=2.0", True), tracing_mode="fake")(logits)) == 1
    gm = make_fx(lambda t: f(t, "softmax_topk", False), tracing_mode="fake")(logits)
    route_node = next(n for n in gm.graph.nodes if "route" in str(n.target))
    route_node.args = (route_node.args[0], None, "softmax_topk+pnorm=2.0", 2, 1, 1, False, 1.0, 0)
    with pytest.raises(IRError, match="needs renormalize=True"):
        verify(gm)
    route_node.args = (route_node.args[0], None, "softmax_topk+bogus", 2, 1, 1, False, 1.0, 0)
    with pytest.raises(IRError, match="unknown modifier"):
        verify(gm)
    route_node.args = (route_node.args[0], None, "softmax_topk+renorm_kept", 2, 1, 1, True, 1.0, 0)
    with pytest.raises(IRError, match="capacity > 0 or cf=F"):
        verify(gm)
    route_node.args = (route_node.args[0], None, "softmax_topk+renorm_kept", 2, 1, 1, True, 1.0, 2)
    assert verify(gm) == 1
