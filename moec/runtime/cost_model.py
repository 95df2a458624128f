"""The expert-parallel cost model: predicted forward time of one MoE layer over W ranks, and the
schedule (chunks, hierarchical all-to-all, shared-expert overlap) that minimises it.

Contract
--------
* ``LayerShape`` is what the model needs to know about a layer: tokens per rank, sizes, top-k,
  gating, dtype width, shared-expert width. Build it by hand, from a ``KernelSpec`` plus sizes, from
  a capture report's ``MoELayer``, or for every MoE layer of a model with ``LayerShape.from_model``.
* ``Calibration`` holds the machine's constants: compute throughput, per-op overhead, local memory
  bandwidth, and alpha (s per message per peer) / beta (s per byte) per link class ``intra`` (inside
  a node) and ``inter`` (between nodes), each marked measured or assumed. ``Calibration.default()``
  is a documented assumption (below); ``moec.runtime.calibrate`` measures this machine and saves
  to ``calibration_path()``.
* ``layer_time(variant)`` is the layer's time as a sympy expression of the symbols in ``SYMBOLS``;
  ``predict(...)`` evaluates it; ``choose_schedule(...)`` evaluates every candidate and returns a
  ``Schedule`` whose ``explain()`` prints the expression and the numbers that decided. The chosen
  schedule never predicts a longer time than the sequential one (r=1, flat, nothing overlapped),
  which is itself a candidate; a candidate must beat the simplest one by ``TIE_TOLERANCE`` to be
  preferred over it. On one rank there is no communication and the answer is r=1.

The model (forward, one layer, the busiest rank)
------------------------------------------------
Everything is counted for the rank that receives the most slots: R = sigma*T*K with sigma >= 1 the
routing skew (1: uniform routing, every rank receives as many slots as it sends).

* All-to-all of n bytes per rank over W ranks, P per node, pairwise exchange (Hockney alpha-beta),
  one term per link class: ``a2a(n) = (P-1)*alpha_intra + (W-P)*alpha_inter
  + n*((P-1)/W*beta_intra + (W-P)/W*beta_inter)`` (uniform routing sends n/W to each rank).
* Hierarchical (two-stage, Tutel's "2D") all-to-all: first inside the node, where each rank
  collects what its node sends to the ranks with its local index elsewhere, then between nodes
  among the W/P ranks with the same local index, with P times larger messages:
  ``a2a_h(n) = (P-1)*alpha_intra + n*(P-1)/P*beta_intra + (W/P-1)*alpha_inter
  + n*(1-P/W)*beta_inter + 2*n/B``. Inter-node bytes are the same as flat; it trades (P-1)/P of the
  bytes crossing the intra links plus a pack and an unpack (2n/B) for W-W/P fewer inter-node
  latencies, so it wins with many nodes and small messages (Tutel: only at ~256+ GPUs for real
  layer sizes).
* The sequential layer is what ``moec.runtime.ep_moe`` does: a count exchange (8*W bytes), the
  dispatch (rows, R*H*b bytes, and the slots' local expert ids, 8*R bytes: two all-to-alls), the
  local experts, the combine (rows back, R*H*b bytes), plus a dense shared expert when there is one:
  ``t_seq = t_cnt + d + s + c + m``. With the hierarchical all-to-all, every exchange (counts
  included) is hierarchical.
* The combine is issued right after the expert compute. On a machine whose ranks share CPUs
  (gloo on one VM) the peers' cores went idle meanwhile and an exchange issued then costs more
  than one issued after a few small ops: measured on this project's 2-core VM, a 256-byte
  all-to-all between 2 ranks cost ~0.15 ms in a tight loop, ~0.35 ms after 0.15 ms of compute,
  ~0.9 ms after 1.4 ms. The model charges that extra ``w`` (``Calibration.wake_s``, measured by
  ``moec.runtime.calibrate``; assumed 0 on GPUs, where NCCL's kernels do not sleep) once per
  combine. The exchanges that follow glue ops (counts, dispatch) pay none.
* Expert compute ``c``: the two grouped GEMMs at ``Phi`` FLOP/s, or streaming the local experts'
  weights at ``B`` bytes/s when that is slower (roofline), plus the local data movement of the
  gathers, activation, scatters and weighted sum (``b*(8*T*K*H + R*(7*H + (4*g+3)*I))`` bytes,
  counted from ``ep_moe``'s ops), plus ``o`` per op (``OPS_FIXED + OPS_PER_EXPERT*L`` ops, L local
  experts).
* Chunked pipeline (Tutel, Lancet): the slots are split into r chunks; dispatch(i+1), experts(i)
  and combine(i-1) overlap. Communication is one stream (dispatch and combine share the links),
  compute another: ``t(r) = t_cnt + d_1 + c_1 + m_1 + (r-1)*ov(c_1, d_1 + m_1)`` with d_1, c_1, m_1
  one chunk's dispatch, compute and combine, and ``ov(a, b) = Max(a, b) + (1-eta)*Min(a, b)`` the
  time of two things run at once: ``eta`` (``Calibration.overlap``) is the fraction of the shorter
  one that is hidden. On a GPU the exchanges run on the copy engines and NVLink while the SMs
  compute (assumed eta = 1); on CPUs whose cores the ranks share (gloo on one machine), gloo's
  threads copy every byte on the same cores the experts need, and ``moec.runtime.calibrate``
  measured eta ~0 on this project's 2-core VM: there, chunking only adds latency. Every chunk pays the alpha terms, its ops' overheads and
  a full read of the local weights again; fill and drain are the first d_1 and the last m_1. The
  counts of all chunks go in one exchange (8*W*r bytes). r=1 is the sequential layer.
* Shared expert overlapped with the dispatch: it runs on the compute stream while chunk 1's rows
  are in flight: ``d_1 + s`` becomes ``ov(d_1, s)``.
* Exposed communication = predicted time - compute-stream busy time (``r*c_1 + s``).

When E < W every expert is assumed replicated W/E times with its slots split evenly over the
replicas (L = 1). Routing is assumed uniform unless ``skew`` is given. What is not modelled: the
router and everything outside the MoE layer, contention between the intra and inter links (the
terms add: a pairwise exchange visits the peers one after the other), network topology beyond the
two link classes, and the backward pass.

Assumed defaults (``Calibration.default()``; marked assumed in every output): an H100-class node,
400 TFLOP/s on the expert GEMMs (dense bf16 peak 989, ~480 measured on grouped GEMMs at 1.5k
rows), 5 us per kernel launch, 2.5 TB/s HBM; intra-node NVLink-class 3 us and 200 GB/s per GPU in
an all-to-all; inter-node 400 Gb/s InfiniBand-class, 5 us and 50 GB/s per GPU; no wake-up cost;
communication fully overlapped with compute (eta = 1). A calibration
measured on one machine measures compute and the intra link only; its inter-node link is the
assumed one, but never faster than the measured intra link (``Calibration.with_assumed_inter``).

Legend (sympy symbols, ``SYMBOLS``): T tokens per rank, H hidden, I expert hidden, E experts,
K top-k, g first-GEMM width factor (2 gated, 1 not; F = g*I), b bytes per element, S shared-expert
hidden (0: none), W ranks, P ranks per node (min(P, W)), r chunks, sigma routing skew, Phi FLOP/s,
o seconds per op, B local memory bytes/s, alpha_intra / beta_intra and alpha_inter / beta_inter
the links, w the wake-up cost of an exchange after compute, eta the overlap efficiency, L = max(1, ceil(E/W)) local experts,
R = sigma*T*K slots received.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import sympy as sp

from moec.runtime.jsonfile import read_json, write_json

__all__ = [
    "Calibration",
    "LayerShape",
    "Schedule",
    "SYMBOLS",
    "TIE_TOLERANCE",
    "calibration_path",
    "choose_schedule",
    "layer_time",
    "predict",
]

# Ops one ep_moe forward issues: sorts, bincounts, gathers, scatters, the exchanges' buffers, the
# activation, the weighted sum, plus per local expert a slice, a GEMM and a cast in each grouped
# GEMM and their concatenation. Counted with torch.profiler on a forward (aten ops at top level or
# directly under a moec:: op, the exchanges left out): 48 + 8 per local expert.
OPS_FIXED = 48
OPS_PER_EXPERT = 8
# Shared expert: two GEMMs, the activation, the add.
OPS_SHARED = 4
# A schedule more complex than the simplest one (fewer chunks, flat, no overlap) must predict at
# least this much less to be chosen: the model is not more accurate than that.
TIE_TOLERANCE = 0.01
LINKS = ("intra", "inter")
CALIBRATION_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Layer shape
# ----------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer as the cost model sees it (``tokens`` is per rank)."""

    tokens: int
    hidden: int
    expert_hidden: int
    num_experts: int
    top_k: int
    gated: bool = True
    dtype_bytes: int = 4
    shared_hidden: int = 0
    name: str = ""

    def __post_init__(self):
        for f in ("tokens", "hidden", "expert_hidden", "num_experts", "top_k", "dtype_bytes"):
            if getattr(self, f) < 1:
                raise ValueError(f"moec: layer shape needs {f} >= 1, got {getattr(self, f)}")
        if self.shared_hidden < 0:
            raise ValueError(f"moec: shared_hidden must be >= 0, got {self.shared_hidden}")
        if self.top_k > self.num_experts:
            raise ValueError(f"moec: top_k={self.top_k} is more than the {self.num_experts} experts")

    def with_tokens(self, tokens: int) -> "LayerShape":
        return dataclasses.replace(self, tokens=tokens)

    def describe(self) -> str:
        gate = "gated" if self.gated else "ungated"
        shared = f", shared expert hidden {self.shared_hidden}" if self.shared_hidden else ""
        return (f"T={self.tokens} tokens/rank, H={self.hidden}, I={self.expert_hidden}, E={self.num_experts}, "
                f"top-{self.top_k}, {gate}, {self.dtype_bytes}-byte elements{shared}")

    @classmethod
    def from_kernel_spec(cls, spec, *, tokens: int, hidden: int, expert_hidden: int, shared_hidden: int = 0,
                         name: str = "") -> "LayerShape":
        """From a ``moec.codegen.spec.KernelSpec`` (experts, top-k, gating, dtype) and the sizes a
        kernel spec does not carry (they are launch-time shapes there)."""
        return cls(tokens=tokens, hidden=hidden, expert_hidden=expert_hidden, num_experts=spec.num_experts,
                   top_k=spec.top_k, gated=spec.gated, dtype_bytes=_DTYPE_BYTES[spec.dtype],
                   shared_hidden=shared_hidden, name=name)

    @classmethod
    def from_moe_layer(cls, layer, *, tokens: int, dtype_bytes: int = 4) -> "LayerShape":
        """From a capture report's ``moec.report.MoELayer``. A shared MLP of width n*I is reported
        as n shared experts; its hidden width is taken as n*I."""
        from moec.ir.ops import GATED_ACTIVATIONS

        return cls(tokens=tokens, hidden=layer.hidden_size, expert_hidden=layer.expert_hidden_size,
                   num_experts=layer.num_experts, top_k=layer.top_k, gated=layer.activation in GATED_ACTIVATIONS,
                   dtype_bytes=dtype_bytes, shared_hidden=layer.num_shared_experts * layer.expert_hidden_size,
                   name=layer.name)

    @classmethod
    def from_model(cls, model, *, tokens: int) -> list["LayerShape"]:
        """Every MoE layer moec's capture recognises in ``model`` (``moec.inspect``'s records), in
        module order; the element width is that of the layer's first floating parameter.
        Recognising a layer installs moec's canonical forward on it, as ``moec.inspect`` does."""
        from moec.capture import convert_model

        shapes = []
        for layer in convert_model(model).layers:
            module = model if layer.name == "<root>" else model.get_submodule(layer.name)
            params = [p for p in module.parameters() if p.is_floating_point()]
            width = params[0].element_size() if params else 4
            shapes.append(cls.from_moe_layer(layer, tokens=tokens, dtype_bytes=width))
        return shapes


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

# See "Assumed defaults" in the module docstring.
ASSUMED = dict(
    device="assumed H100-class GPU node (NVLink inside a node, 400 Gb/s InfiniBand between nodes)",
    flops_per_s=400e12,
    op_overhead_s=5e-6,
    mem_bytes_per_s=2.5e12,
    alpha_s={"intra": 3e-6, "inter": 5e-6},
    beta_s_per_byte={"intra": 1 / 200e9, "inter": 1 / 50e9},
    wake_s=0.0,
    overlap=1.0,
)


def machine_key() -> str:
    """The file name a calibration of this machine is stored under: host and device."""
    device = _device_name()
    raw = f"{socket.gethostname()}-{device}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("_")[:120]


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda-{torch.cuda.get_device_name(0)}"
    return f"cpu-{cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name. What ``moec.cli.bench.machine_info`` reports, read here without
    importing the benchmark module (and Inductor's config with it: 1.5 s in every spawned rank)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_dir() -> Path:
    from moec.codegen.cache import cache_root

    return cache_root() / "calibration"


def calibration_path(key: Optional[str] = None) -> Path:
    """``<moec cache root>/calibration/<key>.json`` (``$MOEC_CACHE_DIR`` or ``~/.cache/moec``)."""
    return calibration_dir() / f"{key or machine_key()}.json"


@dataclass
class Calibration:
    """The machine constants of the cost model. ``measured`` names what was measured (any of
    ``flops_per_s``, ``op_overhead_s``, ``mem_bytes_per_s``, ``intra``, ``inter``, ``wake_s``,
    ``overlap``); the rest is assumed. ``wake_s`` is the extra cost of an exchange issued right after
    a long compute phase, ``overlap`` (eta, in [0, 1]) the fraction of an exchange hidden under
    compute run at the same time (see the module docstring). ``world_size`` is the number of ranks the intra link was measured with (0: never),
    ``threads`` the torch threads per rank. ``samples`` keeps the raw measurements."""

    device: str
    flops_per_s: float
    op_overhead_s: float
    mem_bytes_per_s: float
    alpha_s: dict[str, float]
    beta_s_per_byte: dict[str, float]
    wake_s: float = 0.0
    overlap: float = 1.0
    measured: list[str] = field(default_factory=list)
    world_size: int = 0
    threads: int = 0
    backend: str = ""
    host: str = ""
    torch_version: str = ""
    samples: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for link in LINKS:
            if link not in self.alpha_s or link not in self.beta_s_per_byte:
                raise ValueError(f"moec: calibration needs alpha and beta for link class {link!r}")
        for name, v in [("flops_per_s", self.flops_per_s), ("mem_bytes_per_s", self.mem_bytes_per_s)]:
            if not v > 0:
                raise ValueError(f"moec: calibration {name} must be positive, got {v}")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"moec: calibration overlap (eta) must be in [0, 1], got {self.overlap}")

    @classmethod
    def default(cls) -> "Calibration":
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in ASSUMED.items()})

    @property
    def assumed(self) -> list[str]:
        return [k for k in ("flops_per_s", "op_overhead_s", "mem_bytes_per_s", *LINKS, "wake_s", "overlap")
                if k not in self.measured]

    def with_assumed_inter(self) -> "Calibration":
        """The assumed inter-node link, but not faster than this calibration's intra link (one
        machine cannot measure a network; a network hop does not beat the link inside a node)."""
        alpha = dict(self.alpha_s, inter=max(ASSUMED["alpha_s"]["inter"], self.alpha_s["intra"]))
        beta = dict(self.beta_s_per_byte, inter=max(ASSUMED["beta_s_per_byte"]["inter"], self.beta_s_per_byte["intra"]))
        return dataclasses.replace(self, alpha_s=alpha, beta_s_per_byte=beta,
                                   measured=[m for m in self.measured if m != "inter"])

    def describe(self) -> str:
        parts = [
            f"{self.device}",
            f"compute {_rate(self.flops_per_s, 'FLOP/s')}, {self.op_overhead_s * 1e6:.3g} us/op, "
            f"memory {self.mem_bytes_per_s / 1e9:.4g} GB/s",
        ]
        for link in LINKS:
            parts.append(f"{link} alpha {self.alpha_s[link] * 1e6:.3g} us, beta^-1 "
                         f"{1 / self.beta_s_per_byte[link] / 1e9:.4g} GB/s")
        parts.append(f"wake-up {self.wake_s * 1e6:.3g} us, overlap eta {self.overlap:.2f}")
        where = f" at {self.world_size} ranks" if self.world_size else ""
        threads = f", {self.threads} thread(s)/rank" if self.threads else ""
        how = (f"measured{where}{threads}: {', '.join(self.measured)}; " if self.measured else "") + \
              f"assumed: {', '.join(self.assumed) or 'nothing'}"
        return "; ".join(parts) + f" ({how})"

    def symbol_values(self) -> dict[str, float]:
        return dict(Phi=self.flops_per_s, o=self.op_overhead_s, B=self.mem_bytes_per_s,
                    alpha_intra=self.alpha_s["intra"], beta_intra=self.beta_s_per_byte["intra"],
                    alpha_inter=self.alpha_s["inter"], beta_inter=self.beta_s_per_byte["inter"], w=self.wake_s,
                    eta=self.overlap)

    def to_dict(self) -> dict[str, Any]:
        return dict(version=CALIBRATION_VERSION, assumed=self.assumed, **dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"moec: calibration version {d.get('version')!r} is not {CALIBRATION_VERSION}; "
                             f"recalibrate with python -m moec.runtime.calibrate")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: Optional[os.PathLike] = None) -> Path:
        """Write JSON to ``path`` (default ``calibration_path()``), atomically."""
        return write_json(path if path is not None else calibration_path(), self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: os.PathLike) -> "Calibration":
        """Read a saved calibration; ``ValueError`` (one line) if it is not one."""
        d = read_json(path, "calibration", prefix="moec: ")
        if not isinstance(d, dict):
            raise ValueError(f"moec: {path} is not a moec calibration (expected a JSON object)")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise ValueError(f"moec: {path} is not a moec calibration ({e})") from None

    @classmethod
    def for_this_machine(cls) -> tuple["Calibration", str]:
        """The stored calibration of this machine if there is one, else the assumed defaults;
        and a line saying which."""
        path = calibration_path()
        if path.exists():
            return cls.load(path), f"stored calibration {path}"
        return cls.default(), (f"assumed defaults (no calibration stored for this machine at {path}; "
                               f"python -m moec.runtime.calibrate --world-size 2 measures one)")


# ----------------------------------------------------------------------------------------------
# The expressions
# ----------------------------------------------------------------------------------------------

_NAMES = ("T H I E K g b S W P r sigma Phi o B alpha_intra beta_intra alpha_inter beta_inter w eta").split()
SYMBOLS: dict[str, sp.Symbol] = {
    n: sp.Symbol(n, nonnegative=True) if n in ("S", "w", "eta") else sp.Symbol(n, positive=True) for n in _NAMES
}
# The structural formula's terms (one chunk's dispatch, compute, combine; shared expert; counts).
TERMS = {n: sp.Symbol(n, nonnegative=True) for n in ("t_cnt", "d_1", "c_1", "m_1", "s")}


def _a2a(n, hierarchical: bool):
    """One all-to-all in which a rank sends ``n`` bytes in all (see the module docstring)."""
    y = SYMBOLS
    W, P, B = y["W"], y["P"], y["B"]
    if not hierarchical:
        return ((P - 1) * y["alpha_intra"] + (W - P) * y["alpha_inter"]
                + n * ((P - 1) / W * y["beta_intra"] + (W - P) / W * y["beta_inter"]))
    return ((P - 1) * y["alpha_intra"] + (W / P - 1) * y["alpha_inter"]
            + n * ((P - 1) / P * y["beta_intra"] + (1 - P / W) * y["beta_inter"]) + 2 * n / B)


def term_definitions(hierarchical: bool) -> dict[sp.Symbol, sp.Expr]:
    """Each term of the structural formula in the base symbols, for a layer cut into r chunks."""
    y = SYMBOLS
    T, H, I, E, K, g, b, S, W, r = (y[n] for n in "T H I E K g b S W r".split())
    Phi, o, B, sigma = y["Phi"], y["o"], y["B"], y["sigma"]
    R = sigma * T * K
    L = sp.Max(1, sp.ceiling(E / W))
    gemm_flops = 2 * R * H * (g + 1) * I
    weight_bytes = L * (g + 1) * I * H * b
    # Read + write of ep_moe's local steps: the sender's gather, scatter back and weighted sum
    # (8*T*K*H); the receiver's gather (2H), GEMM outputs and their concatenation (3*g*I + 3*H),
    # activation (g*I in, 3*I through its temporaries), scatter (2H).
    local_bytes = b * (8 * T * K * H + R * (7 * H + (4 * g + 3) * I))
    # Shared expert on this rank's T tokens: read x, write and add its output (4H); GEMM outputs
    # and activation ((g+2)*S). Min(S, 1) is 0 without a shared expert: no ops either.
    shared_bytes = T * b * (4 * H + (g + 2) * S)
    return {
        TERMS["t_cnt"]: _a2a(8 * W * r, hierarchical),
        TERMS["d_1"]: _a2a(R * H * b / r, hierarchical) + _a2a(8 * R / r, hierarchical),
        TERMS["c_1"]: (sp.Max(gemm_flops / (r * Phi), weight_bytes / B) + local_bytes / (r * B)
                       + (OPS_FIXED + OPS_PER_EXPERT * L) * o),
        TERMS["m_1"]: _a2a(R * H * b / r, hierarchical) + sp.Min(W - 1, 1) * y["w"],  # no exchange on one rank
        TERMS["s"]: (sp.Max(2 * T * H * (g + 1) * S / Phi, (g + 1) * S * H * b / B)
                     + shared_bytes / B + OPS_SHARED * sp.Min(S, 1) * o),
    }


def overlapped(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """Time of ``a`` and ``b`` run at once: the longer, plus the part of the shorter not hidden."""
    return sp.Max(a, b) + (1 - SYMBOLS["eta"]) * sp.Min(a, b)


def structural(overlap_shared: bool, sequential: bool = False) -> sp.Expr:
    """The schedule's time in terms of ``TERMS`` (see the module docstring)."""
    t_cnt, d, c, m, s = (TERMS[n] for n in ("t_cnt", "d_1", "c_1", "m_1", "s"))
    if sequential:
        return t_cnt + d + s + c + m
    r = SYMBOLS["r"]
    first = overlapped(d, s) if overlap_shared else d + s
    return t_cnt + first + c + m + (r - 1) * overlapped(c, d + m)


def layer_time(*, hierarchical: bool = False, overlap_shared: bool = False, sequential: bool = False) -> sp.Expr:
    """The layer's predicted time as one sympy expression of ``SYMBOLS``. ``sequential`` is
    ``ep_moe``'s schedule written on its own (it must equal the chunked one at r=1, flat, no
    overlap); with it, ``r`` is 1 and the flags must be off."""
    if sequential and (hierarchical or overlap_shared):
        raise ValueError("moec: the sequential schedule has neither hierarchical a2a nor overlap")
    expr = structural(overlap_shared, sequential).subs(term_definitions(hierarchical))
    return expr.subs(SYMBOLS["r"], 1) if sequential else expr


def compute_busy(hierarchical: bool = False) -> sp.Expr:
    """Busy time of the compute stream: every chunk's experts and the shared expert."""
    return (SYMBOLS["r"] * TERMS["c_1"] + TERMS["s"]).subs(term_definitions(hierarchical))


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, hierarchical: bool, overlap_shared: bool):
    if kind == "time":
        expr = layer_time(hierarchical=hierarchical, overlap_shared=overlap_shared)
    elif kind == "busy":
        expr = compute_busy(hierarchical)
    else:  # one term per function, for explanations
        expr = term_definitions(hierarchical)[TERMS[kind]]
    args = [SYMBOLS[n] for n in _NAMES]
    return sp.lambdify(args, expr, "math", dummify=True)


def _values(shape: LayerShape, world_size: int, ranks_per_node: int, calib: Calibration, chunks: int,
            skew: float) -> dict[str, float]:
    return dict(
        T=shape.tokens, H=shape.hidden, I=shape.expert_hidden, E=shape.num_experts, K=shape.top_k,
        g=2 if shape.gated else 1, b=shape.dtype_bytes, S=shape.shared_hidden, W=world_size,
        P=min(ranks_per_node, world_size), r=chunks, sigma=skew, **calib.symbol_values(),
    )


def _evaluate(kind: str, values: dict[str, float], hierarchical: bool, overlap_shared: bool = False) -> float:
    return float(_compiled(kind, hierarchical, overlap_shared)(*(values[n] for n in _NAMES)))


def _check_world(world_size: int, ranks_per_node: int) -> None:
    if world_size < 1:
        raise ValueError(f"moec: world size must be at least 1, got {world_size}")
    if ranks_per_node < 1:
        raise ValueError(f"moec: ranks per node must be at least 1, got {ranks_per_node}")
    if world_size > ranks_per_node and world_size % ranks_per_node:
        raise ValueError(f"moec: {world_size} ranks do not fill nodes of {ranks_per_node}; the model needs "
                         f"the world size to be a multiple of the ranks per node (or at most one node)")


def predict(shape: LayerShape, world_size: int, ranks_per_node: int, calib: Calibration, *, chunks: int = 1,
            hierarchical: bool = False, overlap_shared: bool = False, skew: float = 1.0) -> dict[str, float]:
    """Seconds: ``time`` of the schedule, ``sequential``, ``exposed_comm`` (time the compute stream
    waits), ``compute`` (its busy time) and the terms ``t_cnt``, ``d_1``, ``c_1``, ``m_1``, ``s``."""
    _check_world(world_size, ranks_per_node)
    if chunks < 1:
        raise ValueError(f"moec: chunks must be at least 1, got {chunks}")
    if hierarchical and world_size <= ranks_per_node:
        raise ValueError("moec: a hierarchical all-to-all needs more than one node")
    if skew < 1:
        raise ValueError(f"moec: skew is the busiest rank's load over the mean, at least 1; got {skew}")
    v = _values(shape, world_size, ranks_per_node, calib, chunks, skew)
    time = _evaluate("time", v, hierarchical, overlap_shared)
    busy = _evaluate("busy", v, hierarchical)
    seq = _evaluate("time", dict(v, r=1), False, False)
    exposed = time - busy
    # Two evaluations of the same sums differ in the last bits: no communication is exactly 0.
    out = dict(time=time, sequential=seq, compute=busy, exposed_comm=exposed if exposed > 1e-9 * time else 0.0)
    for name in TERMS:
        out[name] = _evaluate(name, v, hierarchical)
    return out


# ----------------------------------------------------------------------------------------------
# Choosing a schedule
# ----------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """The schedule chosen for one layer. ``predicted`` (seconds): ``sequential``, ``moec`` (this
    schedule), ``exposed_comm`` and ``exposed_comm_sequential``, ``compute``. ``candidates`` holds
    ``(chunks, hierarchical, overlap_shared, seconds)`` for every schedule evaluated."""

    shape: LayerShape
    world_size: int
    ranks_per_node: int
    chunks: int
    hierarchical: bool
    overlap_shared: bool
    predicted: dict[str, float]
    terms: dict[str, float]
    candidates: list[tuple[int, bool, bool, float]]
    calibration: Calibration
    skew: float = 1.0

    def overlaps(self) -> list[str]:
        """What runs under what, in words."""
        if self.world_size == 1:
            return ["nothing to overlap: one rank, no communication"]
        out = []
        if self.chunks > 1:
            out.append(f"dispatch a2a of chunk i+1 and combine a2a of chunk i-1 under experts of chunk i "
                       f"({self.chunks} chunks)")
        if self.overlap_shared:
            out.append("shared expert under the first dispatch a2a")
        return out or ["nothing (sequential: count exchange, dispatch, experts, combine)"]

    def summary(self) -> str:
        a2a = "hierarchical a2a" if self.hierarchical else "flat a2a"
        return f"r={self.chunks}, {a2a}" + (", shared expert overlapped" if self.overlap_shared else "")

    def explain(self) -> str:
        """The expression, its terms' values for this layer, the candidates and the reason."""
        p, t = self.predicted, self.terms
        W, P = self.world_size, min(self.ranks_per_node, self.world_size)
        lines = [f"{self.shape.name or 'layer'}: {self.shape.describe()}; W={W} ranks, P={P} per node",
                 f"chosen: {self.summary()}"]
        if W == 1:
            lines.append(f"one rank: no all-to-all, t = c_1 + s = {_ms(p['moec'])} (r=1)")
            return "\n".join(lines)
        struct = structural(self.overlap_shared)
        lines.append(f"t(r) = {sp.sstr(struct)}")
        for name, expr in term_definitions(self.hierarchical).items():
            if name == TERMS["s"] and not self.shape.shared_hidden:
                continue
            lines.append(f"  {name} = {sp.sstr(expr)}")
        lines.append("at r={}: t_cnt={}, d_1={}, c_1={}, m_1={}{}".format(
            self.chunks, _ms(t["t_cnt"]), _ms(t["d_1"]), _ms(t["c_1"]), _ms(t["m_1"]),
            f", s={_ms(t['s'])}" if self.shape.shared_hidden else ""))
        bound = "compute-bound (c_1 >= d_1 + m_1)" if t["c_1"] >= t["d_1"] + t["m_1"] else \
            "communication-bound (d_1 + m_1 > c_1)"
        lines.append(f"predicted: sequential {_ms(p['sequential'])}, moec {_ms(p['moec'])} "
                     f"({p['sequential'] / p['moec']:.2f}x), exposed comm {_ms(p['exposed_comm'])} "
                     f"(sequential {_ms(p['exposed_comm_sequential'])}); the pipeline is {bound}")
        by_r: dict[tuple[bool, bool], list[str]] = {}
        for r, h, o, sec in self.candidates:
            by_r.setdefault((h, o), []).append(f"r={r} {_ms(sec)}")
        for (h, o), items in by_r.items():
            label = ("hierarchical" if h else "flat") + (", shared overlapped" if o else "")
            lines.append(f"  {label}: " + ", ".join(items))
        lines.append("why: " + self._why())
        return "\n".join(lines)

    def _why(self) -> str:
        t, p = self.terms, self.predicted
        reasons = []
        same = {r: sec for r, h, o, sec in self.candidates if (h, o) == (self.hierarchical, self.overlap_shared)}
        nxt = same.get(self.chunks + 1)
        more = (f"r={self.chunks + 1} would take {_ms(nxt)}: each chunk adds the a2a latencies and wake-up, "
                f"the per-op overheads and a re-read of the local weights" if nxt is not None else
                f"r={self.chunks} is the most chunks allowed")
        if self.chunks == 1:
            eta = self.calibration.overlap
            reasons.append(f"no chunking: {more}, more than it hides"
                           + (f" (eta={eta:.2f}: {1 - eta:.0%} of what runs at once is not hidden)" if eta < 1 else ""))
        else:
            hidden = self.calibration.overlap * min(t["c_1"], t["d_1"] + t["m_1"]) * (self.chunks - 1)
            reasons.append(f"r={self.chunks} hides (r-1)*eta*min(c_1, d_1+m_1) = {_ms(hidden)} and takes "
                           f"{_ms(p['moec'])}; {more}")
        flat = [sec for r, h, o, sec in self.candidates if not h and r == self.chunks and o == self.overlap_shared]
        if self.hierarchical and flat:
            reasons.append(f"hierarchical a2a: {_ms(flat[0])} flat vs {_ms(p['moec'])}: W-W/P fewer inter-node "
                           f"latencies outweigh the extra intra-node bytes")
        elif self.world_size > self.ranks_per_node:
            reasons.append("flat a2a: the hierarchical one's extra intra-node bytes and stage cost more than "
                           "the inter-node latencies it saves")
        if self.overlap_shared:
            reasons.append("the shared expert runs while the first dispatch is in flight")
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            layer=self.shape.name, shape=dataclasses.asdict(self.shape), world_size=self.world_size,
            ranks_per_node=self.ranks_per_node, chunks=self.chunks, hierarchical=self.hierarchical,
            overlap_shared=self.overlap_shared, overlaps=self.overlaps(), skew=self.skew,
            predicted_s=dict(self.predicted), terms_s=dict(self.terms),
            candidates=[dict(chunks=r, hierarchical=h, overlap_shared=o, seconds=s) for r, h, o, s in self.candidates],
            explanation=self.explain(),
        )


def _rate(per_s: float, unit: str) -> str:
    return f"{per_s / 1e12:.4g} T{unit}" if per_s >= 1e12 else f"{per_s / 1e9:.4g} G{unit}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def choose_schedule(shape: LayerShape, world_size: int, ranks_per_node: int, calib: Calibration,
                    max_chunks: int = 8, *, skew: float = 1.0) -> Schedule:
    """The candidate with the least predicted time among r in 1..max_chunks (at most one chunk per
    token), flat or (with more than one node) hierarchical a2a, shared expert overlapped or not
    (when there is one); a more complex candidate must beat a simpler one by ``TIE_TOLERANCE``.
    Order of simplicity: fewer chunks, then flat, then no overlap."""
    _check_world(world_size, ranks_per_node)
    if max_chunks < 1:
        raise ValueError(f"moec: max_chunks must be at least 1, got {max_chunks}")
    multi = world_size > 1
    rs = range(1, min(max_chunks, shape.tokens) + 1) if multi else [1]
    hs = [False, True] if world_size > ranks_per_node else [False]
    os_ = [False, True] if shape.shared_hidden and multi else [False]
    candidates = []
    for r in rs:
        for h in hs:
            for o in os_:
                candidates.append((r, h, o, predict(shape, world_size, ranks_per_node, calib, chunks=r,
                                                    hierarchical=h, overlap_shared=o, skew=skew)["time"]))
    best = min(c[3] for c in candidates)
    chosen = min((c for c in candidates if c[3] <= best * (1 + TIE_TOLERANCE)), key=lambda c: (c[0], c[1], c[2]))
    r, h, o, _ = chosen
    pred = predict(shape, world_size, ranks_per_node, calib, chunks=r, hierarchical=h, overlap_shared=o, skew=skew)
    seq = predict(shape, world_size, ranks_per_node, calib, skew=skew)
    predicted = dict(sequential=pred["sequential"], moec=pred["time"], exposed_comm=pred["exposed_comm"],
                     exposed_comm_sequential=seq["exposed_comm"], compute=pred["compute"])
    terms = {n: pred[n] for n in TERMS}
    return Schedule(shape, world_size, ranks_per_node, r, h, o, predicted, terms, candidates, calib, skew)
