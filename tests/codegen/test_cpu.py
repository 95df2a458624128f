"""``moec_cpu::`` ops against the ``moec::`` references: a shape table, forward and backward.

Tolerances are scaled to the output (``max |out - ref| <= tol * max |ref|``), so a tolerance
cannot hide values smaller than itself: float32 forward 2e-5 and backward 5e-5 (the per-expert
GEMMs run through oneDNN instead of the reference's BLAS, so sums are ordered differently);
bfloat16 forward 2e-2 (a few bf16 ulps; both sides round every GEMM output to bf16). Routing
(gate indices and counts, permute) must be identical.
"""

from __future__ import annotations

import pytest
import torch

import moec.codegen.cpu  # noqa: F401  (registers moec_cpu::)
import moec.ir  # noqa: F401  (registers moec::)
from moec.ir.ops import ACTIVATIONS, GATED_ACTIVATIONS, ROUTER_KINDS

REL_TOL = {"fwd": 2e-5, "bwd": 5e-5, "bf16": 2e-2}


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Every test runs twice: with the native small-row kernels (``moec.codegen.cpu_native``, taken
    for up to ``_NATIVE_MAX_ROWS`` rows per expert) and with the PyTorch path alone."""
    from moec.codegen import cpu_native

    if request.param == "native" and cpu_native.load() is None:
        pytest.skip(f"native CPU kernels unavailable here: {cpu_native.why_not()}")
    monkeypatch.setattr(moec.codegen.cpu, "use_native", request.param == "native")
    return request.param


def assert_scaled_close(out, ref, tol, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape} {out.dtype} vs {ref.shape} {ref.dtype}"
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max err {err:.3e} > {tol:g} * max |ref| {scale:.3e}"


# name -> (T, H, I, E, K, routing)
CASES = {
    "random": (9, 16, 12, 4, 2, "random"),
    "expert_without_tokens": (8, 16, 12, 4, 2, "skip_expert_2"),
    "all_tokens_on_one_expert": (7, 16, 12, 4, 1, "all_on_0"),
    "one_token": (1, 16, 12, 4, 2, "random"),
    "top_k_equals_experts": (5, 16, 12, 4, 4, "random"),
    "odd_sizes": (13, 19, 11, 5, 3, "random"),
    "capacity_dropped_rows": (11, 16, 12, 4, 2, "capacity"),
}


def routing(T, E, K, kind, g):
    """(weights_TK fp32, token_N, slot_N, counts_E): counts may leave dropped rows at the end."""
    weights_TK = torch.rand(T, K, generator=g) + 0.1
    if kind == "capacity":
        logits = torch.randn(T, E, generator=g)
        logits[:, 0] += 5  # every token wants expert 0: its capacity drops some of them
        weights_TK, idx_TK = torch.ops.moec.route(logits, None, "softmax_topk", K, 1, 1, True, 1.0, 3)
        token_N, slot_N, counts_E = torch.ops.moec.dispatch(idx_TK, E)
        assert int(counts_E.sum()) < T * K
        return weights_TK, token_N, slot_N, counts_E
    if kind == "all_on_0":
        idx_TK = torch.zeros(T, K, dtype=torch.long)
    else:
        choices = [e for e in range(E) if not (kind == "skip_expert_2" and e == 2)]
        idx_TK = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=g)[:K]] for _ in range(T)])
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    token_N, slot_N = torch.ops.moec.permute(idx_TK, counts_E)
    return weights_TK, token_N, slot_N, counts_E


def expert_weights(E, H, I, activation, transposed, bias, dtype, g):
    F_ = 2 * I if activation in GATED_ACTIVATIONS else I
    w_in = torch.randn(E, F_, H, generator=g) / H**0.5
    w_out = torch.randn(E, H, I, generator=g) / I**0.5
    if transposed:
        w_in, w_out = w_in.transpose(1, 2).contiguous(), w_out.transpose(1, 2).contiguous()
    b_in = torch.randn(E, F_, generator=g) if bias else None
    b_out = torch.randn(E, H, generator=g) if bias else None
    return [None if t is None else t.to(dtype) for t in (w_in, w_out, b_in, b_out)]


def grads(out, inputs, cotangent):
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, cotangent, allow_unused=True))
    return [None if t is None else next(got) for t in inputs]


def check_both(name, args, diff_pos, dtype=torch.float32):
    """Run moec_cpu::name and moec::name on the same args; compare outputs (and, in float32,
    gradients of the differentiable args at ``diff_pos``)."""
    leaves = [a.detach().clone().requires_grad_(i in diff_pos and dtype == torch.float32) if isinstance(a, torch.Tensor)
              else a for i, a in enumerate(args)]
    ref_leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in leaves]
    out = getattr(torch.ops.moec_cpu, name)(*leaves)
    ref = getattr(torch.ops.moec, name)(*ref_leaves)
    assert_scaled_close(out, ref, REL_TOL["fwd" if dtype == torch.float32 else "bf16"], f"{name} forward")
    if dtype != torch.float32:
        return out, ref
    cot = torch.randn_like(ref)
    mine = grads(out, [leaves[i] for i in diff_pos], cot)
    theirs = grads(ref, [ref_leaves[i] for i in diff_pos], cot)
    for i, g_mine, g_ref in zip(diff_pos, mine, theirs):
        if g_ref is None:
            continue
        assert_scaled_close(g_mine, g_ref, REL_TOL["bwd"], f"{name} grad of arg {i}")
    return out, ref


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear_layout", "transposed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_ops_match_reference(case, transposed, bias):
    T, H, I, E, K, kind = CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 1000)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", transposed, bias, torch.float32, g)
    x_TH = torch.randn(T, H, generator=g)
    # Garbage past sum(counts): the ops must ignore those rows of their input.
    a_NI = torch.randn(T * K, I, generator=g)

    check_both("grouped_gemm", (x_TH, token_N, counts_E, w_in, b_in, transposed), (0, 3, 4))
    check_both("grouped_gemm", (a_NI, None, counts_E, w_out, b_out, transposed), (0, 3, 4))
    out, _ = check_both("grouped_gemm_act", (x_TH, token_N, counts_E, w_in, b_in, "swiglu", transposed, False, 1.702,
                                             7.0), (0, 3, 4))
    kept = int(counts_E.sum())
    assert out[kept:].abs().max().item() == 0 if kept < out.shape[0] else True
    check_both("grouped_gemm_combine", (a_NI, slot_N, counts_E, w_out, b_out, weights_TK, transposed), (0, 3, 4, 5))


@pytest.mark.parametrize("case", sorted(CASES))
def test_permute_is_identical(case):
    T, H, I, E, K, kind = CASES[case]
    if kind == "capacity":
        pytest.skip("capacity layers keep moec::dispatch")
    g = torch.Generator().manual_seed(3)
    idx_TK = torch.randint(0, E, (T, K), generator=g) if kind != "all_on_0" else torch.zeros(T, K, dtype=torch.long)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    for mine, ref in zip(torch.ops.moec_cpu.permute(idx_TK, counts_E), torch.ops.moec.permute(idx_TK, counts_E)):
        assert torch.equal(mine, ref)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, interleaved):
    if interleaved and activation not in GATED_ACTIVATIONS:
        pytest.skip("interleaving only applies to gated activations")
    T, H, I, E, K, kind = CASES["odd_sizes"]
    g = torch.Generator().manual_seed(5)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, _, b_in, _ = expert_weights(E, H, I, activation, False, True, torch.float32, g)
    x_TH = torch.randn(T, H, generator=g) * 2  # reach clamped_swiglu's limit
    alpha, limit = 1.702, 1.5
    F_ = w_in.shape[1]
    check_both("activation", (torch.randn(T, F_, generator=g) * 3, activation, interleaved, alpha, limit), (0,))
    check_both("activation", (torch.randn(2, T, F_, generator=g), activation, interleaved, alpha, limit), (0,))
    check_both("grouped_gemm_act", (x_TH, token_N, counts_E, w_in, b_in, activation, False, interleaved, alpha, limit),
               (0, 3, 4))


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_at_few_rows(cpu_path, activation, interleaved, monkeypatch):
    """A few rows per expert, where the native kernels take the forward: every activation there,
    with the clamps and softcaps biting (limit 1.5 on values up to ~6)."""
    if interleaved and activation not in GATED_ACTIVATIONS:
        pytest.skip("interleaving only applies to gated activations")
    from moec.codegen import cpu_native

    calls = []
    real = cpu_native.load()
    if real is not None:
        class Spy:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        monkeypatch.setattr(cpu_native, "load", lambda: Spy())
    T, H, I, E, K = 3, 16, 12, 4, 2
    g = torch.Generator().manual_seed(37)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, "random", g)
    w_in, _, b_in, _ = expert_weights(E, H, I, activation, False, True, torch.float32, g)
    x_TH = torch.randn(T, H, generator=g) * 3
    check_both("grouped_gemm_act", (x_TH, token_N, counts_E, w_in, b_in, activation, False, interleaved, 1.702, 1.5),
               (0, 3, 4))
    assert calls == (["gemv_act"] if cpu_path == "native" else [])


GATE_CASES = {
    # id -> (kind, top_k, num_groups, topk_groups, correction bias, renormalize, scaling)
    "softmax_topk": ("softmax_topk", 2, 1, 1, False, True, 1.5),
    "topk_softmax": ("topk_softmax", 2, 1, 1, False, False, 1.0),
    "sigmoid_topk": ("sigmoid_topk", 3, 1, 1, False, True, 1.0),
    "sigmoid_bias_grouped_topk": ("sigmoid_bias_grouped_topk", 4, 4, 2, True, True, 2.5),
    "top1": ("top1", 1, 1, 1, False, False, 1.0),
    # The wider vocabulary: groups and correction biases on every base, group_max, p-norms.
    "softmax_groups_bias_group_max": ("softmax_topk+group_max", 3, 4, 2, True, True, 1.0),
    "softmax_pnorm2": ("softmax_topk+pnorm=2.0", 2, 1, 1, False, True, 1.0),
    "topk_softmax_groups_bias_pnorm": ("topk_softmax+pnorm=1.5", 2, 2, 1, True, True, 2.0),
    "top1_bias": ("top1", 1, 1, 1, True, False, 1.0),
    "sigmoid_group_max_pnorm3": ("sigmoid_bias_grouped_topk+group_max+pnorm=3.0", 4, 4, 2, True, True, 2.5),
    "sqrtsoftplus_topk": ("sqrtsoftplus_topk", 2, 1, 1, False, True, 2.5),
    "sqrtsoftplus_groups_bias": ("sqrtsoftplus_topk", 3, 4, 2, True, True, 1.0),
}
assert {case[0] for case in GATE_CASES.values()} >= set(ROUTER_KINDS)


@pytest.mark.parametrize("router", ["router_weight", "router_weight_bias", "logits"])
@pytest.mark.parametrize("case", sorted(GATE_CASES))
def test_gate(case, router):
    kind, top_k, groups, topk_groups, corr, renorm, scaling = GATE_CASES[case]
    T, H, E = 10, 16, 8
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, T // 2, H if router != "logits" else E, generator=g)
    rw = torch.randn(E, H, generator=g) / H**0.5 if router != "logits" else None
    rb = torch.randn(E, generator=g) if router == "router_weight_bias" else None
    cb = torch.randn(E, generator=g) * 0.1 if corr else None
    args = (x, rw, rb, cb, kind, top_k, groups, topk_groups, renorm, scaling)
    leaves = [a.clone().requires_grad_(i in (0, 1, 2)) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    ref_leaves = [a.clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in leaves]
    w, idx, counts = torch.ops.moec_cpu.gate(*leaves)
    w_ref, idx_ref, counts_ref = torch.ops.moec.gate(*ref_leaves)
    assert torch.equal(idx, idx_ref) and torch.equal(counts, counts_ref)
    assert torch.equal(w, w_ref), "gate weights: the CPU gate runs the reference's ops, so bitwise equal"
    cot = torch.randn_like(w_ref)
    for i, gm, gr in zip((0, 1, 2), grads(w, leaves[:3], cot), grads(w_ref, ref_leaves[:3], cot)):
        if gr is not None:
            assert_scaled_close(gm, gr, REL_TOL["bwd"], f"gate grad of arg {i}")


def test_gate_refuses_routes_with_a_capacity():
    with pytest.raises(ValueError, match="keeps moec::route"):
        torch.ops.moec_cpu.gate(torch.randn(4, 8), None, None, None, "softmax_topk+cf=1.25", 2, 1, 1, False, 1.0)


def test_native_kernels_know_every_activation():
    from moec.codegen import cpu_native

    assert set(cpu_native.ACT_CODES) == set(ACTIVATIONS)
    gated = {a for a, code in cpu_native.ACT_CODES.items() if code <= 3 or code == 8 or code >= 10}  # C++ is_gated
    assert gated == set(GATED_ACTIVATIONS)


# The gated activations with clamps or softcaps: values inside, outside and exactly at the limits.
BOUNDED_ACTIVATIONS = ("swiglu_limit", "swiglu_limit_post", "softcap_swiglu", "clamped_swiglu")


@pytest.mark.parametrize("activation", BOUNDED_ACTIVATIONS)
def test_bounded_activation_gradients_at_the_limits(activation):
    """The hand-written backward against autograd of the reference on a grid of (gate, up) with
    values inside, outside and exactly at +-limit (for swiglu_limit_post: a gate whose SiLU is
    exactly the limit). Where torch.clamp's autograd passes the gradient at the bounds, so must we."""
    import torch.nn.functional as F

    from moec.ir.ops import _apply_activation

    limit = 1.5
    if activation == "swiglu_limit_post":
        limit = F.silu(torch.tensor(1.5)).item()  # silu(1.5), an fp32 value: gate 1.5 sits on the clamp
    vals = torch.tensor([-3.0, -limit, -0.75, 0.0, 0.75, 1.5, limit, 3.0])
    gate, up = torch.meshgrid(vals, vals, indexing="ij")
    g = torch.Generator().manual_seed(2)
    for interleaved in (False, True):
        pairs = (gate.reshape(-1, 1), up.reshape(-1, 1))  # row i, column j of a half: (vals[i], vals[j])
        h = torch.cat(pairs, -1).reshape(8, -1) if interleaved else torch.cat([p.reshape(8, -1) for p in pairs], -1)
        h.requires_grad_()
        ref = _apply_activation(h, activation, interleaved, 1.702, limit)
        out = torch.ops.moec_cpu.activation(h.detach(), activation, interleaved, 1.702, limit)
        assert torch.equal(out, ref), "the CPU activation runs the reference's ops in its order"
        go = torch.rand(ref.shape, generator=g) + 0.5
        (want,) = torch.autograd.grad(ref, [h], go)
        got = torch.ops.moec_cpu.activation_backward(go, h.detach(), activation, interleaved, 1.702, limit)
        assert torch.equal(got == 0, want == 0), "the clamps stop the gradient exactly where torch's do"
        assert_scaled_close(got, want, 1e-6, f"{activation} gradient")
        if not interleaved and activation != "softcap_swiglu":
            # At the bounds the gradient passes up to torch 2.13 and stops from 2.14, as the installed
            # torch.clamp does: d_gate with the gate on its clamp (up 0.75), d_up with up at -limit
            # or +limit (gate 0.75).
            from moec import _torch

            at_bounds = [got[5, 4] != 0, got[4, 8 + 1] != 0, got[4, 8 + 6] != 0]
            if activation == "swiglu_limit_post":  # gate = limit: its SiLU is inside the clamp
                assert got[6, 4] != 0
            else:
                at_bounds.append(got[6, 4] != 0)
            assert all(bool(a) == _torch.clamp_grad_at_bounds() for a in at_bounds), at_bounds
            assert got[7, 4] == 0 and got[4, 8 + 7] == 0 and got[4, 8] == 0  # and stops past them


def test_softcap_swiglu_needs_finite_caps():
    h = torch.randn(3, 8)
    for alpha, limit in ((1.0, float("inf")), (0.0, 2.0), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="positive finite softcaps"):
            torch.ops.moec_cpu.activation(h, "softcap_swiglu", False, alpha, limit)
        with pytest.raises(ValueError, match="positive finite softcaps"):
            torch.ops.moec.activation(h, "softcap_swiglu", False, alpha, limit)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear_layout", "transposed"])
@pytest.mark.parametrize("case", ["random", "capacity_dropped_rows", "one_token"])
def test_bf16_forward(case, transposed, bias):
    T, H, I, E, K, kind = CASES[case]
    g = torch.Generator().manual_seed(11)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", transposed, bias, torch.bfloat16, g)
    x_TH = torch.randn(T, H, generator=g).bfloat16()
    a_NI = torch.randn(T * K, I, generator=g).bfloat16()
    bf = torch.bfloat16
    check_both("grouped_gemm", (x_TH, token_N, counts_E, w_in, b_in, transposed), (), bf)
    check_both("grouped_gemm_act", (x_TH, token_N, counts_E, w_in, b_in, "swiglu", transposed, False, 1.702, 7.0),
               (), bf)
    check_both("grouped_gemm_combine", (a_NI, slot_N, counts_E, w_out, b_out, weights_TK, transposed), (), bf)


def test_float64_falls_back_to_torch_mm():
    T, H, I, E, K, kind = CASES["random"]
    g = torch.Generator().manual_seed(13)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", False, True, torch.float64, g)
    x_TH = torch.randn(T, H, generator=g, dtype=torch.float64)
    a = torch.ops.moec_cpu.grouped_gemm_act(x_TH, token_N, counts_E, w_in, b_in, "swiglu", False, False, 1.0, 7.0)
    out = torch.ops.moec_cpu.grouped_gemm_combine(a, slot_N, counts_E, w_out, b_out, weights_TK, False)
    a_ref = torch.ops.moec.grouped_gemm_act(x_TH, token_N, counts_E, w_in, b_in, "swiglu", False, False, 1.0, 7.0)
    ref = torch.ops.moec.grouped_gemm_combine(a_ref, slot_N, counts_E, w_out, b_out, weights_TK, False)
    torch.testing.assert_close(out, ref)


def test_layer_composition_matches_reference_layer():
    """gate -> permute -> grouped_gemm_act -> grouped_gemm_combine, all moec_cpu, against all moec."""
    T, H, I, E, K = 33, 32, 24, 8, 2
    g = torch.Generator().manual_seed(17)
    x = torch.randn(T, H, generator=g)
    rw = torch.randn(E, H, generator=g)
    w_in, w_out, _, _ = expert_weights(E, H, I, "swiglu", False, False, torch.float32, g)

    def layer(ns):
        w, idx, counts = ns.gate(x, rw, None, None, "softmax_topk", K, 1, 1, True, 1.0)
        token, slot = ns.permute(idx, counts)
        a = ns.grouped_gemm_act(x, token, counts, w_in, None, "swiglu", False, False, 1.702, 7.0)
        return ns.grouped_gemm_combine(a, slot, counts, w_out, None, w, False)

    assert_scaled_close(layer(torch.ops.moec_cpu), layer(torch.ops.moec), REL_TOL["fwd"], "layer")


def _opcheck_cases():
    g = torch.Generator().manual_seed(19)
    T, H, I, E, K = 6, 8, 5, 4, 2
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, "random", g)
    idx_TK = torch.randint(0, E, (T, K), generator=g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", False, True, torch.float32, g)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    a = torch.randn(T * K, I, generator=g, requires_grad=True)
    h = torch.randn(T * K, 2 * I, generator=g, requires_grad=True)
    rw = torch.randn(E, H, generator=g, requires_grad=True)
    for t in (w_in, w_out, b_in, b_out, weights_TK):
        t.requires_grad_()
    ops = torch.ops.moec_cpu
    return {
        "gate": (ops.gate, (x, rw, None, None, "softmax_topk", K, 1, 1, True, 1.0)),
        "gate_grouped": (ops.gate, (x, rw, None, torch.randn(E, generator=g), "sigmoid_bias_grouped_topk", K, 2, 1,
                                    True, 2.0)),
        "gate_group_max_pnorm": (ops.gate, (x, rw, None, torch.randn(E, generator=g),
                                            "softmax_topk+group_max+pnorm=2.0", K, 2, 1, True, 1.0)),
        "activation_relu2": (ops.activation, (h, "relu2", False, 1.0, 7.0)),
        "activation_reglu": (ops.activation, (h, "reglu", True, 1.0, 7.0)),
        "activation_swiglu_limit": (ops.activation, (h, "swiglu_limit", True, 1.0, 0.5)),
        "activation_softcap_swiglu": (ops.activation, (h, "softcap_swiglu", False, 1.5, 2.0)),
        "gate_sqrtsoftplus": (ops.gate, (x, rw, None, torch.randn(E, generator=g), "sqrtsoftplus_topk", K, 2, 1,
                                         True, 1.0)),
        "permute": (ops.permute, (idx_TK, torch.bincount(idx_TK.reshape(-1), minlength=E))),
        "grouped_gemm": (ops.grouped_gemm, (x, token_N, counts_E, w_in, b_in, False)),
        "activation": (ops.activation, (h, "swiglu", False, 1.702, 7.0)),
        "grouped_gemm_act": (ops.grouped_gemm_act, (x, token_N, counts_E, w_in, b_in, "swiglu", False, False, 1.702,
                                                    7.0)),
        "grouped_gemm_combine": (ops.grouped_gemm_combine, (a, slot_N, counts_E, w_out, b_out, weights_TK, False)),
    }


@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_backward_ops_opcheck():
    g = torch.Generator().manual_seed(23)
    T, H, I, E, K = 6, 8, 5, 4, 2
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, "random", g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", False, True, torch.float32, g)
    x, a = torch.randn(T, H, generator=g), torch.randn(T * K, I, generator=g)
    h = torch.randn(T * K, 2 * I, generator=g)
    rw = torch.randn(E, H, generator=g)
    ops = torch.ops.moec_cpu
    for op, args in [
        (ops.gate_backward, (torch.randn(T, K, generator=g), x, rw, None, None, "softmax_topk", K, 1, 1, True, 1.0)),
        (ops.gate_backward, (torch.randn(T, K, generator=g), x, rw, None, torch.randn(E, generator=g),
                             "topk_softmax+group_max+pnorm=2.0", K, 2, 1, True, 1.0)),
        (ops.grouped_gemm_backward, (torch.randn(T * K, 2 * I, generator=g), x, token_N, counts_E, w_in, b_in, False)),
        (ops.activation_backward, (torch.randn(T * K, I, generator=g), h, "swiglu", False, 1.702, 7.0)),
        (ops.activation_backward, (torch.randn(T * K, I, generator=g), h, "swiglu_limit_post", True, 1.0, 0.5)),
        (ops.gate_backward, (torch.randn(T, K, generator=g), x, rw, None, None, "sqrtsoftplus_topk+group_max", K, 2, 1,
                             True, 1.0)),
        (ops.grouped_gemm_act_backward_input, (torch.randn(T * K, I, generator=g), x, token_N, counts_E, w_in, b_in,
                                               "swiglu", False, False, 1.702, 7.0)),
        (ops.grouped_gemm_act_backward_weight, (torch.randn(T * K, 2 * I, generator=g), x, token_N, counts_E, w_in,
                                                b_in, False)),
        (ops.grouped_gemm_act_backward_weight, (torch.randn(T * K, 2 * I, generator=g), x, token_N, counts_E,
                                                w_in.transpose(1, 2).contiguous(), None, True)),
        (ops.grouped_gemm_combine_backward_input, (torch.randn(T, H, generator=g), a, slot_N, counts_E, w_out, b_out,
                                                   weights_TK, False)),
        (ops.grouped_gemm_combine_backward_weight, (torch.randn(T * K, H, generator=g), a, counts_E, w_out, b_out,
                                                    False)),
    ]:
        torch.library.opcheck(op, args)


def test_signatures_match_reference():
    from moec.ir.lowered import BACKWARD_OPS, LOWERED_OPS

    for name in LOWERED_OPS + BACKWARD_OPS:
        mine = getattr(torch.ops.moec_cpu, name).default._schema
        ref = getattr(torch.ops.moec, name).default._schema
        assert str(mine).replace("moec_cpu::", "moec::") == str(ref), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_backward_intermediates_match_reference(cpu_path, case):
    """d_h and d_y, what the input ops hand to the weight ops: the reference's within the backward
    tolerance, and zero on the rows past the counts."""
    T, H, I, E, K, kind = CASES[case]
    g = torch.Generator().manual_seed(29)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, "swiglu", False, True, torch.float32, g)
    x_TH, a_NI = torch.randn(T, H, generator=g), torch.randn(T * K, I, generator=g)
    act_args = (torch.randn(T * K, I, generator=g), x_TH, token_N, counts_E, w_in, b_in, "swiglu", False, False,
                1.702, 7.0)
    comb_args = (torch.randn(T, H, generator=g), a_NI, slot_N, counts_E, w_out, b_out, weights_TK, False)
    kept = int(counts_E.sum())
    for name, args in (("grouped_gemm_act_backward_input", act_args),
                       ("grouped_gemm_combine_backward_input", comb_args)):
        mine = getattr(torch.ops.moec_cpu, name)(*args)
        ref = getattr(torch.ops.moec, name)(*args)
        for i, (m, r) in enumerate(zip(mine, ref)):
            assert_scaled_close(m, r, REL_TOL["bwd"], f"{name} output {i}")
        inter = mine[1]
        assert inter.shape[0] == T * K and (kept == T * K or inter[kept:].abs().max().item() == 0)


def test_frozen_experts_skip_the_weight_gradient_op():
    """autograd calls the weight-gradient op only when the expert weights want a gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    T, H, I, E, K, kind = CASES["random"]
    g = torch.Generator().manual_seed(31)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, _, _ = expert_weights(E, H, I, "swiglu", False, False, torch.float32, g)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ops = torch.ops.moec_cpu
    for trainable in (False, True):
        a = ops.grouped_gemm_act(x, token_N, counts_E, w_in.clone().requires_grad_(trainable), None, "swiglu", False,
                                 False, 1.702, 7.0)
        out = ops.grouped_gemm_combine(a, slot_N, counts_E, w_out.clone().requires_grad_(trainable), None, weights_TK,
                                       False)
        with Calls() as calls:
            out.sum().backward()
        called = [n for n in calls.names if n.startswith("moec_cpu::")]
        expected = ["moec_cpu::grouped_gemm_combine_backward_input", "moec_cpu::grouped_gemm_combine_backward_weight",
                    "moec_cpu::grouped_gemm_act_backward_input", "moec_cpu::grouped_gemm_act_backward_weight"]
        assert called == (expected if trainable else expected[::2])


def test_native_kernels_take_the_small_rows(cpu_path):
    # Guard against the native path silently never running: with it on, a one-token layer must
    # call it (the spy), with it off it must not; the result equals the reference either way.
    from moec.codegen import cpu_native

    calls = []
    real = cpu_native.load()
    if real is not None:
        class Spy:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        import unittest.mock

        patch = unittest.mock.patch.object(cpu_native, "load", lambda: Spy())
    else:
        import contextlib

        patch = contextlib.nullcontext()
    g = torch.Generator().manual_seed(3)
    x, w_in, w_out = torch.randn(1, 16, generator=g), torch.randn(4, 24, 16, generator=g), torch.randn(4, 16, 12, generator=g)
    idx = torch.tensor([[2, 0]])
    counts = torch.bincount(idx.view(-1), minlength=4)
    token, slot = torch.ops.moec.permute(idx, counts)
    weights = torch.tensor([[0.7, 0.3]])
    with patch:
        a = torch.ops.moec_cpu.grouped_gemm_act(x, token, counts, w_in, None, "swiglu", False, False, 1.0, 0.0)
        out = torch.ops.moec_cpu.grouped_gemm_combine(a, slot, counts, w_out, None, weights, False)
    a_ref = torch.ops.moec.grouped_gemm_act(x, token, counts, w_in, None, "swiglu", False, False, 1.0, 0.0)
    out_ref = torch.ops.moec.grouped_gemm_combine(a_ref, slot, counts, w_out, None, weights, False)
    assert_scaled_close(out, out_ref, 2e-6, "one-token layer")
    assert calls == (["gemv_act", "gemv_combine"] if cpu_path == "native" else [])


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    """A killed build leaves torch's lock file behind and the next build would wait on it forever;
    one older than ``STALE_LOCK_S`` is removed, a younger one (a build in progress) is kept."""
    import os
    import time

    from moec.codegen import cpu_native

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not cpu_native.clear_stale_lock(str(lock)) and lock.exists()
    old = time.time() - cpu_native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="build lock"):
        assert cpu_native.clear_stale_lock(str(lock))
    assert not lock.exists()
    assert not cpu_native.clear_stale_lock(str(lock))  # nothing there


# name -> (T, H, I, E, K, routing, activation, interleaved, transposed, bias, token rows gathered)
PADDED_CASES = {
    "swiglu": (48, 16, 12, 4, 2, "random", "swiglu", False, False, False, True),
    "relu_bias": (48, 16, 12, 4, 2, "random", "relu", False, False, True, True),
    "interleaved_transposed": (40, 16, 12, 4, 2, "random", "clamped_swiglu", True, True, True, True),
    "expert_without_tokens": (60, 16, 12, 4, 2, "skip_expert_2", "gelu", False, False, True, True),
    "top_k_equals_experts": (20, 16, 12, 4, 4, "random", "geglu", False, False, False, True),
    "rows_in_order": (48, 16, 12, 4, 2, "random", "silu", False, False, True, False),
}


@pytest.mark.parametrize("case", sorted(PADDED_CASES))
def test_padded_products_match_reference_and_the_loop(case, monkeypatch):
    """Tens of rows per expert: both products run as one batched product over the padded layout
    (``_padded``). Against the reference (forward and gradients), against the per-expert loop
    (``use_padded`` off), and the layout must really be used (a spy on ``_padded_layout``)."""
    T, H, I, E, K, kind, activation, interleaved, transposed, bias, gathered = PADDED_CASES[case]
    cpu = moec.codegen.cpu
    g = torch.Generator().manual_seed(11)
    weights_TK, token_N, slot_N, counts_E = routing(T, E, K, kind, g)
    w_in, w_out, b_in, b_out = expert_weights(E, H, I, activation, transposed, bias, torch.float32, g)
    x = torch.randn(T if gathered else T * K, H, generator=g)  # else: row n is sorted slot n's input
    token = token_N if gathered else None
    layouts = []
    real_layout = cpu._padded_layout
    monkeypatch.setattr(cpu, "_padded_layout", lambda *a: layouts.append(1) or real_layout(*a))
    act_args = (x, token, counts_E, w_in, b_in, activation, transposed, interleaved, 1.702, 1.5)
    a, _ = check_both("grouped_gemm_act", act_args, (0, 3, 4))
    a_NI = torch.randn(T * K, a.shape[1], generator=g)
    out, _ = check_both("grouped_gemm_combine", (a_NI, slot_N, counts_E, w_out, b_out, weights_TK, transposed),
                        (0, 3, 4, 5))
    assert len(layouts) >= 2, "the padded path was not taken"
    monkeypatch.setattr(cpu, "use_padded", False)
    with torch.no_grad():
        a_loop = torch.ops.moec_cpu.grouped_gemm_act(*act_args)
        out_loop = torch.ops.moec_cpu.grouped_gemm_combine(a_NI, slot_N, counts_E, w_out, b_out, weights_TK,
                                                           transposed)
    assert_scaled_close(a.detach(), a_loop, REL_TOL["fwd"], "padded vs loop act")
    assert_scaled_close(out.detach(), out_loop, REL_TOL["fwd"], "padded vs loop combine")
    assert len(layouts) == 2


def test_padded_layout_is_left_alone_where_it_would_waste():
    """All rows on one of four experts: padding every expert to that count would quadruple the
    work, so the loop runs (``_PADDED_MAX_WASTE``); so do bf16 layers and few-row experts."""
    cpu = moec.codegen.cpu
    w = torch.randn(4, 12, 16)
    one_hot = [(0, 0, 40)]
    even = [(e, 10 * e, 10 * e + 10) for e in range(4)]
    wide = [(e, 20 * e, 20 * e + 20) for e in range(4)]
    assert not cpu._padded_ok(one_hot + [(1, 40, 41)], 41, w, torch.float32)
    assert not cpu._padded_ok(even, 40, w, torch.float32)  # 10 rows < _PADDED_MIN_ROWS
    assert cpu._padded_ok(wide, 80, w, torch.float32)
    assert not cpu._padded_ok(wide, 80, w.bfloat16(), torch.bfloat16)
    C, dest = cpu._padded_layout([(0, 0, 3), (2, 3, 4)], 4, torch.tensor([3, 0, 1]))
    assert C == 3 and dest.tolist() == [0, 1, 2, 6]
