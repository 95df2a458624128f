"""Runtime pieces that run around the compiled MoE ops: expert parallelism over a process group."""

from moec.runtime.expert_parallel import contiguous_placement, ep_moe

__all__ = ["contiguous_placement", "ep_moe"]
