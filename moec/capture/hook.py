"""When moec's converted forwards are live, and the hook that converts a model before dynamo traces it.

Contract:
- A converted module keeps its own forward for eager calls and for other backends; it runs its
  canonical ``moec::`` forward only while dynamo traces for a moec backend (``capture_active()``).
  The flag is read through ``assume_constant_result``, so compiled code carries no guard on it.
- A dynamo compile-start callback finds the frame being compiled; when its backend is moec, every
  ``nn.Module`` among the frame's locals (``self`` of a compiled module) is converted first. This
  is how ``torch.compile(model, backend="moec")`` captures MoE layers whose eager code would
  otherwise graph-break, with no moec call in user code.

- The frame's function is run once more, eagerly, on its own arguments (``frame_example``) so
  that capture learns how each MoE layer is really called (``convert_model(..., rerun=)``).
- ``torch.compile(module, backend="moec")`` traces through the module's call
  (``_compile_modules_through_call``), so that a module converted at the start of its own
  compile (an MoE layer compiled alone) is traced with its canonical forward.

Dynamo exposes no public way to see the frame or backend of a compile from its start callback,
so ``_compiling_frame`` reads them from ``torch._dynamo.convert_frame._compile``'s locals.
``tests/capture/test_hook.py`` fails loudly if that changes.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from moec import _torch

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


def _compiling_frame() -> Optional[tuple[dict, Any, dict]]:
    """(the frame's locals, its backend, what re-running it needs) of the compile in progress."""
    f = sys._getframe(1)
    while f is not None:
        if (f.f_globals.get("__name__"), f.f_code.co_name) == _torch.COMPILE_FRAME:
            loc = f.f_locals
            rerun = {k: loc.get(k) for k in ("code", "globals", "closure")}
            return loc.get("locals") or {}, loc.get("compiler_fn"), rerun
        f = f.f_back
    return None


def frame_example(local_vars: dict, rerun: dict) -> Optional[Callable[[], Any]]:
    """A function that runs the frame being compiled again, eagerly, on its own arguments (how
    its modules are called is then recorded); None for dynamo's resume frames."""
    code = rerun.get("code")
    if code is None or code.co_name.startswith("torch_dynamo_resume") or rerun.get("globals") is None:
        return None
    n_pos, n_kw = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames
    try:
        positional = [local_vars[n] for n in names[:n_pos]]
        kwonly = {n: local_vars[n] for n in names[n_pos:n_pos + n_kw]}
        at = n_pos + n_kw
        varargs = list(local_vars[names[at]]) if code.co_flags & inspect.CO_VARARGS else []
        at += bool(code.co_flags & inspect.CO_VARARGS)
        varkw = dict(local_vars[names[at]]) if code.co_flags & inspect.CO_VARKEYWORDS else {}
        fn = types.FunctionType(code, rerun["globals"], code.co_name, None, rerun.get("closure"))
    except (KeyError, TypeError, ValueError):
        return None
    from moec.capture.probes import copied

    return lambda: fn(*copied(positional), *copied(varargs), **copied(kwonly), **copied(varkw))


def _on_compile_start(args) -> None:
    global _active_depth
    found = _compiling_frame()
    moec = found is not None and is_moec_backend(found[1])
    _started.append(moec)
    if not moec:
        return
    from moec.capture.convert import convert_model

    rerun = frame_example(found[0], found[2])
    for value in found[0].values():
        if isinstance(value, nn.Module):
            convert_model(value, rerun=rerun)
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


def _compile_modules_through_call() -> None:
    """``torch.compile(module, backend="moec")``: trace the module's call, not its forward.

    Dynamo compiles the forward a module had when it was called; a module converted by the
    compile-start hook of that very frame (an MoE layer compiled on its own) would trace its own
    code once. Wrapping the top frame (dynamo's ``wrap_inline``, what it does for torch.nn
    modules and under ``config.wrap_top_frame``) resolves ``forward`` while tracing, after the
    hook. Only moec compiles are wrapped: ``OptimizedModule._initialize`` is patched to do so
    when its backend is moec's."""
    cls, disable_context, wrap_inline = _torch.optimized_module()
    original = getattr(cls, "_initialize", None)
    if original is None or wrap_inline is None:
        # A torch without these internals: a bare MoE layer passed to torch.compile itself may be
        # traced as its own code; models whose MoE layers are submodules are unaffected.
        warnings.warn("moec: this torch has no OptimizedModule._initialize or wrap_inline; a bare MoE "
                      "layer passed to torch.compile(backend='moec') may run its own code, not moec's ops",
                      RuntimeWarning)
        return
    if getattr(original, "_moec", False):
        return

    def _initialize(self) -> None:
        original(self)
        ctx = self.dynamo_ctx
        if isinstance(ctx, disable_context) or not is_moec_backend(getattr(ctx, "callback", None)):
            return
        wrapped = ctx(wrap_inline(self._orig_mod))
        if hasattr(self._orig_mod, "_initialize_hook"):
            self._forward = wrapped
        else:
            self.forward = wrapped

    _initialize._moec = True
    cls._initialize = _initialize


def install() -> None:
    """Register the compile hooks once per process (idempotent)."""
    _compile_modules_through_call()
    handler = _torch.callback_handler()
    for attr, cb in (("start_callbacks", _on_compile_start), ("end_callbacks", _on_compile_end)):
        callbacks = getattr(handler, attr)
        if not isinstance(callbacks, _KeepMoec):
            callbacks = _KeepMoec(callbacks)
            setattr(handler, attr, callbacks)
        if cb not in callbacks:
            callbacks.append(cb)
