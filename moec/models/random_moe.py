"""Random MoE layers written the way people write them: the ground truth of moec's differential fuzzer.

Contract
--------
* ``draw(rng: random.Random) -> LayerSpec`` draws one layer from the space below; only sensible
  combinations are drawn (e.g. per-token gathered weights only over stacked weights, capacity
  only with its one-hot or masked-loop dispatch). ``LayerSpec`` is a frozen dataclass:
  ``spec.num_experts`` and ``spec.top_k`` are the ground truth a capture must report (for Expert
  Choice, ``top_k`` is the k of its capacity formula). ``describe(spec)`` is one readable line.
* ``build(spec, *, seed) -> (layer, make_input)``: ``layer`` is an ``nn.Module`` whose forward
  takes the hidden states, ``[T, H]`` or ``[B, S, H]`` as ``spec.input_rank`` says, and returns
  the same shape; ``make_input(num_tokens, seed=0, identical=False)`` gives such an input
  (``identical``: every token the same row, so every token routes alike). Deterministic given the
  seed; the global RNG is left as it was.
* The values of a layer depend only on its *semantics* (sizes, router, FFN form, biases, block)
  and the seed, never on its *presentation* (layout, container, matrix orientation, gate/up
  split, holder, dispatch spelling, names): ``canonical_weights(spec, seed)`` draws the values,
  every layout stores them its own way. ``variants(spec)`` lists the same layer in every
  applicable spelling and layout; built with one seed they compute the same function.
* No moec code is imported here: these layers are plain PyTorch, the oracle moec is tested against.

The space (``AXES`` lists every value)
-------------------------------------
* Sizes: E 2..16 (sometimes 24..64), k 1..min(E, 8) (k = E sometimes), H in {16, 32, 48, 64},
  I in {8, 16, 32, 48}; float32 mostly, bfloat16 sometimes. Input ``[T, H]`` (caller flattens) or
  ``[B, S, H]`` (the layer flattens with view, reshape or flatten).
* Routers: ``softmax_topk`` (renormalise none / sum / L1 / L2, routed scaling, optional correction
  bias as ERNIE-4.5 does), ``topk_softmax``, ``sigmoid_topk`` (correction bias as buffer or
  parameter, or none), ``grouped_topk`` (sigmoid or softmax scores, n groups keep m, group score
  max or sum of top-2, masked-out experts filled with 0 or -inf), ``capacity`` (Switch top-1 /
  GShard top-2 with drops: capacity fixed, ceil or floor of factor * T * k / E, priority
  token-major or first-choices-first), ``expert_choice`` (Zhou et al. 2022: each expert takes its
  top-C tokens, C = min(ceil(factor * T * k / E), T)). Router weight: ``nn.Linear`` with or without
  bias, a bare ``[E, H]`` parameter with ``F.linear`` or ``x @ w.t()``, a ``[H, E]`` parameter with
  ``x @ w``; inline in the layer or in a router module returning ``(weights, idx)``.
* FFN: gated (silu, gelu, gelu tanh, relu, GPT-OSS clamped SwiGLU with float ``alpha``/``limit``)
  with gate and up separate or fused gate-first, up-first or interleaved; ungated (relu, squared
  relu, gelu, gelu tanh, silu); biases or not; the activation a function or a module child.
* Layouts: ``list`` of E expert modules (``nn.ModuleList``, ``nn.ModuleDict``, or a plain module
  with children ``expert_0``..) whose matrices are ``nn.Linear``, a hand-written Linear-like class
  (weight ``[out, in]`` or ``[in, out]``) or bare parameters; ``stacked`` ``[E, F, H]`` / ``[E, H, F]``
  and ``[E, H, I]`` / ``[E, I, H]`` parameters; ``flat`` DBRX ``[E*I, H]`` viewed per expert in the
  forward. Held by the layer itself, by a child holding only the weights, or by a child whose
  forward does dispatch, experts and combine (``experts(x, idx, weights)``, Hugging Face style).
* Dispatch spellings: ``where_index_add``, ``nonzero_accumulate`` (``out[tok] += ...``),
  ``tolist_continue`` (``bincount().tolist()`` and ``if count == 0: continue``), ``expert_hit``
  (one-hot mask, loop over the experts hit), ``sort_split`` (argsort, ``split(counts.tolist())``,
  cat, unsort by index assignment), ``dense_mask`` (every expert on every token, weighted by a
  dense [T, E] matrix), ``gathered_bmm`` / ``gathered_einsum`` (``w[idx]`` per routed token);
  capacity: ``onehot_einsum`` ("tec,th->ech" dispatch and "tec,ech->th" combine), ``capacity_loop``;
  Expert Choice: ``ec_loop``, ``ec_batched`` (gather [E, C, H], index_add_ back), ``ec_onehot``.
* Blocks: ``x + moe(norm(x))`` computed by the layer itself (``nn.LayerNorm``, a hand-written RMSNorm
  or ``nn.RMSNorm``), a shared expert (plain, or times ``sigmoid(Linear(H, 1)(x))``), a dense MLP
  branch beside the experts.
* Names of classes and attributes are drawn from pools of real ones; none is required.

Legend: B batch, S sequence, T tokens, H hidden, I expert intermediate, F first-GEMM width (I, or
2I fused gated), E experts, K top-k, G groups, C capacity, N routed assignments (T*K).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AXES",
    "LayerSpec",
    "Names",
    "build",
    "canonical_weights",
    "describe",
    "draw",
    "spec_from_dict",
    "spec_to_dict",
    "spellings_for",
    "variants",
]

# ----------------------------------------------------------------------------------------------
# The space
# ----------------------------------------------------------------------------------------------

HIDDENS = (16, 32, 48, 64)
INTERMEDIATES = (8, 16, 32, 48)
LARGE_EXPERT_COUNTS = (24, 32, 48, 64)
DTYPES = ("float32", "bfloat16")
INPUT_RANKS = (2, 3)
FLATTENS = ("view", "reshape", "flatten")

TOKEN_ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "grouped_topk")
ROUTERS = TOKEN_ROUTERS + ("capacity", "expert_choice")
SCORE_FNS = ("softmax", "sigmoid")
RENORMS = ("none", "sum", "l1", "l2")
CORRECTION_BIASES = ("none", "buffer", "parameter")
GROUP_SCORES = ("max", "top2sum")
GROUP_FILLS = ("zero", "neg_inf")
ROUTED_SCALINGS = (1.0, 2.5, 16.0)
ROUTER_WEIGHTS = ("linear", "linear_bias", "param_flinear", "param_matmul_t", "param_he")
ROUTER_HOLDERS = ("inline", "module")
CAPACITY_MODES = ("fixed", "ceil", "floor")
CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
FIXED_CAPACITIES = (1, 2, 4, 8)
PRIORITIES = ("token", "choice")

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu")
UNGATED_ACTIVATIONS = ("relu", "relu2", "gelu", "gelu_tanh", "silu")
GATE_UPS = ("separate", "gate_first", "up_first", "interleaved")
CLAMP_ALPHAS = (1.702, 1.0)
CLAMP_LIMITS = (7.0, 1.0)

LAYOUTS = ("list", "stacked", "flat")
CONTAINERS = ("module_list", "module_dict", "children")
EXPERT_LINEARS = ("nn_linear", "custom_out_in", "custom_in_out", "raw_params")
FIRST_ORIENTS = ("FH", "HF")  # first matrix [.., F, H] (x @ w.T) or [.., H, F] (x @ w)
SECOND_ORIENTS = ("HI", "IH")  # second matrix [.., H, I] (a @ w.T) or [.., I, H] (a @ w)
HOLDERS = ("self", "child", "child_forward")

TOKEN_SPELLINGS = ("where_index_add", "nonzero_accumulate", "tolist_continue", "expert_hit", "sort_split",
                   "dense_mask", "gathered_bmm", "gathered_einsum")
CAPACITY_SPELLINGS = ("onehot_einsum", "capacity_loop")
EC_SPELLINGS = ("ec_loop", "ec_batched", "ec_onehot")
SPELLINGS = TOKEN_SPELLINGS + CAPACITY_SPELLINGS + EC_SPELLINGS
GATHERED = ("gathered_bmm", "gathered_einsum")

NORMS = ("none", "layernorm", "rmsnorm", "nn_rmsnorm")
SHARED_EXPERTS = ("none", "plain", "sigmoid_gated")

# Every axis and the values draw() reaches (tests check coverage). Sizes are checked separately.
AXES: dict[str, tuple] = {
    "dtype": DTYPES,
    "input_rank": INPUT_RANKS,
    "flatten": FLATTENS,
    "router": ROUTERS,
    "score_fn": SCORE_FNS,
    "renorm": RENORMS,
    "correction_bias": CORRECTION_BIASES,
    "group_score": GROUP_SCORES,
    "group_fill": GROUP_FILLS,
    "routed_scaling": ROUTED_SCALINGS,
    "router_weight": ROUTER_WEIGHTS,
    "router_holder": ROUTER_HOLDERS,
    "capacity_mode": CAPACITY_MODES,
    "capacity_factor": CAPACITY_FACTORS,
    "capacity": FIXED_CAPACITIES,
    "priority": PRIORITIES,
    "gated": (False, True),
    "activation": tuple(dict.fromkeys(GATED_ACTIVATIONS + UNGATED_ACTIVATIONS)),
    "gate_up": GATE_UPS,
    "ffn_bias": (False, True),
    "act_module": (False, True),
    "clamp_alpha": CLAMP_ALPHAS,
    "clamp_limit": CLAMP_LIMITS,
    "layout": LAYOUTS,
    "container": CONTAINERS,
    "expert_linear": EXPERT_LINEARS,
    "first": FIRST_ORIENTS,
    "second": SECOND_ORIENTS,
    "holder": HOLDERS,
    "spelling": SPELLINGS,
    "norm": NORMS,
    "shared_expert": SHARED_EXPERTS,
    "dense_branch": (False, True),
}

# Name pools, from real MoE code.
LAYER_CLASSES = ("MoE", "SparseMoeBlock", "MoELayer", "MixtureOfExperts", "SparseMLP", "MoEFeedForward", "TopKMoE",
                 "RoutedFFN", "ExpertLayer", "SwitchFFN", "MoeMLP", "SparseBlock", "MoEBlock", "ConditionalFFN",
                 "DecoderSparseLayer", "FeedForward")
EXPERT_CLASSES = ("Expert", "MLP", "FeedForward", "FFN", "ExpertMLP", "GLU", "SwiGLU", "DenseActDense", "Mlp",
                  "PositionwiseFF", "BlockSparseTop2MLP")
EXPERTS_CLASSES = ("Experts", "ExpertBank", "GroupedExperts", "ExpertWeights", "StackedFFN", "ParallelExperts",
                   "ExpertsMLP", "MoeExperts", "LocalExperts")
ROUTER_CLASSES = ("Router", "TopKRouter", "Gate", "Gating", "MoEGate", "TokenChooser", "TopKGate", "LearnedRouter")
MLP_CLASSES = ("SharedMLP", "DenseMLP", "MLP", "GatedMLP", "ResidualMLP", "FFN", "SharedExpertMLP")
NORM_CLASSES = ("RMSNorm", "LlamaRMSNorm", "T5LayerNorm", "RootMeanSquareNorm", "SimpleRMSNorm")
LINEAR_CLASSES = ("Dense", "Proj", "Linear", "QuantLinear", "ColumnLinear", "Projection", "FastLinear")
EXPERTS_ATTRS = ("experts", "ffns", "mlps", "expert_list", "local_experts", "moe_experts", "expert_modules",
                 "bank", "specialists", "ffn")
ROUTER_ATTRS = ("router", "gate", "gating", "wg", "router_proj", "switch", "classifier", "route", "selector",
                "w_gate", "gate_proj")
ROUTER_WEIGHT_ATTRS = ("weight", "proj", "linear", "classifier", "layer", "wg")
CORRECTION_BIAS_ATTRS = ("e_score_correction_bias", "expert_bias", "score_bias", "routing_bias", "bias_correction",
                         "moe_statics")
SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_mlp", "always_on", "common_expert", "dense_expert")
SHARED_GATE_ATTRS = ("shared_expert_gate", "shared_gate", "shared_scale_proj", "gate_shared", "shared_coef")
DENSE_ATTRS = ("dense_mlp", "residual_mlp", "mlp", "dense_ffn", "parallel_mlp", "dense")
NORM_ATTRS = ("norm", "ln", "pre_norm", "input_layernorm", "post_attention_layernorm", "ffn_norm", "layer_norm")
NUM_EXPERTS_ATTRS = ("num_experts", "n_experts", "num_local_experts", "moe_num_experts", "n_routed_experts",
                     "expert_count")
TOP_K_ATTRS = ("top_k", "k", "num_experts_per_tok", "moe_top_k", "topk", "n_activated", "experts_per_token")
LINEAR_WEIGHT_ATTRS = ("weight", "w", "kernel")
EXPERT_KEYS = ("expert_", "e", "ffn_", "mlp")  # ModuleDict keys / child names: prefix + index
# (gate, up, down, fused gate+up); ungated layers use (up, down).
GATED_MATRICES = (("w1", "w3", "w2", "w13"), ("gate_proj", "up_proj", "down_proj", "gate_up_proj"),
                  ("wi_0", "wi_1", "wo", "wi"), ("fc_gate", "fc_in", "fc_out", "fc_gate_in"),
                  ("gate", "up", "down", "gate_up"), ("linear_g", "linear_v", "linear_o", "linear_gv"),
                  ("w_gate", "w_up", "w_down", "w_gate_up"), ("W_g", "W_in", "W_out", "W_gi"),
                  ("w1", "v1", "w2", "w1v1"), ("mlp_gate", "mlp_in", "mlp_out", "mlp1"))
UNGATED_MATRICES = (("", "fc1", "fc2", ""), ("", "fc_in", "fc_out", ""), ("", "wi", "wo", ""),
                    ("", "c_fc", "c_proj", ""), ("", "dense_h_to_4h", "dense_4h_to_h", ""),
                    ("", "lin1", "lin2", ""), ("", "up", "down", ""), ("", "w1", "w2", ""),
                    ("", "up_proj", "down_proj", ""), ("", "mlp1", "mlp2", ""))

# Fixed attribute names the layers use for their own configuration (the pools must avoid them).
_CONFIG_ATTRS = frozenset({"act_fn", "alpha", "limit", "n_group", "topk_group", "routed_scaling_factor",
                           "capacity_factor", "expert_capacity", "norm_topk_prob", "hidden_size", "training",
                           "forward"})


@dataclasses.dataclass(frozen=True)
class Names:
    layer_class: str = "SparseMoeBlock"
    expert_class: str = "Expert"
    experts_class: str = "Experts"
    router_class: str = "Router"
    mlp_class: str = "MLP"
    norm_class: str = "RMSNorm"
    linear_class: str = "Dense"
    experts: str = "experts"
    router: str = "gate"
    router_weight: str = "weight"
    correction_bias: str = "e_score_correction_bias"
    shared: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"
    dense: str = "dense_mlp"
    norm: str = "norm"
    num_experts: str = "num_experts"
    top_k: str = "top_k"
    linear_weight: str = "weight"
    expert_key: str = "expert_"
    matrices: tuple = ("w1", "w3", "w2", "w13")  # (gate, up, down, fused); ungated: ("", in, out, "")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    num_experts: int = 8
    top_k: int = 2
    hidden: int = 32
    intermediate: int = 16
    dtype: str = "float32"
    input_rank: int = 2
    flatten: str = "reshape"
    # router
    router: str = "softmax_topk"
    score_fn: str = "softmax"  # what grouped_topk scores with; the other routers imply theirs
    renorm: str = "none"
    correction_bias: str = "none"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    group_fill: str = "neg_inf"
    routed_scaling: float = 1.0
    router_weight: str = "linear"
    router_holder: str = "inline"
    capacity_mode: str = "ceil"
    capacity: int = 4
    capacity_factor: float = 1.25
    priority: str = "token"
    # expert FFN
    gated: bool = True
    activation: str = "silu"
    gate_up: str = "separate"
    ffn_bias: bool = False
    act_module: bool = False
    clamp_alpha: float = 1.702
    clamp_limit: float = 7.0
    # expert layout
    layout: str = "list"
    container: str = "module_list"
    expert_linear: str = "nn_linear"
    first: str = "FH"
    second: str = "HI"
    holder: str = "self"
    spelling: str = "where_index_add"
    # block
    norm: str = "none"
    shared_expert: str = "none"
    shared_intermediate: int = 16
    dense_branch: bool = False
    names: Names = Names()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def spellings_for(router: str, layout: str) -> tuple[str, ...]:
    """The dispatch spellings that make sense for a router family and an expert layout."""
    if router == "capacity":
        return CAPACITY_SPELLINGS
    if router == "expert_choice":
        return EC_SPELLINGS
    if layout == "list":
        return tuple(s for s in TOKEN_SPELLINGS if s not in GATHERED)
    return TOKEN_SPELLINGS


def holders_for(spec: LayerSpec) -> tuple[str, ...]:
    """Who holds the experts: a list is a child anyway; only token-choice layers hand routing to an
    ``experts(x, idx, weights)`` child."""
    token_choice = spec.router in TOKEN_ROUTERS
    if spec.layout == "list":
        return ("self", "child_forward") if token_choice else ("self",)
    return HOLDERS if token_choice else ("self", "child")


def _draw_sizes(rng: random.Random, router: str) -> tuple[int, int, int, int, int]:
    """(E, k, G, m, ...) with the router's constraints: grouped routing needs E divisible by G
    groups and k <= m * E / G; capacity routers are top-1 (Switch) or top-2 (GShard)."""
    while True:
        E = rng.choice(LARGE_EXPERT_COUNTS) if rng.random() < 0.12 else rng.randint(2, 16)
        kmax = min(E, 8)
        if router == "capacity":
            k = rng.choice((1, 2)) if E >= 2 else 1
        elif E <= 8 and rng.random() < 0.15:
            k = E
        else:
            k = rng.randint(1, kmax)
        G = m = 1
        if router == "grouped_topk":
            groups = [g for g in (2, 3, 4, 8) if E % g == 0 and g < E]
            if not groups:
                continue
            G = rng.choice(groups)
            m = rng.randint(1, max(1, G - 1))
            if k > m * (E // G):
                continue
        return E, k, G, m, kmax


def _draw_names(rng: random.Random, gated: bool) -> Names:
    return Names(
        layer_class=rng.choice(LAYER_CLASSES),
        expert_class=rng.choice(EXPERT_CLASSES),
        experts_class=rng.choice(EXPERTS_CLASSES),
        router_class=rng.choice(ROUTER_CLASSES),
        mlp_class=rng.choice(MLP_CLASSES),
        norm_class=rng.choice(NORM_CLASSES),
        linear_class=rng.choice(LINEAR_CLASSES),
        experts=rng.choice(EXPERTS_ATTRS),
        router=rng.choice(ROUTER_ATTRS),
        router_weight=rng.choice(ROUTER_WEIGHT_ATTRS),
        correction_bias=rng.choice(CORRECTION_BIAS_ATTRS),
        shared=rng.choice(SHARED_ATTRS),
        shared_gate=rng.choice(SHARED_GATE_ATTRS),
        dense=rng.choice(DENSE_ATTRS),
        norm=rng.choice(NORM_ATTRS),
        num_experts=rng.choice(NUM_EXPERTS_ATTRS),
        top_k=rng.choice(TOP_K_ATTRS),
        linear_weight=rng.choice(LINEAR_WEIGHT_ATTRS),
        expert_key=rng.choice(EXPERT_KEYS),
        matrices=rng.choice(GATED_MATRICES if gated else UNGATED_MATRICES),
    )


def draw(rng: random.Random) -> LayerSpec:
    """One layer from the space; every axis value is reachable (see ``AXES``)."""
    router = rng.choices(ROUTERS, weights=(25, 12, 15, 18, 15, 15))[0]
    E, k, G, m, _ = _draw_sizes(rng, router)
    H, I = rng.choice(HIDDENS), rng.choice(INTERMEDIATES)
    kw: dict = dict(num_experts=E, top_k=k, hidden=H, intermediate=I, num_groups=G, topk_groups=m, router=router)
    kw["dtype"] = "bfloat16" if rng.random() < 0.15 else "float32"
    kw["input_rank"] = rng.choice(INPUT_RANKS)
    kw["flatten"] = rng.choice(FLATTENS)

    # router
    kw["router_weight"] = rng.choice(ROUTER_WEIGHTS)
    if router == "softmax_topk":
        kw["score_fn"] = "softmax"
        kw["renorm"] = rng.choice(RENORMS)
        kw["correction_bias"] = rng.choices(CORRECTION_BIASES, weights=(80, 10, 10))[0]
        kw["routed_scaling"] = rng.choices(ROUTED_SCALINGS, weights=(80, 10, 10))[0]
    elif router == "topk_softmax":
        kw["score_fn"] = "softmax"
    elif router == "sigmoid_topk":
        kw["score_fn"] = "sigmoid"
        kw["renorm"] = rng.choice(RENORMS)
        kw["correction_bias"] = rng.choice(CORRECTION_BIASES)
        kw["routed_scaling"] = rng.choices(ROUTED_SCALINGS, weights=(60, 20, 20))[0]
    elif router == "grouped_topk":
        kw["score_fn"] = rng.choice(SCORE_FNS)
        kw["renorm"] = rng.choice(RENORMS)
        kw["correction_bias"] = rng.choice(CORRECTION_BIASES)
        kw["routed_scaling"] = rng.choices(ROUTED_SCALINGS, weights=(50, 30, 20))[0]
        top2 = E // G >= 2
        kw["group_score"] = rng.choice(GROUP_SCORES) if top2 else "max"
        # A 0 fill only means "excluded" while every kept score is positive: no correction bias.
        kw["group_fill"] = "neg_inf" if kw["correction_bias"] != "none" else rng.choice(GROUP_FILLS)
    elif router == "capacity":
        kw["score_fn"] = "softmax"
        kw["renorm"] = rng.choice(("none", "sum")) if k == 2 else "none"
        kw["capacity_mode"] = rng.choice(CAPACITY_MODES)
        kw["capacity"] = rng.choice(FIXED_CAPACITIES)
        kw["capacity_factor"] = rng.choice(CAPACITY_FACTORS)
        kw["priority"] = rng.choice(PRIORITIES) if k == 2 else "token"
    else:  # expert_choice
        kw["score_fn"] = "softmax"
        kw["capacity_mode"] = "ceil"
        kw["capacity_factor"] = rng.choice(CAPACITY_FACTORS)
    kw["router_holder"] = rng.choice(ROUTER_HOLDERS) if router in TOKEN_ROUTERS else "inline"

    # expert FFN
    gated = rng.random() < 0.65
    kw["gated"] = gated
    kw["activation"] = rng.choice(GATED_ACTIVATIONS if gated else UNGATED_ACTIVATIONS)
    kw["act_module"] = rng.random() < 0.3
    if kw["activation"] == "clamped_swiglu":
        kw["clamp_alpha"], kw["clamp_limit"] = rng.choice(CLAMP_ALPHAS), rng.choice(CLAMP_LIMITS)

    # layout and spelling
    layout = rng.choices(LAYOUTS, weights=(45, 40, 15))[0]
    kw["layout"] = layout
    kw["ffn_bias"] = layout != "flat" and rng.random() < 0.35
    kw["gate_up"] = rng.choice(GATE_UPS) if gated and layout != "flat" else "separate"
    kw["container"] = rng.choice(CONTAINERS)
    kw["expert_linear"] = rng.choice(EXPERT_LINEARS)
    kw["first"], kw["second"] = (("FH", "IH") if layout == "flat"
                                 else (rng.choice(FIRST_ORIENTS), rng.choice(SECOND_ORIENTS)))
    kw["spelling"] = rng.choice(spellings_for(router, layout))

    # block
    kw["norm"] = rng.choices(NORMS, weights=(55, 15, 15, 15))[0]
    kw["shared_expert"] = rng.choices(SHARED_EXPERTS, weights=(60, 20, 20))[0]
    kw["shared_intermediate"] = rng.choice((I, 2 * I))
    kw["dense_branch"] = rng.random() < 0.15

    spec = LayerSpec(**kw)
    spec = dataclasses.replace(spec, holder=rng.choice(holders_for(spec)))
    for _ in range(100):
        spec = dataclasses.replace(spec, names=_draw_names(rng, gated))
        if _names_ok(spec):
            return spec
    raise AssertionError("could not draw distinct attribute names")  # pragma: no cover


def _layer_attrs(spec: LayerSpec) -> list[str]:
    """The attribute names the layer module itself sets (they must be distinct)."""
    n = spec.names
    attrs = [n.num_experts, n.top_k, n.router]
    if spec.router_holder == "inline" and spec.correction_bias != "none":
        attrs.append(n.correction_bias)
    if spec.layout == "list" or spec.holder != "self":
        attrs.append(n.experts)
    else:
        attrs += _matrix_attrs(spec)
    if spec.shared_expert != "none":
        attrs.append(n.shared)
    if spec.shared_expert == "sigmoid_gated":
        attrs.append(n.shared_gate)
    if spec.dense_branch:
        attrs.append(n.dense)
    if spec.norm != "none":
        attrs.append(n.norm)
    return attrs


def _matrix_attrs(spec: LayerSpec) -> list[str]:
    gate, up, down, fused = spec.names.matrices
    if not spec.gated:
        names = [up, down]
    elif spec.gate_up == "separate":
        names = [gate, up, down]
    else:
        names = [fused, down]
    if spec.ffn_bias:
        names += [f"{m}_bias" for m in names]
    return names


def _names_ok(spec: LayerSpec) -> bool:
    """Every module's attribute names are distinct identifiers that do not shadow the layers' own
    configuration attributes."""
    n = spec.names
    counts = [n.num_experts, n.top_k]
    groups = [_layer_attrs(spec)]
    if spec.router_holder == "module":
        groups.append([n.router_weight, *counts] + ([n.correction_bias] if spec.correction_bias != "none" else []))
    if spec.layout != "list" and spec.holder != "self":
        groups.append(_matrix_attrs(spec) + counts)
    for attrs in groups:
        if len(set(attrs)) != len(attrs) or set(attrs) & _CONFIG_ATTRS:
            return False
    return all(m.isidentifier() for m in _matrix_attrs(spec))


def spec_to_dict(spec: LayerSpec) -> dict:
    """The spec as JSON-ready values; ``spec_from_dict`` inverts it."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> LayerSpec:
    names = d.get("names", {})
    names = Names(**{**names, "matrices": tuple(names.get("matrices", Names().matrices))})
    return LayerSpec(**{**d, "names": names})


def describe(spec: LayerSpec) -> str:
    """One line saying what the layer computes and how it is written."""
    s = spec
    dtype = "bf16" if s.dtype == "bfloat16" else "fp32"
    parts = [f"E={s.num_experts} k={s.top_k} H={s.hidden} I={s.intermediate} {dtype}",
             "[T,H]" if s.input_rank == 2 else f"[B,S,H]({s.flatten})"]
    r = s.router
    if r == "grouped_topk":
        r += f"({s.score_fn}, G={s.num_groups} keep {s.topk_groups}, {s.group_score}, fill {s.group_fill})"
    elif r == "capacity":
        cap = s.capacity if s.capacity_mode == "fixed" else f"{s.capacity_mode}({s.capacity_factor}*T*k/E)"
        r += f"(C={cap}, {s.priority}-priority)"
    elif r == "expert_choice":
        r += f"(C=ceil({s.capacity_factor}*T*k/E))"
    extras = []
    if s.renorm != "none":
        extras.append(f"renorm {s.renorm}")
    if s.correction_bias != "none":
        extras.append(f"bias {s.correction_bias}")
    if s.routed_scaling != 1.0:
        extras.append(f"x{s.routed_scaling}")
    parts.append(r + (" [" + ", ".join(extras) + "]" if extras else ""))
    parts.append(f"router {s.router_weight}/{s.router_holder}")
    act = s.activation + (f"(a={s.clamp_alpha}, lim={s.clamp_limit})" if s.activation == "clamped_swiglu" else "")
    ffn = ("gated " + act + f" {s.gate_up}") if s.gated else ("ungated " + act)
    parts.append(ffn + (" +bias" if s.ffn_bias else "") + (" (act module)" if s.act_module else ""))
    if s.layout == "list":
        parts.append(f"list({s.container}, {s.expert_linear}, {s.first}/{s.second}, holder {s.holder})")
    else:
        parts.append(f"{s.layout}({s.first}/{s.second}, holder {s.holder})")
    parts.append(s.spelling)
    block = []
    if s.norm != "none":
        block.append(f"x+moe({s.norm}(x))")
    if s.shared_expert != "none":
        block.append(f"shared {s.shared_expert} I={s.shared_intermediate}")
    if s.dense_branch:
        block.append("dense branch")
    if block:
        parts.append("block: " + ", ".join(block))
    parts.append(f"class {s.names.layer_class}")
    return " | ".join(parts)


def variants(spec: LayerSpec) -> list[LayerSpec]:
    """The same layer (same semantics, so the same function for one seed) in every applicable
    dispatch spelling and expert layout, cycling through containers, Linear kinds, matrix
    orientations, gate/up splits and holders. The first entry is ``spec`` itself."""
    out = [spec]
    layouts = ["list", "stacked"] + ([] if spec.ffn_bias else ["flat"])
    i = 0
    for layout in layouts:
        for spelling in spellings_for(spec.router, layout):
            i += 1
            v = dataclasses.replace(
                spec,
                layout=layout,
                spelling=spelling,
                container=CONTAINERS[i % len(CONTAINERS)],
                expert_linear=EXPERT_LINEARS[i % len(EXPERT_LINEARS)],
                first="FH" if layout == "flat" else FIRST_ORIENTS[i % 2],
                second="IH" if layout == "flat" else SECOND_ORIENTS[(i // 2) % 2],
                gate_up="separate" if layout == "flat" or not spec.gated else GATE_UPS[i % len(GATE_UPS)],
            )
            holders = holders_for(v)
            v = dataclasses.replace(v, holder=holders[i % len(holders)])
            if not _names_ok(v):
                v = dataclasses.replace(v, names=Names(matrices=Names().matrices if spec.gated
                                                       else UNGATED_MATRICES[0]))
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def canonical_weights(spec: LayerSpec, seed: int) -> dict[str, Tensor]:
    """Every value a layer of ``spec``'s semantics may use, float32, drawn in one fixed order from
    ``seed``: router ``router_w [E, H]``, ``router_b [E]``, ``correction_bias [E]``; experts
    ``gate``/``up [E, I, H]``, ``down [E, H, I]``, ``b_gate``/``b_up [E, I]``, ``b_down [E, H]``
    (ungated experts use ``up`` and ``down``); shared expert ``s_*`` (intermediate
    ``shared_intermediate``), its gate ``s_gate_w [1, H]``; dense branch ``d_*`` (ungated GELU,
    intermediate 2I); norm ``norm_w``/``norm_b [H]``. Fan-in scaled normals keep each part O(1);
    biases and gate vectors are nonzero."""
    E, H, I, Is = spec.num_experts, spec.hidden, spec.intermediate, spec.shared_intermediate
    Id = 2 * I
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(shape, generator=g) * std

    w = {
        "router_w": normal(E, H, std=H**-0.5),
        "router_b": normal(E, std=0.5),
        # nonzero, comparable to the spread of the scores it shifts (sigmoid ~0.2, softmax ~1/E)
        "correction_bias": normal(E, std=1.0) * (0.1 if spec.score_fn == "sigmoid" else 0.5 / E),
        "gate": normal(E, I, H, std=H**-0.5),
        "up": normal(E, I, H, std=H**-0.5),
        "down": normal(E, H, I, std=I**-0.5),
        "b_gate": normal(E, I, std=0.1),
        "b_up": normal(E, I, std=0.1),
        "b_down": normal(E, H, std=0.1),
        "s_gate": normal(Is, H, std=H**-0.5),
        "s_up": normal(Is, H, std=H**-0.5),
        "s_down": normal(H, Is, std=Is**-0.5),
        "s_b_gate": normal(Is, std=0.1),
        "s_b_up": normal(Is, std=0.1),
        "s_b_down": normal(H, std=0.1),
        "s_gate_w": normal(1, H, std=2 * H**-0.5),
        "d_up": normal(Id, H, std=H**-0.5),
        "d_down": normal(H, Id, std=Id**-0.5),
        "d_b_up": normal(Id, std=0.1),
        "d_b_down": normal(H, std=0.1),
        "norm_w": 1.0 + normal(H, std=0.1),
        "norm_b": normal(H, std=0.1),
    }
    return w


def _fuse(gate: Tensor, up: Tensor, mode: str, dim: int) -> Tensor:
    """Gate and up fused along ``dim`` (>= 0) as a fused layout stores them: gate then up, up then
    gate, or interleaved rows (gate 0, up 0, gate 1, ...; GPT-OSS's ``[..., ::2]`` / ``[..., 1::2]``)."""
    if mode == "gate_first":
        return torch.cat([gate, up], dim=dim)
    if mode == "up_first":
        return torch.cat([up, gate], dim=dim)
    assert mode == "interleaved", mode
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


# ----------------------------------------------------------------------------------------------
# Building blocks the layers are written with
# ----------------------------------------------------------------------------------------------


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACT_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "relu2": _relu2,
}


class ReLUSquared(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).pow(2)


def _act_module(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
            "relu": nn.ReLU, "relu2": ReLUSquared}[name]()


def _split_gate_up(h: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    if mode == "gate_first":
        gate, up = h.chunk(2, dim=-1)
    elif mode == "up_first":
        up, gate = h.chunk(2, dim=-1)
    else:
        gate, up = h[..., ::2], h[..., 1::2]
    return gate, up


class _FFNAct:
    """The hidden activation of an expert: ``act(h)`` ungated, ``act(gate) * up`` gated, or
    GPT-OSS's clamped SwiGLU. ``g`` is the gate GEMM's output when gate and up are separate
    matrices, else None and ``h`` holds both halves."""

    def _init_act(self, spec: LayerSpec) -> None:
        self._gated = spec.gated
        self._gate_up = spec.gate_up
        self._clamped = spec.activation == "clamped_swiglu"
        if self._clamped:
            self.alpha = float(spec.clamp_alpha)
            self.limit = float(spec.clamp_limit)
        elif spec.act_module:
            self.act_fn = _act_module(spec.activation)
        else:
            self._act_fn = _ACT_FUNCS[spec.activation]

    def _act(self, x: Tensor) -> Tensor:
        if "act_fn" in self._modules:
            return self.act_fn(x)
        return self._act_fn(x)

    def _hidden_act(self, h: Tensor, g: Optional[Tensor] = None) -> Tensor:
        if not self._gated:
            return self._act(h)
        gate, up = (g, h) if g is not None else _split_gate_up(h, self._gate_up)
        if self._clamped:
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            return (up + 1) * glu
        return self._act(gate) * up


class _LinearLike(nn.Module):
    """A hand-written Linear that is not ``nn.Linear``: weight ``[out, in]`` used with
    ``x @ w.t()`` or ``[in, out]`` used with ``x @ w`` (Flax's kernel)."""

    def __init__(self, weight_out_in: Tensor, bias: Optional[Tensor], in_out: bool, weight_name: str):
        super().__init__()
        self._in_out = in_out
        self._weight_name = weight_name
        setattr(self, weight_name, _param(weight_out_in.t() if in_out else weight_out_in))
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: Tensor) -> Tensor:
        w = getattr(self, self._weight_name)
        y = x @ w if self._in_out else x @ w.t()
        if self.bias is not None:
            y = y + self.bias
        return y


def _linear(spec: LayerSpec, kind: str, weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
    """A Linear of ``kind`` ("nn_linear", "custom_out_in", "custom_in_out") holding ``weight [out, in]``."""
    if kind == "nn_linear":
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin
    cls = _named_class(spec.names.linear_class, (_LinearLike,))
    return cls(weight, bias, kind == "custom_in_out", spec.names.linear_weight)


def _named_class(name: str, bases: tuple, attrs: Optional[dict] = None) -> type:
    """A class called ``name`` (users name their modules; capture must not rely on it)."""
    return type(name, bases, dict(attrs or {}))


def _matmul(x: Tensor, w: Tensor, out_in: bool) -> Tensor:
    return x @ w.t() if out_in else x @ w


class _MatrixExpert(_FFNAct, nn.Module):
    """One expert whose matrices are Linear-like children (``nn.Linear`` or not)."""

    def __init__(self, spec: LayerSpec, w: dict[str, Tensor], e: int):
        super().__init__()
        self._init_act(spec)
        gate_n, up_n, down_n, fused_n = spec.names.matrices
        kind = spec.expert_linear
        b = spec.ffn_bias
        self._names = (None, up_n, down_n)
        if spec.gated and spec.gate_up == "separate":
            setattr(self, gate_n, _linear(spec, kind, w["gate"][e], w["b_gate"][e] if b else None))
            setattr(self, up_n, _linear(spec, kind, w["up"][e], w["b_up"][e] if b else None))
            self._names = (gate_n, up_n, down_n)
        elif spec.gated:
            fused_w = _fuse(w["gate"][e], w["up"][e], spec.gate_up, dim=0)
            fused_b = _fuse(w["b_gate"][e], w["b_up"][e], spec.gate_up, dim=0) if b else None
            setattr(self, fused_n, _linear(spec, kind, fused_w, fused_b))
            self._names = (None, fused_n, down_n)
        else:
            setattr(self, up_n, _linear(spec, kind, w["up"][e], w["b_up"][e] if b else None))
        setattr(self, down_n, _linear(spec, kind, w["down"][e], w["b_down"][e] if b else None))

    def forward(self, x: Tensor) -> Tensor:
        gate_n, in_n, out_n = self._names
        g = getattr(self, gate_n)(x) if gate_n is not None else None
        h = getattr(self, in_n)(x)
        return getattr(self, out_n)(self._hidden_act(h, g))


class _ParamExpert(_FFNAct, nn.Module):
    """One expert holding its matrices as bare parameters, ``[out, in]`` or ``[in, out]``."""

    def __init__(self, spec: LayerSpec, w: dict[str, Tensor], e: int):
        super().__init__()
        self._init_act(spec)
        gate_n, up_n, down_n, fused_n = spec.names.matrices
        self._first_out_in, self._second_out_in = spec.first == "FH", spec.second == "HI"
        b = spec.ffn_bias

        def put(name: str, weight: Tensor, bias: Optional[Tensor], out_in: bool) -> None:
            setattr(self, name, _param(weight if out_in else weight.t()))
            setattr(self, f"{name}_bias", None if bias is None else _param(bias))

        if spec.gated and spec.gate_up == "separate":
            put(gate_n, w["gate"][e], w["b_gate"][e] if b else None, self._first_out_in)
            put(up_n, w["up"][e], w["b_up"][e] if b else None, self._first_out_in)
            self._names = (gate_n, up_n, down_n)
        elif spec.gated:
            put(fused_n, _fuse(w["gate"][e], w["up"][e], spec.gate_up, 0),
                _fuse(w["b_gate"][e], w["b_up"][e], spec.gate_up, 0) if b else None, self._first_out_in)
            self._names = (None, fused_n, down_n)
        else:
            put(up_n, w["up"][e], w["b_up"][e] if b else None, self._first_out_in)
            self._names = (None, up_n, down_n)
        put(down_n, w["down"][e], w["b_down"][e] if b else None, self._second_out_in)

    def _matrix(self, name: str, x: Tensor, out_in: bool) -> Tensor:
        y = _matmul(x, getattr(self, name), out_in)
        bias = getattr(self, f"{name}_bias")
        return y if bias is None else y + bias

    def forward(self, x: Tensor) -> Tensor:
        gate_n, in_n, out_n = self._names
        g = self._matrix(gate_n, x, self._first_out_in) if gate_n is not None else None
        h = self._matrix(in_n, x, self._first_out_in)
        return self._matrix(out_n, self._hidden_act(h, g), self._second_out_in)


class _MLP(_FFNAct, nn.Module):
    """A dense MLP (shared expert or dense branch) with ``nn.Linear`` children."""

    def __init__(self, spec: LayerSpec, gate: Optional[Tensor], up: Tensor, down: Tensor,
                 b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor]):
        super().__init__()
        self._init_act(spec)
        self.gate_proj = None
        if gate is not None:
            self.gate_proj = _linear(spec, "nn_linear", gate, b_gate)
        self.up_proj = _linear(spec, "nn_linear", up, b_up)
        self.down_proj = _linear(spec, "nn_linear", down, b_down)

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x) if self.gate_proj is not None else None
        return self.down_proj(self._hidden_act(self.up_proj(x), g))


class _RMSNorm(nn.Module):
    """Llama's RMSNorm, hand-written."""

    def __init__(self, weight: Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight = _param(weight)
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x32.to(dtype)


# ----------------------------------------------------------------------------------------------
# Routers. Each is a function of (self, x_TH) on the module holding the router weight and config.
# ----------------------------------------------------------------------------------------------


def _logits_linear(self, x_TH: Tensor) -> Tensor:
    return self._router_w(x_TH)


def _logits_flinear(self, x_TH: Tensor) -> Tensor:
    return F.linear(x_TH, self._router_w)


def _logits_matmul_t(self, x_TH: Tensor) -> Tensor:
    return x_TH @ self._router_w.t()


def _logits_he(self, x_TH: Tensor) -> Tensor:
    return torch.matmul(x_TH, self._router_w)


_LOGITS = {"linear": _logits_linear, "linear_bias": _logits_linear, "param_flinear": _logits_flinear,
           "param_matmul_t": _logits_matmul_t, "param_he": _logits_he}


def _renormalise(self, weights_TK: Tensor) -> Tensor:
    if self._renorm == "sum":
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    elif self._renorm == "l1":  # DBRX's torch.norm, guarded like the sum: saturated sigmoids can all be 0
        weights_TK = weights_TK / torch.norm(weights_TK, p=1, dim=-1, keepdim=True).clamp(min=1e-20)
    elif self._renorm == "l2":
        weights_TK = F.normalize(weights_TK, p=2.0, dim=-1)
    if self.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * self.routed_scaling_factor
    return weights_TK


def _route_softmax_topk(self, x_TH: Tensor) -> tuple[Tensor, Tensor]:
    probs_TE = F.softmax(self._router_logits(x_TH), dim=-1, dtype=torch.float32)
    if self._corr_bias is not None:  # ERNIE-4.5: the bias moves the choice, not the weights
        idx_TK = torch.topk(probs_TE + self._corr_bias, self._K, dim=-1).indices
        weights_TK = probs_TE.gather(1, idx_TK)
    else:
        weights_TK, idx_TK = torch.topk(probs_TE, self._K, dim=-1)
    return _renormalise(self, weights_TK).to(x_TH.dtype), idx_TK


def _route_topk_softmax(self, x_TH: Tensor) -> tuple[Tensor, Tensor]:
    top_TK, idx_TK = torch.topk(self._router_logits(x_TH), self._K, dim=-1)
    weights_TK = F.softmax(top_TK, dim=1, dtype=torch.float)
    return weights_TK.to(x_TH.dtype), idx_TK


def _route_sigmoid_topk(self, x_TH: Tensor) -> tuple[Tensor, Tensor]:
    scores_TE = self._router_logits(x_TH).float().sigmoid()
    choice_TE = scores_TE if self._corr_bias is None else scores_TE + self._corr_bias.unsqueeze(0)
    _, idx_TK = torch.topk(choice_TE, k=self._K, dim=-1, sorted=False)
    weights_TK = scores_TE.gather(1, idx_TK)
    return _renormalise(self, weights_TK).to(x_TH.dtype), idx_TK


def _route_grouped_topk(self, x_TH: Tensor) -> tuple[Tensor, Tensor]:
    logits_TE = self._router_logits(x_TH).float()
    scores_TE = logits_TE.sigmoid() if self._score_fn == "sigmoid" else logits_TE.softmax(dim=-1)
    choice_TE = scores_TE if self._corr_bias is None else scores_TE + self._corr_bias.unsqueeze(0)
    T, E = choice_TE.shape
    grouped_TGX = choice_TE.view(T, self.n_group, E // self.n_group)
    if self._group_score == "max":
        group_scores_TG = grouped_TGX.max(dim=-1).values
    else:
        group_scores_TG = grouped_TGX.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG)
    group_mask_TG.scatter_(1, group_idx, 1)
    score_mask_TE = group_mask_TG.unsqueeze(-1).expand(T, self.n_group, E // self.n_group).reshape(T, -1)
    fill = 0.0 if self._group_fill == "zero" else float("-inf")
    masked_TE = choice_TE.masked_fill(~score_mask_TE.bool(), fill)
    idx_TK = torch.topk(masked_TE, k=self._K, dim=-1, sorted=False)[1]
    weights_TK = scores_TE.gather(1, idx_TK)
    return _renormalise(self, weights_TK).to(x_TH.dtype), idx_TK


_ROUTES = {"softmax_topk": _route_softmax_topk, "topk_softmax": _route_topk_softmax,
           "sigmoid_topk": _route_sigmoid_topk, "grouped_topk": _route_grouped_topk}


def _capacity_of(self, T) -> int:
    if self._capacity_mode == "fixed":
        return self.expert_capacity
    c = self.capacity_factor * T * self._K / self._E
    if self._capacity_mode == "ceil":
        return math.ceil(c)
    return max(int(c), 1)


def _route_capacity(self, x_TH: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Switch (k=1) / GShard (k=2) routing with an expert capacity. Returns the weights [T, K],
    the kept assignments one-hot [T, K, E] and each assignment's slot in its expert [T, K]."""
    T = x_TH.shape[0]
    E, K = self._E, self._K
    probs_TE = F.softmax(self._router_logits(x_TH), dim=-1, dtype=torch.float32)
    weights_TK, idx_TK = torch.topk(probs_TE, K, dim=-1)
    if self._renorm == "sum":
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    capacity = _capacity_of(self, T)
    mask_TKE = F.one_hot(idx_TK, num_classes=E)
    if self._priority == "token":  # token-major: token 0's choices, then token 1's, ...
        pos_TKE = torch.cumsum(mask_TKE.reshape(-1, E), dim=0).reshape(T, K, E) - 1
    else:  # every token's first choice before any second choice (GShard)
        pos_KTE = torch.cumsum(mask_TKE.transpose(0, 1).reshape(-1, E), dim=0).reshape(K, T, E) - 1
        pos_TKE = pos_KTE.transpose(0, 1)
    keep_TKE = mask_TKE * (pos_TKE < capacity)
    slot_TK = (pos_TKE * keep_TKE).sum(dim=-1)
    return weights_TK.to(x_TH.dtype), keep_TKE, slot_TK


# ----------------------------------------------------------------------------------------------
# Expert computation per layout: one expert on its rows, all experts batched, gathered per row.
# ----------------------------------------------------------------------------------------------


class _ListExperts:
    """Experts as E modules in a container."""

    def _expert(self, e) -> nn.Module:
        c = self._experts_container
        if self._container == "module_list":
            return c[e]
        if self._container == "module_dict":
            return c[self._expert_key + str(e)]
        return getattr(c, self._expert_key + str(e))

    def _ffn_one(self, e, x_nH: Tensor) -> Tensor:
        return self._expert(e)(x_nH)

    def _ffn_experts(self, x_ENH: Tensor) -> Tensor:
        return torch.stack([self._expert(e)(x_ENH[e]) for e in range(self._E)])


class _StackedExperts:
    """Experts as stacked [E, ., .] parameters (flat [E*I, H] ones are viewed as stacked by their
    accessors)."""

    def _ffn_one(self, e, x_nH: Tensor) -> Tensor:
        g = None
        h = _matmul(x_nH, self._w_in[e], self._first_out_in)
        if self._b_in is not None:
            h = h + self._b_in[e]
        if self._w_gate is not None:
            g = _matmul(x_nH, self._w_gate[e], self._first_out_in)
            if self._b_gate is not None:
                g = g + self._b_gate[e]
        y = _matmul(self._hidden_act(h, g), self._w_out[e], self._second_out_in)
        if self._b_out is not None:
            y = y + self._b_out[e]
        return y

    def _ffn_experts(self, x_ENH: Tensor) -> Tensor:
        first_eq = "enh,efh->enf" if self._first_out_in else "enh,ehf->enf"
        h = torch.einsum(first_eq, x_ENH, self._w_in)
        if self._b_in is not None:
            h = h + self._b_in[:, None, :]
        g = None
        if self._w_gate is not None:
            g = torch.einsum(first_eq, x_ENH, self._w_gate)
            if self._b_gate is not None:
                g = g + self._b_gate[:, None, :]
        a = self._hidden_act(h, g)
        if self._second_out_in:
            y = torch.bmm(a, self._w_out.transpose(1, 2))
        else:
            y = torch.bmm(a, self._w_out)
        if self._b_out is not None:
            y = y + self._b_out[:, None, :]
        return y

    def _gathered_gemm(self, x_NX: Tensor, w_NXY: Tensor, out_in: bool, use_einsum: bool) -> Tensor:
        if use_einsum:
            return torch.einsum("nx,nyx->ny" if out_in else "nx,nxy->ny", x_NX, w_NXY)
        w = w_NXY.transpose(1, 2) if out_in else w_NXY
        return torch.bmm(x_NX.unsqueeze(1), w).squeeze(1)

    def _ffn_gathered(self, x_NH: Tensor, idx_N: Tensor, use_einsum: bool) -> Tensor:
        h = self._gathered_gemm(x_NH, self._w_in[idx_N], self._first_out_in, use_einsum)
        if self._b_in is not None:
            h = h + self._b_in[idx_N]
        g = None
        if self._w_gate is not None:
            g = self._gathered_gemm(x_NH, self._w_gate[idx_N], self._first_out_in, use_einsum)
            if self._b_gate is not None:
                g = g + self._b_gate[idx_N]
        y = self._gathered_gemm(self._hidden_act(h, g), self._w_out[idx_N], self._second_out_in, use_einsum)
        if self._b_out is not None:
            y = y + self._b_out[idx_N]
        return y


# ----------------------------------------------------------------------------------------------
# Dispatch spellings: (self, x_TH, weights_TK, idx_TK) -> out_TH on the module holding the experts.
# ----------------------------------------------------------------------------------------------


def _dispatch_where_index_add(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    out_TH = torch.zeros_like(x_TH)
    for e in range(self._E):
        tok, slot = torch.where(idx_TK == e)
        y = self._ffn_one(e, x_TH[tok]) * weights_TK[tok, slot, None]
        out_TH.index_add_(0, tok, y.to(x_TH.dtype))
    return out_TH


def _dispatch_nonzero_accumulate(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    out_TH = x_TH.new_zeros(x_TH.shape)
    for e in range(self._E):
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        out_TH[tok] += self._ffn_one(e, x_TH[tok]) * weights_TK[tok, slot].unsqueeze(-1)
    return out_TH


def _dispatch_tolist_continue(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    counts = torch.bincount(idx_TK.flatten(), minlength=self._E).tolist()
    out_TH = torch.zeros_like(x_TH)
    for e, count in enumerate(counts):
        if count == 0:
            continue
        tok, slot = torch.where(idx_TK == e)
        out_TH.index_add_(0, tok, self._ffn_one(e, x_TH[tok]) * weights_TK[tok, slot, None])
    return out_TH


def _dispatch_expert_hit(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    # Hugging Face's eager experts loop: visit only the experts some token picked.
    final_TH = torch.zeros_like(x_TH)
    expert_mask_EKT = F.one_hot(idx_TK, num_classes=self._E).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask_EKT.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        e = int(expert_idx[0])
        slot, tok = torch.where(expert_mask_EKT[e])
        current = self._ffn_one(e, x_TH[tok]) * weights_TK[tok, slot, None]
        final_TH.index_add_(0, tok, current.to(final_TH.dtype))
    return final_TH


def _dispatch_sort_split(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    T, H = x_TH.shape
    K = idx_TK.shape[1]
    idx_N = idx_TK.reshape(-1)
    order_N = torch.argsort(idx_N, stable=True)
    counts = torch.bincount(idx_N, minlength=self._E).tolist()
    chunks = torch.split(x_TH[order_N // K], counts, dim=0)
    y_sorted_NH = torch.cat([self._ffn_one(e, chunk) for e, chunk in enumerate(chunks)], dim=0)
    y_NH = torch.empty_like(y_sorted_NH)
    y_NH[order_N] = y_sorted_NH
    return (y_NH.view(T, K, H) * weights_TK.unsqueeze(-1)).sum(dim=1)


def _dispatch_dense_mask(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
    T, H = x_TH.shape
    dense_TE = torch.zeros(T, self._E, dtype=weights_TK.dtype, device=x_TH.device).scatter(1, idx_TK, weights_TK)
    y_ETH = self._ffn_experts(x_TH.unsqueeze(0).expand(self._E, T, H))
    return torch.einsum("te,eth->th", dense_TE, y_ETH)


def _dispatch_gathered(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor, use_einsum: bool) -> Tensor:
    T, H = x_TH.shape
    K = idx_TK.shape[1]
    x_NH = x_TH.repeat_interleave(K, dim=0)  # row n is token n // K
    y_NH = self._ffn_gathered(x_NH, idx_TK.reshape(-1), use_einsum)
    return torch.einsum("tkh,tk->th", y_NH.view(T, K, H), weights_TK)


def _dispatch_gathered_bmm(self, x_TH, weights_TK, idx_TK):
    return _dispatch_gathered(self, x_TH, weights_TK, idx_TK, use_einsum=False)


def _dispatch_gathered_einsum(self, x_TH, weights_TK, idx_TK):
    return _dispatch_gathered(self, x_TH, weights_TK, idx_TK, use_einsum=True)


_TOKEN_DISPATCH = {
    "where_index_add": _dispatch_where_index_add, "nonzero_accumulate": _dispatch_nonzero_accumulate,
    "tolist_continue": _dispatch_tolist_continue, "expert_hit": _dispatch_expert_hit,
    "sort_split": _dispatch_sort_split, "dense_mask": _dispatch_dense_mask,
    "gathered_bmm": _dispatch_gathered_bmm, "gathered_einsum": _dispatch_gathered_einsum,
}


def _moe_token_choice(self, x_TH: Tensor) -> Tensor:
    weights_TK, idx_TK = self._route(x_TH)
    return self._experts_dispatch(x_TH, weights_TK, idx_TK)


def _moe_capacity_onehot(self, x_TH: Tensor) -> Tensor:
    weights_TK, keep_TKE, slot_TK = _route_capacity(self, x_TH)
    capacity = _capacity_of(self, x_TH.shape[0])
    slot_TKC = F.one_hot(slot_TK, num_classes=capacity)
    dispatch_TEC = torch.einsum("tke,tkc->tec", keep_TKE.to(x_TH.dtype), slot_TKC.to(x_TH.dtype))
    combine_TEC = torch.einsum("tk,tke,tkc->tec", weights_TK, keep_TKE.to(x_TH.dtype), slot_TKC.to(x_TH.dtype))
    x_ECH = torch.einsum("tec,th->ech", dispatch_TEC, x_TH)
    y_ECH = self._ffn_experts(x_ECH)
    return torch.einsum("tec,ech->th", combine_TEC, y_ECH)


def _moe_capacity_loop(self, x_TH: Tensor) -> Tensor:
    weights_TK, keep_TKE, _ = _route_capacity(self, x_TH)
    combine_TE = (weights_TK.unsqueeze(-1) * keep_TKE.to(weights_TK.dtype)).sum(dim=1)
    routed_TE = keep_TKE.sum(dim=1) > 0
    out_TH = torch.zeros_like(x_TH)
    for e in range(self._E):
        tok = torch.nonzero(routed_TE[:, e]).squeeze(-1)
        out_TH.index_add_(0, tok, self._ffn_one(e, x_TH[tok]) * combine_TE[tok, e].unsqueeze(-1))
    return out_TH


def _route_expert_choice(self, x_TH: Tensor) -> tuple[Tensor, Tensor]:
    """Expert Choice: every expert takes its C highest-scoring tokens."""
    T = x_TH.shape[0]
    probs_TE = F.softmax(self._router_logits(x_TH), dim=-1, dtype=torch.float32)
    capacity = min(math.ceil(self.capacity_factor * T * self._K / self._E), T)
    gates_EC, index_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
    return gates_EC.to(x_TH.dtype), index_EC


def _moe_ec_loop(self, x_TH: Tensor) -> Tensor:
    gates_EC, index_EC = _route_expert_choice(self, x_TH)
    out_TH = torch.zeros_like(x_TH)
    for e in range(self._E):
        tok = index_EC[e]
        out_TH.index_add_(0, tok, self._ffn_one(e, x_TH[tok]) * gates_EC[e].unsqueeze(-1))
    return out_TH


def _moe_ec_batched(self, x_TH: Tensor) -> Tensor:
    gates_EC, index_EC = _route_expert_choice(self, x_TH)
    H = x_TH.shape[-1]
    y_ECH = self._ffn_experts(x_TH[index_EC]) * gates_EC.unsqueeze(-1)
    out_TH = torch.zeros_like(x_TH)
    return out_TH.scatter_add_(0, index_EC.reshape(-1, 1).expand(-1, H), y_ECH.reshape(-1, H))


def _moe_ec_onehot(self, x_TH: Tensor) -> Tensor:
    gates_EC, index_EC = _route_expert_choice(self, x_TH)
    P_ECT = F.one_hot(index_EC, num_classes=x_TH.shape[0]).to(x_TH.dtype)
    x_ECH = torch.einsum("ect,th->ech", P_ECT, x_TH)
    y_ECH = self._ffn_experts(x_ECH)
    return torch.einsum("ect,ec,ech->th", P_ECT, gates_EC, y_ECH)


_MOE = {"onehot_einsum": _moe_capacity_onehot, "capacity_loop": _moe_capacity_loop, "ec_loop": _moe_ec_loop,
        "ec_batched": _moe_ec_batched, "ec_onehot": _moe_ec_onehot}


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def _layer_forward(self, hidden_states: Tensor) -> Tensor:
    if self._input_rank == 3:
        batch, seq, hidden = hidden_states.shape
        if self._flatten == "view":
            x_TH = hidden_states.view(-1, hidden)
        elif self._flatten == "reshape":
            x_TH = hidden_states.reshape(batch * seq, hidden)
        else:
            x_TH = hidden_states.flatten(0, 1)
    else:
        x_TH = hidden_states
    h_TH = self._norm_mod(x_TH) if self._norm_mod is not None else x_TH
    out_TH = self._moe(h_TH)
    if self._shared_mod is not None:
        shared_TH = self._shared_mod(h_TH)
        if self._shared_gate_mod is not None:
            shared_TH = torch.sigmoid(self._shared_gate_mod(h_TH)) * shared_TH
        out_TH = out_TH + shared_TH
    if self._dense_mod is not None:
        out_TH = out_TH + self._dense_mod(h_TH)
    if self._norm_mod is not None:
        out_TH = x_TH + out_TH
    if self._input_rank == 3:
        return out_TH.view(batch, seq, hidden)
    return out_TH


def _path(*attrs: str) -> property:
    """A read-only alias of ``self.a.b...``: the layer's code reads its parts through these, so
    the parts themselves can carry any name."""

    def get(self):
        obj = self
        for a in attrs:
            obj = getattr(obj, a)
        return obj

    return property(get)


def _flat_view(*attrs: str, num_experts: int) -> property:
    """DBRX: a flat [E*I, H] parameter viewed as [E, I, H] inside the forward."""

    def get(self):
        obj = self
        for a in attrs:
            obj = getattr(obj, a)
        return obj.view(num_experts, -1, obj.shape[-1])

    return property(get)


def _config(module: nn.Module, spec: LayerSpec) -> None:
    """The expert count and top-k a module keeps, under its drawn names."""
    setattr(module, spec.names.num_experts, spec.num_experts)
    setattr(module, spec.names.top_k, spec.top_k)


def _router_setup(spec: LayerSpec, w: dict[str, Tensor], module: nn.Module, weight_attr: str) -> dict:
    """Puts the router weight (and correction bias) on ``module``; returns the class attributes
    (aliases, routing functions) the module needs."""
    n = spec.names
    if spec.router_weight in ("linear", "linear_bias"):
        lin = nn.Linear(spec.hidden, spec.num_experts, bias=spec.router_weight == "linear_bias")
        with torch.no_grad():
            lin.weight.copy_(w["router_w"])
            if lin.bias is not None:
                lin.bias.copy_(w["router_b"])
        setattr(module, weight_attr, lin)
    elif spec.router_weight == "param_he":
        setattr(module, weight_attr, _param(w["router_w"].t()))
    else:
        setattr(module, weight_attr, _param(w["router_w"]))
    attrs = {"_router_w": _path(weight_attr), "_router_logits": _LOGITS[spec.router_weight],
             "_corr_bias": None}
    if spec.correction_bias == "buffer":
        module.register_buffer(n.correction_bias, w["correction_bias"].clone())
    elif spec.correction_bias == "parameter":
        setattr(module, n.correction_bias, nn.Parameter(w["correction_bias"].clone()))
    if spec.correction_bias != "none":
        attrs["_corr_bias"] = _path(n.correction_bias)
    _config(module, spec)
    module._renorm = spec.renorm
    module._score_fn = spec.score_fn
    module._group_score = spec.group_score
    module._group_fill = spec.group_fill
    module.routed_scaling_factor = float(spec.routed_scaling)
    if spec.router == "grouped_topk":
        module.n_group = spec.num_groups
        module.topk_group = spec.topk_groups
    if spec.router in ("capacity", "expert_choice"):
        module._capacity_mode = spec.capacity_mode
        module._priority = spec.priority
        module.capacity_factor = float(spec.capacity_factor)
        if spec.capacity_mode == "fixed":
            module.expert_capacity = spec.capacity
    attrs["_E"] = _path(n.num_experts)
    attrs["_K"] = _path(n.top_k)
    return attrs


class _Base(nn.Module):
    """Base of every generated class; ``__init__`` only (state is set by ``build``)."""

    def __init__(self):
        super().__init__()


def _expert_store_attrs(spec: LayerSpec, w: dict[str, Tensor], store: nn.Module, path: tuple[str, ...]) -> dict:
    """Puts stacked or flat expert weights on ``store``; returns the aliases to them as seen from
    the module at the start of ``path`` (``path`` leads from that module to ``store``)."""
    gate_n, up_n, down_n, fused_n = spec.names.matrices
    E = spec.num_experts
    first_out_in, second_out_in = spec.first == "FH", spec.second == "HI"
    b = spec.ffn_bias
    attrs: dict = {"_w_gate": None, "_b_in": None, "_b_gate": None, "_b_out": None,
                   "_first_out_in": first_out_in, "_second_out_in": second_out_in}

    def put(alias: str, name: str, value: Tensor, flat_as: Optional[Tensor] = None) -> None:
        if spec.layout == "flat" and flat_as is not None:
            setattr(store, name, _param(flat_as))
            attrs[alias] = _flat_view(*path, name, num_experts=E)
        else:
            setattr(store, name, _param(value))
            attrs[alias] = _path(*path, name)

    def first(t_EXH: Tensor) -> Tensor:  # [E, F, H] as stored
        return t_EXH if first_out_in else t_EXH.transpose(1, 2)

    if spec.gated and spec.gate_up == "separate":
        put("_w_gate", gate_n, first(w["gate"]), flat_as=w["gate"].reshape(-1, spec.hidden))
        put("_w_in", up_n, first(w["up"]), flat_as=w["up"].reshape(-1, spec.hidden))
        if b:
            put("_b_gate", f"{gate_n}_bias", w["b_gate"])
            put("_b_in", f"{up_n}_bias", w["b_up"])
    elif spec.gated:
        put("_w_in", fused_n, first(_fuse(w["gate"], w["up"], spec.gate_up, dim=1)))
        if b:
            put("_b_in", f"{fused_n}_bias", _fuse(w["b_gate"], w["b_up"], spec.gate_up, dim=1))
    else:
        put("_w_in", up_n, first(w["up"]), flat_as=w["up"].reshape(-1, spec.hidden))
        if b:
            put("_b_in", f"{up_n}_bias", w["b_up"])
    down = w["down"] if second_out_in else w["down"].transpose(1, 2)
    put("_w_out", down_n, down, flat_as=w["down"].transpose(1, 2).reshape(-1, spec.hidden))
    if b:
        put("_b_out", f"{down_n}_bias", w["b_down"])
    return attrs


def _list_container(spec: LayerSpec, w: dict[str, Tensor], with_forward: bool) -> nn.Module:
    """E expert modules in a ModuleList, a ModuleDict or a plain module with children; with
    ``with_forward`` the container's class also does dispatch and combine
    (``forward(hidden_states, top_k_index, top_k_weights)``, as Hugging Face's experts modules)."""
    n = spec.names
    expert_base = _ParamExpert if spec.expert_linear == "raw_params" else _MatrixExpert
    expert_cls = _named_class(n.expert_class, (expert_base,))
    experts = [expert_cls(spec, w, e) for e in range(spec.num_experts)]
    base = {"module_list": nn.ModuleList, "module_dict": nn.ModuleDict, "children": _Base}[spec.container]
    if with_forward:
        cls = _named_class(n.experts_class, (_ListExperts, base), {
            "_experts_container": property(lambda self: self), "_container": spec.container,
            "_expert_key": n.expert_key, "_E": _path(n.num_experts), "forward": _experts_forward(spec)})
    elif spec.container == "children":
        cls = _named_class(n.experts_class, (_Base,))
    else:
        cls = base
    if spec.container == "module_list":
        container = cls(experts)
    elif spec.container == "module_dict":
        container = cls({f"{n.expert_key}{e}": m for e, m in enumerate(experts)})
    else:
        container = cls()
        for e, m in enumerate(experts):
            setattr(container, f"{n.expert_key}{e}", m)
    if with_forward:
        _config(container, spec)
    return container


def _stacked_store(spec: LayerSpec, w: dict[str, Tensor], layer: nn.Module) -> dict:
    """Stacked or flat expert weights on the layer or on a child; returns the layer class's attributes."""
    n = spec.names
    if spec.holder == "self":
        _FFNAct._init_act(layer, spec)
        return _expert_store_attrs(spec, w, layer, ())
    store = _Base()
    store_attrs = _expert_store_attrs(spec, w, store, ())
    if spec.holder == "child":  # a child holding only the weights; the layer computes with them
        store.__class__ = _named_class(n.experts_class, (_Base,))
        setattr(layer, n.experts, store)
        _FFNAct._init_act(layer, spec)
        return {k: _via_child(v, n.experts) for k, v in store_attrs.items()}
    # a child with forward(hidden_states, top_k_index, top_k_weights)
    _FFNAct._init_act(store, spec)
    _config(store, spec)
    store_attrs.update(_E=_path(n.num_experts), forward=_experts_forward(spec))
    store.__class__ = _named_class(n.experts_class, (_StackedExperts, _FFNAct, _Base), store_attrs)
    setattr(layer, n.experts, store)
    return {}


def _via_child(attr, child: str):
    """A store's alias re-rooted at the layer: ``self.<child>.<param>``."""
    if not isinstance(attr, property):
        return attr
    fget = attr.fget
    return property(lambda self: fget(getattr(self, child)))


def _experts_forward(spec: LayerSpec) -> Callable:
    dispatch = _TOKEN_DISPATCH[spec.spelling]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return dispatch(self, hidden_states, top_k_weights, top_k_index)

    return forward


def _block_parts(spec: LayerSpec, w: dict[str, Tensor], layer: nn.Module) -> dict:
    """Norm, shared expert (and its sigmoid gate), dense branch; returns the layer class's aliases."""
    n = spec.names
    attrs: dict = {}
    if spec.norm == "layernorm":
        norm = nn.LayerNorm(spec.hidden, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(w["norm_w"])
            norm.bias.copy_(w["norm_b"])
    elif spec.norm == "rmsnorm":
        norm = _named_class(n.norm_class, (_RMSNorm,))(w["norm_w"])
    elif spec.norm == "nn_rmsnorm":
        norm = nn.RMSNorm(spec.hidden, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(w["norm_w"])
    if spec.norm != "none":
        setattr(layer, n.norm, norm)
        attrs["_norm_mod"] = _path(n.norm)
    if spec.shared_expert != "none":
        b = spec.ffn_bias
        shared = _named_class(n.mlp_class, (_MLP,))(
            dataclasses.replace(spec, gate_up="separate"), w["s_gate"] if spec.gated else None, w["s_up"],
            w["s_down"], w["s_b_gate"] if b and spec.gated else None, w["s_b_up"] if b else None,
            w["s_b_down"] if b else None)
        setattr(layer, n.shared, shared)
        attrs["_shared_mod"] = _path(n.shared)
        if spec.shared_expert == "sigmoid_gated":
            gate = nn.Linear(spec.hidden, 1, bias=False)
            with torch.no_grad():
                gate.weight.copy_(w["s_gate_w"])
            setattr(layer, n.shared_gate, gate)
            attrs["_shared_gate_mod"] = _path(n.shared_gate)
    if spec.dense_branch:
        dense_spec = dataclasses.replace(spec, gated=False, activation="gelu", act_module=False)
        dense = _named_class(n.mlp_class, (_MLP,))(dense_spec, None, w["d_up"], w["d_down"], None,
                                                   w["d_b_up"], w["d_b_down"])
        setattr(layer, n.dense, dense)
        attrs["_dense_mod"] = _path(n.dense)
    return attrs


def _build_layer(spec: LayerSpec, w: dict[str, Tensor]) -> nn.Module:
    n = spec.names
    token_choice = spec.router in TOKEN_ROUTERS
    layer = _Base()
    layer._input_rank = spec.input_rank
    layer._flatten = spec.flatten
    _config(layer, spec)
    attrs: dict = {"forward": _layer_forward, "_norm_mod": None, "_shared_mod": None, "_shared_gate_mod": None,
                   "_dense_mod": None, "_E": _path(n.num_experts), "_K": _path(n.top_k)}

    # router: inline on the layer, or a router module returning (weights, idx)
    if spec.router_holder == "module":
        router = _Base()
        router_attrs = _router_setup(spec, w, router, n.router_weight)
        router_attrs["forward"] = _ROUTES[spec.router]
        router.__class__ = _named_class(n.router_class, (_Base,), router_attrs)
        setattr(layer, n.router, router)
        attrs["_route"] = _path(n.router)  # self._route(x) calls the router module
    else:
        attrs.update(_router_setup(spec, w, layer, n.router))
        if token_choice:
            attrs["_route"] = _ROUTES[spec.router]

    # experts
    if spec.layout == "list":
        container = _list_container(spec, w, with_forward=spec.holder == "child_forward")
        setattr(layer, n.experts, container)
        attrs.update(_experts_container=_path(n.experts), _container=spec.container, _expert_key=n.expert_key)
        bases: tuple = (_ListExperts, _Base)
    else:
        attrs.update(_stacked_store(spec, w, layer))
        bases = (_StackedExperts, _FFNAct, _Base)

    # dispatch, experts, combine
    if not token_choice:
        attrs["_moe"] = _MOE[spec.spelling]
    else:
        attrs["_moe"] = _moe_token_choice
        if spec.holder == "child_forward":
            attrs["_experts_dispatch"] = lambda self, x_TH, weights_TK, idx_TK: getattr(self, n.experts)(
                x_TH, idx_TK, weights_TK)
        else:
            attrs["_experts_dispatch"] = _TOKEN_DISPATCH[spec.spelling]

    attrs.update(_block_parts(spec, w, layer))
    layer.__class__ = _named_class(n.layer_class, bases, attrs)
    return layer


def _make_input(spec: LayerSpec, num_tokens: int, seed: int = 0, identical: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = 1 if identical else num_tokens
    x_TH = torch.randn(rows, spec.hidden, generator=g).expand(num_tokens, -1).clone()
    x_TH = x_TH.to(spec.torch_dtype)
    if spec.input_rank == 2:
        return x_TH
    batch = 2 if num_tokens % 2 == 0 else 1
    return x_TH.view(batch, num_tokens // batch, spec.hidden)


def build(spec: LayerSpec, *, seed: int = 0) -> tuple[nn.Module, Callable[..., Tensor]]:
    """The layer ``spec`` describes, with ``canonical_weights(spec, seed)``, in ``spec.dtype`` and
    train mode; and ``make_input(num_tokens, seed=0, identical=False)``."""
    if not _names_ok(spec):
        raise ValueError(f"attribute names of the layer collide: {_layer_attrs(spec)}")
    w = canonical_weights(spec, seed)
    # nn.Linear's constructor draws a default init from the global RNG: fork it so that building
    # a layer leaves callers' random streams alone (every value is overwritten from `w`).
    with torch.random.fork_rng(devices=[]):
        layer = _build_layer(spec, w)
    layer.to(spec.torch_dtype)
    layer.train()
    return layer, functools.partial(_make_input, spec)
