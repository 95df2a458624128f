"""Recognise MoE routers, experts and shared experts by structure, then prove them by semantics.

Contract: structure only proposes candidates (a [E, H] router weight, stacked [E, ., .] expert
weights or a list of E MLPs, the integer and float attributes a module holds). A candidate is
accepted only when the canonical ``moec::`` computation reproduces the module's own forward on
probe inputs: the same expert choice exactly and the same values within a tight tolerance, at
several token counts and input scales (large inputs exercise clamps). Class and attribute names
are never trusted. A recogniser returns a spec, or a string saying why it declined.

Legend: T tokens, H hidden, E experts, K top-k, F first-GEMM width, I expert hidden.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moec.capture.observe import overwritten
from moec.capture.specs import ExpertsSpec, FFNSpec, RouterSpec
from moec.ir import ops

Declined = str

_PROBE_TOKENS = (7, 16)
_PROBE_SCALES = (1.0, 300.0)


def _probe_x(shape, like: Tensor, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(like.dtype).to(like.device)


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype.is_floating_point != b.dtype.is_floating_point:
        return False
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-4
    scale = max(b.abs().max().item(), 1e-6)
    return bool(((a - b).abs() <= tol * scale + 1e-6 * scale).all())


def _call(fn: Callable, *args) -> Union[object, Declined]:
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as err:  # a module rejecting a probe is a reason, not a crash
        return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def _as_tuple(out) -> tuple:
    if isinstance(out, tuple):
        return out
    if isinstance(out, list):
        return tuple(out)
    return (out,)


def _int_attrs(*modules: nn.Module) -> set[int]:
    found = set()
    for m in modules:
        for v in vars(m).values():
            if isinstance(v, int) and not isinstance(v, bool):
                found.add(v)
    return found


def _float_attrs(module: nn.Module) -> dict[str, float]:
    return {k: float(v) for k, v in vars(module).items() if isinstance(v, float) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------


def router_weight(module: nn.Module, num_experts: int, hidden: int) -> Optional[tuple[str, nn.Module]]:
    """The one [E, H] parameter a router module holds, as (name, owner)."""
    found = [
        (name, module.get_submodule(name.rpartition(".")[0]) if "." in name else module)
        for name, p in module.named_parameters()
        if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden)
    ]
    return found[0] if len(found) == 1 else None


def _vectors_E(module: nn.Module, num_experts: int) -> list[tuple[str, Tensor]]:
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return [(n, t) for n, t in named if t.dim() == 1 and t.shape[0] == num_experts]


def _route_candidates(num_experts: int, top_k: int, ints: set[int], corrections: list, capacity_opts: list[int]):
    groups = [(1, 1)] + [
        (g, tg) for g in sorted(ints) for tg in sorted(ints)
        if 1 < g < num_experts and num_experts % g == 0 and 1 <= tg < g
    ]
    kinds = ("top1",) + ops.ROUTER_KINDS if top_k == 1 else ops.ROUTER_KINDS
    for kind in dict.fromkeys(kinds):
        if kind == "top1" and top_k != 1:
            continue
        sigmoid = kind.startswith("sigmoid")
        for renorm in (True, False) if kind not in ("topk_softmax", "top1") else (False,):
            for (ng, tg) in groups if sigmoid else [(1, 1)]:
                if (kind == "sigmoid_bias_grouped_topk") != (ng > 1):
                    continue
                for corr in corrections if sigmoid else [(None, None)]:
                    for cap in capacity_opts:
                        yield kind, renorm, ng, tg, corr, cap


def _match_route(logits, idx_act, w_act, kind, top_k, renorm, ng, tg, corr, cap) -> Optional[tuple[float, float]]:
    """(routed scaling, max error) under which this candidate reproduces (idx, weights), else None."""
    try:
        w_c, idx_c = ops.route_reference(logits, corr, kind, top_k, ng, tg, renorm, 1.0, cap)
    except ValueError:
        return None
    if idx_c.shape != idx_act.shape:
        return None
    idx_c_s, order_c = idx_c.sort(dim=-1)
    idx_a_s, order_a = idx_act.sort(dim=-1)
    if not torch.equal(idx_c_s, idx_a_s):
        return None
    w_c = w_c.gather(-1, order_c).double()
    w_a = w_act.double().gather(-1, order_a) if w_act.shape == idx_act.shape else w_act.double()
    if w_a.shape != w_c.shape:
        return None
    ratio = (w_a.abs().sum() / w_c.abs().sum().clamp_min(1e-30)).item()
    scaling = 1.0 if abs(ratio - 1.0) < 1e-5 else round(ratio, 6)
    return (scaling, (w_c * scaling - w_a).abs().max().item()) if _close(w_c * scaling, w_a) else None


class RouterRecognition:
    """A router module whose forward returns logits, top-k weights and top-k choice (any order).

    ``ranks`` are the input ranks the probes verified; a call with another rank runs the
    module's own forward (GPT-OSS's softmax over dim 1 means something else for 3-D input).
    """

    def __init__(self, spec: RouterSpec, roles: list[str], flatten: dict[int, bool], weights_dtype: torch.dtype):
        self.spec, self.roles, self.flatten, self.weights_dtype = spec, roles, flatten, weights_dtype

    @property
    def ranks(self) -> set[int]:
        return set(self.flatten)

    def forward(self, hidden: int, original: Callable):
        spec, roles, flatten, weights_dtype = self.spec, self.roles, self.flatten, self.weights_dtype

        def moec_router_forward(x, *args, **kwargs):
            if x.dim() not in flatten or args or kwargs:
                return original(x, *args, **kwargs)
            x_in = x.reshape(-1, hidden) if flatten[x.dim()] else x
            logits = spec.logits(x_in)
            weights, idx = spec.route(logits)
            out = []
            for role in roles:
                if role == "logits":
                    out.append(logits)
                elif role == "weights":
                    out.append(weights.to(weights_dtype))
                elif role == "idx":
                    out.append(idx)
                else:  # a one-hot dispatch mask (top-1 routers with capacity)
                    onehot = F.one_hot(idx.clamp(min=0), spec.num_experts) * (idx >= 0).unsqueeze(-1)
                    out.append(onehot.squeeze(-2))
            return tuple(out)

        return moec_router_forward


def _router_plan(module: nn.Module, x: Tensor, weight: Tensor, vectors, ints):
    """Probe once: (plan, roles, flattens, weights dtype, logits dtype) or the reason it fails."""
    num_experts = weight.shape[0]
    out = _call(module, x)
    if isinstance(out, str):
        return f"router forward failed on a probe: {out}"
    outs = _as_tuple(out)
    if not all(isinstance(o, Tensor) for o in outs):
        return "router returns non-tensor outputs"
    logit_pos, logit_bias = None, None
    for pos, o in enumerate(outs):
        if not o.is_floating_point() or o.shape[-1] != num_experts:
            continue
        for bname, b in [(None, None)] + vectors:
            ref = F.linear(x.to(o.dtype), weight.to(o.dtype), None if b is None else b.to(o.dtype))
            if o.numel() == ref.numel() and _close(o.reshape(ref.shape), ref):
                logit_pos, logit_bias = pos, bname
                break
        if logit_pos is not None:
            break
    if logit_pos is None:
        return "no router output equals the router's linear projection (logits)"
    logits = outs[logit_pos]
    idx_pos = [p for p, o in enumerate(outs) if not o.is_floating_point() and o.dtype != torch.bool]
    if len(idx_pos) != 1:
        return "router does not return exactly one integer (expert choice) output"
    ip = idx_pos[0]
    idx_out = outs[ip]
    onehot = idx_out.shape == logits.shape and bool(idx_out.max() <= 1) and bool(idx_out.min() >= 0)
    if onehot:
        if (idx_out.sum(-1) > 1).any():
            return "router's one-hot dispatch mask picks more than one expert per token"
        idx_act = torch.where(idx_out.sum(-1) > 0, idx_out.argmax(-1), -1).unsqueeze(-1)
    else:
        idx_act = idx_out
    top_k = idx_act.shape[-1]
    w_pos = [
        p for p, o in enumerate(outs)
        if p != logit_pos and o.is_floating_point() and o.shape[:-1] == idx_act.shape[:-1] and o.shape[-1] in (top_k, 1)
    ]
    if len(w_pos) != 1:
        return "router does not return exactly one top-k weight output"
    wp = w_pos[0]
    roles = [{logit_pos: "logits", ip: "onehot" if onehot else "idx", wp: "weights"}.get(p, "?") for p in range(len(outs))]
    if "?" in roles:
        return f"router returns {len(outs)} outputs; moec reproduces logits, weights and choice only"
    corrections = [(None, None)] + [(n, t) for n, t in vectors if n != logit_bias]
    capacity_opts = [0] + (sorted(i for i in ints if i > 0) if onehot else [])
    # Some kinds coincide (softmax -> top-k -> renormalise equals top-k -> softmax): keep the one
    # that reproduces the module's arithmetic most exactly.
    best = None
    for kind, renorm, ng, tg, (cname, corr), cap in _route_candidates(num_experts, top_k, ints, corrections, capacity_opts):
        match = _match_route(logits, idx_act, outs[wp], kind, top_k, renorm, ng, tg, corr, cap)
        if match is not None and (best is None or match[1] < best[1]):
            best = ((kind, renorm, ng, tg, cname, cap, match[0], logit_bias, top_k), match[1])
    if best is not None:
        return best[0], roles, logits.dim() < x.dim(), outs[wp].dtype, logits.dtype
    return "router's choice or weights match no known router kind " + str(ops.ROUTER_KINDS)


@contextlib.contextmanager
def _perturbed_vectors(module: nn.Module, num_experts: int):
    """Give every floating [E] vector of the router random values while it is probed.

    A freshly initialised correction bias (DeepSeek's ``e_score_correction_bias``) is all zeros,
    so routing with and without it agree and the probes could not tell that the router adds it:
    the layer would then be silently wrong once trained values are loaded.
    """
    gen = torch.Generator().manual_seed(1234)
    values = [(t, torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(0.5))
              for _, t in _vectors_E(module, num_experts) if t.is_floating_point()]
    with overwritten(values):
        yield


def recognise_router(module: nn.Module, num_experts: int, hidden: int) -> Union[RouterRecognition, Declined]:
    with _perturbed_vectors(module, num_experts):
        return _recognise_router(module, num_experts, hidden)


def _recognise_router(module: nn.Module, num_experts: int, hidden: int) -> Union[RouterRecognition, Declined]:
    found = router_weight(module, num_experts, hidden)
    if found is None:
        return f"no single [{num_experts}, {hidden}] router weight"
    wname, _ = found
    weight = module.get_parameter(wname)
    vectors = _vectors_E(module, num_experts)
    ints = _int_attrs(module)
    verified: dict[int, tuple] = {}
    first_reason = None
    for rank, shapes in ((2, [(7, hidden), (16, hidden)]), (3, [(1, 7, hidden), (2, 5, hidden)])):
        results = [_router_plan(module, _probe_x(shape, weight, seed), weight, vectors, ints)
                   for seed, shape in enumerate(shapes)]
        reasons = [r for r in results if isinstance(r, str)]
        if reasons:
            first_reason = first_reason or reasons[0]
            continue
        if len({(r[0], tuple(r[1]), r[2]) for r in results}) == 1:
            verified[rank] = results[0]
    if not verified:
        return first_reason or "router behaves differently at different token counts"
    some = next(iter(verified.values()))
    if "onehot" in some[1]:
        # Capacity only shows once an expert overflows: probe with enough tokens for the largest
        # candidate capacity, and take the capacity from that probe (small probes cannot tell).
        cap_max = max([i for i in ints if 0 < i <= 4096] or [1])
        big = _router_plan(module, _probe_x((min(8192, 2 * num_experts * cap_max + 1), hidden), weight, 9),
                           weight, vectors, ints)
        if isinstance(big, str):
            return f"router on {2 * num_experts * cap_max + 1} tokens: {big}"
        for rank, r in verified.items():
            if r[0][:5] != big[0][:5]:
                return "router's capacity behaviour matches no candidate"
            verified[rank] = (big[0],) + tuple(r[1:])
    plans = {(r[0], tuple(r[1])) for r in verified.values()}
    if len(plans) != 1:
        return "router behaves differently for 2-D and 3-D inputs"
    (kind, renorm, ng, tg, cname, cap, scaling, bias_name, top_k), roles, _, weights_dtype, logits_dtype = next(
        iter(verified.values()))
    tensors = dict(itertools.chain(module.named_parameters(), module.named_buffers()))

    def fetch():
        return (
            tensors_now(module, wname),
            None if bias_name is None else tensors_now(module, bias_name),
            None if cname is None else tensors_now(module, cname),
        )

    del tensors
    spec = RouterSpec(
        kind=kind, top_k=top_k, num_experts=num_experts, renormalize=renorm, num_groups=ng, topk_groups=tg,
        scaling=scaling, capacity=cap, fetch=fetch, logits_dtype=logits_dtype,
    )
    return RouterRecognition(spec, list(roles), {rank: r[2] for rank, r in verified.items()}, weights_dtype)


def tensors_now(module: nn.Module, name: str) -> Tensor:
    """A parameter or buffer by dotted name, read at call time (it may have been replaced)."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


# ----------------------------------------------------------------------------------------------
# Expert FFN weights
# ----------------------------------------------------------------------------------------------


def mlp_linears(module: nn.Module, hidden: int) -> Optional[tuple[list[nn.Linear], nn.Linear]]:
    """(input projections, output projection) of an MLP-shaped module H -> I -> H, else None."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    n_params = sum(1 for _ in module.parameters())
    if len(linears) not in (2, 3) or n_params != sum(1 + (l.bias is not None) for l in linears):
        return None  # other parameters would be ignored by the FFN formula
    for out in reversed(linears):  # registration order usually follows use: try the last first
        ins = [l for l in linears if l is not out]
        if out.out_features == hidden and all(
            l.in_features == hidden and l.out_features == out.in_features for l in ins
        ):
            return ins, out
    return None


def _activation_candidates(gated: bool, module: nn.Module):
    if gated:
        for act in ("swiglu", "geglu", "geglu_tanh"):
            for interleaved in (False, True):
                yield act, interleaved, 1.0, 0.0
        floats = _float_attrs(module)
        alphas = [v for k, v in floats.items() if "alpha" in k.lower()] or [1.702]
        limits = [v for k, v in floats.items() if "limit" in k.lower() or "clamp" in k.lower()] or [7.0]
        for alpha, limit in itertools.product(alphas, limits):
            for interleaved in (True, False):
                yield "clamped_swiglu", interleaved, alpha, limit
    else:
        for act in ops.UNGATED_ACTIVATIONS:
            yield act, False, 1.0, 0.0


def list_ffn_candidates(experts: list[nn.Module], hidden: int) -> Union[list[FFNSpec], Declined]:
    """Candidate FFN specs for a list of per-expert MLP modules, stacked on each call."""
    parts = [mlp_linears(m, hidden) for m in experts]
    if any(p is None for p in parts):
        return "experts are not all MLPs of 2 or 3 nn.Linear layers (H -> I -> H)"
    n_in = {len(p[0]) for p in parts}
    shapes = {tuple((l.in_features, l.out_features, l.bias is not None) for l in p[0] + [p[1]]) for p in parts}
    if len(n_in) != 1 or len(shapes) != 1:
        return "experts differ in shape"
    gated = n_in.pop() == 2
    inter = parts[0][1].in_features
    has_bias = parts[0][1].bias is not None
    if any((l.bias is not None) != has_bias for l in parts[0][0]):
        return "experts mix biased and unbiased projections"
    candidates = []
    for order in ((0, 1), (1, 0)) if gated else ((0,),):
        def fetch(order=order):
            w_in = torch.stack([torch.cat([p[0][i].weight for i in order]) for p in parts])
            w_out = torch.stack([p[1].weight for p in parts])
            if not has_bias:
                return w_in, w_out, None, None
            b_in = torch.stack([torch.cat([p[0][i].bias for i in order]) for p in parts])
            return w_in, w_out, b_in, torch.stack([p[1].bias for p in parts])

        for act, interleaved, alpha, limit in _activation_candidates(gated, experts[0]):
            if interleaved:
                continue  # separate gate and up projections are never interleaved
            candidates.append(FFNSpec(act, False, False, hidden, inter, alpha, limit, has_bias, fetch,
                                      sources=tuple(experts)))
    return candidates


def stacked_ffn_candidates(owner: nn.Module, num_experts: int, hidden: int) -> Union[list[FFNSpec], Declined]:
    """Candidate FFN specs for stacked [E, ., .] expert weights held directly by ``owner``."""
    params = dict(owner.named_parameters(recurse=False))
    mats = {n: p for n, p in params.items() if p.dim() == 3 and p.shape[0] == num_experts}
    vecs = {n: p for n, p in params.items() if p.dim() == 2 and p.shape[0] == num_experts}
    if len(mats) != 2:
        return f"expected 2 stacked [{num_experts}, ., .] expert weights, found {len(mats)}"
    if len(params) != len(mats) + len(vecs) or len(vecs) not in (0, 2):
        return "stacked experts hold parameters the FFN formula would not use"
    candidates = []
    for (n_in, w_in), (n_out, w_out) in itertools.permutations(mats.items()):
        for transposed in (False, True):
            F_, H_in = (w_in.shape[2], w_in.shape[1]) if transposed else (w_in.shape[1], w_in.shape[2])
            I_, H_out = (w_out.shape[1], w_out.shape[2]) if transposed else (w_out.shape[2], w_out.shape[1])
            if H_in != hidden or H_out != hidden:
                continue
            for gated in (F_ == 2 * I_, ) if F_ != I_ else (False,):
                if F_ != I_ and not gated:
                    continue
                bias_sets = [(None, None)]
                if vecs:
                    b_in = [n for n, v in vecs.items() if v.shape[1] == F_]
                    b_out = [n for n, v in vecs.items() if v.shape[1] == hidden and n not in b_in[:1]]
                    if not b_in or not b_out:
                        continue
                    bias_sets = [(b_in[0], b_out[0])]
                for bi, bo in bias_sets:
                    def fetch(n_in=n_in, n_out=n_out, bi=bi, bo=bo):
                        get = owner.get_parameter
                        return get(n_in), get(n_out), None if bi is None else get(bi), None if bo is None else get(bo)

                    for act, interleaved, alpha, limit in _activation_candidates(gated, owner):
                        candidates.append(
                            FFNSpec(act, transposed, interleaved, hidden, I_, alpha, limit, bi is not None, fetch)
                        )
    return candidates or "stacked expert weights do not form H -> I -> H"


def expert_container(module: nn.Module, hidden: int) -> Optional[tuple[int, Callable[[], Union[list[FFNSpec], Declined]]]]:
    """(num_experts, candidate maker) if ``module`` holds experts: stacked weights or a list of MLPs."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (
        len(list(module.children())) >= 2 and not list(module.parameters(recurse=False))
    ):
        children = list(module.children())
        if len(children) >= 2 and all(mlp_linears(c, hidden) for c in children):
            return len(children), lambda: list_ffn_candidates(children, hidden)
    mats = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    if len(mats) == 2 and mats[0].shape[0] == mats[1].shape[0] >= 2:
        E = mats[0].shape[0]
        return E, lambda: stacked_ffn_candidates(module, E, hidden)
    return None


# ----------------------------------------------------------------------------------------------
# Experts modules with a routing interface: forward(x_TH, idx_TK, weights_TK) -> out_TH
# ----------------------------------------------------------------------------------------------


def _probe_routing(T: int, E: int, K: int, like: Tensor, seed: int, pattern: str):
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif pattern == "one_expert":  # every token's first choice is expert 0; expert E-1 gets nothing
        idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 2, generator=g)[: K - 1]])
                           for _ in range(T)]) if E > 2 and K < E - 1 else torch.arange(K).expand(T, K).clone()
    else:
        raise ValueError(pattern)
    w = torch.rand(T, K, generator=g, dtype=torch.float64).to(like.dtype)
    return idx.to(like.device), w.to(like.device)


def recognise_experts(module: nn.Module, hidden: int, num_experts: int, top_k: int,
                      interface: str) -> Union[ExpertsSpec, Declined]:
    """``interface`` is "index" (idx [T, K]) or "onehot" (mask [T, 1, E], weights [T, 1])."""
    found = expert_container(module, hidden)
    if found is None:
        return "holds neither stacked expert weights nor a list of expert MLPs"
    E, make = found
    if E != num_experts:
        return f"holds {E} experts but the router picks among {num_experts}"
    candidates = make()
    if isinstance(candidates, str):
        return candidates
    like = next(module.parameters())
    probes = []
    for seed, (T, scale) in enumerate(itertools.product(_PROBE_TOKENS, _PROBE_SCALES)):
        for pattern in ("random", "one_expert"):
            x = _probe_x((T, hidden), like, 100 + seed, scale)
            idx, w = _probe_routing(T, E, top_k, like, seed, pattern)
            if interface == "onehot":
                args = (x, F.one_hot(idx, E).reshape(T, 1, E), w.reshape(T, 1))
            else:
                args = (x, idx, w)
            out = _call(module, *args)
            if isinstance(out, str):
                return f"experts forward failed on a probe: {out}"
            if not isinstance(out, Tensor):
                return "experts forward does not return one tensor"
            probes.append((x, idx, w, out))
    for ffn in candidates:
        spec = ExpertsSpec(ffn, E)
        if all(_close(_call(spec, x, idx, w), out) for x, idx, w, out in probes):
            return spec
    return f"no canonical expert FFN ({len(candidates)} layouts x activations tried) reproduces its output"


def recognise_shared(module: nn.Module, hidden: int) -> Union[FFNSpec, Declined]:
    parts = mlp_linears(module, hidden)
    if parts is None:
        return "not an MLP of 2 or 3 nn.Linear layers"
    candidates = list_ffn_candidates([module], hidden)
    if isinstance(candidates, str):
        return candidates
    like = next(module.parameters())
    probes = []
    for seed, (T, scale) in enumerate(itertools.product(_PROBE_TOKENS, _PROBE_SCALES)):
        x = _probe_x((T, hidden), like, 200 + seed, scale)
        out = _call(module, x)
        if not isinstance(out, Tensor):
            return f"shared expert forward failed on a probe: {out}"
        probes.append((x, out))
    for c in candidates:
        def fetch(c=c):
            w_in, w_out, b_in, b_out = c.fetch()
            return w_in[0], w_out[0], None if b_in is None else b_in[0], None if b_out is None else b_out[0]

        spec = FFNSpec(c.activation, False, False, hidden, c.expert_hidden_size, c.alpha, c.limit, c.has_bias, fetch)
        from moec.capture.specs import shared_expert

        if all(_close(_call(shared_expert, spec, x), out) for x, out in probes):
            return spec
    return "no canonical FFN reproduces its output"
