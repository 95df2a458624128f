"""Shared test setup.

* Every test starts from a fresh dynamo state (``torch._dynamo.reset()``, empty
  ``torch._dynamo.utils.counters``) and a seeded global RNG, so graph counts and recompiles seen by
  one test are its own.
* The ``checks`` fixture holds the compiled-vs-eager checks the capture tests share: compile with
  moec, compare outputs and gradients with an eager deep copy, count graphs and graph breaks.

Graph accounting (torch 2.13): ``counters["stats"]["unique_graphs"]`` counts the FX graphs dynamo
handed to the backend (1 per compiled frame, +1 per recompile or resume after a break);
``counters["graph_break"]`` maps each distinct break reason to a count. A model captured whole has
exactly one graph and an empty ``graph_break``.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Optional

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

try:  # the zoo's configs are deliberately tiny; keep transformers' warnings about them out of the log
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # pragma: no cover - transformers is a test dependency
    pass


# Under pytest-xdist (the default run: ``-n auto --maxprocesses=4`` in pyproject.toml) each worker takes its share of
# the cores, so that two workers' intra-op threads do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    counters.clear()


def _identity(out: Any) -> torch.Tensor:
    return out


class Checks:
    """Compiled-vs-eager checks. Tolerances are torch.testing's fp32 defaults (rtol 1.3e-6,
    atol 1e-5): the zoo's weights are scale-preserving, so outputs are O(1) and the MoE layers'
    contribution is far above ``atol`` (see tests/models/test_zoo.py)."""

    @staticmethod
    def compile(model: torch.nn.Module, inner: str | None = "aot_eager") -> Callable:
        # inner=None: moec's default inner compiler (Inductor).
        options = None if inner is None else {"inner": inner}
        return torch.compile(model, backend="moec", options=options)

    @staticmethod
    def graph_count() -> int:
        return counters["stats"]["unique_graphs"]

    @staticmethod
    def graph_breaks() -> dict[str, int]:
        return dict(counters["graph_break"])

    def assert_single_graph(self) -> None:
        assert self.graph_breaks() == {}, f"graph breaks: {self.graph_breaks()}"
        assert self.graph_count() == 1, f"expected 1 graph, dynamo produced {self.graph_count()}"

    @staticmethod
    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).mean()

    @staticmethod
    def assert_grads_close(model: torch.nn.Module, ref: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        ref_params = dict(ref.named_parameters())
        assert params.keys() == ref_params.keys()
        for name, p in params.items():
            g, g_ref = p.grad, ref_params[name].grad
            # None on one side and zeros on the other are the same gradient: an expert that received
            # no tokens is never touched by eager's per-expert loop (grad None), while a compiled
            # grouped computation gives it an explicit zero gradient.
            if g is None and g_ref is None:
                continue
            g = torch.zeros_like(p) if g is None else g
            g_ref = torch.zeros_like(p) if g_ref is None else g_ref
            torch.testing.assert_close(g, g_ref, msg=lambda m, name=name: f"grad of {name}: {m}")

    @staticmethod
    def assert_reported_layers(report: Any, expected: list[tuple[str, int, int]]) -> None:
        """``report.moe_layers`` names exactly the ``expected`` ``(name, num_experts, top_k)``
        blocks, and the report's other contract fields exist with their types."""
        got = sorted((layer.name, layer.num_experts, layer.top_k) for layer in report.moe_layers)
        assert got == sorted(expected)
        for layer in report.moe_layers:
            for attr in ("hidden_size", "expert_hidden_size", "router", "num_shared_experts", "activation"):
                assert hasattr(layer, attr), f"MoE layer record has no {attr!r}"
        assert isinstance(report.graph_breaks, int)
        assert isinstance(report.fallbacks, list)
        for fallback in report.fallbacks:
            assert isinstance(fallback.location, str) and isinstance(fallback.reason, str)

    def compiled_matches_eager(
        self,
        model: torch.nn.Module,
        args: tuple,
        *,
        train: bool,
        inner: str | None = "aot_eager",
        output: Callable[[Any], torch.Tensor] = _identity,
        single_graph: bool = True,
    ) -> None:
        """Compile ``model`` with moec and check it against an eager copy taken before compiling:
        output (and, in train mode, every parameter's gradient of a scalar loss) equal at fp32
        tolerances; with ``single_graph``, the first call captures one graph with no break."""
        model.train(train)
        ref = copy.deepcopy(model)  # before compiling: moec may rewrite the module it compiles
        compiled = self.compile(model, inner)

        with torch.set_grad_enabled(train):
            out = output(compiled(*args))
            if single_graph:
                self.assert_single_graph()
            out_ref = output(ref(*args))
        torch.testing.assert_close(out, out_ref)

        if train:
            self.loss(out).backward()
            self.loss(out_ref).backward()
            self.assert_grads_close(model, ref)

    def matches_eager_over(self, model: torch.nn.Module, xs: list, target: str,
                           last: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
        """``moec.compile(model, target=...)`` in train mode against an eager copy over the calls
        ``xs``: each output equal (fp32 defaults), no graph break, and every parameter's gradient
        accumulated over the calls equal. ``last``: applied to both models (under no_grad) before
        the last call, whose input is then made positive (``x.abs() + 1``): routing concentrated
        by the test's own rule."""
        import moec

        torch._dynamo.reset()
        counters.clear()
        model.train()
        ref = copy.deepcopy(model)
        compiled = moec.compile(model, inner="aot_eager", target=target)
        for i, x in enumerate(xs):
            if last is not None and i == len(xs) - 1:
                with torch.no_grad():
                    last(model)
                    last(ref)
                x = x.abs() + 1.0
            out, out_ref = compiled(x), ref(x)
            torch.testing.assert_close(out, out_ref)
            main, main_ref = (out[0], out_ref[0]) if isinstance(out, tuple) else (out, out_ref)
            main.pow(2).mean().backward()
            main_ref.pow(2).mean().backward()
        assert self.graph_breaks() == {}
        self.assert_grads_close(model, ref)



@pytest.fixture
def checks() -> Checks:
    return Checks()


@pytest.fixture
def triton_here():
    """Triton kernels run here: compiled on a GPU, else in Triton's CPU interpreter; skips with
    the reason where neither can (no triton, or an interpreter this numpy breaks)."""
    pytest.importorskip("triton")
    from moec.codegen import triton_ops

    undo = triton_ops.enable_interpreter() if not torch.cuda.is_available() else (lambda: None)
    ok, why = triton_ops.available()
    if not ok:
        undo()
        pytest.skip(why)
    yield
    undo()
