"""fuse_gating on the wider router vocabulary: routes without a capacity become a gate (numerics
bitwise unchanged), routes with one (fixed, cf=F, expert choice) keep route/dispatch; the whole
pipeline lowers both, on the reference and the CPU target."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import moec.codegen.cpu  # noqa: F401  (registers moec_cpu::)
import moec.ir.lowered  # noqa: F401
from moec.codegen.layers import layer_specs
from moec.passes.fuse_gating import fuse_gating
from moec.passes.pipeline import check_graph, op_counts, run_pipeline

T, H, E, I = 12, 16, 4, 8

# kind -> (top_k, num_groups, topk_groups, renormalize, correction bias, capacity, fused)
ROUTES = {
    "softmax_topk+group_max+pnorm=2.0": (2, 2, 1, True, True, 0, True),
    "topk_softmax+choice_first": (2, 1, 1, False, True, 0, True),  # choice_first without a capacity: no drops
    "top1": (1, 1, 1, False, False, 3, False),  # a fixed capacity
    "softmax_topk+cf=1.0+choice_first": (2, 1, 1, True, False, 0, False),
    "expert_choice+cf=1.0": (2, 1, 1, False, False, 0, False),
    "expert_choice+sigmoid": (1, 1, 1, False, False, 2, False),
    "sqrtsoftplus_topk": (2, 2, 1, True, True, 0, True),  # DeepSeek-V4's scores: a gate like any other
    "softmax_topk+renorm_kept": (2, 1, 1, True, False, 3, False),  # renormalised after the drops
    "softmax_topk+cf=1.0+renorm_kept": (2, 1, 1, True, False, 0, False),
}


def _layer(kind):
    top_k, groups, topk_groups, renorm, corr, capacity, _ = ROUTES[kind]

    def layer(x, router_w, correction_bias, w_in, w_out):
        logits = x @ router_w.t()
        w, idx = torch.ops.moec.route(logits, correction_bias if corr else None, kind, top_k, groups, topk_groups,
                                      renorm, 1.0, capacity)
        token, slot, counts = torch.ops.moec.dispatch(idx, E)
        y = torch.ops.moec.expert_ffn(x, token, counts, w_in, w_out, None, None, "relu2", False, False, 1.0, 0.0)
        return torch.ops.moec.combine(y, slot, w)

    return layer


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, H, generator=g), torch.randn(E, H, generator=g), torch.randn(E, generator=g) * 0.1,
            torch.randn(E, I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5)


@pytest.mark.parametrize("kind", sorted(ROUTES))
def test_routes_with_a_capacity_are_left_alone(kind):
    fused = ROUTES[kind][-1]
    args = _inputs()
    gm = make_fx(_layer(kind), tracing_mode="fake")(*args)
    want = gm(*args)
    gm, changed = fuse_gating(gm)
    check_graph(gm)
    assert changed == int(fused)
    counts = op_counts(gm)
    assert counts.get("moec::gate", 0) == int(fused) and counts.get("moec::route", 0) == int(not fused)
    assert counts.get("moec::dispatch", 0) == int(not fused) and counts.get("moec::permute", 0) == int(fused)
    assert fuse_gating(gm)[1] == 0
    assert torch.equal(gm(*args), want)  # numerics preserved bitwise


@pytest.mark.parametrize("kind", ["softmax_topk+group_max+pnorm=2.0", "expert_choice+cf=1.0",
                                  "softmax_topk+cf=1.0+renorm_kept"])
def test_pipeline_lowers_the_wider_vocabulary(kind):
    args = _inputs()
    want = _layer(kind)(*args)
    gm = make_fx(_layer(kind), tracing_mode="fake")(*args)
    gm, records = run_pipeline(gm, target="cpu", check=True)  # the small layer as plain tensor ops
    assert next(r for r in records if r.name == "lower_small").changes == int(not kind.startswith(("expert_choice",
                                                                                                    "softmax_topk+cf")))
    torch.testing.assert_close(gm(*args), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
    for target in ("reference", "cpu"):
        gm = make_fx(_layer(kind), tracing_mode="fake")(*args)
        gm, _ = run_pipeline(gm, target=target, check=True, disable=("lower_small",))
        assert "moec::grouped_gemm_act" in op_counts(gm) or "moec_cpu::grouped_gemm_act" in op_counts(gm)
        got = gm(*args)
        if target == "reference":
            assert torch.equal(got, want)
            (spec,) = layer_specs(gm, target="interpret")  # what `moec codegen` prints for the layer
            assert spec.router_kind == kind and spec.top_k == (E if kind.startswith("expert_choice") else 2)
        else:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
