"""Routing traces: how many tokens a model routed to each expert, per window and layer, and how
its consecutive layers' choices pair up. Produced by ``moec.runtime.profiler`` (``moec profile``)
and ``moec.runtime.synthetic``; read by the placement optimiser and everything else that takes
a trace.

Legend: W windows (spans of tokens, e.g. successive batches), L MoE layers (in model order),
E experts per layer, R source ranks (the rank a token lives on in a distributed run).

Contract
--------
* ``RoutingTrace(load_WLE, affinity_WLEE=None, source_WLRE=None, meta={})`` validates on
  construction and raises ``TraceError`` (a ``ValueError``) naming the problem and the fix.
* ``RoutingTrace.load(path_or_name)`` reads a ``.npz`` file (format below) or builds the
  ``synthetic:NAME`` preset of ``moec.runtime.synthetic.PRESETS`` (deterministic: fixed seeds).
  ``trace.save(path)`` writes the same format with ``np.savez_compressed``; ``load(save(t)) == t``.
* ``trace.window(i)`` is a one-window trace (same layers, experts, meta).

File format (``.npz``, version 1)
---------------------------------
An ``.npz`` archive (``np.savez`` or ``np.savez_compressed``) holding:

``load`` [W, L, E], integers, required
    ``load[w, l, e]``: slots routed to expert e at layer l in window w (a token routed top-k
    fills k slots per layer).
``affinity`` [W, L-1, E, E], integers, optional
    ``affinity[w, l, a, b]``: pairs (expert a at layer l, expert b at layer l+1) chosen by the
    same token in window w; with top-k a token counts once for each of its k*k (a, b) pairs, so
    when every token reaches both layers ``affinity[w, l].sum(1) == k * load[w, l]``.
``source`` [W, L, R, E], integers, optional
    ``source[w, l, r, e]``: the slots of ``load[w, l, e]`` whose tokens live on rank r (the rank
    that fed them in a distributed run).
``meta`` 0-d string array holding a JSON object, optional
    ``top_k`` (int or null), ``layer_names`` (L strings or null), ``source`` (where the trace
    came from: ``synthetic:NAME``, ``profile:SPEC``, a path; or null), the generator's parameters
    for synthetic traces, ``format_version`` (1, written by ``save``). Missing keys read as null.

Any integer or integer-valued float dtype is accepted on load; arrays are stored as int64.

Validation (what is checked, all raising ``TraceError``)
-------------------------------------------------------
* ``load`` present, 3-d, no zero dimension; ``affinity`` 4-d [W, L-1, E, E]; ``source`` 4-d
  [W, L, R, E] with R >= 1; every array finite, non-negative and integer-valued.
* ``affinity`` is allowed (and empty) with L = 1. Its row sums are NOT required to equal k times
  the load: a token may skip a layer (dense layers between MoE layers, dropped tokens, layers
  recorded from different batches). What is required is consistency in token counts: per window
  and layer, the total pairs ``affinity[w, l].sum()`` cannot exceed
  ``k * min(load[w, l].sum(), load[w, l+1].sum())`` (each token of l and l+1 with k slots in each
  contributes at most k*k pairs, and there are at most min(slots)/k such tokens); when ``top_k``
  is unknown, k is taken as E (the loosest bound). Likewise ``affinity[w, l, a, :].sum()`` cannot
  exceed ``k * load[w, l, a]`` and ``affinity[w, l, :, b].sum()`` cannot exceed
  ``k * load[w, l+1, b]``.
* ``source`` summed over ranks must equal ``load`` (both count the same slots).
* ``meta`` is a JSON object; ``top_k``, when given, an int in [1, E]; ``layer_names``, when
  given, a list of L strings.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = ["FORMAT_VERSION", "RoutingTrace", "TraceError"]

FORMAT_VERSION = 1
SYNTHETIC_PREFIX = "synthetic:"


class TraceError(ValueError):
    """A routing trace (array, file or name) that cannot be used; the message says why and what
    to do."""


def _as_counts(name: str, array: Any, ndim: int, layout: str) -> np.ndarray:
    """``array`` as an int64 array of non-negative integer counts, or ``TraceError``."""
    try:
        arr = np.asarray(array)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's data
        raise TraceError(f"{name} is not an array: {exc}") from exc
    if arr.ndim != ndim:
        raise TraceError(
            f"{name} has {arr.ndim} dimensions (shape {tuple(arr.shape)}) but must be {layout}"
        )
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TraceError(f"{name} has dtype {arr.dtype}; store token counts as integers (int64)")
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise TraceError(f"{name} contains NaN; every entry must be a token count")
        if np.isinf(arr).any():
            raise TraceError(f"{name} contains inf; every entry must be a token count")
        if (arr != np.round(arr)).any():
            bad = arr[arr != np.round(arr)].flat[0]
            raise TraceError(
                f"{name} contains non-integer counts (e.g. {bad}); counts of tokens are integers"
            )
    if arr.size and arr.min() < 0:
        where = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise TraceError(
            f"{name} contains negative counts (e.g. {arr[where]} at index {where}); "
            "counts of tokens are >= 0"
        )
    return arr.astype(np.int64, copy=False)


@dataclass
class RoutingTrace:
    """Per-window, per-layer expert loads and consecutive-layer expert pairs (see the module
    docstring for the shapes and what validation checks)."""

    load_WLE: np.ndarray
    affinity_WLEE: Optional[np.ndarray] = None
    source_WLRE: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.load_WLE = _as_counts("load", self.load_WLE, 3, "[windows, layers, experts]")
        W, L, E = self.load_WLE.shape
        if 0 in (W, L, E):
            raise TraceError(
                f"load has shape {(W, L, E)}: a trace needs at least one window, one layer and "
                "one expert"
            )
        self.meta = self._check_meta(self.meta, L, E)
        if self.affinity_WLEE is not None:
            self.affinity_WLEE = self._check_affinity(self.affinity_WLEE)
        if self.source_WLRE is not None:
            self.source_WLRE = self._check_source(self.source_WLRE)

    # -- validation ----------------------------------------------------------------------------

    @staticmethod
    def _check_meta(meta: Any, L: int, E: int) -> dict:
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TraceError(f"meta must be a dict (a JSON object), got {type(meta).__name__}")
        meta = dict(meta)
        meta.setdefault("top_k", None)
        meta.setdefault("layer_names", None)
        meta.setdefault("source", None)
        k = meta["top_k"]
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= E:
                raise TraceError(
                    f"meta top_k is {k!r}; it must be null or an int in [1, experts={E}]"
                )
            meta["top_k"] = int(k)
        names = meta["layer_names"]
        if names is not None:
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise TraceError(f"meta layer_names must be null or a list of strings, got {names!r}")
            if len(names) != L:
                raise TraceError(
                    f"meta layer_names has {len(names)} names but load has {L} layers; give one "
                    "name per layer or null"
                )
            meta["layer_names"] = list(names)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise TraceError(f"meta must be JSON-serialisable: {exc}") from exc
        return meta

    def _check_affinity(self, affinity: Any) -> np.ndarray:
        W, L, E = self.load_WLE.shape
        want = (W, L - 1, E, E)
        layout = f"[windows, layers-1, experts, experts] = {want}"
        aff = _as_counts("affinity", affinity, 4, layout)
        if aff.shape != want:
            raise TraceError(
                f"affinity has shape {tuple(aff.shape)} but load {(W, L, E)} needs {layout}; "
                "drop affinity or record it over the same windows, layers and experts"
            )
        if L == 1:
            return aff
        k = self.meta["top_k"] or E
        pairs_WL = aff.sum(axis=(2, 3))
        slots_WL = self.load_WLE.sum(axis=2)
        bound_WL = k * np.minimum(slots_WL[:, :-1], slots_WL[:, 1:])
        if (pairs_WL > bound_WL).any():
            w, l = (int(i) for i in np.argwhere(pairs_WL > bound_WL)[0])
            raise TraceError(
                f"affinity counts {pairs_WL[w, l]} pairs between layers {l} and {l + 1} in window "
                f"{w}, more than the {bound_WL[w, l]} that top_k={k} allows for the load's "
                f"{slots_WL[w, l]} and {slots_WL[w, l + 1]} slots; affinity and load must be "
                "recorded from the same tokens"
            )
        for axis, load_WLE, side in ((3, self.load_WLE[:, :-1], "a"), (2, self.load_WLE[:, 1:], "b")):
            rows = aff.sum(axis=axis)
            bad = rows > k * load_WLE
            if bad.any():
                w, l, e = (int(i) for i in np.argwhere(bad)[0])
                layer = l if side == "a" else l + 1
                raise TraceError(
                    f"affinity pairs with expert {e} at layer {layer} in window {w} number "
                    f"{rows[w, l, e]}, more than top_k={k} times its load {load_WLE[w, l, e]}; "
                    "affinity and load must be recorded from the same tokens"
                )
        return aff

    def _check_source(self, source: Any) -> np.ndarray:
        W, L, E = self.load_WLE.shape
        layout = f"[windows, layers, ranks, experts] = ({W}, {L}, ranks, {E})"
        src = _as_counts("source", source, 4, layout)
        if src.shape[:2] != (W, L) or src.shape[3] != E or src.shape[2] == 0:
            raise TraceError(
                f"source has shape {tuple(src.shape)} but load {(W, L, E)} needs {layout} "
                "with ranks >= 1"
            )
        if not np.array_equal(src.sum(axis=2), self.load_WLE):
            raise TraceError(
                "source summed over ranks differs from load; both must count the same slots "
                "(record them together, or drop source)"
            )
        return src

    # -- shape ---------------------------------------------------------------------------------

    @property
    def num_windows(self) -> int:
        return int(self.load_WLE.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.load_WLE.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.load_WLE.shape[2])

    @property
    def num_ranks(self) -> Optional[int]:
        """Source ranks recorded, or None without ``source``."""
        return None if self.source_WLRE is None else int(self.source_WLRE.shape[2])

    @property
    def top_k(self) -> Optional[int]:
        return self.meta["top_k"]

    def window(self, i: int) -> "RoutingTrace":
        """The one-window trace of window ``i`` (negative indices count from the end)."""
        W = self.num_windows
        if not -W <= i < W:
            raise TraceError(f"window {i} out of range: the trace has {W} windows")
        i %= W
        sl = slice(i, i + 1)
        return RoutingTrace(
            self.load_WLE[sl].copy(),
            None if self.affinity_WLEE is None else self.affinity_WLEE[sl].copy(),
            None if self.source_WLRE is None else self.source_WLRE[sl].copy(),
            dict(self.meta, window=i),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented

        def same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
            return (a is None) == (b is None) and (a is None or np.array_equal(a, b))

        return (
            same(self.load_WLE, other.load_WLE)
            and same(self.affinity_WLEE, other.affinity_WLEE)
            and same(self.source_WLRE, other.source_WLRE)
            and self.meta == other.meta
        )

    def __repr__(self) -> str:
        parts = [f"windows={self.num_windows}", f"layers={self.num_layers}",
                 f"experts={self.num_experts}", f"top_k={self.top_k}",
                 f"affinity={self.affinity_WLEE is not None}"]
        if self.source_WLRE is not None:
            parts.append(f"ranks={self.num_ranks}")
        return f"RoutingTrace({', '.join(parts)}, source={self.meta.get('source')!r})"

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write the trace as a compressed ``.npz`` (format in the module docstring); returns
        the path written (NumPy appends ``.npz`` when missing)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        arrays: dict[str, np.ndarray] = {"load": self.load_WLE}
        if self.affinity_WLEE is not None:
            arrays["affinity"] = self.affinity_WLEE
        if self.source_WLRE is not None:
            arrays["source"] = self.source_WLRE
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path_or_name: "str | os.PathLike | RoutingTrace") -> "RoutingTrace":
        """A trace from a ``.npz`` path or a ``synthetic:NAME`` preset (a ``RoutingTrace`` is
        returned as is)."""
        if isinstance(path_or_name, RoutingTrace):
            return path_or_name
        spec = os.fspath(path_or_name)
        if spec.startswith(SYNTHETIC_PREFIX):
            from moec.runtime.synthetic import preset_trace

            return preset_trace(spec[len(SYNTHETIC_PREFIX):])
        return cls._load_npz(spec)

    @classmethod
    def _load_npz(cls, path: str) -> "RoutingTrace":
        if not os.path.exists(path):
            from moec.runtime.synthetic import PRESETS

            hint = ""
            if path in PRESETS:
                hint = f" (did you mean synthetic:{path}?)"
            raise TraceError(
                f"trace {path!r} not found{hint}: give a .npz file or synthetic:NAME with NAME "
                f"one of {', '.join(sorted(PRESETS))}"
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise TraceError(f"cannot read trace {path!r} as a .npz file: {exc}") from exc
        if "load" not in arrays:
            raise TraceError(
                f"trace {path!r} has no 'load' array (it has {sorted(arrays) or 'none'}); a trace "
                "needs load shaped [windows, layers, experts]"
            )
        meta: dict = {}
        if "meta" in arrays:
            raw = arrays["meta"]
            if raw.ndim != 0 or raw.dtype.kind not in "US":
                raise TraceError(
                    f"trace {path!r}: meta must be a 0-d string array holding JSON, got "
                    f"dtype {raw.dtype} shape {tuple(raw.shape)}"
                )
            try:
                meta = json.loads(str(raw[()]))
            except json.JSONDecodeError as exc:
                raise TraceError(f"trace {path!r}: meta is not valid JSON: {exc}") from exc
            if not isinstance(meta, dict):
                raise TraceError(f"trace {path!r}: meta must hold a JSON object, got {meta!r}")
        meta.pop("format_version", None)
        try:
            return cls(arrays["load"], arrays.get("affinity"), arrays.get("source"), meta)
        except TraceError as exc:
            raise TraceError(f"trace {path!r}: {exc}") from exc
