"""A recognised MoE layer as a plan: what to compute, named by paths inside the layer.

Contract: a ``BlockPlan`` is everything ``recognise`` proved about one layer: what the router
and experts read (``premap``), the router (weight, bias, correction bias and its ``moec.ir``
routing attributes), the experts' FFN form, the other summands of the output (``terms``) and
the output's structure. Every tensor and module is named by its path relative to the layer, so
a plan proved on one layer can be bound to another layer of the same kind (``bind``) and
re-verified there cheaply. ``BlockPlan.forward(module)`` is the layer's canonical forward:
ordinary traced PyTorch for the premap and the terms, ``moec::`` ops for the routed experts.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture.candidates import ExpertGroup
from moec.capture.match import FFNForm, Term
from moec.capture.probes import Call, find_x
from moec.capture.specs import ExpertsSpec, FFNSpec, RouterSpec
from moec.ir import ops
from moec.ir.routing import RouterKind


@dataclasses.dataclass
class Output:
    """The layer's output: the hidden-state-shaped tensor at ``main_pos`` (-1: the output itself)
    and what each other element of a tuple output is ("logits", or None)."""

    main_pos: int = -1
    # per position: "main" | "logits" | "none" | ("router", i): the router module's output i |
    # ("projection", shape): a product-key router's [T, 2n] key scores viewed as shape (-1: T)
    extras: tuple = ()
    logits_shape: str = "flat"  # "flat": [T, E]; "input": the input's leading dims + [E]
    container: type = tuple
    flat: bool = False  # the hidden-state output is [T, H] whatever the input's rank


@dataclasses.dataclass
class BlockPlan:
    hidden: int
    experts: ExpertGroup
    router: str
    router_transposed: bool
    router_bias: Optional[str]
    correction: Optional[str]
    kind: str
    top_k: int
    num_groups: int
    topk_groups: int
    renormalize: bool
    scaling: float
    capacity: int
    ffn: FFNForm
    premap: Optional[str]
    terms: list[Term]
    output: Output
    logits_dtype: Optional[torch.dtype] = None  # None: the hidden state's dtype
    route_leading: bool = False  # route over the input's leading dims (per-sequence capacity)
    # The router weight's module, called on x' for the logits (its output, or element i of it):
    # hooks on it (transformers records router logits so) see the call the layer's own code makes.
    router_call: Optional[tuple[str, int]] = None
    # Each token is scaled by its routing weight before the expert, whose outputs are then summed
    # unweighted (Llama-4), instead of the expert's output being weighted.
    input_scaled: bool = False
    logit_scale: float = 1.0  # the router's logits are x' W^T times this
    unit_weights: bool = False  # every chosen expert's output is added with weight ``scaling`` (1 mostly)
    logit_map: str = ""  # a product-key router: how its [T, 2n] key scores make the logits (specs.PRODUCT_KEY_MAPS)

    # Bound per layer (``bind``): the specs read the layer's live tensors.
    def router_spec(self, module: nn.Module) -> RouterSpec:
        w_name, tr, b_name, c_name = self.router, self.router_transposed, self.router_bias, self.correction

        def fetch():
            w = module.get_parameter(w_name)
            return (w.t() if tr else w, _tensor(module, b_name), _tensor(module, c_name))

        return RouterSpec(self.kind, self.top_k, self.experts.num_experts, self.renormalize, self.num_groups,
                          self.topk_groups, self.scaling, self.capacity, fetch=fetch, logits_dtype=self.logits_dtype,
                          logit_scale=self.logit_scale, logit_map=self.logit_map)

    def experts_spec(self, module: nn.Module) -> ExpertsSpec:
        from moec.capture.match import stacker
        from moec.capture.pack import packed_fetch, packer
        from moec.capture.candidates import Candidate

        cand = Candidate("", module, self.experts, self.router, self.router_transposed, self.hidden)
        _, stacked = stacker(cand)
        form = self.ffn
        act, transposed, interleaved, alpha, limit = form.attrs
        ffn = FFNSpec(act, transposed, interleaved, self.hidden, form.inter, alpha, limit,
                      bool(form.b_in or form.b_out is not None), packed_fetch(form, stacked),
                      sources=stacked.__dict__.get("sources", ()), packer=packer(form, stacked))
        post = form.post
        return ExpertsSpec(ffn, self.experts.num_experts, input_scaled=self.input_scaled, post_norm=post,
                           post_scale=None if post is None or post.scale is None else (lambda: _tensor(module, post.scale)))

    def forward(self, module: nn.Module, dtype_of: Callable[[Tensor], torch.dtype]) -> Callable:
        """The canonical forward of ``module`` (called with the layer's own arguments)."""
        router, experts = self.router_spec(module), self.experts_spec(module)
        module.__dict__["_moec_experts_spec"] = experts
        premap = None if self.premap is None else module.get_submodule(self.premap)
        terms = [(t, None if t.module is None or t.source == "tensor" else module.get_submodule(t.module),
                  None if t.gate is None else module.get_submodule(t.gate)) for t in self.terms]
        H, out_spec = self.hidden, self.output
        router_mod = None if self.router_call is None else module.get_submodule(self.router_call[0])

        def moec_block_forward(*args, **kwargs):
            x_pos = find_x(args, kwargs, H)
            x = Call(args, kwargs, x_pos).x
            x_TH = x.reshape(-1, H)
            xp = x if premap is None else premap(x)
            xp_TH = xp.reshape(-1, H)
            logits, router_out = self._logits(router, router_mod, xp_TH)
            if self.route_leading:  # a capacity per sequence: route [B, S, E], flatten after
                weights, idx = router.route(logits.reshape(*x.shape[:-1], -1))
                weights, idx = weights.reshape(-1, weights.shape[-1]), idx.reshape(-1, idx.shape[-1])
            else:  # route output straight into dispatch: what fuse_gating matches
                weights, idx = router.route(logits)
            out_TH = experts(xp_TH, idx, torch.full_like(weights, self.scaling) if self.unit_weights else weights)
            for term, mod, gate in terms:
                if term.source == "input":
                    y = x_TH
                elif term.source == "tensor":
                    y = _tensor(module, term.module)
                elif term.source == "ffn":  # the layer's own projections
                    y = _shared_expert(term.ffn, module, xp_TH, term.params)
                elif term.ffn is not None:
                    y = _shared_expert(term.ffn, mod, xp_TH)
                else:
                    y = _first(mod(xp)).reshape(-1, H)
                if gate is not None:
                    y = torch.sigmoid(_first(gate(xp)).reshape(-1, 1)) * y
                out_TH = out_TH + (y if term.coef == 1.0 else term.coef * y)
            out = out_TH.to(dtype_of(x))
            out = out if out_spec.flat else out.reshape(x.shape)
            if out_spec.main_pos < 0:
                return out
            items = []
            for what in out_spec.extras:
                if what == "main":
                    items.append(out)
                elif what == "logits":
                    items.append(logits if out_spec.logits_shape == "flat" else logits.reshape(*x.shape[:-1], -1))
                elif isinstance(what, tuple) and what[0] == "projection":
                    items.append(router_out.reshape(what[1]))
                elif isinstance(what, tuple):
                    items.append(router_out if what[1] < 0 else router_out[what[1]])
                else:
                    items.append(None)
            return out_spec.container(items)

        return moec_block_forward

    def _logits(self, router, router_mod: Optional[nn.Module], xp_TH: Tensor) -> tuple[Tensor, Any]:
        """(the router logits of ``xp_TH``, the router module's whole output or None): from the
        router spec's weights, or by calling the layer's own router module (``router_call``)."""
        if router_mod is None:
            return router.logits_and_projection(xp_TH) if self.logit_map else (router.logits(xp_TH), None)
        out = router_mod(xp_TH)
        return (out if self.router_call[1] < 0 else out[self.router_call[1]]), out

    def tied_tokens(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        """Tokens of ``x`` (bool, flattened) whose expert choice is a tie or within rounding of one:
        a top-k (or group) boundary where the best excluded score comes within what one rounding
        of the logits moves. Eager breaks such ties as its top-k implementation happens to (CPU
        top-k is not lowest-index-first), so a probe that contains them proves nothing about the
        router. None for expert choice (the tie is between tokens)."""
        rk = RouterKind.parse(self.kind)
        if rk.expert_choice:
            return None
        router, H = self.router_spec(module), self.hidden
        with torch.no_grad():
            xp = x if self.premap is None else module.get_submodule(self.premap)(x)
            router_mod = None if self.router_call is None else module.get_submodule(self.router_call[0])
            logits, _ = self._logits(router, router_mod, xp.reshape(-1, H))
            logits_f = logits.detach().float().reshape(-1, self.experts.num_experts)
            bias = _tensor(module, self.correction)
            eps = torch.finfo(logits.dtype).eps
            step = 2 * eps * (logits_f.abs() + logits_f.square().mean(dim=-1, keepdim=True).sqrt())

            tied = torch.zeros(logits_f.shape[0], dtype=torch.bool, device=logits_f.device)
            # The plan's scores, and sigmoid and softmax: a router form chosen for its choices
            # (top-1 renormalised: any monotone score) may not saturate where the layer's does.
            for scores in dict.fromkeys([rk.scores, "sigmoid", "softmax"]):
                tied |= self._tied(logits_f, step, scores, rk, bias)
            return tied

    def _tied(self, logits_f: Tensor, step: Tensor, scores: str, rk: RouterKind, bias: Optional[Tensor]) -> Tensor:
        def choice(lf: Tensor) -> Tensor:
            c = ops.scores_of(lf, scores)
            return c if bias is None else c + bias.detach().float()

        c = choice(logits_f)
        margin_T = 2 * torch.maximum((choice(logits_f + step) - c).abs(), (choice(logits_f - step) - c).abs()).amax(-1)
        tied = torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
        if self.num_groups > 1:
            G = self.num_groups
            grouped = c.reshape(c.shape[0], G, -1)
            score = ops.group_scores(grouped, rk.group_max)
            if self.topk_groups < G:
                tied |= _boundary_gap(score, self.topk_groups) <= 2 * margin_T
            c = ops.group_mask(c, G, self.topk_groups, rk.group_max)
        if self.top_k < c.shape[-1]:
            tied |= _boundary_gap(c, self.top_k) <= margin_T
        return tied

    def describe(self) -> str:
        parts = [f"router {self.kind} top-{self.top_k}", f"experts {self.ffn.describe()}"]
        if self.premap:
            parts.insert(0, f"pre {self.premap}")
        parts += [f"+ {t.describe()}" + (" (shared expert)" if t.ffn else "") for t in self.terms]
        return ", ".join(parts)


def _boundary_gap(scores: Tensor, k: int) -> Tensor:
    """Per row: the k-th best score minus the (k+1)-th (inf where either is not finite)."""
    top = scores.topk(k + 1, dim=-1).values
    gap = top[:, k - 1] - top[:, k]
    return torch.where(torch.isfinite(top[:, k - 1]) & torch.isfinite(top[:, k]), gap, torch.full_like(gap, math.inf))


def _tensor(module: nn.Module, name: Optional[str]) -> Optional[Tensor]:
    if name is None:
        return None
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _shared_expert(form: FFNForm, module: nn.Module, xp_TH: Tensor, names: tuple = ()) -> Tensor:
    names = list(names) or [n for n, _ in module.named_parameters()]
    w_in, w_out, b_in, b_out = form.build(lambda i: module.get_parameter(names[i]).unsqueeze(0))
    return torch.ops.moec.shared_expert(xp_TH, w_in[0], w_out[0], None if b_in is None else b_in[0],
                                        None if b_out is None else b_out[0], *form.attrs)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
