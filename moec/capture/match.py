"""Match an observed MoE layer against moec's canonical forms: router, expert FFN, the rest.

Contract: every function takes what ``observe`` saw and returns the canonical forms that
reproduce it, best first, or a ``Miss``: which step failed and how close the best candidate
came. Structure proposes candidates (which tensors could be the weights, which integers could
be group counts); only agreement with the observation accepts one.

- ``premaps``: what the router and experts read: the hidden state itself, or the output of a
  token-wise norm module of the layer (a block that computes ``x + moe(norm(x))`` itself).
- ``match_selection``: router forms (``moec.ir.routing``) whose expert choice is exactly the
  observed one on every token: score (softmax, sigmoid, top-k of the logits), correction bias,
  group-limited top-k (group score by top-2 sum or max), from logits ``x' W^T (+ b)``.
- ``ffn_candidates`` / ``match_ffn``: FFN forms (layout, gate/up order, activation, biases)
  built from an expert's tensors, accepted when each observed contribution of expert e to
  token t is a multiple of the form's output on x'_t; the multiples are the routing weights.
- ``match_weights``: renormalisation (none, sum, p-norm) and a routed scaling factor that turn
  a selection's scores into the observed weights.
- ``match_rest``: the layer's output with its experts zeroed, as a sum of terms moec can emit:
  the input (a residual) and other submodules of the layer applied to x' (a shared expert, a
  dense branch), optionally scaled by sigmoid of a width-1 projection (a shared-expert gate).

Legend: T tokens, H hidden, E experts, K top-k, F first-GEMM width, I expert hidden.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moec.capture.candidates import Candidate, expert_tensors, owner_of
from moec.capture.pack import Holder
from moec.capture.specs import PostNorm
from moec.ir import ops


@dataclasses.dataclass
class Miss:
    """A step that found no canonical form: which, why, and how close the best one came."""

    step: str  # "shapes" | "combine" | "router" | "experts" | "weights" | "rest" | "outputs" | "verify"
    reason: str
    closeness: str = ""
    probe: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)  # the Call that failed

    def __str__(self) -> str:
        return f"{self.step}: {self.reason}" + (f" (closest: {self.closeness})" if self.closeness else "")


# ----------------------------------------------------------------------------------------------
# What the experts and router read
# ----------------------------------------------------------------------------------------------


def premaps(cand: Candidate, skip: set[int]) -> list[Optional[str]]:
    """None (the hidden state itself), then every norm-like submodule: all its tensors are [H]."""
    H = cand.hidden
    out: list[Optional[str]] = [None]
    for name, m in cand.module.named_modules():
        if not name or id(m) in skip:
            continue
        tensors = list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]
        if tensors and all(t.dim() == 1 and t.shape[0] == H for t in tensors):
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# Router: which experts each token gets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    base: str  # softmax_topk | topk_softmax | sigmoid_topk
    correction: Optional[str]  # layer-relative name of the [E] tensor added for the choice only
    num_groups: int = 1
    topk_groups: int = 1
    group_max: bool = False

    def kind(self, pnorm: Optional[float] = None) -> str:
        base = self.base
        if base == "sigmoid_topk" and self.num_groups > 1:
            base = "sigmoid_bias_grouped_topk"
        mods = (["group_max"] if self.group_max and self.num_groups > 1 else []) + (
            [f"pnorm={float(pnorm)!r}"] if pnorm is not None else [])
        return "+".join([base, *mods])


def int_attrs(module: nn.Module) -> set[int]:
    found = set()
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, int) and not isinstance(v, bool):
                found.add(v)
            elif isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v):
                found.update(i for i in v if not isinstance(i, bool))
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            found.update(v for v in config.to_dict().values() if isinstance(v, int) and not isinstance(v, bool))
    return found


def float_attrs(module: nn.Module) -> set[float]:
    found = set()
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, float):
                found.add(v)
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            found.update(v for v in config.to_dict().values() if isinstance(v, float))
    return found


def _groupings(E: int, ints: set[int]) -> list[tuple[int, int]]:
    named = [(g, tg) for g in sorted(ints) for tg in sorted(ints) if 1 < g < E and E % g == 0 and 1 <= tg < g]
    every = [(g, tg) for g in range(2, E) if E % g == 0 for tg in range(1, g)] if E <= 64 else []
    return list(dict.fromkeys(named + every))


def _chosen(choice_TE: Tensor, K: int) -> Tensor:
    chosen = torch.zeros_like(choice_TE, dtype=torch.bool)
    return chosen.scatter_(-1, choice_TE.topk(K, dim=-1).indices, True)


_BASE_SCORES = {"softmax_topk": "softmax", "sigmoid_topk": "sigmoid", "sqrtsoftplus_topk": "sqrtsoftplus"}


def _score(base: str, logits_TE: Tensor) -> Tensor:
    return ops.scores_of(logits_TE, _BASE_SCORES.get(base, "logits"))


_SCORED_BASES = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sqrtsoftplus_topk")


def match_selection(logits_TE: Tensor, member_TE: Tensor, vectors: dict[str, Tensor],
                    ints: set[int], subset_of_top: int = 0) -> tuple[list[Selection], float]:
    """Router forms that choose exactly ``member_TE``; and the best fraction of tokens matched.
    With ``subset_of_top`` K: forms whose top K holds every token's ``member_TE`` (slots dropped)."""
    K = subset_of_top or int(member_TE[0].sum())
    E = logits_TE.shape[-1]
    found, best = [], 0.0

    def agreement(chosen_TE: Tensor) -> float:
        same = (chosen_TE | ~member_TE) if subset_of_top else (chosen_TE == member_TE)
        return same.all(-1).double().mean().item()

    for base in _SCORED_BASES:
        score = _score(base, logits_TE)
        for cname, corr in [(None, None), *vectors.items()]:
            choice = score if corr is None else score + corr.double()
            agree = agreement(_chosen(choice, K))
            best = max(best, agree)
            if agree == 1.0:
                # Group limits that change nothing here are no reason to assume any; should a
                # probe show them, the plan fails there and is observed again on that probe.
                found.append(Selection(base, cname))
                continue
            for ng, tg in _groupings(E, ints):
                for group_max in (False, True):
                    if K > tg * (E // ng):
                        continue
                    c = ops.group_mask(choice, ng, tg, group_max)
                    agree = agreement(_chosen(c, K))
                    best = max(best, agree)
                    if agree == 1.0:
                        found.append(Selection(base, cname, ng, tg, group_max))
        if found and all(s.correction is None and s.num_groups == 1 for s in found):
            continue  # softmax, sigmoid and plain logits choose alike: let the weights decide
    return found, best


# ----------------------------------------------------------------------------------------------
# Router: the weights of the chosen experts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouterForm:
    selection: Selection
    renormalize: bool
    pnorm: Optional[float]
    scaling: float
    error: float
    unit: bool = False  # every chosen expert weighs exactly ``scaling`` (PhiMoE's sparsemixer at threshold 0; top-1 renormalised)

    @property
    def kind(self) -> str:
        return self.selection.kind(self.pnorm if self.renormalize else None)


def _weights(sel: Selection, logits_TE: Tensor, member_TE: Tensor, renorm: bool, pnorm: Optional[float]) -> Tensor:
    """[T, E] weights (0 off the selection) before scaling."""
    if sel.base == "topk_softmax":
        w = logits_TE.masked_fill(~member_TE, float("-inf")).softmax(-1)
    else:
        w = _score(sel.base, logits_TE) * member_TE
    if renorm:
        norm = w.sum(-1, keepdim=True) if pnorm is None else w.abs().pow(pnorm).sum(-1, keepdim=True).pow(1 / pnorm)
        w = w / (norm + 1e-20)
    return w


def _snap(value: float, known: set[float]) -> float:
    for k in sorted(known | {1.0}):
        if k != 0 and abs(value / k - 1) < 1e-5:
            return float(k)
    return float(f"{value:.6g}")


def intended(sel: Selection, logits_TE: Tensor, vectors: dict[str, Tensor], K: int) -> Tensor:
    """[T, E]: the K experts ``sel`` chooses per token, before any capacity drops a slot."""
    score = _score(sel.base, logits_TE)
    choice = score if sel.correction is None else score + vectors[sel.correction].double()
    if sel.num_groups > 1:
        choice = ops.group_mask(choice, sel.num_groups, sel.topk_groups, sel.group_max)
    return _chosen(choice, K)


def match_weights(selections: list[tuple[Selection, Tensor]], logits_TE: Tensor, member_TE: Tensor,
                  weights_TE: Tensor, floats: set[float], ints: set[int], tol: float,
                  unc_TE: Optional[Tensor] = None) -> tuple[list[RouterForm], float]:
    """Router forms whose weights are the observed ``weights_TE`` on the slots the layer kept,
    each within ``tol`` of the largest weight beyond its observation's own error ``unc_TE``.
    ``selections`` pairs each rule with the experts it chooses ([T, E], before capacity drops:
    weights are renormalised over all chosen experts, dropped or not)."""
    pnorms = sorted({2.0} | {float(p) for p in (floats | ints) if 1 < p <= 8})  # 2: F.normalize's default
    known_TE = member_TE & weights_TE.isfinite()  # the slots whose weight was observed
    scale = max(weights_TE[known_TE].abs().max().item() if known_TE.any() else 0.0, 1e-30)
    found, best = [], math.inf
    for sel, chosen_TE in selections:
        options = [(False, None), (True, None)] + [(True, p) for p in pnorms]
        for renorm, pnorm in options:
            w = _weights(sel, logits_TE, chosen_TE, renorm, pnorm)
            ratio = (weights_TE[known_TE] / w[known_TE].clamp_min(1e-30))
            scaling = _snap(ratio.median().item(), floats) if ratio.numel() else 1.0
            off_TE = (w * scaling - weights_TE).abs()
            if unc_TE is not None:
                off_TE = (off_TE - unc_TE).clamp_min(0)
            err = (off_TE[known_TE].max() / scale).item() if known_TE.any() else 0.0
            best = min(best, err)
            if err <= tol:
                found.append(RouterForm(sel, renorm, pnorm, scaling, err))
    if found and member_TE.any() and bool((member_TE.sum(-1) <= 1).all()):
        # Top-1 renormalised: every weight is exactly its scaling and, in exact arithmetic, gives
        # the router no gradient (eager's is rounding noise); constant weights are that exactly.
        # The renormalised forms stay behind them: a score that underflows (a sigmoid of logits
        # below -46 over an epsilon of 1e-20) renormalises to less than 1 in the layer's own
        # arithmetic, and verification's large probes reach that.
        found = [dataclasses.replace(f, renormalize=False, pnorm=None, unit=True) for f in found if f.renormalize] + found
    if not found and known_TE.any():
        err = ((weights_TE[known_TE] - 1.0).abs().max() / scale).item()
        best = min(best, err)
        if err <= tol:  # hard routing: the chosen experts' outputs are summed as they are
            found = [RouterForm(sel, False, None, 1.0, err, unit=True) for sel, _ in selections]
    found.sort(key=lambda f: (preference(f), not f.unit))
    return found, best


_BASE_ORDER = ("softmax_topk", "sigmoid_topk", "topk_softmax", "sqrtsoftplus_topk")


def preference(form: RouterForm) -> tuple:
    """Among forms that fit, the plainest: equivalent forms (softmax then top-k renormalised is
    top-k then softmax) are told apart by their rounding only, which is no reason to prefer one."""
    sel = form.selection
    return (form.error > 1e-6, sel.correction is not None, sel.num_groups > 1, sel.group_max,
            form.pnorm is not None, _BASE_ORDER.index(sel.base), form.error)


# ----------------------------------------------------------------------------------------------
# Expert FFN forms
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FFNForm:
    """How to build ``moec::expert_ffn``'s weights from the experts' tensors ([E, ...] each).

    ``w_in``: indices of the input projection(s) (one fused or gate then up); ``*_t``: whether
    each tensor is stored [in, out] (transposed relative to nn.Linear); ``halves``: for one
    fused gated tensor, "gate_up" / "up_gate" split halves or "even" / "odd" interleaved (which
    columns are the gate)."""

    w_in: tuple[int, ...]
    w_in_t: tuple[bool, ...]
    w_out: int
    w_out_t: bool
    b_in: tuple[int, ...]
    b_out: Optional[int]
    halves: str
    activation: str
    alpha: float = 1.0
    limit: float = 0.0
    inter: int = 0
    post: Optional[PostNorm] = None  # an RMSNorm on the expert's output, before its weight

    @property
    def gated(self) -> bool:
        return self.activation in ops.GATED_ACTIVATIONS

    @property
    def layout_key(self) -> tuple:
        """Forms with equal keys build the same weights (they differ in the activation only)."""
        return (self.w_in, self.w_in_t, self.w_out, self.w_out_t, self.b_in, self.b_out, self.halves)

    @property
    def transposed(self) -> bool:
        """All matrices stored [in, out]: passed as they are, in moec's transposed layout."""
        return all(self.w_in_t) and self.w_out_t

    def build(self, stacked: Callable[[int], Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(w_in, w_out, b_in, b_out) as ``moec::expert_ffn`` takes them: [E, F, H] / [E, H, I]
        (or [E, H, F] / [E, I, H] when ``transposed``), gate/up as its ``interleaved`` flag
        expects (gate first, or gate on even columns). The experts' own tensors when they are
        stored that way already; views or copies of them otherwise (gradients flow back)."""
        tr = self.transposed
        dim = -1 if tr else -2  # the F dimension of w_in

        def oriented(i: int, stored_t: bool) -> Tensor:
            t = stacked(i)
            return t.transpose(-1, -2) if stored_t != tr else t

        parts = [oriented(i, t) for i, t in zip(self.w_in, self.w_in_t)]
        w_in = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        b_in = None
        if self.b_in:
            bs = [stacked(i) for i in self.b_in]
            b_in = bs[0] if len(bs) == 1 else torch.cat(bs, dim=-1)
        if self.halves == "up_gate":
            w_in = torch.cat(w_in.chunk(2, dim=dim)[::-1], dim=dim)
            b_in = None if b_in is None else torch.cat(b_in.chunk(2, dim=-1)[::-1], dim=-1)
        elif self.halves == "odd":
            w_in = _swap_pairs(w_in, dim)
            b_in = None if b_in is None else _swap_pairs(b_in, -1)
        w_out = oriented(self.w_out, self.w_out_t)
        b_out = None if self.b_out is None else stacked(self.b_out)
        return w_in, w_out, b_in, b_out

    @property
    def attrs(self) -> tuple:
        return (self.activation, self.transposed, self.halves in ("even", "odd"), self.alpha, self.limit)

    def describe(self) -> str:
        layout = {1: "fused", 2: "gate/up"}[len(self.w_in)] if self.gated else "ungated"
        post = f", then {self.post.describe()}" if self.post is not None else ""
        return f"{self.activation} ({layout}{', ' + self.halves if self.gated and len(self.w_in) == 1 else ''}{post})"


def _swap_pairs(t: Tensor, dim: int) -> Tensor:
    """Swap columns 2j and 2j+1 along ``dim`` (odd-gate interleaving -> even-gate)."""
    t = t.movedim(dim, -1)
    shape = t.shape
    return t.reshape(*shape[:-1], shape[-1] // 2, 2).flip(-1).reshape(shape).movedim(-1, dim)


def _activations(gated: bool, floats: set[float]):
    if gated:
        for act in ("swiglu", "geglu", "geglu_tanh", "reglu"):
            if act in ops.GATED_ACTIVATIONS:
                yield act, 1.0, 0.0
        alphas = sorted({f for f in floats if 0.5 <= f <= 4}) or [1.702]
        limits = sorted({f for f in floats if 1 <= f <= 100}) or [7.0]
        for alpha, limit in itertools.product(alphas, limits):
            yield "clamped_swiglu", alpha, limit
        for act in ("swiglu_limit", "swiglu_limit_post"):  # clamps at a limit (DeepSeek-V4, Step-3.7)
            if act in ops.GATED_ACTIVATIONS:
                for limit in sorted({f for f in floats if 1 <= f <= 1000}) or [7.0, 10.0]:
                    yield act, 1.0, limit
        if "softcap_swiglu" in ops.GATED_ACTIVATIONS:  # gate and up soft-capped (Inkling-2)
            caps = sorted({f for f in floats if 1 <= f <= 1000})
            for gate_cap, up_cap in itertools.product(caps, caps):
                yield "softcap_swiglu", gate_cap, up_cap
    else:
        for act in ("relu", "relu2", "gelu", "gelu_tanh", "silu"):
            if act in ops.UNGATED_ACTIVATIONS:
                yield act, 1.0, 0.0


def _orientations(shape: tuple[int, int], H: int) -> list[tuple[bool, int]]:
    """(stored [in, out]?, the non-H width) for a matrix with one side H."""
    out = []
    if shape[1] == H:
        out.append((False, shape[0]))  # [out, in] with in = H... for an input projection
    if shape[0] == H:
        out.append((True, shape[1]))
    return out


def ffn_candidates(shapes: list[tuple[int, ...]], H: int, floats: set[float]) -> list[FFNForm]:
    """Every FFN form the per-expert tensor ``shapes`` can hold (the E dim removed)."""
    mats = [i for i, s in enumerate(shapes) if len(s) == 2]
    vecs = [i for i, s in enumerate(shapes) if len(s) == 1]
    if len(mats) not in (2, 3) or len(mats) + len(vecs) != len(shapes) or len(vecs) > len(mats):
        return []
    found = []
    for out in reversed(mats):  # code usually registers the output projection last: try it first
        ins = [i for i in mats if i != out]
        # The output projection maps I -> H: stored [H, I] (nn.Linear) or [I, H].
        for out_t in (False, True):
            oshape = shapes[out]
            if (oshape[1] if out_t else oshape[0]) != H:
                continue
            inter = oshape[0] if out_t else oshape[1]
            in_opts = []
            for i in ins:
                in_opts.append([(t, w) for t, w in ((False, shapes[i][0]), (True, shapes[i][1]))
                                if (shapes[i][1] if not t else shapes[i][0]) == H])
            for combo in itertools.product(*in_opts):
                widths = [w for _, w in combo]
                if len(ins) == 1:
                    Fw = widths[0]
                    if Fw == 2 * inter:
                        gated_opts = [("gate_up", True), ("up_gate", True), ("even", True), ("odd", True)]
                    elif Fw == inter:
                        gated_opts = [("none", False)]
                    else:
                        continue
                    orders = [tuple(ins)]
                else:
                    if widths != [inter, inter]:
                        continue
                    Fw = 2 * inter
                    gated_opts = [("gate_up", True)]
                    orders = [tuple(ins), tuple(ins[::-1])]
                t_of = dict(zip(ins, (t for t, _ in combo)))
                for order in orders:
                    for b_in, b_out in _bias_sets(shapes, vecs, order, Fw, inter, H):
                        for halves, gated in gated_opts:
                            for act, alpha, limit in _activations(gated, floats):
                                found.append(FFNForm(order, tuple(t_of[i] for i in order), out, out_t, b_in, b_out,
                                                     halves, act, alpha, limit, inter))
    return found


def _bias_sets(shapes, vecs, order, Fw, inter, H):
    """(b_in indices in ``order``'s order, b_out index) using every vector exactly once."""
    in_width = [Fw] if len(order) == 1 else [inter, inter]
    for n_in in range(len(order) + 1):
        for b_in in itertools.permutations(vecs, n_in):
            if n_in not in (0, len(order)):
                continue
            if [shapes[i][0] for i in b_in] != in_width[:n_in] and n_in:
                continue
            rest = [v for v in vecs if v not in b_in]
            if len(rest) > 1 or (rest and shapes[rest[0]][0] != H):
                continue
            yield tuple(b_in), (rest[0] if rest else None)


def stacker(cand: Candidate) -> tuple[list[tuple[int, ...]], Callable[[int], Tensor]]:
    """Per-expert shapes of the experts' tensors, and ``stacked(i)``: tensor i as [E, ...],
    read from the live parameters at call time (a view, or a stack of the per-expert modules')."""
    g = cand.experts
    owner = owner_of(cand)
    E = g.num_experts
    if g.layout == "modules":
        first = owner.get_submodule(g.names[0])
        names = [n for n, _ in first.named_parameters()]
        shapes = [tuple(p.shape) for _, p in first.named_parameters()]
        modules = [owner.get_submodule(n) for n in g.names]

        def stacked(i: int) -> Tensor:
            return torch.stack([m.get_parameter(names[i]) for m in modules])

        stacked.__dict__["sources"] = tuple(modules)
        stacked.__dict__["names"] = tuple(names)
        stacked.__dict__["owner"] = owner
        stacked.__dict__["holder"] = owner.__dict__.setdefault("_moec_pack_holder", Holder())
        stacked.__dict__["one"] = lambda i, e: modules[e].get_parameter(names[i]).unsqueeze(0)
        return shapes, stacked
    params = [owner.get_parameter(n) for n in g.names]
    if g.layout == "stacked":
        shapes = [tuple(p.shape[1:]) for p in params]

        def stacked(i: int) -> Tensor:
            p = owner.get_parameter(g.names[i])
            # A padded stack: the rows past E are no expert's. (Fewer rows: this rank's shard.)
            return p[:E] if p.shape[0] > E else p

        stacked.__dict__["one"] = lambda i, e: stacked(i)[e : e + 1]
        return shapes, stacked
    shapes = [(p.shape[0] // E, p.shape[1]) for p in params]

    def stacked(i: int) -> Tensor:
        p = owner.get_parameter(g.names[i])
        return p.view(E, p.shape[0] // E, p.shape[1])

    stacked.__dict__["one"] = lambda i, e: stacked(i)[e : e + 1]
    return shapes, stacked


# Above this many bytes of float64 expert weights per layout, match_ffn builds one expert's at a
# time instead of all of them once per layout (a DeepSeek-V3-wide layer holds gigabytes).
STREAM_BYTES = 1 << 30


def _one_expert(form: "FFNForm", stacked, e: int) -> tuple:
    """Expert ``e``'s (w_in, w_out, b_in, b_out) in float64, each with a leading dim of 1."""
    one = stacked.__dict__.get("one")
    parts = form.build(lambda i: one(i, e)) if one is not None else tuple(
        None if t is None else t[e : e + 1] for t in form.build(stacked))
    return tuple(None if t is None else t.double() for t in parts)


def ffn_outputs(form: FFNForm, weights, xp_TH: Tensor, pairs: list[tuple[Tensor, int]],
                post_tensor: Optional[Callable[[str], Tensor]] = None, ids: Optional[list[int]] = None) -> list[Tensor]:
    """The form's output for each (token rows, expert) pair (``post_tensor``: a name's tensor,
    for the form's post-norm scale; ``ids``: the pairs' expert ids where ``weights`` hold only
    theirs)."""
    w_in, w_out, b_in, b_out = weights
    post = form.post
    scale = None if post is None or post.scale is None else post_tensor(post.scale).detach().double()
    out = []
    for i, (rows, e) in enumerate(pairs):
        y = ops.ffn_reference(xp_TH[rows], w_in[e], w_out[e], None if b_in is None else b_in[e],
                              None if b_out is None else b_out[e], *form.attrs)
        if post is not None:
            y = post.apply(y, torch.full((y.shape[0],), e if ids is None else ids[i], dtype=torch.long), scale)
        out.append(y)
    return out


def post_norms(module: nn.Module, prefix: str, E: int, H: int, skip: set[int]) -> list[PostNorm]:
    """RMSNorms an expert's output may pass through before its routing weight, from the tensors
    of ``module`` (at ``prefix`` in the layer) outside ``skip``: no scale, or one ``[H]`` or
    ``[E, H]`` tensor applied after or before normalising, as ``w`` or ``1 + w``; each with the
    small float attributes of the scale's own module as eps (defaults where it has none)."""
    def eps_of(mod: nn.Module) -> list[float]:
        return sorted({f for f in float_attrs(mod) if 0 < f <= 1e-2}, reverse=True)

    found = [PostNorm(None, False, eps) for eps in eps_of(module) or [1e-6, 1e-5]]
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in skip or not t.is_floating_point() or tuple(t.shape) not in ((H,), (E, H)):
            continue
        owner = name.rpartition(".")[0]
        eps_list = eps_of(module.get_submodule(owner)) or eps_of(module) or [1e-6, 1e-5]
        for eps, order, offset in itertools.product(eps_list, ("after", "before"), (0.0, 1.0)):
            found.append(PostNorm(_join(prefix, name), t.dim() == 2, eps, order, offset))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def match_ffn(forms: list[FFNForm], stacked, xp_TH: Tensor, contrib_ETH: Tensor, member_TE: Tensor,
              tol: float, floor_T: Optional[Tensor] = None, post_tensor: Optional[Callable[[str], Tensor]] = None
              ) -> tuple[Optional[tuple[FFNForm, Tensor, Tensor]], float]:
    """The form whose outputs the contributions are multiples of, those multiples [T, E] and how
    far each may be off [T, E]. ``floor_T``: the rounding a contribution carries (a difference of
    two whole outputs of the layer: large beside a small routed part when a residual or dense
    branch dominates); a multiple read off a small expert output carries it divided by that
    output's size."""
    E = member_TE.shape[1]
    pairs = [(member_TE[:, e].nonzero().flatten(), e) for e in range(E) if member_TE[:, e].any()]
    scale_T = contrib_ETH.abs().amax(-1).amax(0).clamp_min(1e-300)
    if floor_T is not None:
        scale_T = torch.maximum(scale_T, floor_T.double())
    best, best_err = None, math.inf
    cache: dict = {}
    one = stacked.__dict__.get("one")
    stream = one is not None and 8 * E * sum(one(i, 0).numel() for i in range(_tensor_count(forms))) > STREAM_BYTES
    for form in forms:
        key = form.layout_key
        try:
            with torch.no_grad():
                if stream:  # lazily: a form that fails on its first experts reads no more
                    ys = (ffn_outputs(form, _one_expert(form, stacked, e), xp_TH.double(), [(rows, 0)],
                                      post_tensor, [e])[0] for rows, e in pairs)
                else:
                    if key not in cache:
                        cache[key] = tuple(None if t is None else t.double() for t in form.build(stacked))
                    ys = ffn_outputs(form, cache[key], xp_TH.double(), pairs, post_tensor)
                found = _multiples(pairs, ys, contrib_ETH, member_TE, scale_T, floor_T, max(tol, best_err))
        except (RuntimeError, ValueError):
            continue
        if found[0] < best_err:
            best, best_err = (form, *found[1:]), found[0]
    return (best if best_err <= tol else None), best_err


def _multiples(pairs, ys, contrib_ETH: Tensor, member_TE: Tensor, scale_T: Tensor, floor_T: Optional[Tensor],
               give_up: float) -> tuple[float, Tensor, Tensor]:
    """(error, multiples [T, E], their uncertainty [T, E]) of one form's expert outputs ``ys``
    (one per (rows, expert) pair); stops reading ``ys`` once the error passes ``give_up``."""
    weights_TE = torch.zeros(member_TE.shape, dtype=torch.float64, device=contrib_ETH.device)
    unc_TE = torch.zeros(member_TE.shape, dtype=torch.float64, device=contrib_ETH.device)
    err = 0.0
    for (rows, e), y in zip(pairs, ys):
        c = contrib_ETH[e, rows]
        yy = (y * y).sum(-1)
        w = (c * y).sum(-1) / yy.clamp_min(1e-300)
        # Relative to the token's whole routed output: a slot with a tiny weight has a tiny,
        # imprecisely observed contribution (a difference of two outputs).
        resid = (c - w[:, None] * y).abs().amax(-1) / scale_T[rows]
        err = max(err, resid.max().item())
        # An expert whose output is zero for the token (every ReLU unit off) says nothing
        # about its weight there: NaN, which match_weights skips.
        weights_TE[rows, e] = torch.where(yy > 0, w, torch.full_like(w, math.nan))
        if floor_T is not None:  # |<dc, y>| / |y|^2 <= |dc| / |y|, dc at most the floor per element
            unc_TE[rows, e] = floor_T.double()[rows] * math.sqrt(y.shape[-1]) / yy.sqrt().clamp_min(1e-300)
        if err > give_up:
            break
    return err, weights_TE, unc_TE


def _tensor_count(forms: list["FFNForm"]) -> int:
    """How many of the experts' tensors ``forms`` read."""
    used = {i for f in forms for i in (*f.w_in, f.w_out, *f.b_in, *([] if f.b_out is None else [f.b_out]))}
    return max(used) + 1 if used else 0


def match_ffn_input_scaled(forms: list[FFNForm], stacked, xp_TH: Tensor, contrib_ETH: Tensor, member_TE: Tensor,
                           selections: list[tuple[Selection, Tensor]], logits_TE: Tensor, floats: set[float],
                           tol: float) -> Optional[tuple[FFNForm, list[RouterForm]]]:
    """An FFN form and router forms with ``contribution = FFN_e(w_te * x'_t)``: the weight scales
    the token before the expert (Llama-4), so the router is found with the form, not after it."""
    E = member_TE.shape[1]
    pairs = [(member_TE[:, e].nonzero().flatten(), e) for e in range(E) if member_TE[:, e].any()]
    scale_T = contrib_ETH.abs().amax(-1).amax(0).clamp_min(1e-300)
    options = [(False, None), (True, None), (True, 2.0)]
    weightings = [(sel, renorm, pnorm, _weights(sel, logits_TE, chosen, renorm, pnorm))
                  for sel, chosen in selections for renorm, pnorm in options]
    cache: dict = {}
    for form in forms:
        if form.layout_key not in cache:
            with torch.no_grad():
                cache[form.layout_key] = tuple(None if t is None else t.double() for t in form.build(stacked))
        w_in, w_out, b_in, b_out = cache[form.layout_key]
        fits = []
        for sel, renorm, pnorm, w_TE in weightings:
            err = 0.0
            for rows, e in pairs:
                x = xp_TH.double()[rows] * w_TE[rows, e, None]
                y = ops.ffn_reference(x, w_in[e], w_out[e], None if b_in is None else b_in[e],
                                      None if b_out is None else b_out[e], *form.attrs)
                err = max(err, ((y - contrib_ETH[e, rows]).abs().amax(-1) / scale_T[rows]).max().item())
                if err > tol:
                    break
            if err <= tol:
                fits.append(RouterForm(sel, renorm, pnorm, 1.0, err))
        if fits:
            return form, sorted(fits, key=preference)
    return None


# ----------------------------------------------------------------------------------------------
# The rest: residual, shared experts, dense branches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Term:
    """One summand of the layer's output besides its routed experts: ``coef * [sigmoid(gate(x')) *]
    source`` with source the input ("input"), or a submodule applied to x' ("module")."""

    source: str  # "input" | "module" | "tensor" (a [H] parameter of the layer, added as it is)
    module: Optional[str] = None  # layer-relative path (of the parameter for "tensor")
    gate: Optional[str] = None  # layer-relative path of a width-1 projection module
    coef: float = 1.0
    ffn: Optional["FFNForm"] = None  # the module is this FFN: emitted as ``moec::shared_expert``
    # source "ffn": an MLP made of the layer's own projections (sibling Linears), these
    # layer-relative parameter paths in ``ffn``'s order.
    params: tuple = ()

    def describe(self) -> str:
        what = {"input": "the input (residual)", "tensor": f"{self.module} (a bias)",
                "ffn": f"MLP({', '.join(self.params)})(x')"}.get(self.source, f"{self.module}(x')")
        gate = f"sigmoid({self.gate}(x')) * " if self.gate else ""
        coef = "" if self.coef == 1.0 else f"{self.coef:g} * "
        return coef + gate + what


def branch_modules(cand: Candidate, skip: set[int], premap: Optional[str]) -> list[str]:
    """The layer's submodules that are neither the router, the experts nor the premap, outermost
    first (a branch's own children are not branches of the layer)."""
    out = []
    taken: list[str] = []
    for name, m in cand.module.named_modules():
        if not name or id(m) in skip or name == premap:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        if not list(m.parameters()):
            continue
        if any(id(sub) in skip for sub in m.modules()):
            continue  # holds the router or the experts
        taken.append(name)
        out.append(name)
    return out


def match_rest(rest_TH: Tensor, x_TH: Tensor, xp_TH: Tensor, x_shape, branches: dict[str, Callable],
               gates: dict[str, Callable], tol: float,
               biases: Optional[dict[str, Tensor]] = None) -> tuple[Optional[list[Term]], float]:
    """The smallest sum of terms equal to ``rest_TH``."""
    scale = max(rest_TH.abs().max().item(), 1e-30)
    if rest_TH.abs().max().item() == 0:
        return [], 0.0
    terms: list[tuple[Term, Tensor]] = [(Term("input"), x_TH.double())]
    for name, b in (biases or {}).items():
        terms.append((Term("tensor", name), b.detach().double().expand_as(x_TH)))
    for name, fn in branches.items():
        y = fn(xp_TH)
        if y is None:
            continue
        terms.append((Term("module", name), y))
        for gname, g in gates.items():
            gv = g(xp_TH)
            if gv is not None:
                terms.append((Term("module", name, gname), torch.sigmoid(gv) * y))
    best_err = math.inf
    for n in range(1, min(len(terms), 4) + 1):
        for subset in itertools.combinations(terms, n):
            if len({(t.module, t.source) for t, _ in subset}) < n:
                continue  # one term per source
            A = torch.stack([v.reshape(-1) for _, v in subset], dim=1)
            b = rest_TH.double().reshape(-1)
            coef = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
            coef = torch.tensor([1.0 if abs(c - 1) < 1e-4 else c for c in coef.tolist()], dtype=torch.float64,
                                device=A.device)
            err = ((A @ coef - b).abs().max() / scale).item()
            best_err = min(best_err, err)
            if err <= tol and all(abs(c) > 1e-6 for c in coef.tolist()):
                return [dataclasses.replace(t, coef=float(f"{c:.7g}")) for (t, _), c in zip(subset, coef.tolist())], err
    return None, best_err


def module_fn(module: nn.Module, x_shape) -> Callable[[Tensor], Optional[Tensor]]:
    """The module applied to x' [T, H] (as the layer's input shape), as float64 [T, H], or None."""
    def fn(xp_TH: Tensor) -> Optional[Tensor]:
        try:
            with torch.no_grad():
                lead = [1] * (len(x_shape) - 2)  # the input's rank, all tokens in its last token dim
                y = module(xp_TH.reshape(*lead, *xp_TH.shape).to(next(module.parameters()).dtype))
        except Exception:
            return None
        if isinstance(y, (tuple, list)):
            y = y[0] if y and isinstance(y[0], Tensor) else None
        if not isinstance(y, Tensor) or y.numel() % xp_TH.shape[0]:
            return None
        return y.reshape(xp_TH.shape[0], -1).double()

    return fn


def vectors_E(module: nn.Module, E: int, skip: set[int]) -> dict[str, Tensor]:
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return {n: t for n, t in named if t.dim() == 1 and t.shape[0] == E and t.is_floating_point() and id(t) not in skip}


def router_logits(cand: Candidate, xp_TH: Tensor, bias: Optional[Tensor], logit_map: str = "") -> Tensor:
    """[T, E] float64 logits of x' (``logit_map``: one of ``specs.PRODUCT_KEY_MAPS`` for a
    product-key candidate, whose weight projects to 2n key scores)."""
    from moec.capture.specs import product_key_scores

    w = cand.module.get_parameter(cand.router).double()
    w_EH = w.t() if cand.router_transposed else w
    proj = F.linear(xp_TH.double(), w_EH, None if bias is None else bias.double())
    return product_key_scores(proj, logit_map) if logit_map else proj


def expert_ids(cand: Candidate) -> set[int]:
    return {id(t) for _, t in expert_tensors(cand)}


def dense_ffn(module: nn.Module, H: int, floats: set[float]) -> Optional[tuple[FFNForm, list[str]]]:
    """The FFN form of an always-on MLP (a shared expert), proved on probes, and its parameter
    names; None when its parameters form no FFN moec knows or its forward is something else."""
    named = list(module.named_parameters())
    if not named or len(named) > 6 or list(module.buffers()):
        return None
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    forms = ffn_candidates(shapes, H, floats)
    if not forms:
        return None
    like = named[0][1]
    g = torch.Generator().manual_seed(21)
    probes = [(torch.randn(9, H, generator=g, dtype=torch.float64) * s).to(like.device, like.dtype) for s in (1.0, 30.0)]
    with torch.no_grad():
        try:
            wants = [module(x) for x in probes]
        except Exception:
            return None
        if not all(isinstance(w, Tensor) and w.shape == x.shape for w, x in zip(wants, probes)):
            return None

        def stacked(i: int) -> Tensor:
            return module.get_parameter(names[i]).unsqueeze(0)

        built: dict = {}
        for form in forms:
            if form.layout_key not in built:
                built[form.layout_key] = [None if t is None else t[0] for t in form.build(stacked)]
            weights = built[form.layout_key]
            if all(_close_rel(ops.ffn_reference(x, *weights, *form.attrs), want) for x, want in zip(probes, wants)):
                return form, names
    return None


def _close_rel(a: Tensor, b: Tensor) -> bool:
    tol = 2e-2 if b.dtype in (torch.bfloat16, torch.float16) else 1e-4
    scale = max(b.abs().max().item(), 1e-12)
    return bool(((a.double() - b.double()).abs() <= tol * scale).all())


def sibling_ffns(module: nn.Module, H: int, skip: set[int], floats: set[float],
                 xp_TH: Tensor) -> list[tuple[FFNForm, list[str], Tensor]]:
    """MLPs made of the layer's own projections (Doge's shared ``gate_proj``, ``up_proj`` and
    ``down_proj`` beside its experts, no module of their own): every FFN form that 2 or 3 of its
    direct children, each one matrix with one side H and an optional bias, can make, with the
    parameter names and its float64 output on ``xp_TH``. Children in ``skip`` are left out."""
    linear = []
    for name, child in module.named_children():
        named = list(child.named_parameters())
        if id(child) in skip or any(id(sub) in skip for sub in child.modules()) or not named or len(named) > 2:
            continue
        mats = [p for _, p in named if p.dim() == 2]
        if len(mats) != 1 or H not in mats[0].shape or any(p.dim() > 2 for _, p in named):
            continue
        linear.append([f"{name}.{n}" for n, _ in named])
    out = []
    for count in (3, 2):
        for group in itertools.combinations(linear, count):
            names = [n for names in group for n in names]
            tensors = [module.get_parameter(n) for n in names]
            forms = ffn_candidates([tuple(t.shape) for t in tensors], H, floats)
            built: dict = {}
            for form in forms:
                if form.layout_key not in built:
                    built[form.layout_key] = [None if t is None else t[0].double()
                                              for t in form.build(lambda i: tensors[i].detach().unsqueeze(0))]
                with torch.no_grad():
                    y = ops.ffn_reference(xp_TH.double(), *built[form.layout_key], *form.attrs)
                out.append((form, names, y))
        if out:
            return out
    return out
