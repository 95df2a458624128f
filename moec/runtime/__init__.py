"""Runtime pieces that run around the compiled MoE ops: expert parallelism over a process group,
process groups with moec's timeout and clear errors when a peer rank dies or hangs."""

from moec.runtime.expert_parallel import contiguous_placement, ep_moe
from moec.runtime.group import CollectiveError, collective_errors, ep_group

__all__ = ["CollectiveError", "collective_errors", "contiguous_placement", "ep_group", "ep_moe"]
