"""Every private torch API moec uses, in one place.

Contract: moec reaches torch internals (``torch._dynamo``, ``torch._inductor``, ``torch._ops``,
``torch._subclasses``, ...) only through this module; everything else uses public API
(``torch.compiler.reset``, ``torch.library``, ``torch.fx``). ``TESTED`` is the range of torch
releases the suite runs on; importing moec under another release warns once. ``missing()`` lists
the internals this torch lacks, by name; ``tests/test_torch_api.py`` fails on any, so a torch
release that moves one is caught by name, not by a failure somewhere downstream.

The dynamo hooks of ``moec.capture.hook`` need three more internals, read lazily by the
accessors below: ``OptimizedModule._initialize`` and ``external_utils.wrap_inline`` (so that
``torch.compile(layer, backend="moec")`` traces the layer's call, after moec converted it), the
``callback_handler`` of compile start/end callbacks, and the frame of
``torch._dynamo.convert_frame._compile`` (whose locals hold the frame being compiled).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

# Oldest and newest torch (major, minor) moec is checked on; see README "Versions" for how far.
TESTED = ((2, 11), (2, 14))


def version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def supported() -> bool:
    return TESTED[0] <= version() <= TESTED[1]


if not supported():
    warnings.warn(f"moec is tested with torch {TESTED[0][0]}.{TESTED[0][1]} to {TESTED[1][0]}.{TESTED[1][1]}; "
                  f"this is torch {torch.__version__}: capture hooks or compiler internals may not work",
                  RuntimeWarning, stacklevel=2)

import torch._dynamo  # noqa: E402  (after the version warning, which names what follows)
from torch._dynamo.utils import counters  # noqa: E402
from torch._ops import OpOverload, OpOverloadPacket  # noqa: E402

__all__ = ["TESTED", "COMPILE_FRAME", "COMPILE_LOCALS", "counters", "OpOverload", "OpOverloadPacket", "version",
           "supported", "missing", "dynamo_optimize", "uncaptured_hop_error", "callback_handler", "optimized_module",
           "lookup_backend", "tracing_context", "inductor_compile_fx", "inductor_config", "functorch_config",
           "custom_graph_pass", "fake_tensor", "functional_tensor", "effect_type", "dispatch_mode",
           "extension_build_dir", "clamp_grad_at_bounds", "members_only_group_naming"]

# The frame whose locals ``moec.capture.hook`` reads: (module name, function name).
COMPILE_FRAME = ("torch._dynamo.convert_frame", "_compile")
# Its locals the hook reads: the code object being compiled, its globals, locals and closure, the backend.
COMPILE_LOCALS = ("code", "globals", "locals", "closure", "compiler_fn")


def dynamo_optimize(backend: Any):
    """``torch._dynamo.optimize``: compile a callable with a backend function, no wrapper module."""
    return torch._dynamo.optimize(backend)


def uncaptured_hop_error() -> type:
    """The error dynamo raises when a higher-order op's body graph-breaks."""
    return torch._dynamo.exc.UncapturedHigherOrderOpError


def callback_handler() -> Any:
    """Dynamo's compile start/end callbacks (``start_callbacks``, ``end_callbacks``)."""
    return torch._dynamo.callback.callback_handler


def optimized_module() -> tuple[type, Any, Any]:
    """(``OptimizedModule``, ``DisableContext``, ``wrap_inline`` or None)."""
    from torch._dynamo import eval_frame, external_utils

    return eval_frame.OptimizedModule, eval_frame.DisableContext, getattr(external_utils, "wrap_inline", None)


def lookup_backend(name: str):
    from torch._dynamo.backends.registry import lookup_backend as lookup

    return lookup(name)


def tracing_context():
    """The dynamo/AOT tracing context of the compile in progress, or None."""
    from torch._guards import TracingContext

    return TracingContext.try_get()


def inductor_compile_fx():
    from torch._inductor.compile_fx import compile_fx

    return compile_fx


def inductor_config():
    from torch._inductor import config

    return config


def functorch_config():
    import torch._functorch.config as config

    return config


def custom_graph_pass() -> tuple[type, Any]:
    """(``CustomGraphPass``, ``get_hash_for_files``): an Inductor post-grad pass with a cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    return CustomGraphPass, get_hash_for_files


def fake_tensor() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def functional_tensor() -> tuple[type, type]:
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    return FunctionalTensor, FunctionalTensorMode


def effect_type() -> type:
    """``torch._library.effects.EffectType``: marks a custom op as ordered (side effects)."""
    from torch._library.effects import EffectType

    return EffectType


def dispatch_mode() -> type:
    """``TorchDispatchMode``: intercepts ops below autograd (the routing profiler's recorder)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def extension_build_dir(name: str) -> str:
    """Where ``torch.utils.cpp_extension`` builds the extension ``name`` (it holds the build's lock)."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, False)


def clamp_grad_at_bounds() -> bool:
    """Whether ``torch.clamp``'s autograd passes the gradient where the input equals a bound: torch
    2.13 and older do, 2.14 does not. moec's hand-written clamp gradients (Triton epilogues, the CPU
    target) follow the installed torch, so that they match eager and the reference bit for bit."""
    return _CLAMP_AT_BOUNDS


def _probe_clamp() -> bool:
    # At import, outside any tracing or fake mode; grad enabled whatever the caller's mode.
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([-1.0, 1.0], requires_grad=True)
        (grad,) = torch.autograd.grad(x.clamp(min=-1.0, max=1.0).sum(), x)
    return bool((grad == 1).all())


_CLAMP_AT_BOUNDS = _probe_clamp()


# Salts of members-only group names (see below): far from any count of groups a job makes.
_MEMBERS_ONLY_SALT = 1 << 40


def _c10d_world():
    from torch.distributed import distributed_c10d

    return distributed_c10d._world


def _hashed_name_counts() -> bool:
    """Whether naming a members-only group (``new_group(use_local_synchronization=True)``) advances
    torch.distributed's group counter, as torch 2.14 does."""
    from torch.distributed import distributed_c10d

    world = _c10d_world()
    saved = world.group_count
    try:
        distributed_c10d._process_group_name([0], use_hashed_name=True)
        return world.group_count != saved
    finally:
        world.group_count = saved


@contextlib.contextmanager
def members_only_group_naming(salt: int) -> Iterator[None]:
    """Around a ``new_group(..., use_local_synchronization=True)`` that only the group's members
    call: leaves torch.distributed's group counter as the other ranks see it.

    torch 2.14 advances that counter (the source of later groups' names) on each rank that names
    a group, and salts a members-only group's name with it: after a members-only group its members
    would name every later group differently from the ranks that did not call, and the next group
    made by all ranks waits for peers that never come (gloo: "Wait timeout"). Here the name is
    salted with ``salt`` (which the members pass alike: their count of such groups over these
    ranks) and the counter is put back. Torch releases whose naming leaves the counter alone
    (2.13 and older) are not touched."""
    if not _hashed_name_counts():
        yield
        return
    world = _c10d_world()
    saved = world.group_count
    world.group_count = _MEMBERS_ONLY_SALT + salt
    try:
        yield
    finally:
        world.group_count = saved


def missing() -> list[str]:
    """The internals above that this torch lacks, each as a readable name; [] when all are there."""
    found = []
    checks = [
        ("torch._dynamo.optimize", lambda: torch._dynamo.optimize),
        ("torch._dynamo.exc.UncapturedHigherOrderOpError", uncaptured_hop_error),
        ("torch._dynamo.callback.callback_handler.start_callbacks", lambda: callback_handler().start_callbacks),
        ("torch._dynamo.callback.callback_handler.end_callbacks", lambda: callback_handler().end_callbacks),
        ("torch._dynamo.eval_frame.OptimizedModule._initialize", lambda: optimized_module()[0]._initialize),
        ("torch._dynamo.external_utils.wrap_inline", lambda: optimized_module()[2] or _missing()),
        ("torch._dynamo.convert_frame._compile", _compile_fn),
        ("torch._dynamo.backends.registry.lookup_backend", lambda: lookup_backend("eager")),
        ("torch._guards.TracingContext.try_get", tracing_context),
        ("torch._inductor.compile_fx.compile_fx", inductor_compile_fx),
        ("torch._inductor.config.fx_graph_cache", lambda: inductor_config().fx_graph_cache),
        ("torch._functorch.config.enable_autograd_cache", lambda: functorch_config().enable_autograd_cache),
        ("torch._inductor.custom_graph_pass", custom_graph_pass),
        ("torch._subclasses.fake_tensor.FakeTensor", fake_tensor),
        ("torch._subclasses.functional_tensor", functional_tensor),
        ("torch._library.effects.EffectType.ORDERED", lambda: effect_type().ORDERED),
        ("torch.utils._python_dispatch.TorchDispatchMode", dispatch_mode),
        ("torch.utils.cpp_extension._get_build_directory", lambda: extension_build_dir("moec_probe")),
        ("torch.distributed.distributed_c10d._world.group_count", lambda: _c10d_world().group_count),
        ("torch.distributed.distributed_c10d._process_group_name", _hashed_name_counts),
    ]
    for name, get in checks:
        try:
            get()
        except (AttributeError, ImportError, LookupError):
            found.append(name)
    return found


def _missing():
    raise AttributeError("missing")


def _compile_fn():
    """``convert_frame._compile``, whose frame the capture hook looks for by these names."""
    import importlib

    module, name = COMPILE_FRAME
    fn = getattr(importlib.import_module(module), name)
    if fn.__code__.co_name != name or not set(COMPILE_LOCALS) <= set(fn.__code__.co_varnames):
        raise AttributeError(f"{module}.{name} no longer has the locals moec reads")
    return fn
