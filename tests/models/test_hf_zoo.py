"""The all-architectures zoo (``moec.models.zoo``): discovery finds the MoE families of the installed
transformers, each buildable one builds, runs eagerly, is deterministic, and its ``expected`` oracle
(from the config) names exactly the modules that hold routed experts (found here from the weights).
No moec compiler code runs here. The default run covers a representative subset; every arch runs
under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch

from moec.models import zoo

pytest.importorskip("transformers")

# Different kinds: plain top-2, group-limited routing with a dense prefix and shared experts, biased
# experts with a clamped SwiGLU, a shared expert behind a sigmoid gate, a Mamba hybrid, and an
# encoder-decoder with capacity-limited top-1 routing.
REPRESENTATIVE = ("mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "jamba", "switch_transformers")


def _buildable() -> list[str]:
    return [a.name for a in zoo.moe_archs() if a.buildable]


# --- discovery -----------------------------------------------------------------------------------


def test_discovery_finds_the_known_moe_families():
    found = {a.name: a for a in zoo.moe_archs()}
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "jamba",
                 "dbrx", "llama4", "switch_transformers", "nllb_moe", "granitemoe", "qwen3_next"):
        assert found[name].buildable, found[name]
    assert len(found) >= 60  # transformers 5.17 (the oldest supported) has 64 MoE families, 5.23 70 and more
    # Dense families are not MoE archs.
    assert not {"llama", "mistral", "qwen2", "gpt2", "t5"} & set(found)


def test_discovery_picks_the_text_decoder_of_multimodal_and_seq2seq_families():
    found = {a.name: a for a in zoo.moe_archs()}
    assert (found["llama4"].model_type, found["llama4"].kind) == ("llama4_text", "causal-lm")
    assert found["qwen3_vl_moe"].model_type == "qwen3_vl_moe_text"
    assert found["qwen3_omni_moe"].model_type == "qwen3_omni_moe_text"  # the thinker, not the talker
    assert found["dbrx"].model_type == "dbrx"  # its experts live in ffn_config
    assert (found["nllb_moe"].kind, found["switch_transformers"].kind) == ("seq2seq", "seq2seq")


def test_every_excluded_arch_has_a_reason():
    excluded = {a.name: a.out_of_scope for a in zoo.moe_archs() if not a.buildable}
    assert all(isinstance(r, str) and r and "\n" not in r for r in excluded.values())
    assert "not a text model" in excluded["vitpose_backbone"]
    # A composite that reuses another family's MoE decoder points at it (families newer than the
    # installed transformers are not there to check).
    found = {a.name for a in zoo.moe_archs()}
    for composite, decoder in (("kimi_k25", "deepseek_v3"), ("nemotron3_5_transcribe", "nemotron_h")):
        if composite in found:
            assert decoder in excluded[composite]
    for arch, reason in excluded.items():
        with pytest.raises(zoo.ZooUnavailable, match=arch):
            zoo.build(arch)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown MoE arch 'llama'.*mixtral"):
        zoo.build("llama")


# --- the structural cross-check ------------------------------------------------------------------


def _expert_count(name: str, module: torch.nn.Module) -> int | None:
    """How many experts a module's own weights hold, if it owns experts' weights directly."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        # A list of expert MLPs (NLLB's also holds a parameter-free dropout).
        return sum(1 for m in module.values() if any(True for _ in m.parameters())) if "expert" in leaf else None
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings if leaf.endswith("_embed") else None  # Doge's product-key experts
    own = list(module.parameters(recurse=False))
    fused = [p.shape[0] for p in own if p.ndim == 3]
    if fused:  # [E, ...]: fused experts, JetMoE's parallel experts
        # min: LongCat-Flash allocates gate_up_proj rows for its zero-computation experts too.
        return min(fused)
    if own and isinstance(getattr(module, "moe_num_experts", None), int):  # DBRX: [E * I, H] blocks
        return module.moe_num_experts
    return None


def _expert_holders(model: torch.nn.Module, counts: set[int]) -> dict[str, int]:
    """``{MoE block path: expert count}``: the nearest ancestor of each module owning expert weights
    that is not itself an experts container (``mlp.experts`` -> ``mlp``)."""
    holders: dict[str, int] = {}
    for name, module in model.named_modules():
        n = _expert_count(name, module)
        if n not in counts:
            continue
        parts = name.split(".")[:-1]
        while parts and "expert" in parts[-1]:
            parts.pop()
        holders[".".join(parts)] = n
    return holders


def _check(arch: str) -> None:
    rng_before = torch.random.get_rng_state()
    first, second = zoo.build(arch), zoo.build(arch)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "build touched the global RNG"

    # Deterministic: bitwise the same weights and inputs.
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(first.args, second.args))
    assert first.kwargs.keys() == second.kwargs.keys()
    assert all(torch.equal(first.kwargs[k], second.kwargs[k]) for k in first.kwargs)

    # Runs eagerly; the output is finite and shaped [B, S, vocab or hidden].
    model = first.model
    assert not model.training
    input_ids_BS = first.args[0]
    assert input_ids_BS.shape == (2, 8) and input_ids_BS.dtype == torch.long
    with torch.no_grad():
        out = first.output(model(*first.args, **first.kwargs))
    assert out.shape[:2] == (2, 8) and out.shape[2] in (64, 128)
    assert torch.isfinite(out).all()

    # The oracle matches the modules: every expected block holds num_experts experts, and nothing
    # else holds experts.
    expected = first.expected
    on_text = [e for e in expected if e.runs_on_text and e.kind == "ffn"]
    assert len(on_text) >= 2, "the default build has at least 2 MoE layers"
    holders = _expert_holders(model, {e.num_experts for e in expected})
    assert holders == {e.name: e.num_experts for e in expected}
    assert all(1 <= e.top_k <= e.num_experts for e in expected)
    # Where the block or its router keeps a top_k, it is the oracle's.
    modules = dict(model.named_modules())
    for e in expected:
        block = modules[e.name]
        kept = [getattr(m, "top_k") for m in (block, *block.children()) if isinstance(getattr(m, "top_k", None), int)]
        assert all(k == e.top_k for k in kept), (e, kept)

    # A different seed gives different weights.
    other = zoo.build(arch, seed=1).model.state_dict()
    assert any(not torch.equal(sa[k], other[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_representative_archs(arch):
    _check(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", _buildable())
def test_every_arch(arch):
    try:
        _check(arch)
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))


# --- layer counts and options --------------------------------------------------------------------


def test_dense_prefix_gets_enough_layers():
    # DeepSeek-V3 keeps its dense prefix (first_k_dense_replace=3): 5 layers, MoE in the last 2.
    model = zoo.build("deepseek_v3")
    assert model.config.first_k_dense_replace == 3 and model.config.num_hidden_layers == 5
    assert [e.name for e in model.expected] == ["model.layers.3.mlp", "model.layers.4.mlp"]
    assert (model.config.n_group, model.config.topk_group, model.config.n_routed_experts) == (4, 2, 8)


def test_num_layers_overrides_the_depth():
    model = zoo.build("qwen2_moe", num_layers=5)
    assert model.config.num_hidden_layers == 5
    assert [e.layer for e in model.expected] == [0, 1, 2, 3, 4]
    jamba = zoo.build("jamba", num_layers=6)  # MoE every 2nd layer from layer 1
    assert [e.layer for e in jamba.expected] == [1, 3, 5]


def test_seq2seq_has_moe_in_both_stacks():
    model = zoo.build("switch_transformers")
    assert set(model.kwargs) == {"attention_mask", "decoder_input_ids"}
    stacks = {e.name.split(".")[0] for e in model.expected}
    assert stacks == {"encoder", "decoder"} and all(e.top_k == 1 for e in model.expected)


def test_dtype():
    model = zoo.build("mixtral", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())


def test_attention_experts_and_hash_routes():
    jetmoe = zoo.build("jetmoe")  # mixture of attention heads: a module under the attention holds experts
    assert [e.name for e in jetmoe.expected if e.kind == "attention"] == [
        "model.layers.0.self_attention.experts", "model.layers.1.self_attention.experts"
    ]
    # DeepSeek-V4's hash-routed layers get top_k distinct experts per token, not the all-zero table.
    v4 = zoo.build("deepseek_v4")
    table = v4.model.model.layers[0].mlp.gate.tid2eid
    assert (table[:, 0] != table[:, 1]).all() and table.unique().numel() == 8
