"""moec_triton:: ops against the moec:: oracle (moec.ir.lowered), forward and backward.

Without CUDA the kernels run in Triton's CPU interpreter (``triton_ops.enable_interpreter()`` in
the ``triton_env`` fixture, before any kernel module is loaded, undone afterwards) on tiny shapes; the ``gpu``-marked
table runs realistic shapes on a CUDA device.

Tolerance: max|out - ref| <= rel * max|ref| per tensor (scaled to the output's magnitude so a
tolerance can never exceed the values), rel = 1e-5 in fp32 and 2e-2 in bf16 (a few bf16 ulps:
the kernels round h once, the oracle rounds each intermediate of the activation). Integer
outputs (idx, counts, permutations) must be equal.

Ties in routing: torch.topk on CPU does not return tied values lowest index first, so the kernels'
rule (ties -> lowest expert index) is checked against a stable sort instead of torch.topk, and
the table uses random data where ties have probability zero.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import moec.ir.lowered  # noqa: F401  (the moec:: oracle ops)
from moec.ir.ops import ACTIVATIONS, GATED_ACTIVATIONS, ROUTER_KINDS
from moec.ir.routing import RouterKind

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_env(tmp_path_factory):
    pytest.importorskip("triton")
    from moec.codegen import cache, triton_ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEC_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        # conftest imports torch._dynamo, which imports triton, so the env var alone is too late.
        undo = triton_ops.enable_interpreter() if not HAS_CUDA else (lambda: None)
        try:
            ok, why = triton_ops.available()
            if not ok and not HAS_CUDA and triton_ops.interpreter_numpy_problem():
                pytest.skip(why)
            assert ok, why
            yield
        finally:
            undo()
            cache.clear_memo()  # later tests may run without the interpreter


def ops():
    return torch.ops.moec_triton


def assert_close_rel(out, ref, rel, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{what}: max|err| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def grads(fn, inputs, grad_out):
    live = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(fn(), live, grad_out, allow_unused=False)


def routing(T, E, K, mode, seed=0):
    """idx_TK, counts_E, token_N, slot_N for a routing pattern (the permutation from the oracle)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif mode == "one_expert":
        assert K == 1
        idx = torch.zeros(T, 1, dtype=torch.int64)
    elif mode == "zero_expert":  # the last expert gets no token
        idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])
    else:
        raise ValueError(mode)
    idx = idx.to(DEVICE)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    token, slot = torch.ops.moec.permute(idx, counts)
    return idx, counts, token, slot


def rand(*shape, dtype=torch.float32, scale=1.0, grad=False):
    t = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return t.requires_grad_(grad)


def w_in_of(E, H, I, act, transposed, dtype=torch.float32, grad=True):
    F = 2 * I if act in GATED_ACTIVATIONS else I
    shape = (E, H, F) if transposed else (E, F, H)
    return rand(*shape, dtype=dtype, scale=H ** -0.5, grad=grad)


def w_out_of(E, H, I, transposed, dtype=torch.float32, grad=True):
    return rand(*((E, I, H) if transposed else (E, H, I)), dtype=dtype, scale=I ** -0.5, grad=grad)


# ----------------------------------------------------------------------------------------------
# grouped_gemm_act
# ----------------------------------------------------------------------------------------------

# (T, H, I, E, K, routing): sizes off the 16-wide interpreter blocks, the degenerate routings,
# and one shape with several BLOCK_M tiles per expert.
SHAPES = [
    pytest.param(7, 24, 20, 4, 2, "random", id="T7_H24_I20"),
    pytest.param(5, 16, 16, 3, 1, "one_expert", id="all_on_one_expert"),
    pytest.param(6, 24, 20, 4, 2, "zero_expert", id="expert_with_zero_tokens"),
    pytest.param(1, 24, 20, 4, 2, "random", id="one_token"),
    pytest.param(4, 16, 12, 3, 3, "random", id="topk_eq_experts"),
    pytest.param(40, 32, 24, 4, 2, "random", id="multi_tile"),
]

# The ReLU-based and the clamped/softcapped SwiGLU activations take two corners of the table each
# (plain; transposed, interleaved when gated, with bias), not all of it: their epilogues differ
# from the others' only in the expression, which the two corners run forward and backward.
_CORNERS_ONLY = ("relu2", "reglu", "swiglu_limit", "swiglu_limit_post", "softcap_swiglu")


def _in_table(act, transposed, interleaved, bias):
    if act not in _CORNERS_ONLY:
        return True
    return transposed == bias and interleaved == (transposed and act in GATED_ACTIVATIONS)


ACT_CASES = [
    pytest.param(act, transposed, interleaved, bias, id=f"{act}-{'T' if transposed else 'N'}"
                 f"{'-il' if interleaved else ''}{'-bias' if bias else ''}")
    for act in ACTIVATIONS
    for transposed in (False, True)
    for interleaved in ((False, True) if act in GATED_ACTIVATIONS else (False,))
    for bias in (False, True)
    if _in_table(act, transposed, interleaved, bias)
]


_KINKS = {  # activation -> (on the gate, on the linear half): where the derivative jumps
    "clamped_swiglu": ("gate", "clamp"), "swiglu_limit": ("gate", "clamp"), "swiglu_limit_post": ("silu", "clamp"),
}


def near_a_kink(x, token, counts, w, b, act, transposed, interleaved, alpha, limit):
    """[N, I]: outputs whose pre-activation lies within rounding of a clamp's limit (None for an
    activation without clamps). Two fp32 computations that sum in another order put such a value
    on different sides of the limit, and its gradient then jumps by the whole derivative (the fp32
    oracle against a float64 one, at 333 tokens, H = I = 2880, clamped SwiGLU at limit 0.8: 2e-2
    of the weight gradient's scale). The backward checks give these outputs no incoming gradient; the clamps still bite elsewhere."""
    if act not in _KINKS:
        return None
    with torch.no_grad():
        experts = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
        w64 = w.double() if transposed else w.double().transpose(1, 2)
        h = torch.cat([x.double()[token[experts == e]] @ w64[e] for e in range(counts.numel())])
        if b is not None:
            h = h + b.double()[experts]
        gate, up = (h[:, ::2], h[:, 1::2]) if interleaved else h.chunk(2, dim=-1)
        delta = max(8 * torch.finfo(x.dtype).eps * limit, 1e-5 * h.abs().max().item())
        on_gate = {"gate": gate, "silu": torch.nn.functional.silu(gate)}[_KINKS[act][0]]
        return ((on_gate - limit).abs() <= delta) | ((up.abs() - limit).abs() <= delta)


def check_gemm_act(T, H, I, E, K, mode, act, transposed, interleaved, bias, dtype=torch.float32, limit=0.8):
    idx, counts, token, slot = routing(T, E, K, mode)
    x = rand(T, H, dtype=dtype, grad=True)
    w = w_in_of(E, H, I, act, transposed, dtype)
    F = w.shape[2] if transposed else w.shape[1]
    b = rand(E, F, dtype=dtype, scale=0.1, grad=True) if bias else None
    # limit 0.8 makes the GPT-OSS clamps bite on these O(1) values
    attrs = (act, transposed, interleaved, 1.702, limit)
    ref = torch.ops.moec.grouped_gemm_act(x, token, counts, w, b, *attrs)
    out = ops().grouped_gemm_act(x, token, counts, w, b, *attrs)
    rel = REL[dtype]
    assert_close_rel(out, ref, rel, "a")
    go = torch.randn_like(ref)
    kinks = near_a_kink(x, token, counts, w, b, *attrs)
    if kinks is not None:
        go = go.masked_fill(kinks, 0.0)
    g_ref = grads(lambda: torch.ops.moec.grouped_gemm_act(x, token, counts, w, b, *attrs), [x, w, b], go)
    g_out = grads(lambda: ops().grouped_gemm_act(x, token, counts, w, b, *attrs), [x, w, b], go)
    for name, g1, g0 in zip(("d_x", "d_w", "d_b"), g_out, g_ref):
        assert_close_rel(g1, g0, 4 * rel, name)


@pytest.mark.parametrize("act,transposed,interleaved,bias", ACT_CASES)
def test_grouped_gemm_act_activations(act, transposed, interleaved, bias):
    check_gemm_act(7, 24, 20, 4, 2, "random", act, transposed, interleaved, bias)


@pytest.mark.parametrize("T,H,I,E,K,mode", SHAPES)
@pytest.mark.parametrize("act,transposed", [("swiglu", False), ("gelu", True)])
def test_grouped_gemm_act_shapes(T, H, I, E, K, mode, act, transposed):
    check_gemm_act(T, H, I, E, K, mode, act, transposed, False, True)


def test_grouped_gemm_act_without_gather_and_leading_dims():
    """token_idx=None reads x's rows in order; leading dims of x flatten."""
    E, H, I = 3, 24, 20
    x = rand(2, 5, H, grad=True)
    counts = torch.tensor([4, 0, 6], device=DEVICE)
    w = w_in_of(E, H, I, "swiglu", False)
    attrs = ("swiglu", False, False, 1.0, 7.0)
    ref = torch.ops.moec.grouped_gemm_act(x, None, counts, w, None, *attrs)
    out = ops().grouped_gemm_act(x, None, counts, w, None, *attrs)
    assert_close_rel(out, ref, 1e-5, "a")
    go = torch.randn_like(ref)
    for g1, g0 in zip(grads(lambda: ops().grouped_gemm_act(x, None, counts, w, None, *attrs), [x, w], go),
                      grads(lambda: torch.ops.moec.grouped_gemm_act(x, None, counts, w, None, *attrs), [x, w], go)):
        assert_close_rel(g1, g0, 4e-5)


def test_rows_past_the_counts_are_zero():
    """Slots beyond sum(counts) (dropped by a capacity limit upstream) give zero rows, no gradient."""
    E, H, I, T = 3, 16, 16, 6
    x = rand(T, H, grad=True)
    token = torch.arange(T, device=DEVICE)
    counts = torch.tensor([2, 0, 1], device=DEVICE)  # rows 3..5 belong to no expert
    w = w_in_of(E, H, I, "silu", False)
    out = ops().grouped_gemm_act(x, token, counts, w, None, "silu", False, False, 1.0, 7.0)
    assert out[3:].abs().max().item() == 0
    ref = torch.ops.moec.grouped_gemm_act(x, token, counts, w, None, "silu", False, False, 1.0, 7.0)
    assert_close_rel(out, ref, 1e-5)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert gx[3:].abs().max().item() == 0


# ----------------------------------------------------------------------------------------------
# grouped_gemm (plain) and activation (alone): the unfused pipeline
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_gemm(gather, transposed, bias):
    T, H, O, E, K = 9, 24, 20, 4, 2
    idx, counts, token, slot = routing(T, E, K, "zero_expert")
    x = rand(T, H, grad=True) if gather else rand(T * K, H, grad=True)
    tok = token if gather else None
    w = rand(*((E, H, O) if transposed else (E, O, H)), scale=H ** -0.5, grad=True)
    b = rand(E, O, scale=0.1, grad=True) if bias else None
    ref = torch.ops.moec.grouped_gemm(x, tok, counts, w, b, transposed)
    out = ops().grouped_gemm(x, tok, counts, w, b, transposed)
    assert_close_rel(out, ref, 1e-5, "out")
    go = torch.randn_like(ref)
    g_out = grads(lambda: ops().grouped_gemm(x, tok, counts, w, b, transposed), [x, w, b], go)
    g_ref = grads(lambda: torch.ops.moec.grouped_gemm(x, tok, counts, w, b, transposed), [x, w, b], go)
    for name, g1, g0 in zip(("d_x", "d_w", "d_b"), g_out, g_ref):
        assert_close_rel(g1, g0, 4e-5, name)


@pytest.mark.parametrize("act,interleaved", [(a, il) for a in ACTIVATIONS
                                             for il in ((False, True) if a in GATED_ACTIVATIONS else (False,))])
def test_activation(act, interleaved):
    h = rand(3, 5, 40, scale=2.0, grad=True)  # leading dims; gated width 20
    attrs = (act, interleaved, 1.702, 0.8)
    ref = torch.ops.moec.activation(h, *attrs)
    out = ops().activation(h, *attrs)
    assert_close_rel(out, ref, 1e-5, "out")
    go = torch.randn_like(ref)
    (g1,) = grads(lambda: ops().activation(h, *attrs), [h], go)
    (g0,) = grads(lambda: torch.ops.moec.activation(h, *attrs), [h], go)
    assert_close_rel(g1, g0, 1e-5, "d_h")


@pytest.mark.parametrize("act", ["swiglu_limit", "swiglu_limit_post", "clamped_swiglu"])
def test_clamp_gradients_at_the_limits(act):
    """Gate and up exactly at -limit / +limit and on either side: the epilogues stop the gradient
    where torch.clamp's autograd does (it passes at the bounds). swiglu_limit_post's bound is on
    silu(gate), which the kernel computes as g * sigmoid(g), not bit for bit as torch; its grid
    has no gate whose SiLU lands on the limit (the CPU test covers that one)."""
    limit = 0.8
    vals = torch.tensor([-2.0, -limit, -0.5, 0.0, 0.5, limit, 2.0], device=DEVICE)
    gate, up = torch.meshgrid(vals, vals, indexing="ij")
    h = torch.cat([gate.reshape(7, 7), up.reshape(7, 7)], -1).requires_grad_()
    attrs = (act, False, 1.702, limit)
    go = torch.rand(7, 7, device=DEVICE) + 0.5
    (g1,) = grads(lambda: ops().activation(h, *attrs), [h], go)
    (g0,) = grads(lambda: torch.ops.moec.activation(h, *attrs), [h], go)
    assert torch.equal(g1 == 0, g0 == 0)
    assert_close_rel(g1, g0, 1e-5, "d_h")
    assert_close_rel(ops().activation(h, *attrs), torch.ops.moec.activation(h, *attrs), 1e-5, "out")


# ----------------------------------------------------------------------------------------------
# grouped_gemm_combine
# ----------------------------------------------------------------------------------------------


def check_combine(T, H, I, E, K, mode, transposed, bias, dtype=torch.float32):
    idx, counts, token, slot = routing(T, E, K, mode)
    a = rand(T * K, I, dtype=dtype, grad=True)
    w = w_out_of(E, H, I, transposed, dtype)
    b = rand(E, H, dtype=dtype, scale=0.1, grad=True) if bias else None
    weights = torch.rand(T, K, device=DEVICE).requires_grad_(True)
    args = lambda: (a, slot, counts, w, b, weights, transposed)  # noqa: E731
    ref = torch.ops.moec.grouped_gemm_combine(*args())
    out = ops().grouped_gemm_combine(*args())
    rel = REL[dtype]
    assert_close_rel(out, ref, rel, "out")
    go = torch.randn_like(ref)
    g_out = grads(lambda: ops().grouped_gemm_combine(*args()), [a, w, b, weights], go)
    g_ref = grads(lambda: torch.ops.moec.grouped_gemm_combine(*args()), [a, w, b, weights], go)
    for name, g1, g0 in zip(("d_a", "d_w", "d_b", "d_weights"), g_out, g_ref):
        assert_close_rel(g1, g0, 4 * rel, name)


@pytest.mark.parametrize("T,H,I,E,K,mode", SHAPES)
@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_grouped_gemm_combine(T, H, I, E, K, mode, transposed, bias):
    check_combine(T, H, I, E, K, mode, transposed, bias)


def test_combine_is_deterministic():
    idx, counts, token, slot = routing(40, 4, 2, "random")
    a, w, weights = rand(80, 24), w_out_of(4, 32, 24, False, grad=False), torch.rand(40, 2, device=DEVICE)
    first = ops().grouped_gemm_combine(a, slot, counts, w, None, weights, False)
    second = ops().grouped_gemm_combine(a, slot, counts, w, None, weights, False)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# gate and permute
# ----------------------------------------------------------------------------------------------

GATE_CASES = [
    # kind, E, top_k, groups, topk_groups, correction bias, router weight, router bias, renormalize, scaling
    ("softmax_topk", 8, 2, 1, 1, False, True, False, False, 1.0),
    ("softmax_topk", 8, 2, 1, 1, False, True, True, True, 1.0),
    ("softmax_topk", 6, 6, 1, 1, False, True, False, False, 1.0),   # top-k equals experts
    ("top1", 5, 1, 1, 1, False, True, False, False, 1.0),
    ("topk_softmax", 8, 2, 1, 1, False, True, False, False, 1.0),
    ("topk_softmax", 8, 3, 1, 1, False, False, False, False, 1.0),  # x is the logits
    ("sigmoid_topk", 8, 2, 1, 1, False, True, False, True, 2.5),
    ("sigmoid_topk", 8, 2, 1, 1, True, True, False, True, 1.0),
    ("sigmoid_bias_grouped_topk", 16, 4, 4, 2, True, True, False, True, 2.5),
    ("sigmoid_bias_grouped_topk", 16, 3, 8, 3, True, False, False, True, 1.0),
    ("sigmoid_bias_grouped_topk", 12, 2, 4, 1, False, True, False, False, 1.0),
    ("sigmoid_bias_grouped_topk", 8, 2, 8, 3, True, True, False, True, 1.0),  # groups of one expert
    # The wider vocabulary: groups and correction biases on every base, group_max, p-norms.
    ("softmax_topk+group_max", 8, 3, 4, 2, True, True, False, True, 1.0),
    ("topk_softmax+pnorm=2.0", 8, 2, 2, 1, True, False, False, True, 1.5),
    ("top1", 5, 1, 1, 1, True, True, False, False, 1.0),
    ("sigmoid_bias_grouped_topk+group_max+pnorm=1.5", 16, 4, 4, 2, True, True, False, True, 2.5),
    ("sqrtsoftplus_topk", 8, 2, 1, 1, False, True, False, True, 2.5),
    ("sqrtsoftplus_topk", 16, 4, 4, 2, True, False, False, True, 1.0),  # DeepSeek-V4-like, x is the logits
]
assert {RouterKind.parse(case[0]).base for case in GATE_CASES} == set(ROUTER_KINDS)


@pytest.mark.parametrize("T", [1, 19])
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"{c[0]}-E{c[1]}-k{c[2]}-g{c[3]}{'-cb' if c[5] else ''}")
def test_gate(case, T):
    kind, E, K, G, TG, has_cb, has_w, has_b, renorm, scaling = case
    RouterKind.parse(kind)
    H = 24
    x = rand(T, H if has_w else E, grad=True)
    rw = rand(E, H, scale=H ** -0.5, grad=True) if has_w else None
    rb = rand(E, scale=0.1, grad=True) if has_b else None
    cb = rand(E, scale=0.1) if has_cb else None
    args = lambda: (x, rw, rb, cb, kind, K, G, TG, renorm, scaling)  # noqa: E731
    w_ref, i_ref, c_ref = torch.ops.moec.gate(*args())
    w_out, i_out, c_out = ops().gate(*args())
    assert torch.equal(i_out, i_ref)
    assert torch.equal(c_out, c_ref)
    assert_close_rel(w_out, w_ref, 1e-5, "weights")
    go = torch.randn_like(w_ref)
    g_out = grads(lambda: ops().gate(*args())[0], [x, rw, rb], go)
    g_ref = grads(lambda: torch.ops.moec.gate(*args())[0], [x, rw, rb], go)
    for g1, g0 in zip(g_out, g_ref):
        assert_close_rel(g1, g0, 1e-5, "grad")


def test_gate_leading_dims_and_bf16():
    x = rand(2, 5, 32, dtype=torch.bfloat16)
    rw = rand(8, 32, dtype=torch.bfloat16, scale=32 ** -0.5)
    args = (x, rw, None, None, "softmax_topk", 2, 1, 1, True, 1.0)
    w_ref, i_ref, c_ref = torch.ops.moec.gate(*args)
    w_out, i_out, c_out = ops().gate(*args)
    assert torch.equal(i_out, i_ref) and torch.equal(c_out, c_ref)
    # The logits are bf16 (F.linear in x's dtype); CPU bf16 matmul does not round exactly like one
    # fp32-accumulated dot, so a logit may differ by one bf16 ulp: bf16 tolerance on the weights.
    assert_close_rel(w_out, w_ref, REL[torch.bfloat16], "weights")


def test_gate_sqrtsoftplus_scores_over_the_whole_range():
    """Logits across softplus's threshold (20) and far below zero, where log1p(exp(z)) must keep
    its tiny value exp(z) (a plain log(1 + exp(z)) would give 0): every score within fp32
    rounding of torch's, elementwise, and the order exactly."""
    z = torch.tensor([[-60.0, -25.0, -5.0, -0.1, 0.0, 1e-3, 3.0, 19.9, 20.0, 20.5, 40.0]], device=DEVICE)
    E = z.shape[1]
    args = (z, None, None, None, "sqrtsoftplus_topk", E, 1, 1, False, 1.0)
    w_out, i_out, _ = ops().gate(*args)
    w_ref, i_ref, _ = torch.ops.moec.gate(*args)
    assert torch.equal(i_out, i_ref) and i_out[0].tolist() == list(range(E))[::-1]
    torch.testing.assert_close(w_out, w_ref, rtol=4e-7, atol=0)


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk", "topk_softmax"])
def test_gate_ties_go_to_the_lowest_index(kind):
    """Exactly tied logits: the kernels pick the lowest indices (a stable descending sort);
    torch.topk picks others on CPU, so only the weights are compared with the oracle."""
    E, K = 8, 3
    x = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.2, 0.3, 0.9], [0.0] * 8, [1.0, 2.0] * 4], device=DEVICE)
    w_out, i_out, c_out = ops().gate(x, None, None, None, kind, K, 1, 1, False, 1.0)
    expect = torch.sort(-x, dim=-1, stable=True).indices[:, :K]
    assert torch.equal(i_out, expect)
    assert torch.equal(c_out, torch.bincount(expect.reshape(-1), minlength=E))
    w_ref, _, _ = torch.ops.moec.gate(x, None, None, None, kind, K, 1, 1, False, 1.0)
    assert_close_rel(w_out, w_ref, 1e-6, "weights")


@pytest.mark.parametrize("T,E,K,mode", [(7, 4, 2, "random"), (1, 4, 2, "random"), (5, 3, 1, "one_expert"),
                                        (6, 5, 5, "random"), (9, 6, 2, "zero_expert"), (100, 8, 3, "random")])
def test_permute(T, E, K, mode):
    idx, counts, _, _ = routing(T, E, K, mode, seed=T)
    token_ref, slot_ref = torch.ops.moec.permute(idx, counts)
    token, slot = ops().permute(idx, counts)
    assert torch.equal(token, token_ref) and torch.equal(slot, slot_ref)


# ----------------------------------------------------------------------------------------------
# bf16, opcheck, a whole layer under torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,transposed,interleaved", [("swiglu", False, False), ("clamped_swiglu", True, True),
                                                        ("gelu", False, False)])
def test_bf16_ffn(act, transposed, interleaved):
    """bf16 in the interpreter works because the generated source upcasts tl.dot operands there
    (its bf16 dot multiplies raw bits). The clamp limit is out of reach here: the clamps' gradient
    is a step, and one bf16 ulp of difference between CPU matmul rounding and the kernel's flips
    it for values at the limit (the fp32 table covers the clamps)."""
    check_gemm_act(7, 24, 20, 4, 2, "random", act, transposed, interleaved, True, dtype=torch.bfloat16, limit=7.0)
    check_combine(7, 24, 20, 4, 2, "random", transposed, True, dtype=torch.bfloat16)


def _opcheck_cases():
    T, H, I, E, K = 5, 16, 12, 3, 2
    idx, counts, token, slot = routing(T, E, K, "random")
    x = rand(T, H, grad=True)
    w_in = w_in_of(E, H, I, "swiglu", False)
    w_out = w_out_of(E, H, I, True)
    a = rand(T * K, I, grad=True)
    weights = torch.rand(T, K, device=DEVICE).requires_grad_(True)
    rw = rand(E, H, grad=True)
    return {
        "gate": (x, rw, None, None, "softmax_topk", K, 1, 1, True, 1.0),
        "gate_bias_pnorm": (x, rw, None, rand(E, scale=0.1), "topk_softmax+pnorm=2.0", K, 1, 1, True, 1.0),
        "permute": (idx, counts),
        "grouped_gemm": (x, token, counts, w_in, None, False),
        "activation": (rand(T, 2 * I, grad=True), "geglu", True, 1.0, 7.0),
        "grouped_gemm_act": (x, token, counts, w_in, rand(E, 2 * I, grad=True), "swiglu", False, False, 1.0, 7.0),
        "grouped_gemm_combine": (a, slot, counts, w_out, None, weights, True),
    }


@pytest.mark.parametrize("name", ["gate", "gate_bias_pnorm", "permute", "grouped_gemm", "activation",
                                  "grouped_gemm_act", "grouped_gemm_combine"])
def test_opcheck(name):
    args = _opcheck_cases()[name]
    torch.library.opcheck(getattr(ops(), name.removesuffix("_bias_pnorm")).default, args)


def _backward_cases():
    T, H, I, E, K = 5, 16, 12, 3, 2
    idx, counts, token, slot = routing(T, E, K, "random")
    counts = counts.clone()
    counts[-1] = 0  # an expert without rows, and its rows (the last ones) past the counts
    x, a = rand(T, H), rand(T * K, I)
    w_in, w_out = w_in_of(E, H, I, "swiglu", False, grad=False), w_out_of(E, H, I, True, grad=False)
    b_in, b_out = rand(E, 2 * I), rand(E, H)
    weights = torch.rand(T, K, device=DEVICE)
    return {
        "grouped_gemm_act_backward_input": (rand(T * K, I), x, token, counts, w_in, b_in, "swiglu", False, False, 1.0,
                                            7.0),
        "grouped_gemm_act_backward_weight": (rand(T * K, 2 * I), x, token, counts, w_in, b_in, False),
        "grouped_gemm_combine_backward_input": (rand(T, H), a, slot, counts, w_out, None, weights, True),
        "grouped_gemm_combine_backward_weight": (rand(T * K, H), a, counts, w_out, b_out, True),
    }


@pytest.mark.parametrize("name", sorted(_backward_cases()))
def test_backward_ops(name):
    """The split backward ops (input gradient, then weight gradient): opcheck, the reference's
    signature and values (the intermediates d_h and d_y zero past the counts on both sides)."""
    args = _backward_cases()[name]
    op = getattr(ops(), name).default
    assert str(op._schema).replace("moec_triton::", "moec::") == str(getattr(torch.ops.moec, name).default._schema)
    torch.library.opcheck(op, args)
    outs = op(*args)
    for i, (got, want) in enumerate(zip(outs, getattr(torch.ops.moec, name)(*args))):
        assert_close_rel(got, want, 4e-5, f"{name} output {i}")
    if name.endswith("_input"):
        kept = int(args[3].sum())
        assert kept < outs[1].shape[0] and outs[1][kept:].abs().max().item() == 0


def test_layer_under_torch_compile():
    """gate -> permute -> grouped_gemm_act -> grouped_gemm_combine through moec_triton ops, compiled
    with aot_eager in one graph, matches the same pipeline of moec ops in eager, with gradients."""
    T, H, I, E, K = 6, 16, 12, 4, 2
    x = rand(T, H, grad=True)
    rw = rand(E, H, grad=True)
    w_in, w_out = w_in_of(E, H, I, "swiglu", False), w_out_of(E, H, I, False)

    def layer(ns, x, rw, w_in, w_out):
        weights, idx, counts = ns.gate(x, rw, None, None, "softmax_topk", K, 1, 1, True, 1.0)
        token, slot = ns.permute(idx, counts)
        a = ns.grouped_gemm_act(x, token, counts, w_in, None, "swiglu", False, False, 1.0, 7.0)
        return ns.grouped_gemm_combine(a, slot, counts, w_out, None, weights, False)

    compiled = torch.compile(lambda *t: layer(ops(), *t), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(x, rw, w_in, w_out)
    ref = layer(torch.ops.moec, x, rw, w_in, w_out)
    assert_close_rel(out, ref, 1e-5, "out")
    g_out = torch.autograd.grad(out.pow(2).sum(), [x, rw, w_in, w_out])
    g_ref = torch.autograd.grad(ref.pow(2).sum(), [x, rw, w_in, w_out])
    for name, g1, g0 in zip(("x", "router", "w_in", "w_out"), g_out, g_ref):
        assert_close_rel(g1, g0, 1e-4, f"d_{name}")


# ----------------------------------------------------------------------------------------------
# Full size, GPU only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the interpreter is too slow for these shapes)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,I,E,K", [(512, 1024, 768, 8, 2), (1000, 2048, 1408, 64, 6), (333, 2880, 2880, 32, 4)])
@pytest.mark.parametrize("act,transposed,interleaved", [("swiglu", False, False), ("clamped_swiglu", True, True),
                                                        ("gelu_tanh", False, False)])
def test_full_size_ffn(T, H, I, E, K, act, transposed, interleaved, dtype):
    check_gemm_act(T, H, I, E, K, "random", act, transposed, interleaved, True, dtype=dtype)
    check_combine(T, H, I, E, K, "random", transposed, True, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [("softmax_topk", 64, 6, 1, 1, False, True, False, False, 1.0),
                                  ("sigmoid_bias_grouped_topk", 256, 8, 8, 4, True, True, False, True, 2.5)],
                         ids=["qwen", "deepseek_v3"])
def test_full_size_gate(case):
    test_gate(case, 4096)
    idx, counts, _, _ = routing(4096, case[1], case[2], "random")
    assert all(torch.equal(a, b) for a, b in zip(ops().permute(idx, counts), torch.ops.moec.permute(idx, counts)))


def test_interpreter_numpy_problem_names_the_fix(monkeypatch):
    """Triton < 3.7's interpreter fails inside Triton with numpy >= 2.3: moec says so and what to
    install instead of letting Triton's TypeError surface."""
    import numpy
    import triton

    from moec.codegen import triton_ops

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "numpy<2.3" in triton_ops.interpreter_numpy_problem()
    monkeypatch.setattr(numpy, "__version__", "2.2.6")
    assert triton_ops.interpreter_numpy_problem() == ""
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert triton_ops.interpreter_numpy_problem() == ""
