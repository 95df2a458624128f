"""moec: a compiler for Mixture-of-Experts models on PyTorch.

``torch.compile(model, backend="moec")`` or ``moec.compile(model)`` captures every recognised
MoE layer as canonical ``moec::`` ops; ``moec.inspect(model, *example_args)`` reports what was
found and what was left alone.
"""

from moec import ir  # noqa: F401  (registers the moec:: ops)
from moec.report import Fallback, MoELayer, Report

__all__ = ["Fallback", "MoELayer", "Report", "compile", "inspect"]


def __getattr__(name):
    # The API pulls in dynamo; import it lazily so `import moec` stays cheap.
    if name in ("compile", "inspect"):
        from moec import api

        return getattr(api, name)
    raise AttributeError(name)
