"""Small, random-initialised Hugging Face MoE models: the zoo moec is tested against.

Contract
--------
* ``make_hf_model(arch, overrides=None, experts_implementation="eager")`` returns
  ``(model, (input_ids_BS,))``: a freshly built model in eval mode and one example input of shape
  ``[2, 8]`` (Switch: ``(input_ids_BS, attention_mask_BS)``, see below); call it as
  ``model(*args)``. The same arguments give bitwise the same weights and inputs; the global RNG is left
  untouched. Nothing is downloaded: every model is built from a small config.
* ``HF_ARCHS`` maps an arch name to its config factory ``factory(**overrides) -> PreTrainedConfig``.
  Overrides are config keys; an unknown arch or key raises ``ValueError`` naming the valid ones.
* ``expected_moe_layers(model)`` lists ``(module path, num_experts, top_k)`` of every MoE block,
  derived from the model's *config* with the family's own layer rule, never by looking at modules
  (it is the oracle the compiler's detection is checked against). ``expected_moe_details`` adds
  hidden sizes and the shared-expert count.
* ``supported_experts_implementations(arch)`` lists the ``experts_implementation`` values that build
  and run on this machine for the arch (found by trying, cached).
* ``primary_output(out)`` picks the tensor to compare from a model output (``logits`` or
  ``last_hidden_state``).

Choices shared by every arch (why):
* hidden 64, 2 layers, 8 experts, top-2, vocab 128, expert intermediate 32: small enough that a
  compile takes seconds on 2 CPU cores.
* ``initializer_range = 0.125`` (about 1/sqrt(hidden)) instead of HF's 0.02: with 0.02 the MoE
  output is ~1% of the residual stream and a wrong MoE layer would still pass an fp32 ``atol`` on the
  logits. Layers that preserve scale make the experts' contribution visible.
* Dropout and router jitter are 0 and ``use_cache`` is False, so train mode is deterministic and the
  forward returns no cache object.
* Attention: ``sdpa`` where the family supports it, else ``eager``; both capture without graph
  breaks under ``torch.compile`` (the only breaks come from the eager experts loop's ``nonzero``).

Per-arch notes:
* deepseek_v3: ``first_k_dense_replace=1``, so layer 0 is a dense MLP and only layer 1 is MoE —
  a detector must tell the two apart. MLA needs ``num_key_value_heads == num_attention_heads``.
* gpt_oss: plain RoPE (its default YaRN config is meaningless at 64 positions); sdpa is not
  supported by the family, so attention is eager; alternating sliding (window 4) / full layers.
* switch_transformers: encoder-decoder with no decoder-only variant. We build
  ``SwitchTransformersEncoderModel`` (input_ids only, output ``last_hidden_state``): its two
  blocks are both sparse (``num_sparse_encoder_layers=2``). Routing is top-1 with a per-sequence,
  per-expert capacity; ``expert_capacity=64`` so no token is dropped for sequences up to 64 tokens
  (override it to exercise dropping). Experts are an ``nn.ModuleDict`` of ReLU MLPs; the family has
  no experts interface, so only ``experts_implementation="eager"`` exists. The example args carry an
  all-ones ``attention_mask``: the stack only builds a default mask when *not* compiling and then
  indexes it, so with ``attention_mask=None`` every compile of the stack raises inside dynamo, which
  silently falls back to eager for the whole frame (3 graphs, no counted graph break).

Legend: B batch, S sequence length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

__all__ = [
    "HF_ARCHS",
    "EXPERTS_IMPLEMENTATION_CANDIDATES",
    "ExpectedMoE",
    "make_hf_model",
    "expected_moe_layers",
    "expected_moe_details",
    "supported_experts_implementations",
    "primary_output",
]

HIDDEN = 64
NUM_LAYERS = 2
NUM_EXPERTS = 8
TOP_K = 2
VOCAB = 128
EXPERT_INTERMEDIATE = 32
BATCH, SEQ = 2, 8
SEED = 0

# The implementations that can run on a CPU. transformers also registers GPU-only ones
# (deepgemm, sonicmoe); trying those here would only test the absence of their kernels.
EXPERTS_IMPLEMENTATION_CANDIDATES = ("eager", "grouped_mm", "batched_mm")

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.125,
    attention_dropout=0.0,
    use_cache=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


class ExpectedMoE(NamedTuple):
    """One MoE block as the config describes it."""

    name: str  # module path from the model root, e.g. "model.layers.1.mlp"
    num_experts: int  # routed experts
    top_k: int
    hidden_size: int
    expert_hidden_size: int  # intermediate size of one routed expert
    # Always-on shared capacity in units of one routed expert's width: DeepSeek's n_shared_experts
    # (one fused MLP of width n*I); Qwen2-MoE's shared_expert_intermediate_size / I.
    num_shared_experts: int


@dataclass(frozen=True)
class _Arch:
    config_cls_name: str
    model_cls_name: str
    defaults: dict[str, Any]
    attn_implementation: str
    # (config) -> [(path relative to the base model, num_experts, top_k, expert I, n shared)]
    moe_layers: Callable[[Any], list[tuple[str, int, int, int, int]]] = field(repr=False)

    def config_cls(self) -> type:
        import transformers

        return getattr(transformers, self.config_cls_name)

    def model_cls(self) -> type:
        import transformers

        return getattr(transformers, self.model_cls_name)

    def valid_keys(self) -> set[str]:
        cls = self.config_cls()
        default = cls(**self.defaults)
        return set(default.to_dict()) | set(getattr(cls, "attribute_map", {})) | set(self.defaults)

    def config(self, **overrides: Any):
        unknown = sorted(set(overrides) - self.valid_keys())
        if unknown:
            raise ValueError(
                f"unknown config override(s) {unknown} for {self.config_cls_name}; "
                f"valid keys: {sorted(self.valid_keys())}"
            )
        return self.config_cls()(**{**self.defaults, **overrides})


def _every_layer(num_experts_key: str, inter_key: str):
    def layers(c) -> list[tuple[str, int, int, int, int]]:
        return [
            (f"layers.{i}.mlp", getattr(c, num_experts_key), c.num_experts_per_tok, getattr(c, inter_key), 0)
            for i in range(c.num_hidden_layers)
        ]

    return layers


def _qwen2_shared(c) -> int:
    # One shared MLP of width n*I counts as n shared experts, as the Qwen1.5-MoE release does
    # ("4 shared experts": 5632 = 4 * 1408) and as DeepSeek's n_shared_experts does.
    width, inter = c.shared_expert_intermediate_size, c.moe_intermediate_size
    return width // inter if width % inter == 0 else 1


def _qwen_layers(shared: Callable[[Any], int]):
    # Qwen{2,3}MoeDecoderLayer: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th.
    def layers(c) -> list[tuple[str, int, int, int, int]]:
        mlp_only = c.mlp_only_layers or []
        return [
            (f"layers.{i}.mlp", c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, shared(c))
            for i in range(c.num_hidden_layers)
            if i not in mlp_only and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
        ]

    return layers


def _deepseek_layers(c) -> list[tuple[str, int, int, int, int]]:
    # DeepseekV3DecoderLayer: dense MLP below first_k_dense_replace, MoE from there on.
    return [
        (f"layers.{i}.mlp", c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.n_shared_experts)
        for i in range(c.num_hidden_layers)
        if i >= c.first_k_dense_replace
    ]


def _switch_encoder_layers(c) -> list[tuple[str, int, int, int, int]]:
    # SwitchTransformersStack: block i is sparse when i % step == 1 or step == 1 (step 0: none).
    # In an encoder block, layer[0] is self-attention and layer[1] the feed-forward.
    step = c.encoder_sparse_step
    return [
        (f"encoder.block.{i}.layer.1.mlp", c.num_experts, 1, c.d_ff, 0)
        for i in range(c.num_layers)
        if step > 0 and (i % step == 1 or step == 1)
    ]


_ARCHS: dict[str, _Arch] = {
    "mixtral": _Arch(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=NUM_EXPERTS,
             num_experts_per_tok=TOP_K, router_jitter_noise=0.0),
        "sdpa",
        _every_layer("num_local_experts", "intermediate_size"),
    ),
    "qwen2_moe": _Arch(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        # norm_topk_prob False as in the released Qwen1.5-MoE: top-k weights are not renormalised.
        dict(_COMMON, intermediate_size=64, moe_intermediate_size=EXPERT_INTERMEDIATE,
             shared_expert_intermediate_size=64, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
             norm_topk_prob=False, decoder_sparse_step=1),
        "sdpa",
        # One shared MLP of width 2*I (counted as 2 shared experts), gated by sigmoid(shared_expert_gate).
        _qwen_layers(shared=_qwen2_shared),
    ),
    "qwen3_moe": _Arch(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # norm_topk_prob True as in the released Qwen3 MoE checkpoints.
        dict(_COMMON, intermediate_size=64, moe_intermediate_size=EXPERT_INTERMEDIATE,
             num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True, decoder_sparse_step=1),
        "sdpa",
        _qwen_layers(shared=lambda c: 0),
    ),
    "deepseek_v3": _Arch(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=EXPERT_INTERMEDIATE,
             n_routed_experts=NUM_EXPERTS, n_shared_experts=1, n_group=4, topk_group=2,
             num_experts_per_tok=TOP_K, first_k_dense_replace=1, routed_scaling_factor=2.5,
             norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16),
        "sdpa",
        _deepseek_layers,
    ),
    "olmoe": _Arch(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_experts=NUM_EXPERTS,
             num_experts_per_tok=TOP_K, norm_topk_prob=False),
        "sdpa",
        _every_layer("num_experts", "intermediate_size"),
    ),
    "gpt_oss": _Arch(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=NUM_EXPERTS,
             num_experts_per_tok=TOP_K, head_dim=16, sliding_window=4,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "eager",  # the family rejects sdpa
        _every_layer("num_local_experts", "intermediate_size"),
    ),
    "switch_transformers": _Arch(
        "SwitchTransformersConfig",
        "SwitchTransformersEncoderModel",
        dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=EXPERT_INTERMEDIATE, num_heads=4,
             num_layers=NUM_LAYERS, num_sparse_encoder_layers=NUM_LAYERS, num_decoder_layers=NUM_LAYERS,
             num_sparse_decoder_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, expert_capacity=64,
             router_jitter_noise=0.0, dropout_rate=0.0, use_cache=False, pad_token_id=0, eos_token_id=1,
             decoder_start_token_id=0),
        "eager",  # the family rejects sdpa
        _switch_encoder_layers,
    ),
}

HF_ARCHS: dict[str, Callable[..., Any]] = {name: arch.config for name, arch in _ARCHS.items()}


def _arch(name: str) -> _Arch:
    try:
        return _ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; valid archs: {sorted(_ARCHS)}") from None


def make_hf_model(
    arch: str, overrides: dict[str, Any] | None = None, experts_implementation: str = "eager"
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a seeded random ``arch`` model (eval mode) and its example args ``(input_ids_BS,)``
    (Switch: ``(input_ids_BS, attention_mask_BS)``)."""
    spec = _arch(arch)
    config = spec.config(**(overrides or {}))
    model_cls = spec.model_cls()
    if experts_implementation not in EXPERTS_IMPLEMENTATION_CANDIDATES:
        raise ValueError(
            f"unknown experts_implementation {experts_implementation!r}; "
            f"valid: {list(EXPERTS_IMPLEMENTATION_CANDIDATES)}"
        )
    # Families without the experts interface silently ignore the setting; refuse instead, so a test
    # parametrised over implementations cannot run the same model twice under two names.
    if experts_implementation != "eager" and not model_cls._can_set_experts_implementation():
        raise ValueError(f"{arch} has no experts interface; only experts_implementation='eager' exists")

    # fork_rng: HF initialises from the global RNG; seed it locally so builds are reproducible
    # and callers' RNG streams are not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_cls._from_config(config, attn_implementation=spec.attn_implementation)
    if model_cls._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
        got = model.config._experts_implementation
        if got != experts_implementation:
            raise ValueError(f"{arch}: asked for experts_implementation={experts_implementation!r}, got {got!r}")

    gen = torch.Generator().manual_seed(SEED)
    input_ids_BS = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=gen)  # 0-2 are special
    if arch == "switch_transformers":
        # SwitchTransformersStack builds a missing mask only when not compiling
        # (`if attention_mask is None and not is_torchdynamo_compiling()`), then indexes it: under
        # torch.compile a None mask raises inside the frame and dynamo silently runs it eagerly.
        return model.eval(), (input_ids_BS, torch.ones_like(input_ids_BS))
    return model.eval(), (input_ids_BS,)


def _base_prefix(model: nn.Module) -> str:
    # ForCausalLM wraps the decoder stack as `.model`; a bare base model has no prefix.
    if getattr(model, "config", None) is not None and model.config.model_type == "switch_transformers":
        return ""  # paths start at encoder./decoder. for every Switch class
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def expected_moe_details(model: nn.Module) -> list[ExpectedMoE]:
    """Every MoE block of a zoo model as its config describes it, in layer order."""
    config = model.config
    spec = _arch(config.model_type)
    if config.model_type == "switch_transformers" and type(model).__name__ != spec.model_cls_name:
        raise ValueError(f"expected_moe_details supports {spec.model_cls_name} for switch_transformers")
    hidden = config.d_model if config.model_type == "switch_transformers" else config.hidden_size
    prefix = _base_prefix(model)
    return [
        ExpectedMoE(prefix + path, e, k, hidden, inter, shared)
        for path, e, k, inter, shared in spec.moe_layers(config)
    ]


def expected_moe_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(module path, num_experts, top_k)`` of every MoE block, from the config."""
    return [(d.name, d.num_experts, d.top_k) for d in expected_moe_details(model)]


@functools.cache
def supported_experts_implementations(arch: str) -> list[str]:
    """The CPU experts implementations that build and run a forward for ``arch``."""
    supported = []
    for impl in EXPERTS_IMPLEMENTATION_CANDIDATES:
        try:
            model, args = make_hf_model(arch, experts_implementation=impl)
            with torch.no_grad():
                model(*args)
        except Exception:  # noqa: BLE001 - any failure means "not available here"
            continue
        supported.append(impl)
    return supported


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a compiled-vs-eager comparison should look at."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"no logits or last_hidden_state in {type(output).__name__}")
