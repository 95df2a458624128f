"""Every MoE architecture in the installed transformers, as a tiny random-initialised model.

Contract
--------
* ``moe_archs()`` finds the MoE architectures in the installed transformers from its own registries
  (``CONFIG_MAPPING``), not from a list of names: an arch is a model directory of transformers
  (``transformers/models/<arch>``) one of whose configs declares a routed-expert count
  (``EXPERT_COUNT_FIELDS``), itself or through a sub-config. Each ``ZooArch`` either says how it is
  built (``buildable``) or gives a one-line ``out_of_scope`` reason (no text model, a text decoder
  that is another arch's, ...).
* ``build(arch, seed=0, num_layers=None, dtype=torch.float32)`` returns a ``ZooModel``: a freshly
  built model in eval mode, the ``args``/``kwargs`` to call it with, ``output(out)`` (the tensor to
  compare), ``expected`` (the MoE blocks, from the config) and ``config``. It raises ``ZooUnavailable``
  with a one-line reason when the arch cannot be built or run eagerly on this machine. Nothing is
  downloaded. The same arguments give bitwise the same weights and inputs; the global RNG is left
  untouched.
* ``ZooModel.expected`` is an oracle: derived from the config with the family's own rule for which
  layers are MoE (``_LAYER_RULES``, keyed by config fields) and the experts' path that the config
  declares in its expert-parallel plan (``base_model_ep_plan``). It never looks at the built modules,
  and never at moec.

Choices shared by every arch (why; the same as ``moec.models.hf``):
* hidden 64, 8 routed experts, top-2, expert intermediate 32, 4 heads, vocab 128, inputs
  ``[2, 8]``: a capture check takes seconds on 2 CPU cores. A family keeps its own routing options
  (group-limited routing, shared experts, correction bias, scoring function, ...); only sizes shrink.
  Fields a family leaves ``None`` by default are filled in from ``_FAMILY``.
* ``initializer_range = 0.125`` (about 1/sqrt(hidden)) instead of HF's 0.02: with 0.02 the MoE output
  is ~1% of the residual stream and a wrong MoE layer would still pass an fp32 ``atol``.
* Every dropout, layer drop and router jitter is 0 and ``use_cache`` is False: train mode is
  deterministic and the forward returns no cache object.
* Attention: ``sdpa`` where the family supports it, else ``eager``.
* Layer count: per-layer lists (``layer_types``, ``mlp_layer_types``, ...) are left to the family's
  own ``__post_init__``, which derives them from the layer count. Without ``num_layers`` the zoo picks
  the fewest layers (at least 2) that give at least 2 MoE layers and every attention/mixer kind the
  family's pattern has (a dense prefix of 3 layers means 5 layers; Qwen3-Next's "full attention every
  4th layer" means 4).
* Hybrid families (Mamba, gated delta net, KDA, short convolutions) run transformers' reference
  PyTorch paths, which it picks by itself when mamba-ssm, causal-conv1d or fla are not installed.
* Multimodal families: the text decoder alone (the text sub-config and its causal-LM or text model).
  Encoder-decoder families: the whole seq2seq model, called with ``decoder_input_ids``, with MoE
  blocks in both stacks. Two bidirectional text encoders with MoE are built too (DiffusionGemma's
  denoiser, OpenAI's privacy filter): same capture problem, no causal mask.

What a family needs beyond that is in ``_FAMILY`` (config values) and ``_AFTER_BUILD`` (state a
checkpoint would load), each with its reason. Worth knowing when a check fails:
* PhiMoE's ``router_jitter_noise`` is sparsemixer's masking threshold, not noise. At 0 each of its
  two rounds keeps only the top logit, so both routing weights are exactly 1 and train mode samples
  nothing (at the family's 0.01 train mode draws Gumbel noise from the global RNG).
* DeepSeek-V4's hash-routed layers get a random token -> experts table (zeros would send every token
  to expert 0 twice).
* Switch and NLLB route per expert through ``nn.ModuleDict`` experts: an expert that gets no token has
  no gradient (None) after a backward.

Legend: B batch, S sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "EXPERT_COUNT_FIELDS",
    "ExpectedMoE",
    "ZooArch",
    "ZooModel",
    "ZooUnavailable",
    "build",
    "moe_archs",
    "tiny_config",
]

HIDDEN = 64
DENSE_INTERMEDIATE = 64
EXPERT_INTERMEDIATE = 32
NUM_EXPERTS = 8
TOP_K = 2
VOCAB = 128
BATCH, SEQ = 2, 8
FIRST_ORDINARY_TOKEN = 3  # 0-2 are pad/bos/eos in the tiny configs

# A config that declares one of these has routed experts. Listed most specific first: the first one a
# config declares names its routed-expert count (``num_experts`` is an alias elsewhere).
EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token", "moe_top_k")


class ZooUnavailable(RuntimeError):
    """The arch cannot be built or run eagerly here; the message is a one-line reason."""


@dataclass(frozen=True)
class ExpectedMoE:
    """One MoE block as the config describes it."""

    name: str  # module path from the model root, e.g. "model.layers.1.mlp"
    num_experts: int  # routed experts
    top_k: int
    layer: int  # index of the decoder (or encoder) layer holding it
    # "ffn": a feed-forward MoE; "attention": an attention module with routed experts (JetMoE's
    # mixture of attention heads: its `experts` child routes the query and output projections).
    kind: str = "ffn"
    # False for blocks a text-only input never reaches (ERNIE-4.5-VL's vision experts).
    runs_on_text: bool = True
    # LongCat-Flash's zero-computation experts: the router picks among num_experts + these, and a
    # token sent to one of them passes through unchanged (scaled by its weight).
    num_zero_experts: int = 0


@dataclass(frozen=True)
class ZooArch:
    """One MoE architecture found in the installed transformers."""

    name: str  # transformers' model directory, e.g. "mixtral", "nllb_moe"
    model_type: str  # the config that declares the experts, e.g. "aria_text", "nllb-moe"
    config_class: str
    model_class: str | None  # what ``build`` instantiates
    kind: str | None  # "causal-lm", "seq2seq" or "text-model" (a bare stack: last_hidden_state)
    out_of_scope: str | None = None  # why the zoo does not build it; None when it does

    @property
    def buildable(self) -> bool:
        return self.out_of_scope is None


@dataclass
class ZooModel:
    arch: str
    model: nn.Module  # eval mode
    args: tuple
    kwargs: dict[str, Any]
    expected: list[ExpectedMoE]
    config: Any
    output_key: str  # "logits" or "last_hidden_state"

    def output(self, out: Any) -> torch.Tensor:
        """The tensor a compiled-vs-eager comparison looks at."""
        value = out if isinstance(out, torch.Tensor) else getattr(out, self.output_key, None)
        if value is None and isinstance(out, (tuple, list)):
            value = out[0]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.arch}: no {self.output_key} in {type(out).__name__}")
        return value


# --- discovery -----------------------------------------------------------------------------------


def _declared_fields(config_cls: type) -> set[str]:
    """Fields a config class declares, with the aliases of its ``attribute_map``."""
    from transformers import PreTrainedConfig

    names: set[str] = set()
    for klass in config_cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, PreTrainedConfig) and klass is not PreTrainedConfig:
            names |= set(vars(klass).get("__annotations__", {}))
    return names | set(getattr(config_cls, "attribute_map", {}))


def _declares_experts(config_cls: type) -> bool:
    return any(f in _declared_fields(config_cls) for f in EXPERT_COUNT_FIELDS)


def _module_dir(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


def _sub_configs(config_cls: type) -> dict[str, type]:
    """``{key: config class}`` of a composite config's sub-configs (``AutoConfig`` ones resolved
    through their default model_type)."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out: dict[str, type] = {}
    for key, spec in (getattr(config_cls, "sub_configs_defaults", None) or {}).items():
        cls = spec.config_class
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedConfig)):
            cls = CONFIG_MAPPING[spec.model_type] if spec.model_type in CONFIG_MAPPING else None
        if cls is not None:
            out[key] = cls
    legacy = vars(config_cls).get("sub_configs")  # older composites (DBRX) list the classes directly
    if isinstance(legacy, dict):
        out.update(legacy)
    return out


def _experts_config(config):
    """The (sub-)config that holds the expert fields: the config itself, or DBRX's ``ffn_config``."""
    if _declares_experts(type(config)):
        return config
    for key in _sub_configs(type(config)):
        sub = getattr(config, key, None)
        if sub is not None and _declares_experts(type(sub)):
            return sub
    raise ValueError(f"{type(config).__name__} declares no routed experts")


def _modeling_module(arch: str):
    return importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")


def _model_classes(arch: str, config_cls: type) -> list[type]:
    from transformers import PreTrainedModel

    module = _modeling_module(arch)
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, PreTrainedModel)
        and obj.__module__ == module.__name__
        and getattr(obj, "config_class", None) is config_cls
    ]


def _pick_model_class(arch: str, model_type: str, config_cls: type) -> tuple[type | None, str | None, str | None]:
    """(model class, kind, reason none fits) for the config that declares the experts."""
    from transformers.models.auto import modeling_auto

    try:
        classes = _model_classes(arch, config_cls)
    except Exception as exc:  # noqa: BLE001 - an import error is a reason, not a crash
        return None, None, f"modeling module does not import: {type(exc).__name__}: {_one_line(exc)}"
    by_name = {c.__name__: c for c in classes}
    seq2seq = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if seq2seq in by_name:
        return by_name[seq2seq], "seq2seq", None
    causal = [c for c in classes if c.__name__.endswith("ForCausalLM")]
    if causal:
        return causal[0], "causal-lm", None
    base_name = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    bases = [by_name[base_name]] if base_name in by_name else [
        c for c in classes if c.__name__.endswith("Model") and not c.__name__.endswith("PreTrainedModel")
    ]
    if bases:
        return bases[0], "text-model", None
    takes = sorted({getattr(c, "main_input_name", "input_ids") for c in classes} - {"input_ids"})
    if classes and takes:
        return None, None, f"not a text model: {', '.join(sorted(by_name))} take {', '.join(takes)}"
    return None, None, f"no causal-LM or text model class for {config_cls.__name__}"


def _arch_entry(arch: str, candidates: list[str]) -> ZooArch:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # A multimodal family has several configs with experts: build its text config ("*_text"; the
    # shortest name, so Qwen3-Omni's thinker text before its talker text, vision MoE never).
    model_type = sorted(candidates, key=lambda mt: (not mt.endswith("_text"), len(mt), mt))[0]
    config_cls = CONFIG_MAPPING[model_type]
    model_cls, kind, reason = _pick_model_class(arch, model_type, config_cls)
    return ZooArch(
        arch, model_type, config_cls.__name__, model_cls.__name__ if model_cls else None, kind, reason
    )


@functools.cache
def moe_archs() -> list[ZooArch]:
    """Every MoE architecture of the installed transformers, sorted by name."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    by_dir: dict[str, dict[str, type]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        try:
            cls = CONFIG_MAPPING[model_type]
        except Exception:  # noqa: BLE001 - a broken registry entry is not an MoE arch
            continue
        by_dir.setdefault(_module_dir(model_type), {})[model_type] = cls

    archs: list[ZooArch] = []
    for arch, classes in sorted(by_dir.items()):
        candidates = [mt for mt, cls in classes.items() if _declares_experts(cls)]
        if candidates:
            archs.append(_arch_entry(arch, candidates))
            continue
        # The experts sit in a sub-config: the family's own (DBRX's ffn_config: build the family's
        # config), or another family's (a composite reusing that family's MoE decoder).
        nested = [
            (mt, cls, key, sub)
            for mt, cls in classes.items()
            for key, sub in _sub_configs(cls).items()
            if _declares_experts(sub)
        ]
        own = [mt for mt, _, _, sub in nested if not sub.model_type or _module_dir(sub.model_type) == arch]
        if own:
            archs.append(_arch_entry(arch, own))
        elif nested:
            mt, cls, key, sub = nested[0]
            reason = f"its {key} is {sub.model_type!r}: the MoE stack is the {_module_dir(sub.model_type)} arch's"
            archs.append(ZooArch(arch, mt, cls.__name__, None, None, reason))
    return archs


def _zoo_arch(name: str) -> ZooArch:
    found = {a.name: a for a in moe_archs()}
    if name not in found:
        raise ValueError(f"unknown MoE arch {name!r}; valid archs: {sorted(found)}")
    return found[name]


# --- tiny configs --------------------------------------------------------------------------------

# Set when the config declares the field (directly or as an ``attribute_map`` alias), in this order;
# a later key wins over an earlier alias of the same field.
_TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=DENSE_INTERMEDIATE,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.125,
    use_cache=False,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # Multi-head latent attention (DeepSeek-V2 style).
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # DeepSeek sparse attention's indexer: top-4 of 8 keys, so the indexer really selects.
    index_n_heads=2,
    index_num_heads=2,  # Kolibri-1.1's indexer: at most the query heads of one key head
    index_head_dim=16,
    index_topk=4,
    # Linear attention (gated delta net, KDA).
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_heads=4,
    linear_head_dim=16,
    # Mamba mixers (transformers picks their PyTorch path when mamba-ssm is not installed).
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_d_state=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    mamba_dt_rank=8,
    ssm_state_size=16,
    mamba_chunk_size=8,
    chunk_size=8,
)

# Fields whose default is None or 0 when the family does not use the feature: shrunk, never switched on.
_TINY_IF_SET: dict[str, Any] = dict(
    q_lora_rank=32,
    qk_rope_head_dim=8,  # 0 in GLM-5-Next, whose DSA layers have no RoPE
    sliding_window=4,
    sliding_window_size=4,
    attention_chunk_size=4,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    # Other widths some families declare.
    intermediate_size_mlp=DENSE_INTERMEDIATE,  # Llama-4's dense layers
    dense_intermediate_size=DENSE_INTERMEDIATE,  # MiniMax-M3's dense layers
    moe_hidden_size=HIDDEN,  # Muse-Spark's experts work in a projected space of this width
    o_lora_rank=16,  # DeepSeek-V4's grouped low-rank output projection
    hc_lowrank=16,  # Qwen4-Exp's hyper-connection mixer
    router_hidden_size=32,  # ZAYA's router MLP
)

# Widths of always-on shared experts, scaled with the routed experts: the family's default ratio
# (shared width / routed expert width) is kept, so "4 shared experts" stays 4.
_SHARED_WIDTH_FIELDS = (
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "shared_intermediate_size",
    "shared_experts_intermediate_size",
    "share_expert_dim",
)

_ZERO_PATTERNS = re.compile(r"dropout|pdrop|layerdrop|jitter")

# What a family needs beyond the generic shrinking, with the reason. A value that is a function of the
# layer count n is called with it (per-layer patterns the family's __post_init__ does not derive).
_FAMILY: dict[str, dict[str, Any]] = {
    # DBRX keeps its experts in ffn_config (ffn_hidden_size is one expert's width). rope_theta and
    # clip_qkv (8, as released) are set because transformers 5.23 reads both unconditionally.
    "dbrx": dict(
        ffn_config=dict(ffn_hidden_size=EXPERT_INTERMEDIATE, moe_num_experts=NUM_EXPERTS, moe_top_k=TOP_K),
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
    ),
    # DeepSeek-OCR-2's decoder (DeepSeek-V2 MoE with MHA) has no default layer kinds; layer 0 is
    # dense as in the released checkpoint.
    "deepseek_ocr2": dict(mlp_layer_types=lambda n: ["dense"] + ["sparse"] * (n - 1)),
    # Full-attention layers take their head_dim from global_head_dim (512 by default).
    "diffusion_gemma": dict(global_head_dim=16),
    # Doge's CDMoE retrieves experts by product keys: the expert count must be a square.
    "doge": dict(is_moe=True, num_experts=16),
    # dots.llm1 leaves these None (the released checkpoint: top-6 of 128 routed, 2 shared).
    "dots1": dict(n_shared_experts=2),
    # dots.llm3's sliding-window layers have MLA sizes of their own, passed as swa_* keywords.
    "dots3_note": dict(
        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=16,
        swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16,
    ),
    # ERNIE-4.5-VL: one expert width per modality (text, vision); its 3-D rotary sections
    # (22, 22, 20 of a 64-wide half) scale to 3, 3, 2 of 8.
    "ernie4_5_vl_moe": dict(
        moe_intermediate_size=[EXPERT_INTERMEDIATE, EXPERT_INTERMEDIATE],
        rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[3, 3, 2]),
    ),
    # Gemma-4's MoE variant: a router and experts beside the dense MLP in every layer. Full-attention
    # layers take their head_dim from global_head_dim; per-layer input embeddings (a second table of
    # vocab_size_per_layer_input = 262k rows) are off.
    "gemma4": dict(enable_moe_block=True, global_head_dim=16, hidden_size_per_layer_input=0),
    # GLM-4.5V's 3-D rotary sections must add up to the rotary half-width (16 * 0.5 / 2 = 4).
    "glm4v_moe": dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[1, 1, 2])
    ),
    # The indexer pools keys by index_kpool; index_topk must be a multiple of it.
    "glm5_next": dict(index_kpool=2),
    # HY-V4-VL's 3-D rotary sections (12, 10, 10 of a 32-wide half) must add up to qk_rope_head_dim / 2.
    "hy_v4_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
    # LFM2: short-convolution and attention layers, with no default pattern.
    "lfm2_moe": dict(layer_types=lambda n: _cycle(["conv", "full_attention"], n)),
    # LongCat-Flash: 256 zero-computation experts beside 512 routed ones, so 4 beside 8.
    "longcat_flash": dict(zero_expert_num=NUM_EXPERTS // 2),
    # Nemotron-H: one mixer per layer. The default pattern is a 4-layer demo with a dense MLP; the
    # released Nemotron-3 MoE models alternate Mamba and MoE layers with attention now and then.
    "nemotron_h": dict(layers_block_type=lambda n: _cycle(["linear_attention", "moe", "full_attention", "moe"], n)),
    # NLLB-MoE: top-2 with capacity (64: nothing dropped); every 2nd layer sparse in both stacks (the
    # family's default is every 4th), so 2 layers per stack already hold MoE.
    "nllb_moe": dict(
        d_model=HIDDEN, encoder_ffn_dim=EXPERT_INTERMEDIATE, decoder_ffn_dim=EXPERT_INTERMEDIATE,
        encoder_attention_heads=4, decoder_attention_heads=4, expert_capacity=64,
        encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=2, decoder_layers=lambda n: n,
    ),
    # Qwen4-Exp's indexed attention layers always build their QSA indexer (its fields default to None).
    "qwen4_exp": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2
    ),
    # Step-3.5/3.7's text model builds the sliding-window mask whatever its layer kinds are.
    "step3p7": dict(sliding_window=4),
    # Switch: top-1 with a per-expert capacity (64: nothing dropped at these sizes); every block
    # sparse in both stacks, as in moec.models.hf.
    "switch_transformers": dict(
        d_model=HIDDEN, d_kv=16, d_ff=EXPERT_INTERMEDIATE, num_heads=4, expert_capacity=64,
        encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0, num_decoder_layers=lambda n: n,
    ),
    # ZAYA supports top-1 routing only.
    "zaya": dict(num_experts_per_tok=1),
}


def _cycle(pattern: list[str], n: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(n)]


def _canonical(config_cls: type, key: str) -> str:
    return getattr(config_cls, "attribute_map", {}).get(key, key)


def _defaults(config_cls: type) -> dict[str, Any]:
    """Class-level defaults of the declared fields (no instance: some families' defaults do not
    construct, e.g. Gemma-4 needs an MoE-free per-layer config)."""
    out: dict[str, Any] = {}
    for klass in reversed(config_cls.__mro__):
        for f in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _layer_count_field(config_cls: type) -> str:
    """The field that counts decoder layers: ``num_hidden_layers`` or what it aliases; LongCat-Flash
    derives num_hidden_layers (attention sublayers, 2 per layer) from num_layers."""
    name = _canonical(config_cls, "num_hidden_layers")
    if isinstance(getattr(config_cls, name, None), property) and "num_layers" in _defaults(config_cls):
        return "num_layers"
    return name


def _tiny_kwargs(arch: ZooArch, num_layers: int) -> dict[str, Any]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch.model_type]
    declared = _declared_fields(cls)
    defaults = _defaults(cls)
    kw: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        # A declared field keeps its name even when attribute_map aliases it (Bailing declares n_group
        # and maps it to num_expert_group); an alias alone is passed as its target.
        if key in defaults:
            kw[key] = value
        elif key in declared:
            kw[_canonical(cls, key)] = value

    def default(key: str) -> Any:
        return defaults[key] if key in defaults else defaults.get(_canonical(cls, key))

    for key, value in _TINY.items():
        put(key, value)
    for key, value in _TINY_IF_SET.items():
        if default(key):
            put(key, value)

    # Routed experts: 8 of them, top-2, each EXPERT_INTERMEDIATE wide. Families without a separate
    # expert width (Mixtral, GPT-OSS, ...) use intermediate_size for the experts.
    expert_field = next((f for f in EXPERT_COUNT_FIELDS if f in declared), None)
    if expert_field is not None:  # else a sub-config holds them (DBRX, in _FAMILY)
        put(expert_field, NUM_EXPERTS)
    for key in TOP_K_FIELDS:
        if key in declared:
            put(key, TOP_K)
            break
    routed_width_field = "moe_intermediate_size" if "moe_intermediate_size" in declared else "intermediate_size"
    default_routed_width = default(routed_width_field)
    put(routed_width_field, EXPERT_INTERMEDIATE)
    for key in _SHARED_WIDTH_FIELDS:
        width = default(key)
        if key in declared and width and isinstance(default_routed_width, int) and default_routed_width > 0:
            put(key, EXPERT_INTERMEDIATE * max(1, round(width / default_routed_width)))
    # Group-limited routing (DeepSeek-V3): 4 groups of 2 experts, tokens pick from the best 2 groups.
    if (default("n_group") or 1) > 1:
        put("n_group", 4)
        put("topk_group", 2)
    # MLA uses as many key/value heads as query heads; where head_dim is its rotary part, it follows
    # qk_rope_head_dim.
    if "kv_lora_rank" in declared:
        put("num_key_value_heads", 4)
        if default("head_dim") is not None and default("head_dim") == default("qk_rope_head_dim"):
            put("head_dim", kw.get(_canonical(cls, "qk_rope_head_dim"), default("qk_rope_head_dim")))

    for name, value in defaults.items():
        if _ZERO_PATTERNS.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            kw[name] = 0.0
    # Per-layer lists sized for the released depth: the family's __post_init__ derives them again.
    default_depth = defaults.get(_layer_count_field(cls))
    for name, value in defaults.items():
        if isinstance(value, (list, tuple)) and default_depth and len(value) == default_depth:
            kw[name] = None
    kw[_layer_count_field(cls)] = num_layers

    for key, value in _FAMILY.get(arch.name, {}).items():
        kw[key] = value(num_layers) if callable(value) else value
    return kw


def tiny_config(arch: str, num_layers: int | None = None):
    """The tiny config ``build`` uses (``num_layers`` None: the fewest layers described above)."""
    spec = _zoo_arch(arch)
    if not spec.buildable:
        raise ZooUnavailable(f"{arch}: {spec.out_of_scope}")
    if num_layers is not None:
        return _make_config(spec, num_layers)
    return _make_config(spec, _default_num_layers(spec))


def _make_config(spec: ZooArch, num_layers: int):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    try:
        return CONFIG_MAPPING[spec.model_type](**_tiny_kwargs(spec, num_layers))
    except Exception as exc:  # noqa: BLE001 - the family refuses the tiny config: say which way
        raise ZooUnavailable(f"{spec.name}: tiny config rejected: {type(exc).__name__}: {_one_line(exc)}") from exc


def _mixer_kinds(config) -> set[str]:
    kinds = getattr(config, "layer_types", None)
    return set(kinds) if isinstance(kinds, (list, tuple)) else set()


@functools.cache
def _default_num_layers(spec: ZooArch, *, at_most: int = 12) -> int:
    reference = _mixer_kinds(_make_config(spec, at_most))
    for n in range(2, at_most + 1):
        config = _make_config(spec, n)
        moe_blocks = [e for e in _expected_for(spec, config) if e.kind == "ffn" and e.runs_on_text]
        if len(moe_blocks) >= 2 and _mixer_kinds(config) >= reference:
            return n
    return at_most


# --- the oracle ----------------------------------------------------------------------------------

_SPARSE = ("sparse", "moe", "hash_moe")

# Which decoder layers hold an MoE block, as each family's decoder layer decides it. The first rule
# whose field the config has (not None) and that has a say (does not return None) decides; a config
# with none of them is MoE in every layer.
_LAYER_RULES: tuple[tuple[str, Callable[[Any, int], bool | None]], ...] = (
    # Layers listed as dense (Qwen-MoE and descendants, Kolibri-1.1); the others as the rules below say.
    ("mlp_only_layers", lambda c, i: False if i in c.mlp_only_layers else None),
    # Nemotron-H: one mixer per layer; "moe" layers are MoE. (Jamba and Granite-MoE-Hybrid list only
    # their sequence mixers there: no "moe" entry, no say over the MLP.)
    ("layers_block_type", lambda c, i: c.layers_block_type[i] == "moe" if "moe" in c.layers_block_type else None),
    # Most recent families: an explicit per-layer MLP kind (DeepSeek-V4's hash-routed layers count).
    ("mlp_layer_types", lambda c, i: c.mlp_layer_types[i] in _SPARSE),
    # Llama-4: the listed layers.
    ("moe_layers", lambda c, i: i in c.moe_layers),
    # Jamba: layers_num_experts[i] > 1 (every expert_layer_period-th from expert_layer_offset).
    ("layers_num_experts", lambda c, i: c.layers_num_experts[i] > 1),
    # ERNIE-4.5: an interval inside [start, end].
    (
        "moe_layer_interval",
        lambda c, i: (i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= c.moe_layer_end_index,
    ),
    # Qwen-MoE and descendants: every decoder_sparse_step-th layer not in mlp_only_layers.
    (
        "decoder_sparse_step",
        lambda c, i: i not in (c.mlp_only_layers or []) and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0,
    ),
    # DeepSeek-V2/V3 and descendants: dense below first_k_dense_replace.
    ("first_k_dense_replace", lambda c, i: i >= c.first_k_dense_replace),
    # AFMoE, LFM2-MoE: dense below num_dense_layers.
    ("num_dense_layers", lambda c, i: i >= c.num_dense_layers),
    # Switches that turn MoE on for every layer (Doge, Gemma-4).
    ("is_moe", lambda c, i: bool(c.is_moe)),
    ("enable_moe_block", lambda c, i: bool(c.enable_moe_block)),
)


def _is_moe_layer(config, i: int) -> bool:
    for name, rule in _LAYER_RULES:
        if getattr(config, name, None) is not None and (verdict := rule(config, i)) is not None:
            return verdict
    return True


def _per_layer(value: Any, i: int) -> int:
    return value[i] if isinstance(value, (list, tuple)) else value


def _num_experts(config) -> int | list[int]:
    c = _experts_config(config)
    return next(getattr(c, f) for f in EXPERT_COUNT_FIELDS if getattr(c, f, None) is not None)


def _top_k(config) -> int | list[int]:
    c = _experts_config(config)
    return next(getattr(c, f) for f in TOP_K_FIELDS if getattr(c, f, None) is not None)


def _block_paths(config) -> list[tuple[str, bool]]:
    """``(path of the MoE block under a decoder layer, runs on text)`` from the expert-parallel plan
    the config declares: ``layers.*.mlp.experts`` -> ``mlp``; ``layers.*.experts`` -> the layer."""
    plan = {**(getattr(config, "base_model_tp_plan", None) or {}), **(getattr(config, "base_model_ep_plan", None) or {})}
    paths = []
    for key in plan:
        match = re.fullmatch(r"layers\.\*(?:\.(.+))?\.experts", key)
        if match:
            block = match.group(1) or ""
            paths.append((block, "vision" not in block))
    return sorted(set(paths))


# Families whose config plans do not name their experts: the MoE block's path in a decoder layer.
_BLOCK_PATHS_BY_ARCH: dict[str, list[tuple[str, bool]]] = {
    "dbrx": [("ffn", True)],
    "doge": [("mlp", True)],
    "jetmoe": [("mlp", True)],
    "jamba": [("feed_forward", True)],  # transformers 5.17's config has no plan; 5.23's names this path
}
# The decoder-layer list, where it is not `layers`.
_LAYERS_ATTR: dict[str, str] = {"dbrx": "blocks"}
# Routed attention experts, every layer: JetMoE's mixture of attention heads (the module under its
# attention that holds the router and the query and output projections of the FFN's expert count
# and top-k).
_ATTENTION_EXPERTS: dict[str, str] = {"jetmoe": "self_attention.experts"}


def _expected_for(spec: ZooArch, config) -> list[ExpectedMoE]:
    """The MoE blocks of a ``spec.model_class`` built from ``config``, from the config alone."""
    if spec.name == "switch_transformers":
        return _switch_expected(config)
    if spec.name == "nllb_moe":
        return _nllb_expected(config)
    layers_attr = _LAYERS_ATTR.get(spec.name, "layers")
    prefix = _base_prefix(spec)
    paths = _BLOCK_PATHS_BY_ARCH.get(spec.name) or _block_paths(config)
    if not paths:
        raise ZooUnavailable(f"{spec.name}: the config declares no experts path")
    n_layers = getattr(config, _layer_count_field(type(config)))
    num_experts, top_k = _num_experts(config), _top_k(config)
    zero = getattr(config, "zero_expert_num", None) or 0
    out = []
    for i in range(n_layers):
        if not _is_moe_layer(config, i):
            continue
        for block, on_text in paths:
            name = ".".join(p for p in (prefix, layers_attr, str(i), block) if p)
            out.append(ExpectedMoE(name, _per_layer(num_experts, i), _per_layer(top_k, i), i, "ffn", on_text, zero))
    if spec.name in _ATTENTION_EXPERTS:
        out += [
            ExpectedMoE(f"{prefix}.{layers_attr}.{i}.{_ATTENTION_EXPERTS[spec.name]}", num_experts, top_k, i, "attention")
            for i in range(n_layers)
        ]
    return sorted(out, key=lambda e: (e.layer, e.kind != "ffn", e.name))


# Causal LMs whose base_model_prefix names the multimodal checkpoint's attribute, not their own.
_BASE_ATTR: dict[str, str] = {"llama4": "model"}


def _base_prefix(spec: ZooArch) -> str:
    """Path of the decoder stack's owner: a causal LM's ``base_model_prefix`` (``model``), empty for
    a bare text model."""
    if spec.kind != "causal-lm":
        return ""
    return _BASE_ATTR.get(spec.name) or _model_class(spec).base_model_prefix


def _switch_expected(c) -> list[ExpectedMoE]:
    # SwitchTransformersStack: block i is sparse when i % step == 1 or step == 1 (step 0: none). The
    # feed-forward is layer[1] of an encoder block and layer[2] (after cross-attention) of a decoder's.
    out = []
    for stack, step, n, ff in (
        ("encoder", c.encoder_sparse_step, c.num_layers, 1),
        ("decoder", c.decoder_sparse_step, c.num_decoder_layers, 2),
    ):
        for i in range(n):
            if step > 0 and (i % step == 1 or step == 1):
                out.append(ExpectedMoE(f"{stack}.block.{i}.layer.{ff}.mlp", c.num_experts, 1, i))
    return out


def _nllb_expected(c) -> list[ExpectedMoE]:
    # NllbMoe{Encoder,Decoder}: layer i is sparse when (i + 1) % step == 0; top-2 routing.
    out = []
    for stack, step, n in (
        ("encoder", c.encoder_sparse_step, c.encoder_layers),
        ("decoder", c.decoder_sparse_step, c.decoder_layers),
    ):
        for i in range(n):
            if step > 0 and (i + 1) % step == 0:
                out.append(ExpectedMoE(f"model.{stack}.layers.{i}.ffn", c.num_experts, 2, i))
    return out


# --- building ------------------------------------------------------------------------------------


def _model_class(spec: ZooArch) -> type:
    return getattr(_modeling_module(spec.name), spec.model_class)


def _random_hash_routes(model: nn.Module, gen: torch.Generator) -> None:
    """DeepSeek-V4's hash-routed layers look experts up by token id in ``tid2eid``, which a checkpoint
    loads; left at its zero init it sends every token to expert 0 twice. Fill it with top_k distinct
    random experts per token, as the released fixed hash does."""
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor):
            vocab, top_k = table.shape
            table.copy_(torch.rand(vocab, module.num_experts, generator=gen).argsort(dim=-1)[:, :top_k])


# State a released checkpoint would load and a random init leaves degenerate: (model, generator).
_AFTER_BUILD: dict[str, Callable[[nn.Module, torch.Generator], None]] = {"deepseek_v4": _random_hash_routes}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def build(
    arch: str,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    smoke_run: bool = True,
    experts_implementation: str | None = None,
) -> ZooModel:
    """Build a seeded, tiny, random ``arch`` model (eval mode) and its example inputs. With
    ``smoke_run`` one eager no-grad forward runs first, so a family that cannot run here raises
    ``ZooUnavailable`` instead of failing later inside a caller's check. ``experts_implementation``
    picks transformers' experts implementation where the family has one (its ``grouped_mm``
    default cannot run in float64; ``"eager"`` can)."""
    spec = _zoo_arch(arch)
    if not spec.buildable:
        raise ZooUnavailable(f"{arch}: {spec.out_of_scope}")
    config = tiny_config(arch, num_layers)
    model_cls = _model_class(spec)
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    # fork_rng: HF initialises from the global RNG; seed it locally so builds are reproducible and
    # callers' RNG streams are not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = model_cls._from_config(config, attn_implementation=attn)
        except ImportError as exc:
            raise ZooUnavailable(f"{arch}: needs an optional package: {_one_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - report why, in one line
            raise ZooUnavailable(f"{arch}: model does not build: {type(exc).__name__}: {_one_line(exc)}") from exc
    if arch in _AFTER_BUILD:
        with torch.no_grad():
            _AFTER_BUILD[arch](model, torch.Generator().manual_seed(seed))
    model = model.to(dtype).eval()
    if experts_implementation is not None and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(experts_implementation)
        except (ValueError, NotImplementedError, AttributeError):
            pass  # a family without the experts interface keeps its own code

    gen = torch.Generator().manual_seed(seed)
    input_ids_BS = torch.randint(FIRST_ORDINARY_TOKEN, config.vocab_size, (BATCH, SEQ), generator=gen)
    kwargs: dict[str, Any] = {}
    if spec.kind == "seq2seq":
        # An explicit all-ones mask: Switch builds a missing mask only when not compiling (see hf.py).
        kwargs["attention_mask"] = torch.ones_like(input_ids_BS)
        kwargs["decoder_input_ids"] = torch.randint(
            FIRST_ORDINARY_TOKEN, config.vocab_size, (BATCH, SEQ), generator=gen
        )
    output_key = "last_hidden_state" if spec.kind == "text-model" else "logits"
    zoo_model = ZooModel(arch, model, (input_ids_BS,), kwargs, _expected_for(spec, config), config, output_key)
    if smoke_run:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                zoo_model.output(model(*zoo_model.args, **zoo_model.kwargs))
        except Exception as exc:  # noqa: BLE001 - report why, in one line
            raise ZooUnavailable(f"{arch}: does not run eagerly: {type(exc).__name__}: {_one_line(exc)}") from exc
    return zoo_model
