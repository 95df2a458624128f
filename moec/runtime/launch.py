"""Run a function on W local gloo ranks: what tests, benchmarks and calibration use on one machine.

Contract: ``spawn_gloo(fn, world, *args)`` starts ``world`` fresh processes; rank r sets
``torch.set_num_threads(threads)``, joins a gloo group of ``world`` ranks (file rendezvous in a
temporary directory, the group's timeout ``timeout_s``), runs ``fn(rank, world, *args)`` and
destroys the group. It returns the ranks' return values in rank order (they travel by
``torch.save``, so tensors, dicts and lists are fine). A rank that raises makes ``spawn_gloo``
raise ``torch.multiprocessing.ProcessRaisedException`` with that rank's traceback. ``fn`` must
be importable by name (a module-level function), as ``torch.multiprocessing.spawn`` requires.
Real jobs use ``torchrun``, not this.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120.0, threads: int = 1) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, args, tmp, timeout_s, threads), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank: int, fn, world: int, args: tuple, tmp: str, timeout_s: float, threads: int) -> None:
    torch.set_num_threads(threads)  # the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
