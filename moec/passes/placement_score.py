"""Scoring an expert placement on a routing trace window: load balance, cross-rank and cross-node
token traffic, all-to-all bytes, simulated step time from the expert-parallel cost model, and the
weights moved from a previous plan. Every placement method (``moec.passes.placement`` and the
baselines in ``moec.passes.placement_baselines``) is scored by this one harness.

Contract
--------
``score_plan(plan, trace, window, ranks_per_node=M, config=ScoreConfig(), previous=None)`` returns a
``PlanScore``: one ``LayerScore`` per layer and the totals. It reads window ``window`` of the trace
only; evaluation plans on window i and scores on window i+1 (``moec.passes.placement.evaluate_windows`` does exactly that).
Nothing is run: every time is a prediction from the formulas below, with ``Calibration.default()``
(assumed H100-class constants, see ``moec.runtime.cost_model``) unless the config gives another.

Definitions (layer l, N ranks, nodes of M ranks, ``share_NE[r, e]`` the fraction of expert e's
tokens rank r takes under the plan, ``load_E`` the window's slots per expert; with the plan's
``replica_balance`` "adaptive", ``share_NE`` is what the runtime's per-step balancing gives on the
window's counts, ``routed_shares``, and each layer with replicas pays the all-reduce of the counts,
two exchange latencies and 16 E bytes, and the host's balancing, ``HOST_S_FIXED`` + water-fills x
``HOST_S_PER_FILL``, measured on a CPU VM)
-----------------------------------------------------------------------------------------------
* Rank load ``load_N = share_NE @ load_E``; balance is ``max(load_N) / mean(load_N)``.
* Traffic follows the tokens from layer to layer (ExFlow's model, generalised to top-k): a token's
  layer-(l+1) slots start from the ranks of its layer-l experts. With the window's affinity counts
  ``A[a, b]`` (pairs: a at layer l, b at l+1, k*k per token) the rank-to-rank pair flow is
  ``F_NN = share_l @ A @ share_{l+1}^T`` (replicas split pairs by their shares, independently at
  the two ends, as the runtime routes by share). **Cross-rank fraction** of the transition l -> l+1
  = pairs with ``r != s`` over all pairs; **cross-node fraction** = pairs with ``r // M != s // M``.
  The model's fractions are the pair-weighted sums over all transitions. Layer 0 has no previous
  layer: its slots start from the tokens' source ranks when the trace has ``source`` recorded at the
  same world size, else uniformly from every rank (placement cannot change that, so it is left out
  of the fractions; ``source_cross_rank`` reports it when known).
  With top-k routing and choices drawn independently per layer, at most about 1/k + 1/N of the
  pairs can be on one rank whatever the placement: a slot has one co-located predecessor among k.
* Dispatch matrix ``D_NN[r, s]``: slots of layer l+1 sent from rank r to rank s. Each slot of expert
  b comes from its token's layer-l experts in proportion to ``A[:, b]`` (one of k, weight 1/k
  each): ``D = share_l @ (A / colsum(A) * load_{l+1}) @ share_{l+1}^T``; column sums are the rank
  loads. Without affinity for b (zero column), or without a previous layer, slots come from the
  source ranks as above.
* **a2a bytes** of a layer: slots crossing ranks (off-diagonal of D) x (H*b + 8) for the dispatch
  (rows and their local expert ids, as ``ep_moe`` sends them) plus x H*b for the combine, which
  returns the same rows the same way; split into intra- and inter-node bytes.
* **Simulated layer time** = slowest rank's expert compute + all-to-all time, mirroring the
  sequential schedule of ``moec.runtime.cost_model`` (its ``term_definitions`` at r=1; its private
  formulas are mirrored here per rank, since the cost model itself assumes uniform routing):
  compute of rank r with ``R_r`` received slots, ``T_r`` sent slots and ``L_r`` experts held:
  ``max(2*R_r*H*g1*I/Phi, L_r*g1*I*H*b/B) + b*(8*T_r*H + R_r*(7H + (4g+3)I))/B
  + (OPS_FIXED + OPS_PER_EXPERT*L_r)*o`` with ``g1 = g+1``, plus the cost model's term s without
  a shared expert (``T*b*4H/B``, T tokens per rank; the same on every rank); all-to-all: the count exchange, the
  two dispatch exchanges and the combine each pay ``(P-1)*alpha_intra + (N-P)*alpha_inter``, plus
  the busiest rank's bytes per link class: ``max_r max(sent_r, received_r)`` of
  ``bytes_intra*beta_intra + bytes_inter*beta_inter``. With uniform routing and a contiguous plan
  this is exactly ``cost_model.predict(...)["sequential"]`` (a test checks it). The model's step time is the sum over
  layers (forward, MoE layers only).
* Trace counts are scaled so that the mean rank sends ``tokens_per_rank * top_k`` slots per layer
  (``ScoreConfig.tokens_per_rank``, default 4096 as ``moec optimize``; None keeps the trace's
  counts): a window's counts give the routing's proportions, the step size is the deployment's.
* **Traffic floor** (``traffic_floor``): the lowest cross-rank (cross-node) fraction that *any*
  plan with S slots per rank and max/mean load <= b (default 1.05) can reach on a window; it says
  how much of the traffic the window's affinity lets a placement keep local. Per transition, split
  the pairs into their part under independence, ``A_ind = rowsum(A) colsum(A)^T / P`` (P pairs),
  and the excess ``X = max(A - A_ind, 0)``; same-rank pairs are at most
  ``sum_r R_r C_r / P <= max_r C_r <= b P / N`` of the independent part (``R_r``, ``C_r``: the
  pairs leaving / reaching rank r, ``C_r`` proportional to rank r's layer-(l+1) load as the
  profiler and the synthetic traces count pairs) plus, of the excess, at most
  ``min(sum_a top_S(X[a, :]), sum_b top_S(X[:, b]))`` (a rank holds at most S experts of each
  layer and an expert's shares sum to 1). So ``cross_rank >= 1 - (b P / N + min(...)) / P``; the
  same with nodes of M ranks (N / M bins of M*S slots) bounds cross-node. It is a bound, not a
  plan: where a token's experts sit in dense groups (the ``*-group-affinity`` presets) it is loose.
* **Weights moved** from a previous plan: (expert, rank) pairs held now that the previous plan's
  same layer did not hold; bytes = that count x ``g1*I*H*b``. Dropping a replica moves nothing.

Legend: N ranks, M (P) ranks per node, E experts, L layers, H hidden, I expert hidden, b bytes per
element, g 2 gated / 1 not.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from moec.ir.parallel import _held, balance_replicas, flatten_placement
from moec.runtime.cost_model import OPS_FIXED, OPS_PER_EXPERT, Calibration
from moec.runtime.plan import PlacementPlan, PlanError

__all__ = ["LayerScore", "PlanScore", "ScoreConfig", "dispatch_matrix", "pair_flow", "routed_shares", "score_plan",
           "score_arrays", "score_window_inputs", "traffic_floor", "weights_moved"]

ID_BYTES = 8  # the local expert id ep_moe sends with each row
# Host time of moec::ep_route_adaptive's balancing, measured on the 2-core EPYC VM (Python 3.11):
# about 2.2 us per water-fill (balance_replicas, setup included) and 0.1 ms to read the counts and
# build the routing tables; charged to adaptive layers, since the exchange waits for them.
HOST_S_PER_FILL = 2.2e-6
HOST_S_FIXED = 1e-4


@dataclass(frozen=True)
class ScoreConfig:
    """Layer sizes and machine for scoring. Defaults: DeepSeek-V3-sized experts (H=7168, I=2048,
    gated, bf16), 4096 tokens per rank, ``Calibration.default()``."""

    hidden: int = 7168
    expert_hidden: int = 2048
    gated: bool = True
    dtype_bytes: int = 2
    tokens_per_rank: Optional[int] = 4096
    calibration: Calibration = field(default_factory=Calibration.default)

    @classmethod
    def from_trace(cls, trace, **overrides) -> "ScoreConfig":
        """Sizes from the trace's meta when it records them (``hidden_size``, ``expert_hidden_size``
        / ``moe_intermediate_size``, ``dtype_bytes``, ``gated``), else the defaults; ``overrides``
        win over both."""
        meta = getattr(trace, "meta", {}) or {}
        found: dict[str, Any] = {}
        for key, names in (("hidden", ("hidden_size", "hidden")),
                           ("expert_hidden", ("expert_hidden_size", "moe_intermediate_size", "expert_hidden")),
                           ("dtype_bytes", ("dtype_bytes",)), ("gated", ("gated",))):
            for n in names:
                if meta.get(n) is not None:
                    found[key] = meta[n]
                    break
        found.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**found)

    @property
    def expert_bytes(self) -> int:
        return (3 if self.gated else 2) * self.expert_hidden * self.hidden * self.dtype_bytes


@dataclass
class LayerScore:
    """One layer's numbers (see the module docstring). Fractions are None where undefined."""

    layer: int
    max_mean_load: float
    cross_rank: Optional[float]
    cross_node: Optional[float]
    pairs: float
    a2a_bytes_intra: float
    a2a_bytes_inter: float
    compute_s: float
    a2a_s: float
    time_s: float
    moved: int = 0
    moved_bytes: int = 0
    load_N: Optional[np.ndarray] = None

    @property
    def a2a_bytes(self) -> float:
        return self.a2a_bytes_intra + self.a2a_bytes_inter

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["load_N"] = None if self.load_N is None else [float(x) for x in self.load_N]
        d["a2a_bytes"] = self.a2a_bytes
        return d


@dataclass
class PlanScore:
    """All layers' scores and the model's totals."""

    layers: list[LayerScore]
    source_cross_rank: Optional[float] = None

    @property
    def time_s(self) -> float:
        return float(sum(s.time_s for s in self.layers))

    @property
    def max_mean_load(self) -> float:
        """The worst layer's max/mean load."""
        return float(max(s.max_mean_load for s in self.layers))

    @property
    def mean_max_mean_load(self) -> float:
        return float(np.mean([s.max_mean_load for s in self.layers]))

    def _pair_weighted(self, name: str) -> Optional[float]:
        rows = [(getattr(s, name), s.pairs) for s in self.layers if getattr(s, name) is not None and s.pairs > 0]
        total = sum(p for _, p in rows)
        return float(sum(f * p for f, p in rows) / total) if total else None

    @property
    def cross_rank(self) -> Optional[float]:
        return self._pair_weighted("cross_rank")

    @property
    def cross_node(self) -> Optional[float]:
        return self._pair_weighted("cross_node")

    @property
    def a2a_bytes(self) -> float:
        return float(sum(s.a2a_bytes for s in self.layers))

    @property
    def moved(self) -> int:
        return int(sum(s.moved for s in self.layers))

    @property
    def moved_bytes(self) -> int:
        return int(sum(s.moved_bytes for s in self.layers))

    def totals(self) -> dict[str, Any]:
        return dict(max_mean_load=self.max_mean_load, mean_max_mean_load=self.mean_max_mean_load,
                    cross_rank=self.cross_rank, cross_node=self.cross_node, source_cross_rank=self.source_cross_rank,
                    a2a_bytes=self.a2a_bytes, time_s=self.time_s, moved=self.moved, moved_bytes=self.moved_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dict(totals=self.totals(), layers=[s.to_dict() for s in self.layers])


# ----------------------------------------------------------------------------------------------
# Flows
# ----------------------------------------------------------------------------------------------


def pair_flow(share_prev_NE: np.ndarray, affinity_EE: np.ndarray, share_NE: np.ndarray) -> np.ndarray:
    """``F_NN[r, s]``: affinity pairs whose layer-l expert is on rank r and layer-(l+1) expert on s."""
    return share_prev_NE @ affinity_EE @ share_NE.T


def _source_slots_NE(load_E: np.ndarray, source_RE: Optional[np.ndarray], N: int) -> np.ndarray:
    """Slots of each expert by the rank they start from, before placement (layer 0's origin)."""
    if source_RE is not None and source_RE.shape[0] == N:
        total = source_RE.sum(0)
        frac_NE = np.where(total > 0, source_RE / np.maximum(total, 1e-300), 1.0 / N)
        return frac_NE * load_E
    return np.broadcast_to(load_E / N, (N, load_E.shape[0]))


def dispatch_matrix(share_prev_NE: Optional[np.ndarray], affinity_EE: Optional[np.ndarray], share_NE: np.ndarray,
                    load_E: np.ndarray, source_RE: Optional[np.ndarray] = None) -> np.ndarray:
    """``D_NN[r, s]``: this layer's slots sent from rank r to rank s (see the module docstring)."""
    N = share_NE.shape[0]
    load_E = np.asarray(load_E, dtype=np.float64)
    origin_NE = np.array(_source_slots_NE(load_E, source_RE, N))
    if share_prev_NE is not None and affinity_EE is not None:
        col_E = affinity_EE.sum(0).astype(np.float64)
        has = col_E > 0
        if has.any():
            # origin of b's slots: its layer-l partners a, weighted by A[a, b], at the ranks of a.
            weights_EE = affinity_EE[:, has] / col_E[has] * load_E[has]
            origin_NE[:, has] = share_prev_NE @ weights_EE
    return origin_NE @ share_NE.T


def _local_bound(affinity_EE: np.ndarray, bins: int, slots: int, max_mean: float, rho: float = 1.0) -> float:
    """Most pairs of one transition that can share a bin (rank or node) under any placement with
    ``slots`` experts of each layer per bin and bin loads <= ``max_mean`` x the mean (module
    docstring, "Traffic floor"); ``rho`` >= max_b colsum(A)_b / (k load_b) where the pairs do not
    count exactly k per slot of layer l+1."""
    A = np.asarray(affinity_EE, dtype=np.float64)
    P = float(A.sum())
    if bins <= 1 or not math.isfinite(rho):
        return P
    excess_EE = np.maximum(A - np.outer(A.sum(1), A.sum(0)) / P, 0.0)
    k = min(slots, A.shape[0])
    by_row = float(-np.sort(-excess_EE, axis=1)[:, :k].sum())
    by_col = float(-np.sort(-excess_EE, axis=0)[:k].sum())
    return min(P, rho * max_mean * P / bins + min(by_row, by_col))


def traffic_floor(affinity_LEE: Optional[np.ndarray], world_size: int, ranks_per_node: int, slots_per_rank: int,
                  max_mean: float = 1.05, load_LE: Optional[np.ndarray] = None,
                  top_k: Optional[int] = None) -> dict[str, Optional[float]]:
    """``{"cross_rank", "cross_node"}``: the lowest pair-weighted cross-rank and cross-node fractions
    any plan with ``slots_per_rank`` slots and max/mean load <= ``max_mean`` can reach on these
    affinity counts [L-1, E, E] (None without pairs; module docstring, "Traffic floor"). The
    bound takes the pairs reaching an expert of layer l+1 to be k per slot, as the profiler and
    the synthetic traces count them; given the window's ``load_LE`` and ``top_k`` it checks that
    and, where pairs are missing or extra (dropped slots, partial records), widens the bound by
    ``rho = max_b colsum(A)_b / (k load_b)`` (no bound where a slot-less expert has pairs)."""
    if max_mean < 1:
        raise ValueError(f"moec: max_mean is a max/mean load, at least 1; got {max_mean}")
    if world_size > ranks_per_node and world_size % ranks_per_node:
        raise ValueError(f"moec: {world_size} ranks do not fill nodes of {ranks_per_node}")
    if affinity_LEE is None:
        return dict(cross_rank=None, cross_node=None)
    A_LEE = np.asarray(affinity_LEE, dtype=np.float64)
    N, S = world_size, slots_per_rank
    M = min(ranks_per_node, N)
    total = float(A_LEE.sum())
    if total <= 0:
        return dict(cross_rank=None, cross_node=None)
    rho_L = [1.0] * len(A_LEE)
    if load_LE is not None and top_k:
        for l, A_EE in enumerate(A_LEE):
            col_E, want_E = A_EE.sum(0), top_k * np.asarray(load_LE[l + 1], dtype=np.float64)
            if np.any((col_E > 0) & (want_E <= 0)):
                rho_L[l] = math.inf
            elif np.any(want_E > 0):
                scale = col_E[want_E > 0] / want_E[want_E > 0]
                rho_L[l] = float(scale.max() / (col_E.sum() / want_E.sum()))
    out = {}
    for name, bins, slots in (("cross_rank", N, S), ("cross_node", N // M, M * S)):
        local = sum(_local_bound(A_EE, bins, slots, max_mean, rho) for A_EE, rho in zip(A_LEE, rho_L) if A_EE.sum() > 0)
        out[name] = max(0.0, 1.0 - local / total)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def routed_shares(plan: PlacementPlan, load_LE: np.ndarray, fills: Optional[list[int]] = None) -> list[np.ndarray]:
    """Per layer, ``share_NE`` as the runtime routes the window: the plan's shares, or with
    ``replica_balance == "adaptive"`` the shares ``moec.ir.parallel.balance_replicas`` computes
    from the window's slots per expert (the runtime does it per step, on the step's counts).
    ``fills``, if given, gets each layer's number of water-fills (0 for static plans)."""
    if plan.replica_balance != "adaptive":
        if fills is not None:
            fills.extend([0] * plan.num_layers)
        return [plan.share_matrix(l) for l in range(plan.num_layers)]
    E = load_LE.shape[1]
    out = []
    for l, lp in enumerate(plan.layers):
        slots, slot_counts, shares = flatten_placement(lp.rank_experts, lp.shares)
        stats: dict = {}
        fractions = balance_replicas(np.asarray(load_LE[l], dtype=np.float64).tolist(), slots, slot_counts, shares, E,
                                     stats=stats)
        if fills is not None:
            fills.append(stats.get("water_fills", 0))
        share_NE = np.zeros((plan.world_size, E))
        for pos, rank, _, e in _held(slots, slot_counts):
            share_NE[rank, e] = fractions[pos]
        out.append(share_NE)
    return out


def weights_moved(plan: PlacementPlan, previous: Optional[PlacementPlan]) -> list[int]:
    """Per layer, (expert, rank) pairs of ``plan`` that ``previous`` did not hold (0s without one)."""
    if previous is None:
        return [0] * plan.num_layers
    if previous.world_size != plan.world_size or previous.num_layers != plan.num_layers:
        raise PlanError(f"previous plan is for {previous.world_size} rank(s) and {previous.num_layers} layer(s), "
                        f"this one for {plan.world_size} and {plan.num_layers}: plan again without --previous")
    out = []
    for lp, pp in zip(plan.layers, previous.layers):
        out.append(sum(len(set(new) - set(old)) for new, old in zip(lp.rank_experts, pp.rank_experts)))
    return out


def score_window_inputs(trace, window: int):
    """``(load_LE, affinity_LEE or None, source_LRE or None)`` of one window, as float64."""
    W = trace.num_windows
    if not -W <= window < W:
        raise ValueError(f"moec: window {window} out of range: the trace has {W} window(s)")
    load_LE = trace.load_WLE[window].astype(np.float64)
    aff = None if trace.affinity_WLEE is None else trace.affinity_WLEE[window].astype(np.float64)
    src = None if getattr(trace, "source_WLRE", None) is None else trace.source_WLRE[window].astype(np.float64)
    return load_LE, aff, src


def score_plan(plan: PlacementPlan, trace, window: int, *, ranks_per_node: Optional[int] = None,
               config: Optional[ScoreConfig] = None, previous: Optional[PlacementPlan] = None) -> PlanScore:
    """Score ``plan`` on window ``window`` of ``trace`` (see the module docstring)."""
    load_LE, aff_LEE, src_LRE = score_window_inputs(trace, window)
    return score_arrays(plan, load_LE, aff_LEE, src_LRE, top_k=(trace.meta or {}).get("top_k") or 1,
                        ranks_per_node=ranks_per_node, config=config or ScoreConfig.from_trace(trace),
                        previous=previous)


def score_arrays(plan: PlacementPlan, load_LE: np.ndarray, aff_LEE: Optional[np.ndarray],
                 src_LRE: Optional[np.ndarray], *, top_k: int = 1, ranks_per_node: Optional[int] = None,
                 config: Optional[ScoreConfig] = None, previous: Optional[PlacementPlan] = None) -> PlanScore:
    """``score_plan`` on one window's arrays: ``load_LE``, ``aff_LEE`` [L-1, E, E] or None,
    ``src_LRE`` or None."""
    config = config or ScoreConfig()
    load_LE = np.asarray(load_LE, dtype=np.float64)
    L, E = load_LE.shape
    plan.validate(num_experts=E, num_layers=L)
    N = plan.world_size
    M = min(ranks_per_node or plan.ranks_per_node or N, N)
    if N > M and N % M:
        raise PlanError(f"{N} ranks do not fill nodes of {M}: use a world size that is a multiple of the ranks per node")
    calib = config.calibration
    H, I, b = config.hidden, config.expert_hidden, config.dtype_bytes
    g = 2 if config.gated else 1
    node_N = np.arange(N) // M
    same_node_NN = node_N[:, None] == node_N[None, :]
    eye_NN = np.eye(N, dtype=bool)
    intra_NN = same_node_NN & ~eye_NN
    inter_NN = ~same_node_NN
    alphas = (M - 1) * calib.alpha_s["intra"] + (N - M) * calib.alpha_s["inter"]
    beta_i, beta_e = calib.beta_s_per_byte["intra"], calib.beta_s_per_byte["inter"]
    count_bytes = 8 * N
    t_count = alphas + count_bytes * ((M - 1) / N * beta_i + (N - M) / N * beta_e) if N > 1 else 0.0
    moved = weights_moved(plan, previous)

    fills_L: list[int] = []
    shares = routed_shares(plan, load_LE, fills_L)
    adaptive = plan.replica_balance == "adaptive"
    layers: list[LayerScore] = []
    src_cross = []
    for l in range(L):
        share_NE = shares[l]
        total = load_LE[l].sum()
        scale = (N * config.tokens_per_rank * top_k / total) if (config.tokens_per_rank and total > 0) else 1.0
        load_E = load_LE[l] * scale
        src_RE = None if src_LRE is None else src_LRE[l] * scale
        load_N = share_NE @ load_LE[l]
        mean = load_N.mean()
        max_mean = float(load_N.max() / mean) if mean > 0 else 1.0

        cross_rank = cross_node = None
        pairs = 0.0
        prev_share = aff_EE = None
        if l > 0 and aff_LEE is not None:
            prev_share, aff_EE = shares[l - 1], aff_LEE[l - 1]
            F_NN = pair_flow(prev_share, aff_EE, share_NE)
            pairs = float(F_NN.sum())
            if pairs > 0:
                cross_rank = float(F_NN[~eye_NN].sum() / pairs)
                cross_node = float(F_NN[inter_NN].sum() / pairs)
        D_NN = dispatch_matrix(prev_share, aff_EE, share_NE, load_E, src_RE)
        if l == 0 and src_RE is not None and src_RE.shape[0] == N and D_NN.sum() > 0:
            src_cross.append((float(D_NN[~eye_NN].sum()), float(D_NN.sum())))

        # Bytes per rank and link class; the combine mirrors the dispatch (rows only).
        row = H * b
        sent_i, sent_e = (D_NN * intra_NN).sum(1), (D_NN * inter_NN).sum(1)
        recv_i, recv_e = (D_NN * intra_NN).sum(0), (D_NN * inter_NN).sum(0)
        def busiest(per_slot: float) -> float:
            t_sent = per_slot * (sent_i * beta_i + sent_e * beta_e)
            t_recv = per_slot * (recv_i * beta_i + recv_e * beta_e)
            return float(np.maximum(t_sent, t_recv).max())
        a2a_s = (t_count + 2 * alphas + busiest(row + ID_BYTES) + alphas + busiest(row)) if N > 1 else 0.0
        if adaptive and N > 1 and any(c > 1 for c in plan.layers[l].copies(E)):
            # the step's all-reduce of E slot counts before routing (a ring: 2(N-1) steps), and the
            # host's balancing, which the exchange waits for (moec::ep_route_adaptive)
            a2a_s += (2 * alphas + 2 * 8 * E * ((M - 1) / N * beta_i + (N - M) / N * beta_e)
                      + HOST_S_FIXED + fills_L[l] * HOST_S_PER_FILL)
        bytes_i = float(sent_i.sum()) * (2 * row + ID_BYTES)
        bytes_e = float(sent_e.sum()) * (2 * row + ID_BYTES)

        # Compute per rank, mirroring cost_model.term_definitions' c_1 at r=1.
        R_N = share_NE @ load_E
        T_N = D_NN.sum(1)
        L_N = np.array([len(x) for x in plan.layers[l].rank_experts])
        gemm_N = 2 * R_N * H * (g + 1) * I / calib.flops_per_s
        weights_N = L_N * (g + 1) * I * H * b / calib.mem_bytes_per_s
        local_N = b * (8 * T_N * H + R_N * (7 * H + (4 * g + 3) * I)) / calib.mem_bytes_per_s
        ops_N = (OPS_FIXED + OPS_PER_EXPERT * np.maximum(L_N, 1)) * calib.op_overhead_s
        # The cost model's shared-expert term s at S=0: the reads of x and the add of the output
        # (4H per token), the same on every rank.
        shared_s = config.tokens_per_rank * b * 4 * H / calib.mem_bytes_per_s if config.tokens_per_rank else 0.0
        compute_s = float((np.maximum(gemm_N, weights_N) + local_N + ops_N).max()) + shared_s
        layers.append(LayerScore(layer=l, max_mean_load=max_mean, cross_rank=cross_rank, cross_node=cross_node,
                                 pairs=pairs, a2a_bytes_intra=bytes_i, a2a_bytes_inter=bytes_e, compute_s=compute_s,
                                 a2a_s=float(a2a_s), time_s=compute_s + float(a2a_s), moved=moved[l],
                                 moved_bytes=moved[l] * config.expert_bytes, load_N=load_N))
    source_cross = (sum(c for c, _ in src_cross) / sum(t for _, t in src_cross)) if src_cross else None
    return PlanScore(layers=layers, source_cross_rank=source_cross)
