"""``moec zoo``: moec's capture on every MoE architecture of the installed transformers.

Contract
--------
``run(archs=None, inner="aot_eager")`` takes every arch ``moec.models.zoo.moe_archs()`` finds
(or the ones named), builds each as a tiny random model (``zoo.build``) and records, per arch:

- ``status``: "ok" (every expected MoE layer recognised with the config's expert count and
  top-k, no graph break, forward and every gradient equal to eager in eval and train),
  "mismatch", "missed" (a layer not recognised, or a graph break), "error", "unavailable" (the
  arch cannot be built or run eagerly here, with the reason) or "out of scope" (no text decoder);
- ``expected`` / ``recognised``: MoE layers the config describes / those moec's capture
  (``convert_model`` on one example call) recognised with that expert count and top-k;
  ``missed``: each missed layer with the fallback moec reported; ``capture_seconds``;
- ``moe_graph_breaks``: each expected MoE layer compiled alone (eval and train) with the call
  capture recorded for it, and the graph breaks that shows (none when it is captured whole);
  ``graph_breaks``: the compiled model's breaks in eval and train, the model's own elsewhere
  included (``eval_check`` / ``train_check`` hold their reasons); ``eval`` / ``train``: the
  comparisons' first mismatch (None when equal), ``seconds``.

The model capture converted is then compiled, ``torch.compile(model, backend="moec")``
(inner compiler ``inner``), and compared with a fresh eager build of the same arch (bitwise the
same weights and inputs), in eval mode, then in train mode, fp32, ``torch.testing.assert_close``
defaults on the output and every parameter's gradient of a fixed random projection of it. Where
they differ, moec passes when it is as close to the model run in float64 as eager is (its
experts round differently from the model's own loop; recurrent layers carry that a long way).
Where moec's run fails, the same compile without moec says whether the inner compiler fails on
the arch by itself (AOT autograd on some backwards); both then run with ``inner="eager"``.
``eval_check`` / ``train_check`` record what was compared and why. ``main`` prints a table and
writes the JSON (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Optional

import torch

from moec.cli.fuzz import _projection, compare


def _fresh(arch: str, dtype=torch.float32):
    from moec.models import zoo

    # The float64 reference runs transformers' eager experts loop (its grouped_mm is fp32-only).
    return zoo.build(arch, dtype=dtype, experts_implementation="eager" if dtype == torch.float64 else None)


def _expected(zm) -> list[tuple[str, int, int]]:
    return [(e.name, e.num_experts, e.top_k) for e in zm.expected if e.runs_on_text]


def _reason_for(name: str, fallbacks) -> str:
    best = ""
    for f in fallbacks:
        loc = f.location
        if loc == name or name.startswith(loc + ".") or loc.startswith(name + "."):
            if len(loc) > len(best.split(":")[0]) or not best:
                best = f"{loc}: {f.reason}"
    return best or "no MoE-looking module found there (no router weight next to the experts)"


def _run(zm, train: bool, backend) -> tuple[Any, dict, list[str]]:
    """(output, parameter gradients, graph break reasons) of ``zm.model`` under ``backend`` (None:
    eager); an exception propagates."""
    from moec._torch import counters

    zm.model.train(train)
    torch.compiler.reset()
    counters.clear()
    fn = zm.model if backend is None else backend(zm.model)
    out = zm.output(fn(*zm.args, **zm.kwargs))
    breaks = [r.splitlines()[0][:200] for r, n in counters["graph_break"].items() for _ in range(n)]
    grads = {}
    if train:
        (out.float() * _projection(out.detach(), seed=7)).sum().backward()
        grads = {n: p.grad for n, p in zm.model.named_parameters()}
    return out.detach(), grads, breaks


def _first_difference(got, want) -> Optional[str]:
    problem = compare(got[0], want[0], "output")
    if problem:
        return problem
    for name, g in got[1].items():
        problem = compare(g, want[1].get(name), f"grad of {name}")
        if problem:
            return problem
    return None


def _moec(inner: str):
    return lambda model: torch.compile(model, backend="moec", options={"inner": inner})


def _plain(inner: str):
    return lambda model: torch.compile(model, backend=inner)


def _check_mode(arch: str, zm, train: bool, inner: str, eager) -> dict[str, Any]:
    """moec against eager in one mode: equal at ``assert_close`` defaults, or else (moec's experts
    round differently from the model's own loop, and a deep or recurrent model can carry that far)
    at least as close to the model run in float64 as eager is. When moec's run fails, the same
    compile without moec tells whether the inner compiler itself fails on this arch; then both
    run again with the ``eager`` inner compiler."""
    out: dict[str, Any] = {"inner": inner}
    try:
        got = _run(zm, train, _moec(inner))
        out["breaks"] = len(got[2])
        out["break_reasons"] = sorted(set(got[2]))
        out["vs_eager"] = out["verdict"] = _first_difference(got, eager)
    except Exception as e:
        out["vs_eager"] = out["verdict"] = f"moec's run raised {type(e).__name__}: {e}".splitlines()[0][:300]
        try:
            _run(_fresh(arch), train, _plain(inner))
        except Exception as base_error:
            if inner != "eager":  # the inner compiler fails on this arch without moec too
                again = _check_mode(arch, _fresh(arch), train, "eager", eager)
                again["because"] = (f"torch.compile(backend={inner!r}) fails on this arch without moec too: "
                                    f"{type(base_error).__name__}: {base_error}".splitlines()[0][:300])
                return again
        return out
    if out["vs_eager"]:
        try:
            exact = _run(_fresh(arch, torch.float64), train, None)
        except Exception as e:
            out["float64"] = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
            return out
        out["vs_float64"] = out["verdict"] = _as_accurate(got, eager, exact)
        if not out["verdict"]:
            out["because"] = f"not equal to eager at assert_close defaults, but as accurate: {out['vs_eager']}"
    return out


def _as_accurate(got, eager, exact) -> Optional[str]:
    """None when every tensor of ``got`` is as close to the float64 run ``exact`` as eager's:
    within twice eager's error, or 1e-4 of the tensor's largest value (fp32 rounding carried
    through a deep or recurrent model), whichever is larger."""
    pairs = [("output", got[0], eager[0], exact[0])]
    pairs += [(f"grad of {n}", g, eager[1].get(n), exact[1].get(n)) for n, g in got[1].items()]
    for what, g, e, x in pairs:
        if g is None and e is None:
            continue
        if x is None or g is None or e is None:
            return f"{what}: missing on one side"
        x = x.double()
        err_got, err_eager = ((t.double() - x).abs().max().item() for t in (g, e))
        allowed = max(2 * err_eager, 1e-4 * x.abs().max().item())
        if err_got > allowed:
            return f"{what}: off the float64 model by {err_got:.3g}, eager by {err_eager:.3g}"
    return None


def _moe_layer_breaks(model, names: list[str]) -> dict[str, list[str]]:
    """Graph breaks of each expected MoE layer compiled alone with moec, on the call capture
    recorded for it: breaks inside MoE layers, told apart from the model's own elsewhere."""
    from moec._torch import counters

    from moec.capture.probes import copied

    from moec.capture.split import run_pair

    state = model.__dict__.get("_moec_capture_state")
    layers = {layer.cand.name: layer for layer in (state.layers if state else [])}
    out = {}
    for name in names:
        layer = layers.get(name)
        if layer is None or not layer.calls:
            continue
        call = layer.calls[0]
        module = model.get_submodule(name)
        fn = module
        if "split" in layer.cand.__dict__:  # its two halves, rows straight from one to the other
            plan, call = layer.cand.__dict__["split"]
            fn = lambda *a, _m=module, _p=plan, **k: run_pair(_m, _p, *a, **k)  # noqa: E731
        training = module.training
        reasons = []
        for train in (False, True):  # a layer random in training runs its own code there
            module.train(train)
            torch.compiler.reset()
            counters.clear()
            try:
                with torch.no_grad():
                    # copied: a recorded KV cache is appended to by each call
                    torch.compile(fn, backend="moec", options={"inner": "eager"})(*copied(call.args),
                                                                                  **copied(call.kwargs))
            except Exception as e:  # noqa: BLE001 - a layer that cannot be called alone says why
                reasons.append(f"could not be compiled alone: {type(e).__name__}: {e}".splitlines()[0][:200])
                continue
            reasons += [f"{'train' if train else 'eval'}: {r.splitlines()[0][:200]}" for r in counters["graph_break"]]
        module.train(training)
        if reasons:
            out[name] = reasons
    return out


def run_arch(arch: str, inner: str = "aot_eager") -> dict[str, Any]:
    from moec.capture import convert_model
    from moec.models import zoo

    start = time.perf_counter()
    rec: dict[str, Any] = {"arch": arch}
    try:
        zm = _fresh(arch)
    except zoo.ZooUnavailable as e:
        rec.update(status="unavailable", reason=str(e), seconds=round(time.perf_counter() - start, 2))
        return rec
    expected = _expected(zm)
    rec["expected"] = len(expected)
    rec["model_class"] = type(zm.model).__name__
    try:
        t = time.perf_counter()
        report = convert_model(zm.model, (zm.args, zm.kwargs))
        rec["capture_seconds"] = round(time.perf_counter() - t, 2)
        got = {layer.name: layer for layer in report.layers}
        ok = [n for n, E, k in expected if n in got and (got[n].num_experts, got[n].top_k) == (E, k)]
        rec["recognised"] = len(ok)
        rec["missed"] = [{"layer": n, "E": E, "k": k,
                          "reported": None if n not in got else [got[n].num_experts, got[n].top_k],
                          "why": _reason_for(n, report.fallbacks)} for n, E, k in expected if n not in ok]
        rec["unexpected"] = sorted(set(got) - {n for n, _, _ in expected})
        rec["routers"] = sorted({layer.router for layer in report.layers})
        rec["recognisers"] = sorted({layer.recogniser for layer in report.layers})
        rec["graph_breaks"] = 0
        rec["moe_graph_breaks"] = _moe_layer_breaks(zm.model, [n for n, _, _ in expected])
        ref = _fresh(arch)
        for train in (False, True):
            eager = _run(ref, train, None)
            mode = _check_mode(arch, zm, train, inner, eager)
            rec["train_check" if train else "eval_check"] = mode
            rec["train" if train else "eval"] = mode["verdict"]
            rec["graph_breaks"] += mode.get("breaks", 0)
    except Exception as e:  # one arch's crash is a finding, not the end of the sweep
        rec.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300],
                   traceback=traceback.format_exc()[-1500:])
    rec["seconds"] = round(time.perf_counter() - start, 2)
    if "status" not in rec:
        if rec["eval"] or rec["train"]:
            rec["status"] = "mismatch"
        elif rec["recognised"] < rec["expected"] or rec["moe_graph_breaks"]:
            rec["status"] = "missed"
        else:
            rec["status"] = "ok"
    return rec


class ZooError(ValueError):
    """A bad option value (an arch the installed transformers does not have); one line."""


def run(archs: Optional[list[str]] = None, inner: str = "aot_eager", progress=None) -> dict[str, Any]:
    import transformers

    from moec.models import zoo

    found = {a.name: a for a in zoo.moe_archs()}
    unknown = sorted(set(archs or []) - set(found))
    if unknown:
        raise ZooError(f"unknown arch(s) {unknown}; MoE archs in transformers {transformers.__version__}: "
                         f"{sorted(found)}")
    records = []
    for name in archs or sorted(found):
        arch = found[name]
        if not arch.buildable:
            rec = {"arch": name, "status": "out of scope", "reason": arch.out_of_scope}
        else:
            rec = run_arch(name, inner)
        records.append(rec)
        if progress:
            progress(rec)
    totals: dict[str, int] = {}
    for rec in records:
        totals[rec["status"]] = totals.get(rec["status"], 0) + 1
    return {"transformers": transformers.__version__, "torch": torch.__version__, "inner": inner,
            "archs": records, "totals": totals}


def line(rec: dict[str, Any]) -> str:
    status = rec["status"]
    if status in ("out of scope", "unavailable"):
        return f"{rec['arch']:<24} {status}: {rec['reason']}"
    if status == "error":
        return f"{rec['arch']:<24} error: {rec['error']}"
    text = (f"{rec['arch']:<24} {status:<8} {rec['recognised']}/{rec['expected']} layers, "
            f"{len(rec['moe_graph_breaks'])} with breaks ({rec['graph_breaks']} in the model), "
            f"eval {_verdict(rec, 'eval')}, train {_verdict(rec, 'train')}, {rec['seconds']:.1f} s")
    for miss in rec.get("missed", []):
        text += f"\n    missed {miss['layer']}: {miss['why']}"
    for what in ("eval", "train"):
        if rec.get(what):
            text += f"\n    {what}: {rec[what][:200]}"
    return text


def _verdict(rec: dict[str, Any], mode: str) -> str:
    """"=" equal to eager; "~" as accurate as eager against float64; "!=" otherwise."""
    if rec.get(mode):
        return "!="
    check = rec.get(f"{mode}_check") or {}
    return "~" if check.get("vs_eager") else "="


_WORDS = {"=": "equal", "~": "as accurate", "!=": "differs"}


def table(result: dict[str, Any]) -> str:
    """A markdown table: one row per arch. "as accurate": not equal at assert_close defaults, but
    as close to the float64 model as eager is."""
    rows = ["| arch | status | MoE layers recognised / expected | recogniser | breaks in MoE layers | "
            "breaks in the model | eval fwd | train fwd + grads | seconds | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec in result["archs"]:
        if rec["status"] in ("out of scope", "unavailable", "error"):
            note = rec.get("reason") or rec.get("error", "")
            rows.append(f"| {rec['arch']} | {rec['status']} | | | | | | | {rec.get('seconds', '')} | {note} |")
            continue
        notes = [m["why"] for m in rec["missed"]] + [r for rs in rec["moe_graph_breaks"].values() for r in rs]
        rows.append(f"| {rec['arch']} | {rec['status']} | {rec['recognised']} / {rec['expected']} | "
                    f"{', '.join(rec['recognisers'])} | {len(rec['moe_graph_breaks'])} | {rec['graph_breaks']} | "
                    f"{_WORDS[_verdict(rec, 'eval')]} | {_WORDS[_verdict(rec, 'train')]} | {rec['seconds']} | "
                    f"{'; '.join(notes)[:200].replace('|', '/')} |")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archs", nargs="*", help="arch names (default: every MoE arch of the installed transformers)")
    p.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor", "eager"),
                   help="inner compiler of the compiled runs (default aot_eager)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--markdown", action="store_true", help="print the result as a markdown table")


def zoo_main(opts: argparse.Namespace) -> int:
    try:
        result = run(opts.archs or None, opts.inner, progress=lambda rec: print(line(rec), flush=True))
    except ZooError as e:
        print(f"moec zoo: {e}", file=sys.stderr)
        return 2
    totals = ", ".join(f"{n} {k}" for k, n in sorted(result["totals"].items()))
    print(f"{len(result['archs'])} archs: {totals}")
    if opts.markdown:
        print(table(result))
    if opts.out:
        from moec.runtime.jsonfile import write_json

        write_json(opts.out, result)
    bad = sum(result["totals"].get(k, 0) for k in ("mismatch", "missed", "error"))
    return 1 if bad else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="moec zoo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return zoo_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
