"""Synthetic routing traces: Zipf-skewed expert popularity, inter-layer affinity and drift over
windows, simulated token by token; and the named presets shipped with moec (``synthetic:NAME``).

Legend: W windows, L layers, E experts, T tokens per window, K top-k, G experts per affinity group,
Q groups a token may use per layer (``topk_groups``), C candidate experts of a token (Q*G).

Contract
--------
``synthetic_trace(num_experts, num_layers, num_windows, tokens_per_window, top_k, ...)`` returns a
``RoutingTrace`` with ``load_WLE`` and ``affinity_WLEE`` filled; the same arguments (seed
included) always give the same trace. Every token picks ``top_k`` distinct experts at every
layer, so ``load_WLE.sum(-1) == tokens_per_window * top_k`` and, since every token reaches every
layer, ``affinity_WLEE.sum(-1) == top_k * load_WLE[:, :-1]`` and
``affinity_WLEE.sum(-2) == top_k * load_WLE[:, 1:]`` (a token contributes its k*k pairs).
``preset_trace(NAME)`` builds ``PRESETS[NAME]``; nothing is downloaded and every preset is
generated in under 3 s of CPU time.

The model
---------
* Popularity. Layer l ranks its experts by a random permutation; the expert of rank r (0-based)
  has Zipf weight (r+1)^-zipf_s (zipf_s = 0: uniform). ``popularity[w, l]`` is that distribution
  normalised, for window 0.
* Drift. Window w+1's popularity is (1-drift) * window w's + drift * a Zipf distribution over a
  fresh random permutation: the total-variation distance between consecutive windows is at most
  ``drift`` (0: the same popularity in every window; 1: a new ranking every window).
* Affinity. Layer l has a fixed mapping to layer l+1: the experts of each layer are split into
  E/G groups of G (by a per-layer random permutation) and group g at layer l maps to group
  pi_l(g) at layer l+1 (a random permutation of the groups). With G = 1 (default) the mapping is a
  random permutation of the experts. For each token, each of its k choices at layer l+1 independently
  *follows* with probability ``affinity``: it becomes the image of the token's j-th choice at layer l
  (for G > 1: an expert of the image group, drawn by the layer's popularity within the group).
  The other choices are drawn from the layer's popularity. A followed choice that repeats one
  already taken is drawn from the popularity instead. Followed choices are placed first, then the
  rest are drawn one at a time from the popularity restricted to the experts not yet taken
  (sampling without replacement, as top-k of a noisy score does); layer 0 has nothing to follow.
  So the load at layer l+1 is a mixture of its own popularity and layer l's load carried through
  the mapping, and ``affinity`` = 1 with G = 1 makes every token follow one fixed chain of experts.
* Group-limited routing (``topk_groups`` Q > 0; off by default). The experts of every layer form
  E/G groups of G consecutive ids (DeepSeek-V3's ``n_group`` layout; its ``topk_group`` is Q) and
  group g at layer l maps to group pi_l(g) at layer l+1 (a random permutation of the groups).
  Each token first picks Q distinct groups: at layer 0 from the group weights (a group's summed
  popularity), at layer l+1 each of its layer-l groups g is *followed* to pi_l(g) with probability
  ``affinity``, the rest drawn from the group weights without replacement. Then it picks its k
  experts among the Q*G of its groups, by popularity, without replacement (Gumbel top-k, which
  samples exactly as sequential draws do). A token's k experts therefore sit in Q groups at every
  layer and, with probability ``affinity`` per group, in the images of its previous groups: the
  inter-layer affinity is between groups, as DeepSeek-V3's group-limited routing makes it and
  as ExFlow reports for consecutive layers (choices concentrated on few experts / GPUs).
* Windows are independent samples of T tokens (no token spans two windows).

Why the group presets. Traffic is counted on a token's k*k consecutive-layer pairs
(``moec.passes.placement_score``). With the per-choice model above, a token's k experts at a layer
are drawn independently of each other, so only about 1/k of its pairs can ever share a rank,
whatever the placement: with top-6/8 no placement cuts cross-rank traffic by much (measured 3-8%
below contiguous on ``zipf*-affinity``). With group-limited routing a token's experts and their
successors sit in few groups, and a placement that puts a group chain on one rank (or node) keeps
most of the token's pairs there. How much is reachable is geometric: a rank holds about E/N
experts, so a token's k experts span at least ceil(k*N/E) ranks (more where a hot group is split
over ranks for balance) and at most about 1/ceil(k*N/E) of its pairs can stay on one rank
(``zipf64-group-affinity`` at 32 ranks: 2-3 experts per rank, top-6: at most ~1/3).

What is not modelled: the input dependence of real routing (tokens are i.i.d.), correlations
beyond consecutive layers, dropped tokens, shared experts.

Presets (``PRESETS``, all synthetic values with fixed seeds, not measured from any model):
``zipf64``, ``zipf64-affinity``, ``zipf256``, ``zipf256-affinity``: skewed traces (zipf_s 1.0) with
small drift, without and with strong per-choice inter-layer affinity; ``zipf64-group-affinity``,
``zipf256-group-affinity``: the same skew with group-limited routing (one group per token and
layer: groups of 8 experts of 64 with top-6, of 16 of 256 with top-8) followed layer to layer with
probability 0.8, the traces the issue's traffic target is evaluated on (see "Why the group
presets"); ``mixtral-like`` (8 experts, top-2),
``qwen3-moe-like`` (128 experts, top-8), ``deepseek-v3-like`` (256 experts, top-8): the routing
*shapes* of those models (expert count, top-k) with milder skew, fewer layers than the real models.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from moec.runtime.trace import RoutingTrace, TraceError

__all__ = ["PRESETS", "preset_trace", "synthetic_trace"]

# Rejection rounds before the remaining collisions are resolved exactly (rarely reached).
_MAX_REJECTION_ROUNDS = 32

PRESETS: dict[str, dict[str, Any]] = {
    "zipf64": dict(num_experts=64, num_layers=8, num_windows=4, tokens_per_window=98304, top_k=6,
                   zipf_s=1.0, affinity=0.0, drift=0.005, seed=64),
    "zipf64-affinity": dict(num_experts=64, num_layers=8, num_windows=4, tokens_per_window=98304, top_k=6,
                            zipf_s=1.0, affinity=0.8, drift=0.005, seed=65),
    "zipf256": dict(num_experts=256, num_layers=6, num_windows=4, tokens_per_window=98304, top_k=8,
                    zipf_s=1.0, affinity=0.0, drift=0.005, seed=256),
    "zipf256-affinity": dict(num_experts=256, num_layers=6, num_windows=4, tokens_per_window=98304, top_k=8,
                             zipf_s=1.0, affinity=0.8, drift=0.005, seed=257),
    "zipf64-group-affinity": dict(num_experts=64, num_layers=8, num_windows=4, tokens_per_window=98304, top_k=6,
                                  zipf_s=1.0, affinity=0.8, drift=0.005, seed=66, affinity_group=8, topk_groups=1),
    "zipf256-group-affinity": dict(num_experts=256, num_layers=6, num_windows=4, tokens_per_window=98304, top_k=8,
                                   zipf_s=1.0, affinity=0.8, drift=0.005, seed=258, affinity_group=16,
                                   topk_groups=1),
    "mixtral-like": dict(num_experts=8, num_layers=32, num_windows=4, tokens_per_window=8192, top_k=2,
                         zipf_s=0.4, affinity=0.3, drift=0.05, seed=8),
    "qwen3-moe-like": dict(num_experts=128, num_layers=8, num_windows=4, tokens_per_window=8192, top_k=8,
                           zipf_s=0.6, affinity=0.5, drift=0.05, seed=128),
    "deepseek-v3-like": dict(num_experts=256, num_layers=4, num_windows=4, tokens_per_window=131072, top_k=8,
                             zipf_s=0.6, affinity=0.5, drift=0.05, seed=3),
}


def preset_trace(name: str) -> RoutingTrace:
    """The trace of preset ``name`` (``synthetic:NAME`` in ``RoutingTrace.load``)."""
    if name not in PRESETS:
        raise TraceError(f"unknown synthetic trace {name!r}: known presets are {', '.join(sorted(PRESETS))}")
    trace = synthetic_trace(**PRESETS[name])
    trace.meta["source"] = f"synthetic:{name}"
    trace.meta["preset"] = name
    return trace


def _check_args(E: int, L: int, W: int, T: int, K: int, zipf_s: float, affinity: float, drift: float,
                group: int, topk_groups: int) -> None:
    for flag, value in (("num_experts", E), ("num_layers", L), ("num_windows", W),
                        ("tokens_per_window", T), ("top_k", K), ("affinity_group", group)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TraceError(f"{flag} must be a positive int, got {value!r}")
    if K > E:
        raise TraceError(f"top_k={K} exceeds num_experts={E}: a token picks top_k distinct experts")
    if zipf_s < 0 or not np.isfinite(zipf_s):
        raise TraceError(f"zipf_s must be >= 0 (0 is uniform popularity), got {zipf_s}")
    for flag, value in (("affinity", affinity), ("drift", drift)):
        if not 0.0 <= value <= 1.0:
            raise TraceError(f"{flag} is a probability in [0, 1], got {value}")
    if E % group:
        raise TraceError(f"affinity_group={group} does not divide num_experts={E}")
    if isinstance(topk_groups, bool) or not isinstance(topk_groups, (int, np.integer)) or topk_groups < 0:
        raise TraceError(f"topk_groups must be an int >= 0 (0: no group-limited routing), got {topk_groups!r}")
    if topk_groups:
        if topk_groups > E // group:
            raise TraceError(f"topk_groups={topk_groups} exceeds the {E // group} groups of affinity_group={group}")
        if K > topk_groups * group:
            raise TraceError(f"top_k={K} exceeds the topk_groups*affinity_group={topk_groups * group} experts a "
                             f"token may pick from")


def _zipf(E: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights (rank+1)^-s placed on a random permutation of the experts, normalised."""
    weights_E = np.arange(1, E + 1, dtype=np.float64) ** -s
    p_E = np.empty(E)
    p_E[rng.permutation(E)] = weights_E / weights_E.sum()
    return p_E


def _draw_free(chosen_TK: np.ndarray, p_E: np.ndarray, rng: np.random.Generator) -> None:
    """Fill the -1 slots of ``chosen_TK`` in place, slot by slot, each from ``p_E`` restricted to
    the experts the token has not taken (sequential sampling without replacement)."""
    T, K = chosen_TK.shape
    cdf_E = np.cumsum(p_E)
    cdf_E /= cdf_E[-1]
    for j in range(K):
        rows = np.flatnonzero(chosen_TK[:, j] < 0)
        for _ in range(_MAX_REJECTION_ROUNDS):
            if rows.size == 0:
                break
            draw = np.minimum(np.searchsorted(cdf_E, rng.random(rows.size), side="right"), len(p_E) - 1)
            taken = (chosen_TK[rows] == draw[:, None]).any(axis=1)
            chosen_TK[rows[~taken], j] = draw[~taken]
            rows = rows[taken]
        for t in rows:  # exact fallback for the few tokens whose left-over experts are improbable
            q_E = p_E.copy()
            q_E[chosen_TK[t][chosen_TK[t] >= 0]] = 0.0
            if q_E.sum() <= 0:  # only zero-weight experts left (cannot happen with Zipf weights > 0)
                q_E = (q_E == 0).astype(np.float64)
                q_E[chosen_TK[t][chosen_TK[t] >= 0]] = 0.0
            chosen_TK[t, j] = rng.choice(len(p_E), p=q_E / q_E.sum())


def _follow(prev_TK: np.ndarray, p_E: np.ndarray, affinity: float, group_to_E: tuple,
            rng: np.random.Generator) -> np.ndarray:
    """Layer l+1's choices: followed ones placed (see the module docstring), the rest -1."""
    T, K = prev_TK.shape
    src_group_E, dst_members_GM = group_to_E
    chosen_TK = np.full((T, K), -1, dtype=np.int64)
    if affinity <= 0:
        return chosen_TK
    follows_TK = rng.random((T, K)) < affinity
    target_group_TK = src_group_E[prev_TK]
    G = dst_members_GM.shape[1]
    if G == 1:
        target_TK = dst_members_GM[target_group_TK, 0]
    else:
        within_GM = p_E[dst_members_GM]
        cdf_GM = np.cumsum(within_GM, axis=1)
        cdf_GM /= cdf_GM[:, -1:]
        u_TK = rng.random((T, K))
        pick_TK = (u_TK[..., None] >= cdf_GM[target_group_TK]).sum(-1)
        target_TK = dst_members_GM[target_group_TK, np.minimum(pick_TK, G - 1)]
    for j in range(K):
        ok = follows_TK[:, j] & ~(chosen_TK == target_TK[:, j:j + 1]).any(axis=1)
        chosen_TK[ok, j] = target_TK[ok, j]
    return chosen_TK


def _group_mapping(E: int, G: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(group at layer l of each expert [E], with the members [E/G, G] of each layer-l+1 group
    that layer-l group g maps to, indexed by g)."""
    n = E // G
    src_group_E = np.empty(E, dtype=np.int64)
    src_group_E[rng.permutation(E)] = np.repeat(np.arange(n), G)
    dst_members_GM = rng.permutation(E).reshape(n, G)
    return src_group_E, dst_members_GM[rng.permutation(n)]


def _group_limited(prev_groups_TQ: Optional[np.ndarray], p_E: np.ndarray, G: int, Q: int, K: int, T: int,
                   affinity: float, image_G: Optional[np.ndarray], rng: np.random.Generator):
    """One layer of group-limited routing (module docstring): (groups [T, Q], experts [T, K])."""
    E = len(p_E)
    groups_TQ = np.full((T, Q), -1, dtype=np.int64)
    if prev_groups_TQ is not None and affinity > 0:
        follows_TQ = rng.random((T, Q)) < affinity
        groups_TQ[follows_TQ] = image_G[prev_groups_TQ][follows_TQ]  # a bijection: stays distinct
    _draw_free(groups_TQ, p_E.reshape(E // G, G).sum(1), rng)
    cand_TC = (groups_TQ[:, :, None] * G + np.arange(G)).reshape(T, Q * G)
    key_TC = np.log(p_E)[cand_TC] + rng.gumbel(size=cand_TC.shape)
    top_TK = np.argpartition(-key_TC, K - 1, axis=1)[:, :K] if K < Q * G else np.arange(K)[None].repeat(T, 0)
    return groups_TQ, np.take_along_axis(cand_TC, top_TK, axis=1)


def synthetic_trace(
    num_experts: int,
    num_layers: int,
    num_windows: int,
    tokens_per_window: int,
    top_k: int,
    zipf_s: float = 1.0,
    affinity: float = 0.0,
    drift: float = 0.0,
    seed: int = 0,
    affinity_group: int = 1,
    topk_groups: int = 0,
) -> RoutingTrace:
    """A simulated trace (the model is in the module docstring). ``affinity`` is the probability a
    choice (a group, with ``topk_groups``) follows the layer-to-layer mapping; ``affinity_group``
    is G (1: expert to expert); ``topk_groups`` Q > 0 turns on group-limited routing (Q groups of
    G consecutive experts per token and layer); ``drift`` the share of popularity replaced
    between consecutive windows."""
    E, L, W, T, K, G, Q = num_experts, num_layers, num_windows, tokens_per_window, top_k, affinity_group, topk_groups
    _check_args(E, L, W, T, K, float(zipf_s), float(affinity), float(drift), G, Q)
    rng = np.random.default_rng(seed)
    popularity_LE = np.stack([_zipf(E, zipf_s, rng) for _ in range(L)])
    if Q:
        images = [rng.permutation(E // G) for _ in range(L - 1)]
    else:
        mappings = [_group_mapping(E, G, rng) for _ in range(L - 1)]
    load_WLE = np.zeros((W, L, E), dtype=np.int64)
    affinity_WLEE = np.zeros((W, L - 1, E, E), dtype=np.int64)
    for w in range(W):
        if w > 0 and drift > 0:
            fresh_LE = np.stack([_zipf(E, zipf_s, rng) for _ in range(L)])
            popularity_LE = (1 - drift) * popularity_LE + drift * fresh_LE
        prev_TK = groups_TQ = None
        for l in range(L):
            if Q:
                groups_TQ, chosen_TK = _group_limited(groups_TQ, popularity_LE[l], G, Q, K, T, affinity,
                                                      images[l - 1] if l else None, rng)
            elif prev_TK is None:
                chosen_TK = np.full((T, K), -1, dtype=np.int64)
            else:
                chosen_TK = _follow(prev_TK, popularity_LE[l], affinity, mappings[l - 1], rng)
            if not Q:
                _draw_free(chosen_TK, popularity_LE[l], rng)
            load_WLE[w, l] = np.bincount(chosen_TK.ravel(), minlength=E)
            if prev_TK is not None:
                pairs = (prev_TK[:, :, None] * E + chosen_TK[:, None, :]).ravel()
                affinity_WLEE[w, l - 1] = np.bincount(pairs, minlength=E * E).reshape(E, E)
            prev_TK = chosen_TK
    meta = dict(
        top_k=K, layer_names=None, source="synthetic",
        generator=dict(num_experts=E, num_layers=L, num_windows=W, tokens_per_window=T, top_k=K,
                       zipf_s=float(zipf_s), affinity=float(affinity), drift=float(drift), seed=int(seed),
                       affinity_group=G, topk_groups=Q),
    )
    return RoutingTrace(load_WLE, affinity_WLEE, None, meta)
