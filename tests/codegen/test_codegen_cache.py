"""KernelSpec keys, emitted source, and the on-disk kernel cache.

The cache tests import the generated modules (``cache.load``) but launch no kernel, so they need
Triton importable and nothing else; a second Python process checks that an existing file is
reused, not rewritten.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from moec import _torch
from moec.codegen import templates
from moec.codegen.emit import emit, emit_group, layer_source
from moec.codegen.spec import KERNEL_GROUPS, KernelSpec

BASE = KernelSpec.from_layer(num_experts=8, top_k=2, router_kind="sigmoid_bias_grouped_topk", num_groups=4,
                             topk_groups=2, renormalize=True, scaling=2.5, has_correction_bias=True,
                             activation="clamped_swiglu", interleaved=True, alpha=1.702, limit=7.0,
                             has_bias_in=True, dtype="bfloat16", target="interpret")

# A different valid value for every field of BASE.
CHANGED = dict(router_kind="sigmoid_topk", num_experts=16, top_k=3, num_groups=2, topk_groups=1,
               renormalize=False, scaling=1.0, has_router_weight=False, has_router_bias=True,
               has_correction_bias=False, activation="swiglu", interleaved=False, alpha=1.0, limit=math.inf,
               transposed=True, has_bias_in=False, has_bias_out=True, dtype="float32", target="cuda")


def test_changed_covers_every_field():
    assert set(CHANGED) == {f.name for f in fields(KernelSpec)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_key_changes_with_every_field(name):
    pytest.importorskip("triton")
    other = replace(BASE, **{name: CHANGED[name]})
    assert getattr(other, name) != getattr(BASE, name)
    assert other.key() != BASE.key()


def test_key_is_stable_and_hex():
    pytest.importorskip("triton")
    assert BASE.key() == replace(BASE).key()
    assert len(BASE.key()) == 64 and int(BASE.key(), 16) >= 0


def test_key_covers_template_version(monkeypatch):
    pytest.importorskip("triton")
    from moec.codegen import spec as spec_mod

    before = BASE.key()
    monkeypatch.setattr(spec_mod, "TEMPLATE_VERSION", spec_mod.TEMPLATE_VERSION + "x")
    assert BASE.key() != before


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="router kind"):
        KernelSpec(router_kind="nope")
    with pytest.raises(ValueError, match="activation"):
        KernelSpec(activation="tanh")
    with pytest.raises(ValueError, match="top_k"):
        KernelSpec(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="groups"):
        KernelSpec(num_experts=6, top_k=1, num_groups=4)
    with pytest.raises(ValueError, match="positive finite softcaps"):
        KernelSpec(activation="softcap_swiglu")  # the default limit is inf
    with pytest.raises(ValueError, match="needs renormalize=True"):
        KernelSpec(router_kind="softmax_topk+renorm_kept", num_experts=8, top_k=2)


def test_router_kind_is_validated_and_canonical():
    spelled = KernelSpec(router_kind="softmax_topk+pnorm=2", num_experts=8, top_k=2, renormalize=True)
    assert spelled.router_kind == "softmax_topk+pnorm=2.0"
    assert spelled == replace(spelled, router_kind="softmax_topk+pnorm=2.0")
    with pytest.raises(ValueError, match="unknown modifier"):
        KernelSpec(router_kind="softmax_topk+bogus")
    with pytest.raises(ValueError, match="needs renormalize=True"):
        KernelSpec(router_kind="softmax_topk+pnorm=2.0", num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="fewer than top_k"):
        KernelSpec(num_experts=8, top_k=3, num_groups=4, topk_groups=1)


def test_gate_sub_spec_keeps_groups_and_correction_bias_for_every_base():
    for kind in ("softmax_topk", "topk_softmax+group_max", "sigmoid_topk"):
        sub = replace(BASE, router_kind=kind).for_kernel("gate")
        assert (sub.num_groups, sub.topk_groups, sub.has_correction_bias) == (4, 2, True), kind
    ungrouped = replace(BASE, router_kind="softmax_topk", num_groups=1, topk_groups=3)
    assert ungrouped.for_kernel("gate").topk_groups == 1  # meaningless without groups


def test_sub_specs_keep_only_their_fields():
    # A different router does not change the FFN kernels, and a different activation not the gate.
    other_router = replace(BASE, router_kind="softmax_topk", num_groups=1, topk_groups=1, has_correction_bias=False)
    assert other_router.for_kernel("grouped_gemm_act") == BASE.for_kernel("grouped_gemm_act")
    assert other_router.for_kernel("gate") != BASE.for_kernel("gate")
    other_act = replace(BASE, activation="swiglu")
    assert other_act.for_kernel("gate") == BASE.for_kernel("gate")
    assert other_act.for_kernel("grouped_gemm_act") != BASE.for_kernel("grouped_gemm_act")
    # alpha and limit only matter to clamped_swiglu
    swiglu = replace(BASE, activation="swiglu")
    assert replace(swiglu, alpha=3.0, limit=1.0).for_kernel("activation") == swiglu.for_kernel("activation")
    assert replace(BASE, alpha=3.0).for_kernel("activation") != BASE.for_kernel("activation")


@pytest.mark.parametrize("activation,reads", [("swiglu_limit", {"limit"}), ("swiglu_limit_post", {"limit"}),
                                              ("softcap_swiglu", {"alpha", "limit"}),
                                              ("clamped_swiglu", {"alpha", "limit"}), ("reglu", set())])
def test_activation_sub_specs_keep_the_attributes_the_activation_reads(activation, reads):
    spec = replace(BASE, activation=activation, alpha=1.5, limit=7.0)
    for group in ("activation", "grouped_gemm_act"):
        for name, value in (("alpha", 3.0), ("limit", 2.0)):
            changed = replace(spec, **{name: value}).for_kernel(group) != spec.for_kernel(group)
            assert changed == (name in reads), (group, name)
    assert replace(spec, alpha=3.0, limit=2.0).for_kernel("gate") == spec.for_kernel("gate")


def test_emit_gives_every_group_as_a_parseable_module():
    sources = emit(BASE)
    assert set(sources) == set(KERNEL_GROUPS)
    for group, text in sources.items():
        tree = ast.parse(text)
        kernels = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert kernels and all(k.startswith("moec_") for k in kernels), group


def test_layer_source_holds_every_kernel_once():
    text = layer_source(BASE)
    tree = ast.parse(text)
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    expected = [n.name for g in KERNEL_GROUPS for n in ast.parse(emit_group(BASE, g)).body
                if isinstance(n, ast.FunctionDef)]
    assert names == expected
    assert len(set(names)) == len(names)


def _act_expr(activation: str) -> str:
    return ast.unparse(ast.parse(emit_group(replace(BASE, activation=activation), "grouped_gemm_act")))


def test_activation_source_differs_where_it_should():
    swiglu, geglu = _act_expr("swiglu"), _act_expr("geglu")
    assert swiglu != geglu
    assert "tl.erf" in geglu and "tl.erf" not in swiglu
    assert "act = g * tl.sigmoid(g) * u" in swiglu
    clamped = _act_expr("clamped_swiglu")
    assert "tl.minimum(g, 7.0)" in clamped and "1.702" in clamped
    relu = _act_expr("relu")
    assert "acc_u" not in relu and "acc_u" in swiglu  # ungated: one accumulator
    # interleaved vs split gate/up columns
    il = emit_group(BASE, "grouped_gemm_act")
    split = emit_group(replace(BASE, interleaved=False), "grouped_gemm_act")
    assert "gate_cols = 2 * cols" in il and "up_cols = cols + I_DIM" in split
    # only the text that depends on the activation changes: the GEMM loop is shared
    assert "for k0 in range(0, K_DIM, BLOCK_K)" in swiglu and "for k0 in range(0, K_DIM, BLOCK_K)" in geglu


def test_router_source_is_specialised():
    gate = emit_group(BASE, "gate")
    assert gate.count("# group ") == 4 and "tl.static_range(2)" in gate and "wts * 2.5" in gate
    # (A correction bias now steers any base's choice, so the plain router has none.)
    plain = emit_group(replace(BASE, router_kind="softmax_topk", num_groups=1, scaling=1.0, has_correction_bias=False),
                       "gate")
    assert "# group " not in plain and "cb_ptr + cols" not in plain and "tl.exp(logits" in plain
    assert templates.dot_expr(replace(BASE, target="cuda", dtype="float32"), "a", "b").endswith('"ieee")')
    assert ".to(tl.float32)" in templates.dot_expr(BASE, "a", "b")  # interpreter: upcast


def test_router_source_for_the_wider_vocabulary():
    def gate(kind, **kw):
        return emit_group(replace(BASE, router_kind=kind, **kw), "gate")

    top2, by_max = gate("sigmoid_bias_grouped_topk"), gate("sigmoid_bias_grouped_topk+group_max")
    assert top2.count("m2 = ") == 4 and "m2 = " not in by_max and by_max.count("gscore = tl.where(in_g") == 4
    softmax_groups = gate("softmax_topk")
    assert "tl.exp(logits" in softmax_groups and "cb_ptr + cols" in softmax_groups and "# group 3" in softmax_groups
    assert "tl.sigmoid(logits)" not in softmax_groups
    assert "score = logits" in gate("topk_softmax")
    assert "tl.sqrt(tl.sum(wts * wts, 1))" in gate("softmax_topk+pnorm=2.0")
    assert "tl.exp(1.5 * tl.log(" in gate("softmax_topk+pnorm=1.5")
    assert "tl.sum(wts, 1)" in gate("softmax_topk") and "tl.sqrt" not in gate("softmax_topk")


@pytest.mark.parametrize("kind", ["top1+cf=1.25", "expert_choice+cf=1.0", "softmax_topk+renorm_kept"])
def test_capacity_routers_have_no_gate_kernel(kind):
    """Routes with an expert capacity stay route/dispatch: their gate module is empty, the other
    groups (and the layer source) are generated as for any layer."""
    spec = replace(BASE, router_kind=kind, num_groups=1, topk_groups=1, renormalize=kind.endswith("renorm_kept"),
                   has_correction_bias=False)
    gate = emit_group(spec, "gate")
    assert not [n for n in ast.parse(gate).body if isinstance(n, ast.FunctionDef)]
    assert "has an expert capacity" in gate
    assert "moec_grouped_gemm_act_kernel" in layer_source(spec)


def test_sqrtsoftplus_router_source():
    gate = emit_group(replace(BASE, router_kind="sqrtsoftplus_topk"), "gate")
    assert "score = tl.sqrt_rn(sp)" in gate and "logits > 20.0" in gate  # torch's softplus threshold
    assert "tl.sigmoid(logits)" not in gate and "tl.exp(logits" not in gate
    assert gate.count("# group ") == 4 and "cb_ptr + cols" in gate  # groups and bias as for any base


def test_bounded_swiglu_sources():
    limit, post, softcap = _act_expr("swiglu_limit"), _act_expr("swiglu_limit_post"), _act_expr("softcap_swiglu")
    assert "g_c = tl.minimum(g, 7.0)" in limit and "act = g_c * tl.sigmoid(g_c) * u_c" in limit
    assert "a_c = tl.minimum(g * tl.sigmoid(g), 7.0)" in post and "act = a_c * u_c" in post
    assert "u_c = tl.minimum(tl.maximum(u, -7.0), 7.0)" in limit and "1.702" not in limit  # alpha unused
    assert "t_g_v = g / 1.702" in softcap and "t_u_v = u / 7.0" in softcap and "act = c * s * v" in softcap
    assert "s = tl.sigmoid(g)" in softcap and all("acc_u" in src for src in (limit, post, softcap))
    bwd = emit_group(replace(BASE, activation="swiglu_limit"), "activation")
    at_bound = "<=" if _torch.clamp_grad_at_bounds() else "<"  # torch's clamp gradient at the bound
    assert f"d_g = tl.where(g {at_bound} 7.0," in bwd and "d_u = tl.where(in_u," in bwd


def test_relu_based_activation_sources():
    relu2, reglu = _act_expr("relu2"), _act_expr("reglu")
    assert "act = r * r" in relu2 and "acc_u" not in relu2
    assert "act = tl.maximum(g, 0.0) * u" in reglu and "acc_u" in reglu
    bwd = emit_group(replace(BASE, activation="relu2"), "activation")
    assert "d_h = tl.where(h > 0.0, 2.0 * h * go, 0.0)" in bwd


# ----------------------------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from moec.codegen import cache

    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path))
    cache.clear_memo()
    yield cache, tmp_path
    cache.clear_memo()


def test_load_writes_once_and_memoises(cache_env):
    cache, tmp = cache_env
    written, imported = cache.STATS["written"], cache.STATS["imported"]
    module = cache.load(BASE, "grouped_gemm_act")
    path = cache.path_for(BASE, "grouped_gemm_act")
    assert path.parent == tmp and path.exists()
    assert path.name == f"grouped_gemm_act-{BASE.for_kernel('grouped_gemm_act').key()}.py"
    assert hasattr(module, "moec_grouped_gemm_act_kernel")
    assert cache.load(BASE, "grouped_gemm_act") is module  # memo: imported once per process
    assert (cache.STATS["written"], cache.STATS["imported"]) == (written + 1, imported + 1)
    # the same sub-spec from another layer spec shares the file
    cache.load(replace(BASE, router_kind="softmax_topk", num_groups=1, topk_groups=1), "grouped_gemm_act")
    assert cache.STATS["written"] == written + 1
    assert [p.name for p in tmp.iterdir()] == [path.name]  # no temporary files left behind


def test_existing_file_is_reused_not_rewritten(cache_env):
    cache, tmp = cache_env
    path = cache.ensure_file(BASE, "gate")
    os.utime(path, (1_000_000, 1_000_000))
    written = cache.STATS["written"]
    cache.clear_memo()
    cache.load(BASE, "gate")
    assert cache.STATS["written"] == written and path.stat().st_mtime == 1_000_000


def test_second_process_does_not_regenerate(cache_env):
    cache, tmp = cache_env
    path = cache.ensure_file(BASE, "permute")
    os.utime(path, (1_000_000, 1_000_000))
    code = ("from moec.codegen import cache; from moec.codegen.spec import KernelSpec\n"
            f"spec = {BASE!r}\n"
            "m = cache.load(spec, 'permute'); assert hasattr(m, 'moec_permute_scatter_kernel')\n"
            "print(cache.STATS['written'], cache.STATS['imported'])")
    env = dict(os.environ, MOEC_CACHE_DIR=str(tmp))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]
    assert path.stat().st_mtime == 1_000_000


def test_truncated_file_is_regenerated(cache_env):
    cache, tmp = cache_env
    path = cache.ensure_file(BASE, "offsets")
    full = path.read_text()
    path.write_text(full[: len(full) // 2])  # a partial write by something that bypassed the rename
    written = cache.STATS["written"]
    module = cache.load(BASE, "offsets")
    assert cache.STATS["written"] == written + 1
    assert path.read_text() == full and hasattr(module, "moec_offsets_kernel")


def test_cache_dir_default(monkeypatch):
    from moec.codegen import cache

    monkeypatch.delenv("MOEC_CACHE_DIR", raising=False)
    assert cache.cache_dir() == Path.home() / ".cache" / "moec" / "kernels"
