"""Synthetic routing traces: Zipf-skewed expert popularity, inter-layer affinity and drift over
windows, simulated token by token; and the named presets shipped with moec (``synthetic:NAME``).

Legend: W windows, L layers, E experts, T tokens per window, K top-k, G experts per affinity group.

Contract
--------
``synthetic_trace(num_experts, num_layers, num_windows, tokens_per_window, top_k, ...)`` returns a
``RoutingTrace`` with ``load_WLE`` and ``affinity_WLEE`` filled; the same arguments (seed
included) always give the same trace. Every token picks ``top_k`` distinct experts at every
layer, so ``load_WLE.sum(-1) == tokens_per_window * top_k`` and, since every token reaches every
layer, ``affinity_WLEE.sum(-1) == top_k * load_WLE[:, :-1]`` and
``affinity_WLEE.sum(-2) == top_k * load_WLE[:, 1:]`` (a token contributes its k*k pairs).
``preset_trace(NAME)`` builds ``PRESETS[NAME]``; nothing is downloaded and every preset is
generated in well under 2 s.

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
* Windows are independent samples of T tokens (no token spans two windows).

What is not modelled: the input dependence of real routing (tokens are i.i.d.), correlations
beyond consecutive layers, dropped tokens, shared experts.

Presets (``PRESETS``, all synthetic values with fixed seeds, not measured from any model):
``zipf64``, ``zipf64-affinity``, ``zipf256``, ``zipf256-affinity``: skewed traces (zipf_s 1.0) with
small drift, without and with strong inter-layer affinity; ``mixtral-like`` (8 experts, top-2),
``qwen3-moe-like`` (128 experts, top-8), ``deepseek-v3-like`` (256 experts, top-8): the routing
*shapes* of those models (expert count, top-k) with milder skew, fewer layers than the real models.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moec.runtime.trace import RoutingTrace, TraceError

__all__ = ["PRESETS", "preset_trace", "synthetic_trace"]

# Rejection rounds before the remaining collisions are resolved exactly (rarely reached).
_MAX_REJECTION_ROUNDS = 32

PRESETS: dict[str, dict[str, Any]] = {
    "zipf64": dict(num_experts=64, num_layers=8, num_windows=4, tokens_per_window=32768, top_k=6,
                   zipf_s=1.0, affinity=0.0, drift=0.005, seed=64),
    "zipf64-affinity": dict(num_experts=64, num_layers=8, num_windows=4, tokens_per_window=32768, top_k=6,
                            zipf_s=1.0, affinity=0.8, drift=0.005, seed=65),
    "zipf256": dict(num_experts=256, num_layers=6, num_windows=4, tokens_per_window=32768, top_k=8,
                    zipf_s=1.0, affinity=0.0, drift=0.005, seed=256),
    "zipf256-affinity": dict(num_experts=256, num_layers=6, num_windows=4, tokens_per_window=32768, top_k=8,
                             zipf_s=1.0, affinity=0.8, drift=0.005, seed=257),
    "mixtral-like": dict(num_experts=8, num_layers=32, num_windows=4, tokens_per_window=8192, top_k=2,
                         zipf_s=0.4, affinity=0.3, drift=0.05, seed=8),
    "qwen3-moe-like": dict(num_experts=128, num_layers=8, num_windows=4, tokens_per_window=8192, top_k=8,
                           zipf_s=0.6, affinity=0.5, drift=0.05, seed=128),
    "deepseek-v3-like": dict(num_experts=256, num_layers=4, num_windows=4, tokens_per_window=8192, top_k=8,
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
                group: int) -> None:
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
) -> RoutingTrace:
    """A simulated trace (the model is in the module docstring). ``affinity`` is the probability a
    choice follows the layer-to-layer mapping; ``affinity_group`` is G (1: expert to expert);
    ``drift`` the share of popularity replaced between consecutive windows."""
    E, L, W, T, K, G = num_experts, num_layers, num_windows, tokens_per_window, top_k, affinity_group
    _check_args(E, L, W, T, K, float(zipf_s), float(affinity), float(drift), G)
    rng = np.random.default_rng(seed)
    popularity_LE = np.stack([_zipf(E, zipf_s, rng) for _ in range(L)])
    mappings = [_group_mapping(E, G, rng) for _ in range(L - 1)]
    load_WLE = np.zeros((W, L, E), dtype=np.int64)
    affinity_WLEE = np.zeros((W, L - 1, E, E), dtype=np.int64)
    for w in range(W):
        if w > 0 and drift > 0:
            fresh_LE = np.stack([_zipf(E, zipf_s, rng) for _ in range(L)])
            popularity_LE = (1 - drift) * popularity_LE + drift * fresh_LE
        prev_TK = None
        for l in range(L):
            if prev_TK is None:
                chosen_TK = np.full((T, K), -1, dtype=np.int64)
            else:
                chosen_TK = _follow(prev_TK, popularity_LE[l], affinity, mappings[l - 1], rng)
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
                       affinity_group=G),
    )
    return RoutingTrace(load_WLE, affinity_WLEE, None, meta)
