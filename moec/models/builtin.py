"""Hand-written MoE idioms: small models written the way people write MoE layers, not the way a
compiler would like them.

Contract
--------
* ``BUILTIN_MODELS[name](**kw)`` returns ``(model.eval(), (x_BSH,))`` with ``x_BSH`` float32
  ``[2, 8, hidden]``. The model is embedding-free: ``num_layers`` pre-norm blocks
  ``x = x + moe(norm(x))`` with the MoE block at ``layers.{i}.moe``. Weights and input come from
  the factory's own seeded ``torch.Generator``: the same call gives bitwise the same model and input,
  and the global RNG is not touched. Keyword overrides (``OVERRIDES``): ``num_experts`` (8),
  ``top_k`` (2), ``seed`` (0), ``hidden`` (64), ``intermediate`` (128), ``num_layers`` (2); a bad
  value raises ValueError. On the command line: ``builtin:NAME:key=value,...``.
* ``DEFAULT_BUILTIN`` ("moe-mlp") is the model the CLI and docs use when none is named.
* ``expected_moe_layers(model)`` lists ``(module path, num_experts, top_k)`` of every MoE block.

The idioms (one MoE block class each; router → dispatch → expert):

* ``moe-mlp`` (``LoopMoE``): ``Linear`` (no bias) → softmax → top-k → renormalise; a Python loop
  over experts finds each expert's tokens with ``torch.where`` and accumulates with ``index_add_``;
  ``nn.ModuleList`` of SwiGLU experts (w1, w3, w2).
* ``stacked-bmm`` (``StackedBmmMoE``): ``Linear`` with bias → top-k on logits → softmax over k;
  stacked ``[E, H, I]`` / ``[E, I, H]`` parameters gathered per assignment and applied with
  ``torch.bmm``; GELU MLP with biases; combined with ``einsum``.
* ``sort-split`` (``SortSplitMoE``): softmax → top-k, no renormalisation; assignments sorted by
  expert (``argsort``), ``torch.split`` by ``bincount().tolist()``, per-expert ReLU MLP from a
  ``ModuleList``, concatenated and un-permuted by index assignment.
* ``shared-expert`` (``SharedExpertMoE``): as moe-mlp (spelled with ``torch.nonzero(...,
  as_tuple=True)``) plus one always-on, ungated SwiGLU shared expert added to the output.

Legend: B batch, S sequence, T tokens (B*S), H hidden, I expert intermediate, E experts,
K top-k, N routed assignments (T*K).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BUILTIN",
    "MoEStack",
    "LoopMoE",
    "StackedBmmMoE",
    "SortSplitMoE",
    "SharedExpertMoE",
    "expected_moe_layers",
]

HIDDEN = 64
INTERMEDIATE = 128
NUM_EXPERTS = 8
TOP_K = 2
NUM_LAYERS = 2
BATCH, SEQ = 2, 8


class SwiGLUExpert(nn.Module):
    """Llama/Mixtral-style expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TH)) * self.w3(x_TH))


class ReluExpert(nn.Module):
    """Switch/T5-style expert with biases: fc2(relu(fc1 x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x_TH)))


class LoopMoE(nn.Module):
    """The reference-implementation idiom (Mixtral's original HF code): loop over experts, find each
    expert's tokens with ``torch.where``, accumulate with ``index_add_``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, intermediate) for _ in range(num_experts))

    def route(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE = F.softmax(self.router(x_TH), dim=-1, dtype=torch.float32)
        weights_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK.to(x_TH.dtype), idx_TK

    def routed(self, x_TH: torch.Tensor) -> torch.Tensor:
        weights_TK, idx_TK = self.route(x_TH)
        out_TH = torch.zeros_like(x_TH)
        for e in range(self.num_experts):
            tok, slot = torch.where(idx_TK == e)
            y = self.experts[e](x_TH[tok]) * weights_TK[tok, slot, None]
            out_TH.index_add_(0, tok, y)
        return out_TH

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        return self.routed(x_BSH.reshape(-1, H)).reshape(B, S, H)


class SharedExpertMoE(LoopMoE):
    """LoopMoE plus one always-on shared expert (DeepSeek style, ungated). Tokens are found with
    ``torch.nonzero(..., as_tuple=True)``, the other spelling people use."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, intermediate, num_experts, top_k)
        self.shared_expert = SwiGLUExpert(hidden, intermediate)

    def routed(self, x_TH: torch.Tensor) -> torch.Tensor:
        weights_TK, idx_TK = self.route(x_TH)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
            out_TH.index_add_(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot].unsqueeze(-1))
        return out_TH

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        return (self.routed(x_TH) + self.shared_expert(x_TH)).reshape(B, S, H)


class StackedBmmMoE(nn.Module):
    """Stacked expert weights as 3D parameters; each routed assignment gathers its expert's matrices
    and the whole batch of assignments runs as one ``torch.bmm`` (memory-hungry but loop-free, a
    common research-code shape). Router with bias, top-k on logits then softmax over the k
    (GPT-OSS / original Mixtral order). GELU MLP with biases."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=True)
        self.w_in_EHI = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.b_in_EI = nn.Parameter(torch.empty(num_experts, intermediate))
        self.w_out_EIH = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.b_out_EH = nn.Parameter(torch.empty(num_experts, hidden))

    def reset_parameters(self, generator: torch.Generator) -> None:
        H, I = self.w_in_EHI.shape[1:]
        with torch.no_grad():
            self.w_in_EHI.normal_(0.0, H**-0.5, generator=generator)
            self.w_out_EIH.normal_(0.0, I**-0.5, generator=generator)
            self.b_in_EI.normal_(0.0, 0.02, generator=generator)
            self.b_out_EH.normal_(0.0, 0.02, generator=generator)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        K = self.top_k
        x_TH = x_BSH.reshape(-1, H)
        logits_TK, idx_TK = torch.topk(self.gate(x_TH), K, dim=-1)
        weights_TK = torch.softmax(logits_TK, dim=-1)

        idx_N = idx_TK.reshape(-1)
        x_N1H = x_TH.repeat_interleave(K, dim=0).unsqueeze(1)  # row n = token n // K
        h_N1I = torch.bmm(x_N1H, self.w_in_EHI[idx_N]) + self.b_in_EI[idx_N].unsqueeze(1)
        y_N1H = torch.bmm(F.gelu(h_N1I), self.w_out_EIH[idx_N]) + self.b_out_EH[idx_N].unsqueeze(1)
        out_TH = torch.einsum("tkh,tk->th", y_N1H.reshape(-1, K, H), weights_TK)
        return out_TH.reshape(B, S, H)


class SortSplitMoE(nn.Module):
    """Megablocks/fairseq-style permute: sort assignments by expert, ``torch.split`` by the
    per-expert counts (``bincount().tolist()``), run each chunk through its expert, concatenate and
    un-permute. Softmax → top-k without renormalisation (Qwen1.5-MoE). ReLU experts with biases."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(ReluExpert(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        probs_TE = self.router(x_TH).softmax(dim=-1)
        weights_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)

        idx_N = idx_TK.flatten()
        order_N = idx_N.argsort(stable=True)
        counts = torch.bincount(idx_N, minlength=self.num_experts).tolist()
        chunks = torch.split(x_TH[order_N // self.top_k], counts)
        y_sorted_NH = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        y_NH = torch.empty_like(y_sorted_NH)
        y_NH[order_N] = y_sorted_NH

        out_TH = (y_NH.view(-1, self.top_k, H) * weights_TK.unsqueeze(-1)).sum(dim=1)
        return out_TH.reshape(B, S, H)


class Block(nn.Module):
    def __init__(self, moe: nn.Module, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.moe = moe

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return x_BSH + self.moe(self.norm(x_BSH))


class MoEStack(nn.Module):
    """Pre-norm residual blocks of one MoE idiom; the MoE blocks sit at ``layers.{i}.moe``."""

    def __init__(self, moe_cls: type[nn.Module], *, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
                 num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, num_layers: int = NUM_LAYERS):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(moe_cls(hidden, intermediate, num_experts, top_k), hidden) for _ in range(num_layers)
        )

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_BSH = layer(x_BSH)
        return x_BSH


def _init_weights(model: nn.Module, generator: torch.Generator) -> None:
    # Fan-in scaled normal init so every layer preserves scale: the MoE output is then as large as
    # the residual, and a wrong MoE shows up in the output at fp32 tolerances.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, StackedBmmMoE):
                module.reset_parameters(generator)


def _make(moe_cls: type[nn.Module], *, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, seed: int = 0,
          hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
          num_layers: int = NUM_LAYERS) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    for key, value in (("num_experts", num_experts), ("top_k", top_k), ("hidden", hidden),
                       ("intermediate", intermediate), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    generator = torch.Generator().manual_seed(seed)
    # nn.Linear's constructor draws a default init from the global RNG; fork it so building a
    # model leaves callers' random streams alone (every value is overwritten from `generator`).
    with torch.random.fork_rng(devices=[]):
        model = MoEStack(moe_cls, hidden=hidden, intermediate=intermediate, num_experts=num_experts, top_k=top_k,
                         num_layers=num_layers)
    _init_weights(model, generator)
    x_BSH = torch.randn(BATCH, SEQ, hidden, generator=generator)
    return model.eval(), (x_BSH,)


BUILTIN_MODELS: dict[str, Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "moe-mlp": functools.partial(_make, LoopMoE),
    "stacked-bmm": functools.partial(_make, StackedBmmMoE),
    "sort-split": functools.partial(_make, SortSplitMoE),
    "shared-expert": functools.partial(_make, SharedExpertMoE),
}
DEFAULT_BUILTIN = "moe-mlp"
OVERRIDES = ("num_experts", "top_k", "seed", "hidden", "intermediate", "num_layers")

_MOE_CLASSES = (LoopMoE, StackedBmmMoE, SortSplitMoE)  # SharedExpertMoE is a LoopMoE


def expected_moe_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(module path, num_experts, top_k)`` of every MoE block of a builtin model."""
    return [
        (name, module.num_experts, module.top_k)
        for name, module in model.named_modules()
        if isinstance(module, _MOE_CLASSES)
    ]
