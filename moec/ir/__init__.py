"""The moec MoE IR: canonical ``moec::`` ops, their reference semantics, and the verifier."""

from moec.ir import ops  # noqa: F401  (registers the ops)
