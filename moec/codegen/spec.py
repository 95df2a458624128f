"""Kernel specifications: what one MoE layer fixes about its Triton kernels.

Contract: a ``KernelSpec`` is a frozen, hashable description of one layer (router, expert FFN,
dtype, codegen target). ``router_kind`` is the full kind string of ``moec.ir.routing``, validated
and stored in its canonical spelling. ``spec.key()`` is a sha256 over every field plus the
Triton, torch and template versions, so a cached kernel file is reused only when all of them
match.
``spec.for_kernel(group)`` keeps only the fields the kernel group ``group`` is generated from and
resets the others to their defaults, so two layers that differ only in, say, the router share the
cached grouped-GEMM kernels.

Build one from a layer's attributes with ``KernelSpec.from_layer(...)`` (the router/FFN attribute
names of ``moec::gate`` and ``moec::grouped_gemm_act``); the ``moec_triton::`` op wrappers build
the per-group sub-specs directly from their arguments.

Weight layout (``transposed``) is carried by strides at launch, not baked into the source, so it
is not a field of any sub-spec; it stays in the layer spec for ``key()`` and for the launcher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, fields, replace

from moec.ir.ops import ACTIVATION_ATTRS, ACTIVATIONS, GATED_ACTIVATIONS, check_activation_attrs
from moec.ir.routing import RouterKind

# Bump when any template in ``moec.codegen.templates`` changes what it generates.
TEMPLATE_VERSION = "2"

DTYPES = ("float32", "bfloat16", "float16")
TARGETS = ("cuda", "interpret")

# Kernel groups: one generated module each (see ``moec.codegen.templates``).
KERNEL_GROUPS = (
    "gate",
    "permute",
    "offsets",
    "grouped_gemm",
    "activation",
    "grouped_gemm_act",
    "grouped_gemm_combine",
    "grouped_wgrad",
)

# Fields each kernel group is generated from (besides ``target``, which every group keeps).
_GROUP_FIELDS = {
    "gate": ("router_kind", "num_experts", "top_k", "num_groups", "topk_groups", "renormalize", "scaling",
             "has_router_weight", "has_router_bias", "has_correction_bias", "dtype"),
    "permute": ("num_experts", "top_k"),
    "offsets": ("num_experts",),
    "grouped_gemm": ("num_experts", "dtype"),
    "activation": ("activation", "interleaved", "alpha", "limit", "dtype"),
    "grouped_gemm_act": ("num_experts", "activation", "interleaved", "alpha", "limit", "has_bias_in", "dtype"),
    "grouped_gemm_combine": ("num_experts", "top_k", "has_bias_out", "dtype"),
    "grouped_wgrad": ("num_experts", "dtype"),
}


def default_target() -> str:
    """``interpret`` when Triton will run kernels in its CPU interpreter, else ``cuda``."""
    return "interpret" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"


@dataclass(frozen=True)
class KernelSpec:
    router_kind: str = "softmax_topk"
    num_experts: int = 1
    top_k: int = 1
    num_groups: int = 1
    topk_groups: int = 1
    renormalize: bool = False
    scaling: float = 1.0
    has_router_weight: bool = False
    has_router_bias: bool = False
    has_correction_bias: bool = False
    activation: str = "swiglu"
    interleaved: bool = False
    alpha: float = 1.0
    limit: float = math.inf
    transposed: bool = False
    has_bias_in: bool = False
    has_bias_out: bool = False
    dtype: str = "float32"
    # Not a property of the layer but of the generated source: the interpreter cannot run bf16
    # tl.dot (it multiplies the raw bits), so ``interpret`` sources upcast dot operands to fp32.
    target: str = dataclasses.field(default_factory=default_target)

    def __post_init__(self):
        # Canonical spelling, so that the key does not depend on how a capture wrote the kind.
        object.__setattr__(self, "router_kind", str(RouterKind.parse(self.router_kind)))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"moec: unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        check_activation_attrs(self.activation, self.alpha, self.limit)
        if self.dtype not in DTYPES:
            raise ValueError(f"moec: dtype {self.dtype!r} has no Triton kernels; expected one of {DTYPES}")
        if self.target not in TARGETS:
            raise ValueError(f"moec: unknown codegen target {self.target!r}; expected one of {TARGETS}")
        self.router.check(num_experts=self.num_experts, top_k=self.top_k, num_groups=self.num_groups,
                          topk_groups=self.topk_groups, renormalize=self.renormalize,
                          has_correction_bias=self.has_correction_bias)

    @property
    def router(self) -> RouterKind:
        return RouterKind.parse(self.router_kind)

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def key(self) -> str:
        import torch
        import triton

        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)]
        parts += [f"triton={triton.__version__}", f"torch={torch.__version__}", f"template={TEMPLATE_VERSION}"]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def for_kernel(self, group: str) -> "KernelSpec":
        """This spec with only the fields kernel group ``group`` depends on (others defaulted)."""
        if group not in _GROUP_FIELDS:
            raise ValueError(f"moec: unknown kernel group {group!r}; expected one of {KERNEL_GROUPS}")
        keep = set(_GROUP_FIELDS[group]) | {"target"}
        if group == "activation" or group == "grouped_gemm_act":
            # alpha / limit only appear in the expressions of the activations that read them
            keep -= {"alpha", "limit"} - set(ACTIVATION_ATTRS.get(self.activation, ()))
            if not self.gated:
                keep -= {"interleaved"}
        if group == "gate" and self.num_groups <= 1:  # topk_groups only means something with groups
            keep -= {"num_groups", "topk_groups"}
        defaults = KernelSpec(target=self.target)
        return replace(self, **{f.name: getattr(defaults, f.name) for f in fields(self) if f.name not in keep})

    @classmethod
    def from_layer(
        cls,
        *,
        num_experts: int,
        top_k: int,
        router_kind: str = "softmax_topk",
        num_groups: int = 1,
        topk_groups: int = 1,
        renormalize: bool = False,
        scaling: float = 1.0,
        has_router_weight: bool = True,
        has_router_bias: bool = False,
        has_correction_bias: bool = False,
        activation: str = "swiglu",
        interleaved: bool = False,
        alpha: float = 1.0,
        limit: float = math.inf,
        transposed: bool = False,
        has_bias_in: bool = False,
        has_bias_out: bool = False,
        dtype="float32",
        target: str | None = None,
    ) -> "KernelSpec":
        """A layer spec from the attributes of its ``moec::gate`` / ``grouped_gemm_act`` /
        ``grouped_gemm_combine`` nodes; ``dtype`` may be a ``torch.dtype`` or its name."""
        return cls(
            router_kind=router_kind, num_experts=num_experts, top_k=top_k, num_groups=num_groups,
            topk_groups=topk_groups, renormalize=renormalize, scaling=float(scaling),
            has_router_weight=has_router_weight, has_router_bias=has_router_bias,
            has_correction_bias=has_correction_bias, activation=activation, interleaved=interleaved,
            alpha=float(alpha), limit=float(limit), transposed=transposed, has_bias_in=has_bias_in,
            has_bias_out=has_bias_out, dtype=dtype_name(dtype), target=target or default_target(),
        )


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
