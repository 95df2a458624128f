"""The router vocabulary: what the ``kind`` string of ``moec::route`` / ``moec::gate`` can say.

Contract: ``RouterKind.parse(kind)`` is the one place a kind string is read; it raises
``ValueError`` naming the problem and the valid forms. ``str(RouterKind)`` is the canonical
string (modifiers in ``MOD_ORDER``, floats as ``repr(float)``), and ``parse(str(k)) == k``; the
string is part of cache keys and printed graphs, so it is deterministic. The forward ops' schemas
do not change with the vocabulary: every new behaviour is spelled in the kind (``moec::route_backward``
takes the route's ``capacity`` too, which ``renorm_kept``'s weights depend on).

Grammar::

    KIND := BASE ("+" MOD)*
    BASE := softmax_topk | topk_softmax | sigmoid_topk | sigmoid_bias_grouped_topk | top1
          | sqrtsoftplus_topk | expert_choice
    MOD  := group_max | pnorm=FLOAT | cf=FLOAT | cfloor | cmin=INT | choice_first | renorm_kept
          | sigmoid

Token-choice bases (all but ``expert_choice``) score every expert, pick ``top_k`` per token on
the choice (scores + correction bias, group-limited when ``num_groups > 1``) and read the
weights from the unbiased scores; ``moec.ir.ops.route_reference`` is their definition.
``sqrtsoftplus_topk`` scores by ``sqrt(softplus(logits))`` (DeepSeek-V4; softplus with torch's
defaults, beta 1 and threshold 20) and is otherwise ``sigmoid_topk``.

- ``group_max``: a group's score in group-limited top-k is its best choice score (DeepSeek-V2)
  instead of the sum of its two best (DeepSeek-V3).
- ``pnorm=P``: renormalisation divides the k weights by their p-norm instead of their sum
  (DBRX); needs ``renormalize=True``.
- ``cf=F``: an expert capacity per call, ``C = ceil(F * T * top_k / E)`` (float arithmetic, left
  to right), T the tokens along dim -2; ``cfloor`` rounds down instead; ``cmin=N`` makes it at
  least N. A computed capacity is at least 1. The ``capacity`` argument, when > 0, is a fixed
  capacity and wins over ``cf``.
- ``choice_first``: capacity priority goes to every token's first choice, in token order, then
  every second choice, ... (GShard top-2), instead of token by token.
- ``renorm_kept``: renormalisation happens after the capacity drops, over the slots kept:
  ``w_k * kept_k / max(sum_j w_j kept_j, eps)`` with eps the float32 epsilon, so a dropped slot
  weighs 0 and a token that lost every slot has all-zero weights (NLLB-MoE,
  ``normalize_router_prob_before_dropping=False``). Without it the k weights are renormalised
  before the drops. Needs ``renormalize=True`` and a capacity (fixed or ``cf``), and renormalises
  by the sum (not with ``pnorm``). The weights then depend on the capacity, so the backward
  recomputes the kept slots with the same capacity.
- ``expert_choice``: each expert takes its C best tokens (scores softmax over experts, or
  ``sigmoid``); C from the ``capacity`` argument or ``cf``, at most T. The route's K dim is E.

Legend: T tokens (along dim -2), E experts, k / K top-k.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Union

TOKEN_CHOICE_BASES = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sigmoid_bias_grouped_topk", "top1",
                      "sqrtsoftplus_topk")
BASES = TOKEN_CHOICE_BASES + ("expert_choice",)
# Canonical modifier order of the printed kind.
MOD_ORDER = ("group_max", "pnorm", "cf", "cfloor", "cmin", "choice_first", "renorm_kept", "sigmoid")
_FLAG_MODS = ("group_max", "cfloor", "choice_first", "renorm_kept", "sigmoid")
_VALUE_MODS = {"pnorm": "FLOAT", "cf": "FLOAT", "cmin": "INT"}
FORMS = ("BASE('+'MOD)* with BASE one of " + ", ".join(BASES) + " and MOD one of group_max, pnorm=FLOAT, "
         "cf=FLOAT, cfloor, cmin=INT, choice_first, renorm_kept, sigmoid (expert_choice only)")


def _fmt(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True)
class RouterKind:
    base: str
    group_max: bool = False
    pnorm: Optional[float] = None  # None: renormalise by the sum
    capacity_factor: Optional[float] = None  # cf=F
    capacity_floor: bool = False  # cfloor
    capacity_min: int = 0  # cmin=N; 0: none
    choice_first: bool = False
    renorm_kept: bool = False
    sigmoid: bool = False

    def __post_init__(self):
        def bad(msg: str):
            raise ValueError(f"moec: router kind {str(self)!r}: {msg}; valid forms: {FORMS}")

        if self.base not in BASES:
            raise ValueError(f"moec: unknown router kind {self.base!r}; valid forms: {FORMS}")
        if self.pnorm is not None and not (math.isfinite(self.pnorm) and self.pnorm > 0):
            bad(f"pnorm={self.pnorm} must be a positive finite float")
        if self.capacity_factor is not None and not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            bad(f"cf={self.capacity_factor} must be a positive finite float")
        if self.capacity_min < 0:
            bad(f"cmin={self.capacity_min} must be a positive integer")
        if (self.capacity_floor or self.capacity_min) and self.capacity_factor is None:
            bad("cfloor and cmin shape a computed capacity and need cf=F")
        if self.expert_choice:
            for name in ("group_max", "pnorm", "choice_first", "renorm_kept"):
                if getattr(self, name) not in (False, None):
                    bad(f"{name} applies to token-choice routers, not expert_choice")
        elif self.sigmoid:
            bad("sigmoid applies to expert_choice only (token-choice bases name their scores)")
        if self.renorm_kept and self.pnorm is not None:
            bad("renorm_kept renormalises the kept weights by their sum; it does not combine with pnorm")

    # ------------------------------------------------------------------------------------------
    # The string form
    # ------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, kind: Union[str, "RouterKind"]) -> "RouterKind":
        if isinstance(kind, RouterKind):
            return kind
        if not isinstance(kind, str):
            raise ValueError(f"moec: router kind must be a string, got {type(kind).__name__}; valid forms: {FORMS}")
        return _parse(kind)  # memoised: ops parse their kind on every call

    @classmethod
    def _from_string(cls, kind: str) -> "RouterKind":
        base, *mods = kind.split("+")
        if base not in BASES:
            raise ValueError(f"moec: unknown router kind {kind!r} (base {base!r}); valid forms: {FORMS}")
        fields: dict = {}
        for mod in mods:
            name, eq, value = mod.partition("=")
            key = {"cf": "capacity_factor", "cfloor": "capacity_floor", "cmin": "capacity_min"}.get(name, name)
            if name in _FLAG_MODS and not eq:
                parsed: object = True
            elif name in _VALUE_MODS and eq:
                try:
                    parsed = int(value) if _VALUE_MODS[name] == "INT" else float(value)
                except ValueError:
                    what = "an integer" if _VALUE_MODS[name] == "INT" else "a float"
                    raise ValueError(f"moec: router kind {kind!r}: {name}={value!r} is not {what}; valid forms: "
                                     f"{FORMS}") from None
                if name == "cmin" and parsed < 1:
                    raise ValueError(f"moec: router kind {kind!r}: cmin={value} must be at least 1; valid forms: "
                                     f"{FORMS}")
            else:
                raise ValueError(f"moec: router kind {kind!r}: unknown modifier {mod!r}; valid forms: {FORMS}")
            if key in fields:
                raise ValueError(f"moec: router kind {kind!r}: modifier {name!r} given twice; valid forms: {FORMS}")
            fields[key] = parsed
        return cls(base, **fields)

    def __str__(self) -> str:
        parts = [self.base]
        if self.group_max:
            parts.append("group_max")
        if self.pnorm is not None:
            parts.append(f"pnorm={_fmt(self.pnorm)}")
        if self.capacity_factor is not None:
            parts.append(f"cf={_fmt(self.capacity_factor)}")
        if self.capacity_floor:
            parts.append("cfloor")
        if self.capacity_min:
            parts.append(f"cmin={self.capacity_min}")
        if self.choice_first:
            parts.append("choice_first")
        if self.renorm_kept:
            parts.append("renorm_kept")
        if self.sigmoid:
            parts.append("sigmoid")
        return "+".join(parts)

    # ------------------------------------------------------------------------------------------
    # What the rest of moec asks
    # ------------------------------------------------------------------------------------------

    @property
    def expert_choice(self) -> bool:
        return self.base == "expert_choice"

    @property
    def scores(self) -> str:
        """What the weights are read from: ``softmax`` (over experts), ``sigmoid``,
        ``sqrtsoftplus`` or ``logits``."""
        if self.base == "topk_softmax":
            return "logits"
        if self.base == "sqrtsoftplus_topk":
            return "sqrtsoftplus"
        if self.base.startswith("sigmoid") or self.sigmoid:
            return "sigmoid"
        return "softmax"

    def out_k(self, top_k: int, num_experts: int) -> int:
        """The K dim of the route's outputs: E for expert choice, else top_k."""
        return num_experts if self.expert_choice else top_k

    def capacity_for(self, capacity: int, tokens: int, top_k: int, num_experts: int) -> int:
        """The expert capacity of one call over ``tokens`` tokens; 0 means unlimited."""
        if capacity > 0:
            return capacity
        if self.capacity_factor is None:
            return 0
        raw = self.capacity_factor * tokens * top_k / num_experts
        computed = math.floor(raw) if self.capacity_floor else math.ceil(raw)
        return max(computed, self.capacity_min, 1)

    def check(self, *, num_experts: int, top_k: int, num_groups: int, topk_groups: int, renormalize: bool,
              has_correction_bias: bool, capacity: Optional[int] = None) -> None:
        """Raise ``ValueError`` for arguments that make no sense with this kind. ``capacity`` is
        the route's ``capacity`` argument (0 for a gate); ``None`` when the caller does not know
        it (a ``KernelSpec``), which skips the one rule that needs it."""
        where = f"moec: router kind {str(self)!r}"
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moec: top_k={top_k} must be between 1 and the {num_experts} experts")
        if self.pnorm is not None and not renormalize:
            raise ValueError(f"{where}: pnorm renormalises the weights and needs renormalize=True")
        if self.renorm_kept:
            if not renormalize:
                raise ValueError(f"{where}: renorm_kept renormalises the kept weights and needs renormalize=True")
            if capacity is not None and capacity <= 0 and self.capacity_factor is None:
                raise ValueError(f"{where}: renorm_kept renormalises over the slots an expert capacity kept and "
                                 "needs one: capacity > 0 or cf=F in the kind")
        if self.expert_choice:
            if renormalize:
                raise ValueError(f"{where}: expert choice does not renormalise (a token's weights are its "
                                 "scores over all experts); use renormalize=False")
            if num_groups > 1:
                raise ValueError(f"{where}: expert choice has no group-limited top-k; use num_groups=1")
            if has_correction_bias:
                raise ValueError(f"{where}: expert choice takes no correction bias")
            return
        if num_groups > 1:
            if num_experts % num_groups:
                raise ValueError(f"moec: {num_experts} experts do not split into {num_groups} groups")
            if not 1 <= topk_groups <= num_groups:
                raise ValueError(f"moec: topk_groups={topk_groups} must be between 1 and num_groups={num_groups}")
            if topk_groups * (num_experts // num_groups) < top_k:
                raise ValueError(f"moec: {topk_groups} of {num_groups} groups hold "
                                 f"{topk_groups * (num_experts // num_groups)} experts, fewer than top_k={top_k}")


@functools.lru_cache(maxsize=256)
def _parse(kind: str) -> RouterKind:
    return RouterKind._from_string(kind)


def has_capacity(kind: Union[str, RouterKind], capacity: int) -> bool:
    """Whether a route drops slots by an expert capacity (fixed, from ``cf``, or expert choice):
    such a route keeps ``moec::route`` / ``moec::dispatch`` (the drops need the dispatch order),
    everything else can be the fused ``gate``. A ``renorm_kept`` kind counts as one whatever the
    argument: it is only valid with a capacity (``RouterKind.check``)."""
    rk = RouterKind.parse(kind)
    return capacity > 0 or rk.capacity_factor is not None or rk.expert_choice or rk.renorm_kept


def canonical(kind: Union[str, RouterKind]) -> str:
    """The canonical spelling of a kind string (``softmax_topk+pnorm=2`` -> ``...+pnorm=2.0``)."""
    return str(RouterKind.parse(kind))
