"""Expert placement plans: which rank holds which experts (replicas included) in each MoE layer, and
how a replicated expert's tokens are split among its replicas.

Contract
--------
* ``PlacementPlan`` holds ``world_size`` ranks and one ``LayerPlan`` per MoE layer (in model order).
  ``LayerPlan.rank_experts[r]`` lists the experts rank ``r`` holds, in its local slot order (slot i of
  rank r holds ``rank_experts[r][i]``); an expert listed on several ranks is replicated.
  ``LayerPlan.shares[r][i]`` (optional, same nesting) is the fraction of expert
  ``rank_experts[r][i]``'s tokens the replica on rank r takes; per expert the fractions sum to 1
  (within ``SHARE_TOLERANCE``). Without shares a replicated expert's tokens are split evenly.
  ``replica_balance`` ("static", "adaptive" or None: static) says how the runtime is meant to split
  them: by those shares, or by shares it balances on each step's routing (``moec.compile``'s
  ``replica_balance``, ``moec::ep_route_adaptive``); the scorer scores the plan the same way.
* ``validate(num_experts, num_layers, slots_per_rank)`` raises ``PlanError`` (a ``ValueError`` whose
  one-line message names the problem and the fix) on: an unknown expert id (outside [0, E)), a
  layer whose rank lists do not match ``world_size`` (rank out of range), an expert held by no rank
  (its tokens would be dropped), an expert twice on one rank, a rank holding more experts than its
  slots or fewer slots in all than experts, shares of the wrong shape, negative or not summing to 1,
  a layer count or expert count different from the model's or trace's. ``load`` and ``from_dict``
  validate; constructing a plan in code does not until ``validate()`` is called.
* ``replicas(layer)`` is what the runtime routes by: per expert, ``(rank, local_slot, share)`` for
  each replica, ranks ascending. ``slots_per_rank(layer)`` counts each rank's experts.
* ``contiguous(E, N, L)`` is the unplaced layout (Megatron/DeepSpeed): rank r holds experts
  ``r*E//N .. (r+1)*E//N - 1``; with fewer experts than ranks, rank r holds expert ``r*E//N``
  (each expert replicated on N/E ranks, split evenly).

JSON format (``save`` / ``load``; UTF-8, one object)::

    {
      "world_size": 4,                       # required: ranks
      "num_experts": 8,                      # optional: experts per layer (else max id + 1)
      "ranks_per_node": 2,                   # optional: informational (the scorer's node size)
      "replica_balance": "adaptive",         # optional: how the runtime splits a replicated expert's
                                             #   tokens: "static" (by shares; the default) or "adaptive"
                                             #   (shares balanced on each step's routing; moec.compile)
      "layers": [                            # required: one object per MoE layer, model order
        {"rank_experts": [[0, 1, 7], [2, 3], [4, 5, 7], [6]],   # required: per rank, its experts
         "shares": [[1.0, 1.0, 0.25], [1.0, 1.0], [1.0, 1.0, 0.75], [1.0]]},  # optional
        ...
      ],
      "meta": {...}                          # optional: free-form (who planned it, on what trace)
    }

Legend: E experts, N ranks (world size), L layers, S slots per rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moec.runtime.jsonfile import read_json, write_json

__all__ = ["LayerPlan", "PlacementPlan", "PlanError", "SHARE_TOLERANCE"]

SHARE_TOLERANCE = 1e-6
REPLICA_BALANCE = ("static", "adaptive")
PLAN_FORMAT = "moec-placement-plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """An invalid placement plan or plan file; the message is one line and says how to fix it."""


@dataclass
class LayerPlan:
    """One MoE layer's placement: ``rank_experts[r]`` the experts on rank r (local slot order),
    ``shares[r][i]`` the fraction of ``rank_experts[r][i]``'s tokens that replica takes (None: even)."""

    rank_experts: list[list[int]]
    shares: Optional[list[list[float]]] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rank_experts": [[int(e) for e in r] for r in self.rank_experts]}
        if self.shares is not None:
            d["shares"] = [[float(s) for s in r] for r in self.shares]
        return d

    def copies(self, num_experts: int) -> list[int]:
        """How many ranks hold each expert."""
        n = [0] * num_experts
        for experts in self.rank_experts:
            for e in experts:
                n[e] += 1
        return n

    def share_matrix(self, num_experts: int) -> np.ndarray:
        """``share_NE[r, e]``: the fraction of expert e's tokens rank r takes (0 where it holds none)."""
        share_NE = np.zeros((len(self.rank_experts), num_experts))
        copies = self.copies(num_experts)
        for r, experts in enumerate(self.rank_experts):
            for i, e in enumerate(experts):
                share_NE[r, e] = self.shares[r][i] if self.shares is not None else 1.0 / copies[e]
        return share_NE


@dataclass
class PlacementPlan:
    """Per MoE layer, which rank holds which experts (see the module docstring)."""

    world_size: int
    layers: list[LayerPlan]
    num_experts: Optional[int] = None
    ranks_per_node: Optional[int] = None
    meta: dict = field(default_factory=dict)
    replica_balance: Optional[str] = None  # "static" / "adaptive" (None: static); see the module docstring

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int, num_layers: int,
                   ranks_per_node: Optional[int] = None) -> "PlacementPlan":
        """Rank r holds experts ``r*E//N .. (r+1)*E//N - 1`` in every layer (E < N: expert
        ``r*E//N``, so each expert is replicated on about N/E ranks)."""
        if num_experts < 1 or world_size < 1 or num_layers < 0:
            raise PlanError(f"contiguous plan needs experts >= 1, ranks >= 1, layers >= 0; got E={num_experts}, "
                            f"N={world_size}, L={num_layers}")
        E, N = num_experts, world_size
        if E >= N:
            ranks = [list(range(r * E // N, (r + 1) * E // N)) for r in range(N)]
        else:
            ranks = [[r * E // N] for r in range(N)]
        return cls(world_size=N, layers=[LayerPlan([list(r) for r in ranks]) for _ in range(num_layers)],
                   num_experts=E, ranks_per_node=ranks_per_node, meta={"method": "contiguous"})

    # -- queries the runtime uses ---------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def experts(self) -> int:
        """E: ``num_experts``, else the largest expert id in the plan + 1."""
        if self.num_experts is not None:
            return int(self.num_experts)
        ids = [e for layer in self.layers for r in layer.rank_experts for e in r]
        return max(ids) + 1 if ids else 0

    def _layer(self, layer: int) -> LayerPlan:
        if not -len(self.layers) <= layer < len(self.layers):
            raise PlanError(f"layer {layer} is out of range: the plan has {len(self.layers)} layer(s)")
        return self.layers[layer]

    def replicas(self, layer: int) -> list[list[tuple[int, int, float]]]:
        """Per expert of ``layer``: ``(rank, local_slot, share)`` of each replica, ranks ascending."""
        lp = self._layer(layer)
        E = self.experts()
        copies = lp.copies(E)
        out: list[list[tuple[int, int, float]]] = [[] for _ in range(E)]
        for r, experts in enumerate(lp.rank_experts):
            for i, e in enumerate(experts):
                share = float(lp.shares[r][i]) if lp.shares is not None else 1.0 / copies[e]
                out[e].append((r, i, share))
        return out

    def slots_per_rank(self, layer: int) -> list[int]:
        """How many experts (slots used) each rank holds in ``layer``."""
        return [len(r) for r in self._layer(layer).rank_experts]

    def share_matrix(self, layer: int) -> np.ndarray:
        """``share_NE[r, e]``: the fraction of expert e's tokens rank r takes in ``layer``."""
        return self._layer(layer).share_matrix(self.experts())

    # -- checking --------------------------------------------------------------------------------

    def validate(self, num_experts: Optional[int] = None, num_layers: Optional[int] = None,
                 slots_per_rank: Optional[int] = None) -> "PlacementPlan":
        """Raise ``PlanError`` if the plan is not usable (see the module docstring); return self."""
        N = self.world_size
        if not isinstance(N, int) or isinstance(N, bool) or N < 1:
            raise PlanError(f"plan world_size must be a positive integer, got {N!r}")
        if num_experts is not None and self.num_experts is not None and num_experts != self.num_experts:
            raise PlanError(f"plan is for {self.num_experts} experts per layer but the model/trace has "
                            f"{num_experts}: re-plan for this model")
        if num_layers is not None and num_layers != len(self.layers):
            raise PlanError(f"plan has {len(self.layers)} layer(s) but the model/trace has {num_layers} MoE "
                            f"layer(s): re-plan for this model (one entry in \"layers\" per MoE layer)")
        if self.ranks_per_node is not None and (not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1):
            raise PlanError(f"plan ranks_per_node must be a positive integer, got {self.ranks_per_node!r}")
        if self.replica_balance not in (None, *REPLICA_BALANCE):
            raise PlanError(f"plan replica_balance must be one of {', '.join(map(repr, REPLICA_BALANCE))}, "
                            f"got {self.replica_balance!r}")
        E = num_experts if num_experts is not None else self.num_experts
        for l, lp in enumerate(self.layers):
            self._validate_layer(l, lp, E, slots_per_rank)
        return self

    def _validate_layer(self, l: int, lp: LayerPlan, E: Optional[int], S: Optional[int]) -> None:
        N = self.world_size
        where = f"plan layer {l}"
        if not isinstance(lp.rank_experts, list) or len(lp.rank_experts) != N:
            got = len(lp.rank_experts) if isinstance(lp.rank_experts, list) else type(lp.rank_experts).__name__
            raise PlanError(f"{where}: rank out of range: rank_experts lists {got} rank(s) but world_size is {N}; "
                            f"give exactly one expert list per rank")
        for r, experts in enumerate(lp.rank_experts):
            if not isinstance(experts, list):
                raise PlanError(f"{where}: rank {r}'s entry must be a list of expert ids, got {experts!r}")
            for e in experts:
                if not isinstance(e, (int, np.integer)) or isinstance(e, bool):
                    raise PlanError(f"{where}: rank {r} lists {e!r}, not an integer expert id")
                if e < 0 or (E is not None and e >= E):
                    bound = f"[0, {E})" if E is not None else "non-negative ids"
                    raise PlanError(f"{where}: unknown expert {e} on rank {r} (experts are {bound}); "
                                    f"fix the id or plan for the right number of experts")
            if len(set(experts)) != len(experts):
                dup = next(e for e in experts if experts.count(e) > 1)
                raise PlanError(f"{where}: expert {dup} appears twice on rank {r}; a rank holds an expert "
                                f"at most once (replicate it on another rank instead)")
            if S is not None and len(experts) > S:
                raise PlanError(f"{where}: rank {r} holds {len(experts)} experts but has only {S} slot(s); "
                                f"move experts to other ranks or raise the slots per rank")
        if E is None:
            ids = [e for r in lp.rank_experts for e in r]
            E = max(ids) + 1 if ids else 0
        if S is not None and N * S < E:
            raise PlanError(f"slots fewer than experts: {N} rank(s) x {S} slot(s) = {N * S} < {E} experts; "
                            f"use at least {math.ceil(E / N)} slots per rank")
        copies = lp.copies(E)
        missing = [e for e in range(E) if copies[e] == 0]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise PlanError(f"{where}: expert(s) {shown} on no rank: their tokens would be dropped; "
                            f"place every expert on at least one rank")
        if lp.shares is None:
            return
        if not isinstance(lp.shares, list) or len(lp.shares) != N or any(
                not isinstance(s, list) or len(s) != len(x) for s, x in zip(lp.shares, lp.rank_experts)):
            raise PlanError(f"{where}: shares must have the shape of rank_experts (one fraction per listed "
                            f"expert per rank); drop \"shares\" to split replicas evenly")
        total = [0.0] * E
        for r, (experts, shares) in enumerate(zip(lp.rank_experts, lp.shares)):
            for e, s in zip(experts, shares):
                if not isinstance(s, (int, float, np.floating, np.integer)) or isinstance(s, bool) or not math.isfinite(s):
                    raise PlanError(f"{where}: share {s!r} of expert {e} on rank {r} is not a number")
                if s < 0:
                    raise PlanError(f"{where}: share {s} of expert {e} on rank {r} is negative; shares are "
                                    f"fractions of the expert's tokens in [0, 1]")
                total[e] += float(s)
        for e, t in enumerate(total):
            if abs(t - 1.0) > SHARE_TOLERANCE:
                raise PlanError(f"{where}: expert {e}'s shares sum to {t:.9g}, not 1; its replicas' fractions "
                                f"must add up to 1 (within {SHARE_TOLERANCE:g})")

    # -- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "world_size": int(self.world_size)}
        if self.num_experts is not None:
            d["num_experts"] = int(self.num_experts)
        if self.ranks_per_node is not None:
            d["ranks_per_node"] = int(self.ranks_per_node)
        if self.replica_balance is not None:
            d["replica_balance"] = self.replica_balance
        d["layers"] = [lp.to_dict() for lp in self.layers]
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "plan") -> "PlacementPlan":
        """Build and validate a plan from its JSON object (see the module docstring)."""
        if not isinstance(d, dict):
            raise PlanError(f"{source} is not a placement plan: expected a JSON object with \"world_size\" "
                            f"and \"layers\", got {type(d).__name__}")
        for key in ("world_size", "layers"):
            if key not in d:
                raise PlanError(f"{source} has no \"{key}\" key; a plan needs at least "
                                f"{{\"world_size\": N, \"layers\": [{{\"rank_experts\": [[...], ...]}}, ...]}}")
        if not isinstance(d["layers"], list):
            raise PlanError(f"{source}: \"layers\" must be a list of layer objects")
        layers = []
        for l, ld in enumerate(d["layers"]):
            if not isinstance(ld, dict) or "rank_experts" not in ld:
                raise PlanError(f"{source}: layer {l} has no \"rank_experts\" key (per rank, the list of its experts)")
            layers.append(LayerPlan(rank_experts=ld["rank_experts"], shares=ld.get("shares")))
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise PlanError(f"{source}: \"meta\" must be a JSON object")
        plan = cls(world_size=d["world_size"], layers=layers, num_experts=d.get("num_experts"),
                   ranks_per_node=d.get("ranks_per_node"), meta=meta, replica_balance=d.get("replica_balance"))
        if plan.num_experts is not None and (not isinstance(plan.num_experts, int) or plan.num_experts < 1):
            raise PlanError(f"{source}: \"num_experts\" must be a positive integer, got {plan.num_experts!r}")
        try:
            return plan.validate()
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    def save(self, path: os.PathLike) -> Path:
        """Write the plan as JSON (atomically) and return the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: os.PathLike) -> "PlacementPlan":
        """Read and validate a plan file; ``PlanError`` if it is missing, unreadable or invalid."""
        d = read_json(path, "plan", PlanError, " (expected JSON written by `moec place --out`)")
        return cls.from_dict(d, source=f"plan {path}")
