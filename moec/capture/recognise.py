"""Recognise one MoE-looking layer from what it computes: observe, match, assemble, verify.

Contract: ``recognise(cand, calls)`` returns a ``BlockPlan`` that reproduced the layer's own
forward (and its gradients) on probe inputs shaped like ``calls``, or a ``Miss`` naming the
step that failed and how close the best candidate came. ``verify(plan, module, calls)`` is the
proof, run again on every layer a plan is bound to. Layers held in half precision are observed
on a float32 copy (rounding would hide small contributions) and verified in their own dtype.
Verification's probe tokens whose routing is a tie, or within one rounding of the logits of one
(``BlockPlan.tied_tokens``; exact ties are common in bf16 and in scores saturated by the large
probes), are redrawn first: which expert wins a tie is torch.topk's implementation detail, not
the layer's. An output outside tolerance still passes when it is as close to a float64 twin's
as the layer's own is (float32 rounding of an underflowed score, say).

Pseudo-code::

    obs = observe(layer, probe)                       # output, rest, contribution of each expert
    for x' in (x, norm_i(x)):                         # what the router and experts read
        for b in (None, [E] vectors):                 # the router's bias
            selections = router forms choosing exactly obs.member_TE from x' W^T + b
            form, weights = the FFN form whose outputs the contributions are multiples of
            routers = selections whose renormalised, scaled scores are those multiples
            terms = residual / submodules(x') / sigmoid-gated submodules summing to obs.rest
            plan = assemble(...); if verify(plan): return plan
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture import match as m
from moec.capture.pack import packed_fetch, packer
from moec.ir import ops
from moec.capture.candidates import Candidate, expert_tensors, owner_of
from moec.capture.match import Miss
from moec.capture.observe import Observation, observe, randomized_constants
from moec.capture.plan import BlockPlan, Output
from moec.capture.specs import PRODUCT_KEY_MAPS
from moec.capture.probes import (Call, as_accurate, call_module, close, main_output, probe_call, probe_shapes,
                                 random_x, rel_error)

_FP32_TOL = 1e-4


def _tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else _FP32_TOL


def _observation_tokens(E: int) -> int:
    return min(128, max(32, 4 * E))


def copy_as(module: nn.Module, dtype: torch.dtype, device: Optional[torch.device] = None) -> nn.Module:
    """A copy of ``module`` with its floating tensors in ``dtype`` (and on ``device``, when
    given), made tensor by tensor: no copy in the module's own dtype first (a full-size bf16
    DeepSeek-V3 layer is 22 GB)."""
    memo: dict = {}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in memo:
                continue
            v = (t.detach().to(device=device, dtype=dtype, copy=True) if t.is_floating_point()
                 else t.detach().to(device=device, copy=True))
            v = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v
            if t.is_floating_point():  # what ``observe.zeroed`` restores the copy from
                v._moec_source, v._moec_versions = t, (v._version, t._version)
            memo[id(t)] = v
    return copy.deepcopy(module, memo)


def _as_float32(cand: Candidate, call: Call) -> tuple[Candidate, Call]:
    """The layer and call in float32 (a copy), for observing a half-precision layer."""
    if call.x.dtype == torch.float32:
        return cand, call
    module = copy_as(cand.module, torch.float32)

    def up(v):
        return v.float() if isinstance(v, Tensor) and v.is_floating_point() else v

    return (dataclasses.replace(cand, module=module),
            Call(tuple(up(a) for a in call.args), {k: up(v) for k, v in call.kwargs.items()}, call.x_pos))


def recognise(cand: Candidate, calls: list[Call]) -> Union[BlockPlan, Miss]:
    """Observe on one probe; when the plans it gives fail verification on another probe (an
    expert capacity that only shows once an expert overflows, say), observe again there."""
    E = cand.experts.num_experts
    call = calls[0]
    shape = probe_shapes(call, _observation_tokens(E)) or tuple(call.x.shape)
    probe, first = probe_call(call, shape, seed=11), None
    seen = {"top_k": 0}  # the most experts any token kept in any observation so far
    for _ in range(3):
        found = _observed_plans(cand, probe, seen)
        if call.x.device.type != "cpu":
            # The float32 copy observation made of a half-precision layer, freed before
            # verification needs the memory (deep copies of modules can hold reference cycles).
            gc.collect()
        result = found if isinstance(found, Miss) else _first_verified(found, cand.module, calls)
        if not isinstance(result, Miss):
            return result
        first = first or result
        if result.probe is None:
            return first
        probe = result.probe  # observe where the plan went wrong: the drops, the clamps show there
    return first


def _first_verified(plans: list[BlockPlan], module: nn.Module, calls: list[Call]) -> Union[BlockPlan, Miss]:
    misses = []
    for plan in plans:
        miss = verify(plan, module, calls, full=True)
        if miss is None:
            return plan
        misses.append(miss)
    return misses[0]


def _big_tokens(E: int, ints: set[int]) -> int:
    """Enough tokens for an expert to overflow the largest capacity the layer could hold."""
    cap = max([i for i in ints if 0 < i <= 4096] or [64])
    return int(min(8192, max(256, 2 * E * cap + 1)))


def _observed_plans(cand: Candidate, call: Call, seen: Optional[dict] = None) -> Union[list[BlockPlan], Miss]:
    obs_cand, obs_call = _as_float32(cand, call)
    keep = [t for _, t in expert_tensors(obs_cand)]
    training = obs_cand.module.training
    obs_cand.module.eval()
    try:
        with randomized_constants(obs_cand.module, keep):
            return _match(obs_cand, obs_call, low_precision=call.x.dtype != torch.float32, seen=seen)
    finally:
        obs_cand.module.train(training)


def _match(cand: Candidate, call: Call, low_precision: bool, seen: Optional[dict] = None) -> Union[list[BlockPlan], Miss]:
    """Plans that reproduce the observation, most likely first (verification picks one).
    ``seen["top_k"]``: the most experts a token kept in earlier observations of the layer (a
    capacity can drop every token's second choice on one probe)."""
    obs = observe(cand, call)
    if isinstance(obs, str):
        return Miss("shapes", obs)
    seen = {"top_k": 0} if seen is None else seen
    seen["top_k"] = top_k_hint = max(seen["top_k"], int(obs.member_TE.sum(-1).max()))
    E, H = cand.experts.num_experts, cand.hidden
    err = obs.additivity_error()
    if err > 1e-4:
        return Miss("combine", "the output is not its experts' contributions plus a remainder (a norm or "
                               "nonlinearity after the experts' sum?)", f"off by {err:.2g} of the routed output")
    counts = obs.member_TE.sum(-1)
    if int(counts.max()) == 0:
        return Miss("router", "no expert changed the output on the probe (the experts are not used)")
    skip = _expert_modules(cand)
    router_owner = cand.router.rpartition(".")[0]
    router_mod = cand.module.get_submodule(router_owner) if router_owner else None
    if router_mod is not None and router_mod is not cand.module:
        skip.add(id(router_mod))
    ints, floats = m.int_attrs(cand.module), m.float_attrs(cand.module)
    vectors = m.vectors_E(cand.module, E, m.expert_ids(cand))
    shapes, stacked = m.stacker(cand)
    forms = m.ffn_candidates(shapes, H, floats)
    if not forms:
        return Miss("experts", f"an expert's tensors {shapes} form no FFN moec knows (2 or 3 matrices "
                               "H -> I -> H and their biases)")
    x = call.x
    x_TH = x.reshape(-1, H).double()
    misses: list[Miss] = []
    plans: list[BlockPlan] = []
    for premap in m.premaps(cand, skip):
        xp = x if premap is None else call_module(cand.module.get_submodule(premap), Call((x,), {}, 0))
        if not isinstance(xp, Tensor) or xp.shape != x.shape:
            continue
        xp_TH = xp.reshape(-1, H).double()
        # The router's own bias (a sibling named "bias") first: read as a correction bias of
        # the choice, it chooses alike under top-1 but loses the weights' form at the extremes.
        own = f"{cand.router.rpartition('.')[0]}.bias".lstrip(".")
        readings = [(b, "") for b in [own] * (own in vectors) + [None] + [n for n in vectors if n != own]]
        if cand.logit_map:  # the weight projects to 2n key scores: which map makes them E logits
            readings = [(None, how) for how in PRODUCT_KEY_MAPS]
        for bias_name, logit_map in readings:
            plain = m.router_logits(cand, xp_TH, None if bias_name is None else vectors[bias_name], logit_map)
            corrections = {n: v for n, v in vectors.items() if n != bias_name}
            # A logit multiplier (MuSE's output_multiplier) shows only once a correction bias or a
            # group limit mixes the scaled scores with something else: tried when 1 fails.
            for logit_scale in [1.0, *sorted(f for f in floats if 0 < f <= 1e3 and f != 1.0)]:
                logits = plain * logit_scale
                routings = _routings(obs, logits, corrections, ints, floats, call, top_k_hint)
                if not isinstance(routings, Miss):
                    break
                misses.append(routings)
            if isinstance(routings, Miss):
                continue
            chosen = [(r.selection, obs.member_TE if r.capacities[0][1][:1] == ("expert_choice",)
                       else m.intended(r.selection, logits, corrections, r.capacities[0][2])) for r in routings]
            input_scaled = False
            # float32 outputs: a contribution is a difference of two, each rounded to ~6e-8 of its size
            floor_T = 64 * torch.finfo(torch.float32).eps * obs.main_TH.double().abs().amax(-1)
            # (the best-fitting form is taken; verification then checks it on every probe)
            ffn, ffn_err = m.match_ffn(forms, stacked, xp_TH, obs.contrib_ETH, obs.member_TE, 5e-5, floor_T)
            post_forms: list = []
            if ffn is None:
                # An RMSNorm on each expert's output before its weight (Ergo): no contribution
                # is then a multiple of the plain FFN's output.
                posts = _post_norms(cand, bias_name)
                ffn, post_err = m.match_ffn([dataclasses.replace(f, post=p) for p in posts for f in forms], stacked,
                                            xp_TH, obs.contrib_ETH, obs.member_TE, 5e-5, floor_T,
                                            post_tensor=lambda name: _tensor_at(cand.module, name))
                ffn_err = min(ffn_err, post_err)
                if ffn is not None:
                    # Scaling before or after normalising differs by a factor per row, which the
                    # multiples absorb: the weights decide between such readings.
                    post_forms = [dataclasses.replace(ffn[0], post=p) for p in posts
                                  if p.scale == ffn[0].post.scale and p != ffn[0].post]
            if ffn is not None:
                form, weights_TE, unc_TE = ffn
                routers, w_err = m.match_weights(chosen, logits, obs.member_TE, weights_TE, floats, ints, 1e-5,
                                                 unc_TE)
                # Rank-one experts (I = 1, Doge's): an expert's output is its activation times a
                # fixed row, so every activation explains the contributions, the difference going
                # into the weights: the activation whose weights are a router's is the one.
                rank_one = [f for f in forms if f.inter == 1 and f.layout_key == form.layout_key and f != form]
                for other in [*post_forms, *rank_one] if not routers else []:
                    found, _ = m.match_ffn([other], stacked, xp_TH, obs.contrib_ETH, obs.member_TE, 5e-5, floor_T,
                                           post_tensor=lambda name: _tensor_at(cand.module, name))
                    if found is None:
                        continue
                    routers, err = m.match_weights(chosen, logits, obs.member_TE, found[1], floats, ints, 1e-5,
                                                   found[2])
                    w_err = min(w_err, err)
                    if routers:
                        form = other
                        break
            else:
                # Llama-4 scales each token by its weight before the expert: no output is then a
                # multiple of the expert's output on x', but the router's weights tell the scale.
                found = m.match_ffn_input_scaled(forms, stacked, xp_TH, obs.contrib_ETH, obs.member_TE, chosen,
                                                 logits, floats, 1e-5)
                if found is None:
                    misses.append(Miss("experts", f"no FFN form ({len(forms)} tried) explains the experts' "
                                                  "contributions, scaling their outputs or their inputs, with or "
                                                  "without an RMSNorm on their outputs",
                                       f"relative residual {ffn_err:.2g}"))
                    continue
                form, routers = found
                input_scaled, w_err = True, 0.0
            if not routers:
                misses.append(Miss("weights", "the experts are chosen as a known router would, but their weights "
                                              "are not its renormalised, scaled scores",
                                   f"weights off by {w_err:.2g} of the largest"))
                continue
            terms = _rest(cand, obs, x_TH, xp_TH, skip, premap)
            if isinstance(terms, Miss):
                misses.append(terms)
                continue
            router_call, router_out = _router_call(cand, xp_TH, logits)
            proj = m.router_logits(cand, xp_TH, None) if logit_map else None
            output = _output(obs, logits, E, router_out, proj)
            if isinstance(output, Miss):
                misses.append(output)
                continue
            for r in routers:
                for routing in [g for g in routings if g.selection == r.selection]:
                    if r.renormalize and routing.capacities[0][1][:1] == ("expert_choice",):
                        continue
                    for rank, (capacity, mods, top_k, leading) in enumerate(routing.capacities):
                        for logits_dtype in (None, torch.float32) if low_precision else (None,):
                            plan = BlockPlan(
                                hidden=H, experts=cand.experts, router=cand.router,
                                router_transposed=cand.router_transposed, router_bias=bias_name,
                                correction=r.selection.correction, kind=_kind(r, mods), top_k=top_k,
                                num_groups=r.selection.num_groups, topk_groups=r.selection.topk_groups,
                                renormalize=r.renormalize, scaling=r.scaling, capacity=capacity, ffn=form,
                                premap=premap, terms=terms, output=output, logits_dtype=logits_dtype,
                                route_leading=leading, router_call=router_call, input_scaled=input_scaled,
                                logit_scale=logit_scale, unit_weights=r.unit, logit_map=logit_map,
                            )
                            plans.append(((_simplicity(r), rank, logits_dtype is not None), plan))
            if plans:
                # Simplest first: equivalent forms (group-limited top-1, say) verify alike, and
                # the first that verifies is the one installed.
                plans.sort(key=lambda kp: kp[0])
                unique = {(p.kind, p.correction, p.router_bias, p.num_groups, p.topk_groups, p.renormalize,
                           p.scaling, p.capacity, p.top_k, p.route_leading, p.logits_dtype, p.unit_weights): p
                          for _, p in plans}
                return list(unique.values())[:_MAX_PLANS]
    return _closest(misses)


_MAX_PLANS = 32


def _post_norms(cand: Candidate, router_bias: Optional[str]) -> list:
    """Post-expert RMSNorms to try: scales from the experts' own module, then from the rest of
    the layer; never the router's or the experts' tensors."""
    owner = owner_of(cand)
    skip = {id(t) for _, t in expert_tensors(cand)} | {id(cand.module.get_parameter(cand.router))}
    if router_bias is not None:
        skip.add(id(_tensor_at(cand.module, router_bias)))
    E, H = cand.experts.num_experts, cand.hidden
    found = m.post_norms(owner, cand.experts.owner, E, H, skip)
    if owner is not cand.module:  # a scale the layer holds beside its experts' module
        skip |= {id(t) for t in [*owner.parameters(), *owner.buffers()]}
        found += m.post_norms(cand.module, "", E, H, skip)
    return list(dict.fromkeys(found))


def _tensor_at(module: nn.Module, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _simplicity(r: m.RouterForm) -> tuple:
    return m.preference(r)



@dataclasses.dataclass
class _Routing:
    """A selection rule, and the capacities (fixed, kind modifiers, top_k, route over the input's
    leading dims) that reproduce the drops of the observation (one (0, (), K, False) entry when
    nothing was dropped)."""

    selection: m.Selection
    capacities: list[tuple[int, tuple[str, ...], int]]


def _kind(router: m.RouterForm, mods: tuple[str, ...]) -> str:
    from moec.ir.routing import RouterKind

    if mods and mods[0] == "expert_choice":
        return str(RouterKind.parse("+".join(mods)))
    return str(RouterKind.parse("+".join([router.kind, *mods])))


def _routings(obs: Observation, logits_TE: Tensor, corrections: dict, ints: set[int], floats: set[float],
              call: Call, top_k_hint: int = 0) -> Union[list[_Routing], Miss]:
    member = obs.member_TE
    rows, cols = member.sum(-1), member.sum(0)
    if int(rows.min()) == int(rows.max()) >= top_k_hint:
        sels, agree = m.match_selection(logits_TE, member, corrections, ints)
        if sels:
            return [_Routing(s, [(0, (), int(rows[0]), False)]) for s in sels]
        miss = Miss("router", "no router form chooses the experts the layer used",
                    f"{agree:.0%} of tokens' expert sets reproduced")
        same = _unrouted(member, logits_TE)
        if same is not None:
            return Miss("router", f"every token used the same experts {same} though their router scores rank the "
                                  "experts differently: the layer does not route by its router weight (transformers' "
                                  "NLLB-MoE experts module picks experts by the values of a one-hot mask)")
        if int(cols.min()) != int(cols.max()):
            return miss
    else:
        miss = None
    if int(cols.min()) == int(cols.max()):  # every expert took as many tokens: expert choice
        found = _expert_choice(logits_TE, member, ints, floats, call)
        if found:
            return found
    if int(rows.min()) != int(rows.max()) or int(rows.max()) < top_k_hint:  # token choice, slots dropped
        found = _token_choice_drops(logits_TE, member, corrections, ints, floats, call, top_k_hint)
        if isinstance(found, list) and found:
            return found
        return found if isinstance(found, Miss) else Miss(
            "router", f"tokens use between {int(rows.min())} and {int(rows.max())} experts and no capacity rule "
                      "(fixed, or a factor of the token count; token or first-choice priority) drops those slots")
    return miss or Miss("router", "no router form chooses the experts the layer used")


def _unrouted(member_TE: Tensor, logits_TE: Tensor) -> Optional[list[int]]:
    """The experts every token used, when all used the same ones (fewer than all) while their
    router scores' top choices differ; else None."""
    if member_TE.shape[0] < 2 or bool(member_TE.all()) or not bool((member_TE == member_TE[:1]).all()):
        return None
    if int(logits_TE.argmax(-1).unique().numel()) < 2:
        return None
    return member_TE[0].nonzero().flatten().tolist()


def _capacity_mods(floats: set[float], ints: set[int]) -> list[tuple[str, ...]]:
    factors = sorted({f for f in floats if 0 < f <= 16} | {1.0, 1.25, 2.0})
    mins = [0] + sorted(i for i in ints if 1 <= i <= 64)
    out = []
    for f in factors:
        for floor in (False, True):
            for cmin in mins:
                out.append(tuple([f"cf={float(f)!r}"] + (["cfloor"] if floor else []) + ([f"cmin={cmin}"] if cmin else [])))
    return out


def _scopes(logits_TE: Tensor, call: Call) -> list[tuple[bool, Tensor]]:
    """Capacities count along one token dim: all tokens, or each sequence of a [B, S, H] input."""
    lead = tuple(call.x.shape[:-1])
    out = [(False, logits_TE)]
    if len(lead) >= 2:  # at one sequence both read alike; the verification's two sequences tell
        out.append((True, logits_TE.reshape(*lead, -1)))
    return out


def _kept(idx: Tensor, E: int) -> Tensor:
    """[T, E]: which experts each token kept (dropped slots, -1, go to a spare column)."""
    idx = idx.reshape(-1, idx.shape[-1])
    slots = torch.where(idx >= 0, idx, E)
    return torch.zeros(idx.shape[0], E + 1, dtype=torch.bool, device=idx.device).scatter_(-1, slots, True)[:, :E]


def _token_choice_drops(logits_TE, member, corrections, ints, floats, call,
                        top_k_hint: int = 0) -> Union[list[_Routing], Miss]:
    rows = member.sum(-1)
    K = max(int(rows.max()), top_k_hint)
    full = rows == K
    if full.any():
        sels, agree = m.match_selection(logits_TE[full], member[full], corrections, ints)
    else:  # every token lost a slot here: the kept experts are among each token's top K
        sels, agree = m.match_selection(logits_TE, member, corrections, ints, subset_of_top=K)
    if not sels:
        return Miss("router", "no router form chooses the experts of the tokens that kept all theirs",
                    f"{agree:.0%} of them reproduced")
    E = member.shape[1]
    found = []
    for sel in sels:
        logits = logits_TE.float()
        corr = None if sel.correction is None else corrections[sel.correction].float()
        base = sel.kind()
        caps = []
        for leading, scoped in _scopes(logits, call):
            # A fixed capacity is the most any expert kept (in one sequence, when per sequence).
            fixed = int(member.reshape(*scoped.shape[:-1], E).sum(-2).max())
            options = []
            for prio in ((), ("choice_first",)):
                options.append((fixed, prio))
                options += [(0, mods + prio) for mods in _capacity_mods(floats, ints)]
            for cap, mods in options:
                kind = "+".join([base, *mods])
                try:
                    _, idx = ops.route_reference(scoped, corr, kind, K, sel.num_groups, sel.topk_groups, False, 1.0,
                                                 cap)
                except ValueError:
                    continue
                if torch.equal(_kept(idx, E), member):
                    caps.append((cap, mods, K, leading))
        if caps:
            found.append(_Routing(sel, caps))
    return found or Miss("router", f"tokens kept between {int(rows.min())} and {K} of {K} experts, and no capacity "
                                   "rule (fixed, or a factor of the token count; token or first-choice priority) "
                                   "drops those slots")


def _expert_choice(logits_TE, member, ints, floats, call) -> list[_Routing]:
    from moec.ir.routing import RouterKind

    E = member.shape[1]
    found = []
    for base, mods in (("softmax_topk", ("expert_choice",)), ("sigmoid_topk", ("expert_choice", "sigmoid"))):
        caps = []
        for leading, scoped in _scopes(logits_TE, call):
            T = scoped.shape[-2]
            taken = _kept(ops.route_reference(scoped, None, "+".join(mods), 1, 1, 1, False, 1.0,
                                              max(1, int(member.sum(0)[0]) // max(1, member.shape[0] // T)))[1], E)
            if not torch.equal(taken, member):
                continue
            C = int(member.sum(0)[0]) // (member.shape[0] // T)
            caps.append((C, mods, 1, leading))
            computed = []
            for k in sorted({1, 2, *(i for i in ints if 1 <= i <= E)}):
                for cmods in _capacity_mods(floats, ints):
                    if RouterKind.parse("+".join([*mods, *cmods])).capacity_for(0, T, k, E) == C:
                        # C = cf * T * k / E fixes only cf * k: the layer's own k and cf first.
                        cf = float(cmods[0].split("=")[1])
                        computed.append(((k not in ints, cf not in floats, -k), (0, (*mods, *cmods), k, leading)))
            caps += [c for _, c in sorted(computed, key=lambda kc: kc[0])]
        if caps:
            # Expert choice weights are the scores themselves: the selection's base says which.
            found.append(_Routing(m.Selection(base, None), caps))
    return found


def _expert_modules(cand: Candidate) -> set[int]:
    """ids of the modules that are the experts (E modules and what they hold), or that hold
    nothing but the experts' tensors; the layer itself never (stacked experts may be its own)."""
    owner = owner_of(cand)
    if cand.experts.layout == "modules":
        return {id(sub) for sub in owner.modules()}
    # (Doge's experts are the tables of two nn.Embedding children of the layer.)
    experts = m.expert_ids(cand)
    return {id(sub) for sub in cand.module.modules() if sub is not cand.module and list(sub.parameters())
            and all(id(p) in experts for p in sub.parameters())}


def _closest(misses: list[Miss]) -> Miss:
    """The miss of the furthest step (a wrong premap fails at the router; the right one later)."""
    if not misses:
        return Miss("router", "no premap of the hidden state feeds a router weight")
    order = ["shapes", "combine", "router", "experts", "weights", "rest", "outputs", "verify"]
    return max(misses, key=lambda miss: order.index(miss.step))


def _rest(cand, obs: Observation, x_TH, xp_TH, skip, premap) -> Union[list, Miss]:
    shape = obs.call.x.shape
    skip_tensors = m.expert_ids(cand) | {id(cand.module.get_parameter(cand.router))}
    branches, gates = {}, {}
    for name in m.branch_modules(cand, skip, premap):
        fn = m.module_fn(cand.module.get_submodule(name), shape)
        y = fn(xp_TH[:2])
        if y is None:
            continue
        if y.shape[-1] == cand.hidden:
            branches[name] = fn
        elif y.shape[-1] == 1:
            gates[name] = fn
    # An MLP of the layer's own projections (no module of its own): the form that best explains
    # what the branches cannot, as one more branch.
    sibling = _sibling_branch(cand, obs, x_TH, xp_TH, skip | {id(cand.module.get_submodule(n)) for n in branches})
    if sibling is not None:
        branches[_SIBLINGS] = lambda xp, y=sibling[2]: y  # (match_rest calls it on this xp_TH)
    # [H] parameters the layer holds outside its branches (JetMoE adds an output bias).
    owned = {id(p) for name in branches if name != _SIBLINGS for p in cand.module.get_submodule(name).parameters()}
    if sibling is not None:
        owned |= {id(cand.module.get_parameter(n)) for n in sibling[1]}
    owned |= {id(p) for name in gates for p in cand.module.get_submodule(name).parameters()}
    if premap is not None:
        owned |= {id(p) for p in cand.module.get_submodule(premap).parameters()}
    biases = {n: p for n, p in cand.module.named_parameters()
              if p.dim() == 1 and p.shape[0] == cand.hidden and id(p) not in owned and id(p) not in skip_tensors}
    terms, err = m.match_rest(obs.rest_TH.double(), x_TH, xp_TH, shape, branches, gates, 1e-5, biases)
    if terms is not None:
        floats = m.float_attrs(cand.module)
        for i, t in enumerate(terms):
            if t.module == _SIBLINGS:
                terms[i] = dataclasses.replace(t, source="ffn", module=None, ffn=sibling[0], params=tuple(sibling[1]))
            elif t.source == "module":
                found = m.dense_ffn(cand.module.get_submodule(t.module), cand.hidden, floats)
                if found is not None:
                    terms[i] = dataclasses.replace(t, ffn=found[0])
    if terms is None:
        found = ", ".join(list(branches) + list(gates)) or "none"
        return Miss("rest", "what the layer adds besides its experts is not a sum of its input and its "
                            f"submodules (tried: {found})", f"relative residual {err:.2g}")
    return terms


_SIBLINGS = "\0siblings"  # the branch name of an MLP made of the layer's own projections


def _sibling_branch(cand, obs: Observation, x_TH, xp_TH, skip: set[int]):
    """(form, parameter names, output on x') of the sibling-projection MLP whose output, alone or
    beside the input, best explains the layer's remainder; None when none comes within 1e-5."""
    found = m.sibling_ffns(cand.module, cand.hidden, skip, m.float_attrs(cand.module), xp_TH)
    if not found:
        return None
    rest = obs.rest_TH.double().reshape(-1, 1)
    scale = max(rest.abs().max().item(), 1e-30)
    best, best_err = None, math.inf
    for form, names, y in found:
        for cols in ([y], [x_TH.double(), y]):
            A = torch.stack([c.reshape(-1) for c in cols], dim=1)
            coef = torch.linalg.lstsq(A, rest).solution
            err = ((A @ coef - rest).abs().max() / scale).item()
            if err < best_err:
                best, best_err = (form, names, y), err
    return best if best_err <= 1e-5 else None


def _router_call(cand: Candidate, xp_TH: Tensor, logits_TE: Tensor) -> tuple[Optional[tuple[str, int]], Any]:
    """(the router weight's module and where its output holds the logits, that output) when the
    module, called on x', returns the logits (alone or in a tuple); (None, None) otherwise."""
    owner = cand.router.rpartition(".")[0]
    if not owner:
        return None, None
    module = cand.module.get_submodule(owner)
    if any(module is sub for sub in owner_of(cand).modules()):
        return None, None
    out = call_module(module, Call((xp_TH.to(cand.module.get_parameter(cand.router).dtype),), {}, 0))
    items = [out] if isinstance(out, Tensor) else list(out) if isinstance(out, (tuple, list)) else []
    for i, o in enumerate(items):
        if isinstance(o, Tensor) and o.shape == logits_TE.shape and close(o.double(), logits_TE):
            return (owner, -1 if isinstance(out, Tensor) else i), out
    return None, None


def _output(obs: Observation, logits_TE: Tensor, E: int, router_out: Any,
            proj: Optional[Tensor] = None) -> Union[Output, Miss]:
    """How the layer's output is built; ``proj``: the [T, 2n] key scores of a product-key
    router, which a layer may return viewed in another shape (Doge's [2, T, n])."""
    main = obs.out if obs.main_pos < 0 else obs.out[obs.main_pos]
    flat = main.shape != obs.call.x.shape
    if obs.main_pos < 0:
        return Output(flat=flat)
    router_items = [] if router_out is None else [router_out] if isinstance(router_out, Tensor) else list(router_out)
    extras, shape = [], "flat"
    T = logits_TE.shape[0]
    for i, o in enumerate(obs.out):
        if i == obs.main_pos:
            extras.append("main")
            continue
        if o is None:
            extras.append("none")
            continue
        if isinstance(o, Tensor) and o.numel() == logits_TE.numel() and o.shape[-1] == E and \
                close(o.reshape(logits_TE.shape).double(), logits_TE):
            extras.append("logits")
            shape = "flat" if o.dim() == 2 else "input"
            continue
        j = next((j for j, r in enumerate(router_items) if isinstance(o, Tensor) and isinstance(r, Tensor)
                  and r.shape == o.shape and r.dtype == o.dtype and close(r, o)), None)
        if j is not None:
            extras.append(("router", -1 if isinstance(router_out, Tensor) else j))
            continue
        if proj is not None and isinstance(o, Tensor) and o.numel() == proj.numel() and list(o.shape).count(T) == 1 \
                and close(o.reshape(proj.shape).double(), proj):
            extras.append(("projection", tuple(-1 if d == T else d for d in o.shape)))
            continue
        what = f"a tensor {list(o.shape)}" if isinstance(o, Tensor) else type(o).__name__
        return Miss("outputs", f"the layer also returns {what} (output {i}), which moec does not reproduce")
    return Output(obs.main_pos, tuple(extras), shape, type(obs.out) if isinstance(obs.out, tuple) else tuple, flat)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def _compare(got: Any, want: Any, tol: float, exact: Any = None) -> Optional[str]:
    """None when ``got`` (moec's) matches ``want`` (the layer's) within ``tol``, or, given
    ``exact`` (a float64 twin's), is no less accurate than ``want`` (``as_accurate``): eager
    float32 rounds where the plan may not (a renormalisation of an underflowed sigmoid, an exact
    tie of saturated scores that float64 does not have)."""
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor):
            return f"returns {type(got).__name__} instead of a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"returns {list(got.shape)} {got.dtype} instead of {list(want.shape)} {want.dtype}"
        if close(got, want, tol):
            return None
        if isinstance(exact, Tensor) and exact.shape == want.shape and as_accurate(got, want, exact):
            return None
        return f"output off by {rel_error(got, want):.2g} of its largest value"
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return "returns another structure"
        exacts = exact if isinstance(exact, (tuple, list)) and len(exact) == len(want) else [None] * len(want)
        for g, w, x in zip(got, want, exacts):
            why = _compare(g, w, tol, x)
            if why:
                return why
        return None
    return None if got is None and want is None or got == want else "returns another value"


def _probe_set(call: Call, full: bool, big: Optional[tuple[int, ...]]) -> list[tuple[Call, str, Optional[float]]]:
    """Probes in the order verification runs them: unit-scale inputs at several token counts,
    then (``full``) inputs that overflow any expert capacity, then large inputs (clamps). A
    failing probe is where a plan is observed again, so the ones that show most come first.
    Each comes with how to draw a replacement token (``_untied``): ``draw(n, seed, attempt)``."""
    x = call.x
    T = x.shape[:-1].numel()
    counts = list(dict.fromkeys([T] + ([1, 7, 3 * T + 5] if full else [])))
    shapes = [(tokens, probe_shapes(call, tokens)) for tokens in counts]
    shapes = [(tokens, shape) for tokens, shape in shapes if shape is not None]
    out = [(probe_call(call, shape, seed=100 + i), f"{tokens} tokens", _draw(call, 1.0))
           for i, (tokens, shape) in enumerate(shapes)]
    if not full:
        return out
    if big is not None and not call.token_shaped():
        out.append((probe_call(call, big, seed=99), f"{math.prod(big[:-1])} tokens: {_CAPACITY_PROBE}", _draw(call, 1.0)))
        # Nearly identical tokens all want the same experts: any capacity below the token count
        # overflows (distinct scores still, so no exact ties to break).
        for tokens in dict.fromkeys([T, 4 * T + 3]):
            shape = probe_shapes(call, tokens)
            if shape is not None:
                probe, draw = _concentrated(call, shape, seed=98)
                out.append((probe, f"{tokens} nearly identical tokens: {_CAPACITY_PROBE}", draw))
    out += [(probe_call(call, shape, seed=200 + i, scale=_LARGE), f"{tokens} tokens x{_LARGE:g}", _draw(call, _LARGE))
            for i, (tokens, shape) in enumerate(shapes)]
    return out


def _draw(call: Call, scale: float):
    """Replacement tokens for ``_untied``: fresh random ones at ``scale``, halved every second
    attempt down to 1 (large inputs saturate sigmoid and softmax scores into exact ties that any
    redraw at that scale repeats)."""
    H = call.x.shape[-1]

    def draw(n: int, seed: int, attempt: int) -> Tensor:
        return random_x((n, H), call.x, seed, scale=max(scale / 2 ** ((attempt + 1) // 2), 1.0))

    return draw


def _untied(plan: BlockPlan, module: nn.Module, probe: Call, draw) -> Call:
    """``probe`` with the tokens whose routing ties (``BlockPlan.tied_tokens``) redrawn by
    ``draw``; tokens still tied after a few rounds stay (and verification may then fail)."""
    x = probe.x
    H = x.shape[-1]
    for attempt in range(8):
        try:
            tied = plan.tied_tokens(module, x)
        except Exception:  # the router cannot be run apart from the layer here: keep the probe
            return probe
        if tied is None or not bool(tied.any()):
            break
        x_TH = x.reshape(-1, H).clone()
        x_TH[tied] = draw(int(tied.sum()), 300 + attempt, attempt)
        x = x_TH.reshape(x.shape)
    return probe.with_x(x)


def _concentrated(call: Call, shape, seed: int):
    """Nearly identical tokens (a probe) and how to draw more like them."""
    x = random_x(shape, call.x, seed, dtype=torch.float64)
    base = random_x(shape[-1:], call.x, seed + 1, dtype=torch.float64)

    def draw(n: int, seed: int, attempt: int) -> Tensor:
        return (base + 0.05 * random_x((n, shape[-1]), call.x, seed, dtype=torch.float64)).to(call.x.dtype)

    return call.with_x((base + 0.05 * x).to(call.x.dtype)), draw


_CAPACITY_PROBE = "the capacity probe"
# Large inputs exercise clamps in the experts (GPT-OSS clamps at 7); much larger ones would
# saturate the router's softmax into exact ties, which layers break in different orders.
_LARGE = 8.0


def _verify_big_shape(call: Call, E: int, ints: set[int]) -> tuple[int, ...]:
    """Two sequences when the layer takes [B, S, H] (a per-sequence capacity and a global one
    then drop differently), else one long [T, H]."""
    x = call.x
    T = _big_tokens(E, ints)
    if x.dim() == 2:
        return (T, x.shape[-1])
    return (*([1] * (x.dim() - 3)), 2, T // 2, x.shape[-1])


def verify(plan: BlockPlan, module: nn.Module, calls: list[Call], full: bool) -> Optional[Miss]:
    """None when ``plan`` reproduces ``module`` on probes of every call (eval mode; with
    ``full``, also more token counts, large inputs and the gradients)."""
    keep = [p for p in module.parameters() if p.dim() >= 2]
    ints = m.int_attrs(module) if full else set()
    training = module.training
    try:
        module.eval()
        with randomized_constants(module, keep):
            fwd = plan.forward(module, lambda x: x.dtype)
            for call in calls:
                tol = _tol(call.x.dtype)
                big = _verify_big_shape(call, plan.experts.num_experts, ints) if full else None
                for probe, what, draw in _probe_set(call, full, big):
                    probe = _untied(plan, module, probe, draw)
                    want = call_module(module, probe)
                    if isinstance(want, str):
                        return Miss("shapes", f"the layer failed on a probe ({what}): {want}")
                    got = call_module(fwd, probe)
                    if isinstance(got, str):
                        return Miss("verify", f"moec's forward failed on a probe ({what}): {got}")
                    why = _compare(got, want, tol)
                    if why and call.x.dtype != torch.float64:
                        why = _compare(got, want, tol, _twin_output(module, probe))
                    if why:
                        return Miss("verify", f"the assembled layer differs on a probe ({what})", why,
                                    probe=probe)
                if full:
                    probe = _untied(plan, module, probe_call(call, probe_shapes(call, 9) or tuple(call.x.shape), 7),
                                    _draw(call, 1.0))
                    why = _compare_grads(module, fwd, probe, tol)
                    if why:
                        return Miss("verify", "the assembled layer's gradients differ", why)
    finally:
        module.train(training)
    return None


def _twin_output(module: nn.Module, probe: Call) -> Any:
    """The output of a float64 copy of ``module`` on ``probe`` (None when it cannot run so)."""
    try:
        twin = copy_as(module, torch.float64)
    except Exception:
        return None
    out = call_module(twin, probe.with_x(probe.x.double()))
    return None if isinstance(out, str) else out


def _compare_grads(module: nn.Module, fwd, call: Call, tol: float) -> Optional[str]:
    with torch.enable_grad():
        try:
            return _grad_mismatch(module, fwd, call, tol)
        except Exception as err:  # a layer whose backward cannot run twice (state kept across calls)
            return f"its gradients could not be compared: {type(err).__name__}: {err}".splitlines()[0][:200]


# Above this many bytes of parameters, gradients are compared one parameter at a time (each
# side then holds one parameter's gradient, at the cost of a backward pass per parameter), and a
# half-precision layer's exact twin is float32 rather than float64: a full-size DeepSeek-V3
# layer holds 22.5 GB of bf16 experts, whose float64 twin alone outgrew an H200.
_STREAM_GRAD_BYTES = 1 << 30


def _grad_mismatch(module: nn.Module, fwd, call: Call, tol: float) -> Optional[str]:
    """Gradients of the input and every parameter, ``fwd`` against ``module``. A gradient outside
    ``tol`` still passes when it is as close to the float64 twin's as eager's is (a gradient that
    is mathematically zero, as the router's under top-1 renormalisation, is rounding noise on
    both sides)."""
    params = [p for p in module.parameters() if p.requires_grad]
    stream = sum(p.numel() * p.element_size() for p in params) > _STREAM_GRAD_BYTES
    grads = []
    for fn in (module, fwd):
        grads.append(_grads_of(fn, call, params, lazy=stream))
        if isinstance(grads[-1], str):
            return grads[-1]
    exact = None
    # The largest gradient anywhere: a gradient moec does not have (a router under constant
    # weights) passes when eager's is rounding noise at this scale.
    overall = max([float(w.detach().abs().max()) for w in grads[0] if w is not None and w.numel()] or [0.0])
    for i, (want, got) in enumerate(zip(*grads)):  # eager's, moec's
        if want is None and got is None:
            continue
        like = call.x if i == 0 else params[i - 1]
        if got is None and float(want.detach().abs().max()) <= 1e-2 * tol * overall:
            continue
        want = torch.zeros_like(like) if want is None else want
        got = torch.zeros_like(like) if got is None else got
        if close(got, want, max(tol, 1e-3) if i else tol):
            continue
        if call.x.dtype != torch.float64:
            if exact is None:
                half = all(p.dtype in (torch.bfloat16, torch.float16) for p in params)
                twin = copy_as(module, torch.float32 if stream and half else torch.float64)
                exact = _grads_of(twin, call.with_x(call.x.to(next(twin.parameters()).dtype)),
                                  [p for p in twin.parameters() if p.requires_grad], lazy=stream)
            if not isinstance(exact, str) and exact[i] is not None and as_accurate(got, want, exact[i]):
                continue
        what = "the input" if i == 0 else "a parameter"
        return f"the gradient of {what} is off by {rel_error(got, want):.2g}"
    return None


def _grads_of(fn, call: Call, params: list[Tensor], lazy: bool = False) -> Union[tuple, "_LazyGrads", str]:
    """Gradients of the input and ``params`` of a float64 loss of ``fn``'s main output on
    ``call`` (a fixed random cotangent), or why there are none; ``lazy``: each computed when
    indexed (``_LazyGrads``)."""
    x = call.x.detach().clone().requires_grad_(True)
    out = call_module(fn, call.with_x(x), grad=True)
    found = main_output(out, x) if not isinstance(out, str) else None
    if found is None:
        return f"no output to differentiate: {out if isinstance(out, str) else type(out).__name__}"
    r = torch.randn(found[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(found[0].device)
    loss = (found[0].double() * r).sum()
    if lazy:
        return _LazyGrads(loss, [x, *params])
    return torch.autograd.grad(loss, [x, *params], allow_unused=True)


class _LazyGrads:
    """The gradients ``_grads_of`` gives, each computed when indexed (the graph is kept): one
    parameter's gradient in memory at a time. Iterates as the tuple would."""

    def __init__(self, loss: Tensor, inputs: list[Tensor]):
        self.loss, self.inputs = loss, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> Optional[Tensor]:
        return torch.autograd.grad(self.loss, [self.inputs[i]], retain_graph=True, allow_unused=True)[0]


def same_kind_key(module: nn.Module) -> tuple:
    """Modules with equal keys are the same layer kind: one plan serves them all (re-verified)."""
    tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad)
                    for n, t in [*module.named_parameters(), *module.named_buffers()])
    attrs = []
    for name, sub in module.named_modules():
        attrs.append((name, type(sub).__qualname__,
                      tuple(sorted((k, v) for k, v in vars(sub).items()
                                   if isinstance(v, (bool, int, float, str)) and not k.startswith("_")))))
    return type(module).__qualname__, tensors, tuple(attrs)




# ----------------------------------------------------------------------------------------------
# Experts modules alone: forward(x, idx, weights) -> out, with the layer's routing kept
# ----------------------------------------------------------------------------------------------


def _routing_probe(T: int, E: int, K: int, like: Tensor, seed: int, hidden: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, hidden, generator=g, dtype=torch.float64)).to(like.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=torch.float64).to(like.dtype)
    return x.to(like.device), idx.to(like.device), w.to(like.device)


def own_forward(module: nn.Module) -> bool:
    """The module's class defines a forward (a bare ``nn.ModuleList`` / ``ModuleDict`` does not; a
    subclass of one that routes, as NLLB-MoE's experts dict, does)."""
    return type(module).forward is not nn.Module.forward


def recognise_experts_module(cand: Candidate, top_k: int):
    """The experts' own module as ``forward(x [T, H], idx [T, K], weights [T, K]) -> [T, H]``
    (transformers' experts interface), reproduced by dispatch -> expert FFN -> combine: an
    ``ExpertsSpec`` and what expert ids at or past E mean (``_ids_past``: "no expert", a skip
    class the replacement drops, or identity experts it adds as the token times its weight), or
    a ``Miss``. Routing stays the layer's own code. Where the module computes something else for
    such ids, they stay what they are and ``moec::dispatch`` raises if a router ever emits one."""
    from moec.capture.specs import ExpertsSpec, FFNSpec

    module = owner_of(cand)
    E, H = cand.experts.num_experts, cand.hidden
    if module is cand.module or not own_forward(module):
        return Miss("experts", "the experts are not a module of their own with a routing interface")
    like = next(module.parameters())
    K = max(1, min(top_k, E))
    # Constant tensors (a norm scale of zeros or ones) take random values while probed: a
    # replacement that ignored them would match here and be wrong once trained values load.
    keep = [t for _, t in expert_tensors(cand)]
    with randomized_constants(module, keep):
        probes = []
        for seed, (T, scale) in enumerate(((7, 1.0), (16, 1.0), (16, _LARGE))):
            x, idx, w = _routing_probe(T, E, K, like, 500 + seed, H)
            call = Call((x * scale, idx, w), {}, 0)
            out = call_module(module, call)
            if not isinstance(out, Tensor) or out.shape != call.x.shape:
                why = out if isinstance(out, str) else f"returns {type(out).__name__}"
                return Miss("experts", f"the experts module is not called as (x, expert ids, weights): {why}")
            probes.append((call, out))
        shapes, stacked = m.stacker(cand)
        forms = m.ffn_candidates(shapes, H, m.float_attrs(cand.module))
        prefix = cand.experts.owner
        # Plain forms first, then each with an RMSNorm on the expert's output (Ergo, MuSE-Spark).
        posts = [None, *m.post_norms(module, prefix, E, H, {id(t) for t in keep})]
        spec = None
        for post, form in ((p, f) for p in posts for f in forms):
            act, transposed, interleaved, alpha, limit = form.attrs
            ffn = FFNSpec(act, transposed, interleaved, H, form.inter, alpha, limit,
                          bool(form.b_in or form.b_out is not None), packed_fetch(form, stacked),
                          sources=stacked.__dict__.get("sources", ()), packer=packer(form, stacked))
            candidate = ExpertsSpec(ffn, E, post_norm=post,
                                    post_scale=None if post is None or post.scale is None else (
                                        lambda p=post: _tensor_at(cand.module, p.scale)))
            if all(close(_as_out(call_module(candidate, call), out), out) for call, out in probes):
                spec = candidate
                break
    if spec is None:
        return Miss("experts", f"no FFN form ({len(forms)} tried, with and without an RMSNorm on the output) "
                               "reproduces the experts module")
    return spec, _ids_past(module, spec, probes[0][0], E)


# Ids past E probed for identity experts: at most this many.
_MAX_IDENTITY_IDS = 64
# Off the CPU, ids past E are probed on a CPU copy of an experts module at most this large.
_MAX_CPU_COPY_BYTES = 4 << 30


def _ids_past(module: nn.Module, spec, call: Call, E: int) -> tuple[str, int]:
    """What the experts module does with expert ids E, E+1, ...: ("drop", 0) nothing (a skip
    class: a dropped slot); ("identity", hi) ids in [E, hi) pass the token through times its
    weight (LongCat-Flash's "zero" experts), ids from hi on are refused by the module (they never
    occur); ("", 0) it refuses them, or computes something else: such ids then reach
    ``moec::dispatch``, which raises naming them, never a silent answer.

    Off the CPU the question goes to a CPU copy of the module: an id out of a module's range
    there is a device-side assert, which ends the process instead of raising. A module too large
    to copy (past ``_MAX_CPU_COPY_BYTES``) is not asked: ("", 0)."""
    x, idx, w = call.args
    dropped = idx.clone()
    dropped[:, 0] = -1
    without = call_module(spec, Call((x, dropped, w), {}, 0))
    if x.device.type != "cpu":
        size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        if size > _MAX_CPU_COPY_BYTES or not isinstance(without, Tensor):
            return "", 0
        cpu = torch.device("cpu")
        module = copy_as(module, x.dtype, cpu)
        x, idx, w, without = x.to(cpu), idx.to(cpu), w.to(cpu), without.to(cpu)
    identity = without + w[:, :1].to(without.dtype) * x.to(without.dtype)
    mode = ""
    for j in range(E, E + _MAX_IDENTITY_IDS):
        beyond = idx.clone()
        beyond[:, 0] = j
        out = call_module(module, Call((x, beyond, w), {}, 0))
        if not isinstance(out, Tensor):
            return (mode, j) if mode == "identity" else ("", 0)
        if j == E and close(_as_out(without, out), out):
            return "drop", 0
        if not close(_as_out(identity, out), out):
            return ("identity", j) if mode == "identity" else ("", 0)
        mode = "identity"
    return mode, E + _MAX_IDENTITY_IDS


def _as_out(value, like: Tensor):
    return value.to(like.dtype) if isinstance(value, Tensor) else value
