"""The moec MoE IR: canonical ``moec::`` ops, the lowered grouped-GEMM ops, their reference
semantics, the router vocabulary (``routing``), and the verifier."""

from moec.ir import lowered, ops, routing  # noqa: F401  (registers the ops)
