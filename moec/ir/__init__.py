"""The moec MoE IR: canonical ``moec::`` ops, the lowered grouped-GEMM ops, their reference
semantics, and the verifier."""

from moec.ir import lowered, ops  # noqa: F401  (registers the ops)
