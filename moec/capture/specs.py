"""What a recogniser proved about one MoE layer: enough to run it as canonical ``moec::`` ops.

Contract: a spec is built only after its canonical computation matched the module's own forward
on probe inputs (see ``recognisers.py``). ``fetch_*`` callables read the module's live
parameters at call time, so training updates and ``load_state_dict`` stay visible.

Legend: T tokens, H hidden, E experts, K top-k, F first-GEMM width, I expert hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor


# Product-key routing (Doge's CDMoE, PEER): a projection gives two sets of n key scores per
# token, expert i*n + j scores key i of the first set plus key j of the second. The maps differ
# in where the sets are read: "tokens" splits each token's 2n scores in halves; "view" reads the
# [T, 2n] projection as [2, T, n] (Doge's ``view(2, T, n)``: a token's two sets then come from
# other tokens' rows); "-swap" makes the second set the major index.
PRODUCT_KEY_MAPS = ("tokens", "tokens-swap", "view", "view-swap")


def product_key_scores(proj_TF: Tensor, how: str) -> Tensor:
    """[T, 2n] key scores -> [T, n * n] expert scores, as ``how`` (``PRODUCT_KEY_MAPS``) reads them."""
    T, F = proj_TF.shape
    n = F // 2
    if how.startswith("tokens"):
        a, b = proj_TF[:, :n], proj_TF[:, n:]
    elif how.startswith("view"):
        pair = proj_TF.reshape(2, T, n)
        a, b = pair[0], pair[1]
    else:
        raise ValueError(f"unknown product-key map {how!r}; known: {', '.join(PRODUCT_KEY_MAPS)}")
    if how.endswith("-swap"):
        a, b = b, a
    return (a.unsqueeze(-1) + b.unsqueeze(-2)).reshape(T, n * n)


@dataclasses.dataclass
class RouterSpec:
    kind: str
    top_k: int
    num_experts: int
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    capacity: int = 0
    # () -> (w_EH, b_E or None, correction_bias_E or None)
    fetch: Callable[[], tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = dataclasses.field(repr=False, default=None)
    logits_dtype: Optional[torch.dtype] = None
    logit_scale: float = 1.0
    logit_map: str = ""  # "" (the projection is the logits) or one of PRODUCT_KEY_MAPS

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        _, _, correction_bias = self.fetch()
        return torch.ops.moec.route(
            logits, correction_bias, self.kind, self.top_k, self.num_groups, self.topk_groups,
            self.renormalize, self.scaling, self.capacity,
        )

    def logits(self, x: Tensor) -> Tensor:
        return self.logits_and_projection(x)[0]

    def logits_and_projection(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [T, E], the router projection they come from: the logits themselves unless
        ``logit_map`` maps a [T, 2n] projection to them)."""
        w_EH, b_E, _ = self.fetch()
        dtype = self.logits_dtype or x.dtype
        proj = torch.nn.functional.linear(x.to(dtype), w_EH.to(dtype), None if b_E is None else b_E.to(dtype))
        logits = product_key_scores(proj, self.logit_map) if self.logit_map else proj
        return (logits if self.logit_scale == 1.0 else logits * self.logit_scale), proj

    @property
    def report_kind(self) -> str:
        return self.kind


@dataclasses.dataclass
class FFNSpec:
    """One FFN shape (the experts' stacked, or a shared expert's unstacked)."""

    activation: str
    transposed: bool
    interleaved: bool
    hidden_size: int
    expert_hidden_size: int
    alpha: float = 1.0
    limit: float = 0.0
    has_bias: bool = False
    # () -> (w_in, w_out, b_in or None, b_out or None)
    fetch: Callable[[], tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]] = dataclasses.field(
        repr=False, default=None
    )
    # The per-expert modules ``fetch`` stacks (experts held as a module list), else ().
    sources: tuple = dataclasses.field(repr=False, default=())
    # Module-list experts: () -> the ``moec.capture.pack.Pack`` that lets ``fetch`` read them
    # stacked without copying (made when the layer is installed), or None where they cannot be.
    packer: Optional[Callable[[], object]] = dataclasses.field(repr=False, default=None)

    def attrs(self) -> tuple:
        return (self.activation, self.transposed, self.interleaved, self.alpha, self.limit)


@dataclasses.dataclass(frozen=True)
class PostNorm:
    """An RMSNorm on each expert's output row, before its routing weight (Ergo, MuSE-Spark).

    ``scale``: the norm's scale tensor, a path relative to the layer module, ``[H]`` (one for all
    experts) or ``[E, H]`` (``per_expert``: each row takes its expert's), or None (no scale).
    ``order``: "after" normalises then scales, "before" scales then normalises (the scaled row is
    rounded to the row's dtype first). ``offset``: added to the scale (1.0: a ``1 + w`` scale).
    Computed in float32 (or the row's wider dtype), the result rounded to the row's dtype."""

    scale: Optional[str]
    per_expert: bool
    eps: float
    order: str = "after"  # "after" | "before"
    offset: float = 0.0

    def apply(self, y_NH: Tensor, expert_N: Tensor, scale: Optional[Tensor]) -> Tensor:
        """``scale``: the live tensor ``self.scale`` names (None when it names none)."""
        work = torch.promote_types(y_NH.dtype, torch.float32)
        s = None
        if scale is not None:
            s = (scale[expert_N] if self.per_expert else scale).to(work)
            s = s + self.offset if self.offset else s
        y = y_NH.to(work)
        if self.order == "before" and s is not None:
            y = (y * s).to(y_NH.dtype).to(work)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        if self.order == "after" and s is not None:
            y = y * s
        return y.to(y_NH.dtype)

    def describe(self) -> str:
        what = "none" if self.scale is None else ("per expert " if self.per_expert else "") + self.scale
        offset = f"{self.offset:g} + " if self.offset else ""
        return f"rms_norm(eps={self.eps:g}, scale {offset}{what} {self.order})"


@dataclasses.dataclass
class ExpertsSpec:
    ffn: FFNSpec
    num_experts: int
    # Set by expert-parallel sharding (``moec.runtime.shard``): the parameters ``fetch`` reads hold
    # only this rank's experts, and the name of the group whose all-gather rebuilds all of them.
    shard_group: Optional[str] = None
    # Set with a placement plan: (slots, slot_counts, shares) as ``moec.ir.parallel`` takes them;
    # this rank's parameters hold the experts the plan lists for it.
    placement: Optional[tuple] = None
    # The routing weight scales each token's row before its expert, and the experts' outputs are
    # summed unweighted (Llama-4), instead of weighting the outputs.
    input_scaled: bool = False
    # An RMSNorm on each expert output row before its weight, and () -> its scale tensor or None.
    post_norm: Optional[PostNorm] = None
    post_scale: Optional[Callable[[], Optional[Tensor]]] = dataclasses.field(repr=False, default=None)

    def weights(self) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """All experts' (w_in, w_out, b_in, b_out); gathered from the ranks when sharded (the
        ``expert_parallel`` pass then uses this rank's shard directly and drops the gather)."""
        weights = self.ffn.fetch()
        if self.shard_group is None:
            return weights
        if self.placement is not None:
            slots, counts, shares = (list(a) for a in self.placement)
            return tuple(None if w is None else torch.ops.moec.unshard(w, self.shard_group, slots, counts, shares,
                                                                       self.num_experts) for w in weights)
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        return tuple(None if w is None else all_gather_tensor_autograd(w, 0, self.shard_group) for w in weights)

    def __call__(self, x_TH: Tensor, idx_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """dispatch -> expert_ffn -> combine: out [T, H] in x's dtype."""
        token_N, slot_N, counts_E = torch.ops.moec.dispatch(idx_TK, self.num_experts)
        w_in, w_out, b_in, b_out = self.weights()
        if self.input_scaled:
            rows_NH = x_TH[token_N] * weights_TK.reshape(-1)[slot_N].unsqueeze(-1).to(x_TH.dtype)
            every_N = torch.arange(rows_NH.shape[0], device=x_TH.device)
            y_NH = torch.ops.moec.expert_ffn(rows_NH, every_N, counts_E, w_in, w_out, b_in, b_out, *self.ffn.attrs())
            return torch.ops.moec.combine(y_NH, slot_N, torch.ones_like(weights_TK)).to(x_TH.dtype)
        y_NH = torch.ops.moec.expert_ffn(x_TH, token_N, counts_E, w_in, w_out, b_in, b_out, *self.ffn.attrs())
        if self.post_norm is not None:
            # Ordinary traced ops between expert_ffn and combine: the lowering passes then leave
            # this combine unfused, and every target runs the norm as PyTorch.
            scale = None if self.post_scale is None else self.post_scale()
            y_NH = self.post_norm.apply(y_NH, idx_TK.reshape(-1)[slot_N], scale)
        return torch.ops.moec.combine(y_NH, slot_N, weights_TK).to(x_TH.dtype)


def shared_expert(ffn: FFNSpec, x: Tensor) -> Tensor:
    w_in, w_out, b_in, b_out = ffn.fetch()
    return torch.ops.moec.shared_expert(x, w_in, w_out, b_in, b_out, *ffn.attrs())
