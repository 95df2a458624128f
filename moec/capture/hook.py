"""When moec's converted forwards are live, and the hook that converts a model before dynamo traces it.

Contract:
- A converted module keeps its own forward for eager calls and for other backends; it runs its
  canonical ``moec::`` forward only while dynamo traces for a moec backend (``capture_active()``).
  The flag is read through ``assume_constant_result``, so compiled code carries no guard on it.
- A dynamo compile-start callback finds the frame being compiled; when its backend is moec, every
  ``nn.Module`` among the frame's locals (``self`` of a compiled module) is converted first. This
  is how ``torch.compile(model, backend="moec")`` captures MoE layers whose eager code would
  otherwise graph-break, with no moec call in user code.

Dynamo exposes no public way to see the frame or backend of a compile from its start callback,
so ``_compiling_frame`` reads them from ``torch._dynamo.convert_frame._compile``'s locals. torch
is pinned; ``tests/capture/test_hook.py`` fails loudly if that changes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Optional

import torch
import torch.nn as nn

_active_depth = 0
_started: list[bool] = []


@torch.compiler.assume_constant_result
def capture_active() -> bool:
    return _active_depth > 0


@contextlib.contextmanager
def active():
    """Run converted modules' moec forwards (used by ``moec.inspect``'s own trace)."""
    global _active_depth
    _active_depth += 1
    try:
        yield
    finally:
        _active_depth -= 1


def is_moec_backend(fn: Any) -> bool:
    for _ in range(16):
        if fn is None:
            return False
        if getattr(fn, "_moec_backend", False):
            return True
        fn = (
            getattr(fn, "_torchdynamo_orig_backend", None)
            or getattr(fn, "compiler_fn", None)
            or getattr(fn, "func", None)
        )
    return False


def _compiling_frame() -> Optional[tuple[dict, Any]]:
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "_compile" and f.f_globals.get("__name__") == "torch._dynamo.convert_frame":
            return f.f_locals.get("locals") or {}, f.f_locals.get("compiler_fn")
        f = f.f_back
    return None


def _on_compile_start(args) -> None:
    global _active_depth
    found = _compiling_frame()
    moec = found is not None and is_moec_backend(found[1])
    _started.append(moec)
    if not moec:
        return
    from moec.capture.convert import convert_model

    for value in found[0].values():
        if isinstance(value, nn.Module):
            convert_model(value)
    _active_depth += 1


def _on_compile_end(args) -> None:
    global _active_depth
    if _started and _started.pop():
        _active_depth -= 1


class _KeepMoec(list):
    """A callback list whose ``clear()`` (run by ``torch._dynamo.reset()``) keeps moec's hooks."""

    def clear(self) -> None:
        keep = [cb for cb in self if cb in (_on_compile_start, _on_compile_end)]
        super().clear()
        self.extend(keep)


def install() -> None:
    """Register the compile hooks once per process (idempotent)."""
    handler = torch._dynamo.callback.callback_handler
    for attr, cb in (("start_callbacks", _on_compile_start), ("end_callbacks", _on_compile_end)):
        callbacks = getattr(handler, attr)
        if not isinstance(callbacks, _KeepMoec):
            callbacks = _KeepMoec(callbacks)
            setattr(handler, attr, callbacks)
        if cb not in callbacks:
            callbacks.append(cb)
