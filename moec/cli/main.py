"""The ``moec`` command: ``moec inspect [SPEC]``, ``moec codegen [SPEC]``, ``moec bench [SPEC]``,
``moec optimize [SPEC] --world-size N``, ``moec profile [SPEC] --tokens N``,
``moec place TRACE --world-size N --ranks-per-node M --slots S``, ``moec zoo [ARCH ...]`` and
``moec fuzz --cases N --seed S``.

Contract: ``main(argv)`` returns the exit status, it does not exit:

- 0 on success;
- 2 for an error the user can fix (a bad model spec, a model with no MoE layer, a bad option
  value), reported as ONE line ``moec: <message>`` on stderr with no traceback (argparse's own
  errors, such as an unknown flag, print its usage line too);
- 1 when ``moec bench`` finds that moec's output differs from eager, when ``moec zoo`` finds an
  arch whose layers moec misses or computes differently, or when ``moec fuzz`` finds a mismatch;
- 141 when the reader of stdout goes away (``moec inspect --graph | head``).

Internal errors are not caught: their traceback is the bug report.
``moec inspect --json`` and ``moec optimize --json`` write nothing but one JSON document to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from moec.cli import bench, fuzz, optimize, place, profile, zoo
from moec.models.spec import FORMS, SpecError

SPEC_HELP = f"the model: {FORMS} (default: builtin:%s)"


def _default_builtin() -> str:
    try:
        from moec.models.builtin import DEFAULT_BUILTIN
    except ImportError:
        return "?"
    return DEFAULT_BUILTIN


def build_parser() -> argparse.ArgumentParser:
    default = _default_builtin()
    parser = argparse.ArgumentParser(
        prog="moec",
        description="moec: a compiler for Mixture-of-Experts models on PyTorch.",
        epilog="Model specs: builtin:NAME (embedded models), hf:ARCH[:key=value,...] (small random "
               "transformers models; experts=eager|grouped_mm|batched_mm picks the experts "
               "implementation), path/to/file.py:factory (factory() returns a model, "
               "(model, example_input) or (model, tuple_of_args)).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="report the MoE layers moec finds in a model",
                       description="Capture the model with moec and report its MoE layers, graph breaks "
                                   "and what was left alone. Exits 2 if no MoE layer is found.")
    p.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP % default)
    p.add_argument("--json", action="store_true", help="print the report as JSON (and nothing else) on stdout")
    p.add_argument("--graph", action="store_true", help="also print the captured FX graphs with their moec ops")

    c = sub.add_parser("codegen", help="print the Triton kernels moec generates for a model's MoE layers",
                       description="Capture and lower the model, then print the Triton source generated for "
                                   "each MoE layer (gating, permutation, grouped GEMMs, backward), as written "
                                   "to moec's kernel cache. Needs no GPU.")
    c.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP % default)
    c.add_argument("--layer", type=int, metavar="N", help="only the N-th MoE layer (0-based, in graph order)")
    c.add_argument("--target", choices=["cuda", "interpret"],
                   help="the source variant: cuda, or interpret for Triton's CPU interpreter "
                        "(default: interpret when TRITON_INTERPRET=1, else cuda)")

    b = sub.add_parser("bench", help="time eager, Inductor and moec on a model in one process",
                       description="Time the model eagerly, under torch.compile(backend='inductor') and "
                                   "under moec.compile, each warmed up, and check moec's output against eager. "
                                   "Prints a table and writes the numbers and the machine to a JSON file. "
                                   "Exits 1 if moec's output differs from eager.")
    b.add_argument("spec", nargs="?", metavar="SPEC", help=f"the model: {FORMS} (default: {bench.DEFAULT_SPEC}, "
                                                           "the default builtin at Mixtral-8x7B's proportions, 1/8 width)")
    b.add_argument("--tokens", type=int, nargs="+", default=list(bench.DEFAULT_TOKENS), metavar="N",
                   help="token counts (sequence lengths at batch 1) to time (default: %(default)s)")
    b.add_argument("--repeat", type=int, default=bench.DEFAULT_REPEAT, metavar="R",
                   help="timed runs per backend and token count; the median is reported (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=bench.DEFAULT_WARMUP, metavar="W",
                   help="untimed runs after the first (compiling) call (default: %(default)s)")
    b.add_argument("--train", action="store_true",
                   help="time forward + backward instead of forward only (model kept in eval mode)")
    b.add_argument("--out", metavar="FILE", help="JSON output file (default: moec-bench-<name>.json in the current directory)")
    b.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda (default: %(default)s)")
    b.add_argument("--dtype", choices=sorted(bench.DTYPES), help="cast the model and float inputs (default: as loaded)")
    b.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="the backend moec hands the rewritten graph to (default: %(default)s)")
    b.add_argument("--backends", default=",".join(bench.BACKENDS),
                   help="comma-separated subset of eager,inductor,moec to run; eager is the reference (default: %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    o = sub.add_parser("optimize", help="choose each MoE layer's expert-parallel schedule with the cost model",
                       description="Predict each MoE layer's expert-parallel forward time with moec's cost model "
                                   "and choose its schedule: the number of chunks r pipelined (dispatch of chunk "
                                   "i+1 and combine of chunk i-1 under the experts of chunk i), flat or "
                                   "hierarchical all-to-all, shared expert under the dispatch. Prints the choice, "
                                   "what overlaps what, the predicted times and why. Needs no GPU and runs nothing "
                                   "distributed.")
    optimize.add_arguments(o, SPEC_HELP % default)

    pr = sub.add_parser("profile", help="record a model's routing (tokens per expert, expert pairs) as a trace",
                        description="Run the model eagerly on random, seeded inputs and record, per MoE layer and "
                                    "window, the tokens routed to each expert and the expert pairs chosen by the "
                                    "same token at consecutive layers. Prints a per-layer summary and writes the "
                                    "trace (.npz, documented in moec.runtime.trace).")
    profile.add_arguments(pr, SPEC_HELP % default)

    pl = sub.add_parser("place", help="plan expert placement on a routing trace; compare with EPLB and others",
                        description="Plan which rank holds which experts (replicas included) on window I of a "
                                    "routing trace with moec's placement optimiser, score it and the baselines "
                                    "(contiguous, round-robin, EPLB) on window I+1: load balance, cross-rank and "
                                    "cross-node traffic, a2a bytes, simulated step time, weights moved; write the "
                                    "plan (JSON, moec.runtime.plan). Needs no GPU.")
    place.add_arguments(pl)

    z = sub.add_parser("zoo", help="check moec's capture on every MoE architecture of the installed transformers",
                       description="Build every MoE architecture of the installed transformers that has a text "
                                   "decoder as a tiny random model and report, per arch: the MoE layers the config "
                                   "describes and those moec recognised, graph breaks, forward and gradient "
                                   "equality with eager in eval and train, why a layer was left alone, and the "
                                   "seconds taken. Exits 1 if any arch is missed or differs.")
    zoo.add_arguments(z)

    f = sub.add_parser("fuzz", help="differential fuzzing: random MoE layers, moec against eager",
                       description="Draw random MoE layers (router kind x FFN form x layout x spelling x sizes x "
                                   "token counts x dtype; moec.models.random_moe), compile each with moec and "
                                   "compare forward and gradients with eager. Seeded: case I of seed S reruns "
                                   "alone with --case I. Exits 1 if a case mismatches or raises.")
    fuzz.add_arguments(f)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    if getattr(opts, "spec", "") is None:
        opts.spec = bench.DEFAULT_SPEC if opts.command == "bench" else f"builtin:{_default_builtin()}"
    try:
        if opts.command == "inspect":
            return inspect_main(opts)
        if opts.command == "codegen":
            return codegen_main(opts)
        if opts.command == "optimize":
            return optimize.optimize_main(opts)
        if opts.command == "profile":
            return profile.profile_main(opts)
        if opts.command == "place":
            return place.place_main(opts)
        if opts.command == "zoo":
            return zoo.zoo_main(opts)
        if opts.command == "fuzz":
            return fuzz.fuzz_main(opts)
        return bench.bench_main(opts)
    except (SpecError, bench.BenchError, optimize.OptimizeError, profile.ProfileError,
            place.PlaceError, fuzz.FuzzError, zoo.ZooError) as e:
        return _fail(str(e))
    except BrokenPipeError:
        # `moec inspect --graph | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def inspect_main(opts) -> int:
    import moec
    from moec.models.spec import load_spec

    # With --json stdout must hold only the JSON document, so chatter from model code goes to stderr.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if opts.json else contextlib.nullcontext()
    with quiet_stdout:
        model, args, _ = load_spec(opts.spec)
        report = moec.inspect(model, *args)
    if not report.moe_layers:
        why = "; ".join(f"{f.location}: {f.reason}" for f in report.fallbacks)
        return _fail(f"no MoE layer found in {opts.spec}" + (f" (left alone: {why})" if why else
                     " (it has no layer moec recognises; `moec inspect --help` lists the spec forms)"))
    if opts.json:
        print(report.to_json())
        return 0
    print(report.table())
    if opts.graph:
        for i, graph in enumerate(report.graphs):
            print(f"\n--- graph {i} ---\n{graph}")
    return 0


def codegen_main(opts) -> int:
    from moec.codegen.emit import layer_source
    from moec.codegen.layers import graph_layer_specs
    from moec.codegen.spec import KERNEL_GROUPS
    from moec.models.spec import load_spec

    with contextlib.redirect_stdout(sys.stderr):
        model, args, _ = load_spec(opts.spec)
        specs = graph_layer_specs(model, *args, target=opts.target)
    if not specs:
        return _fail(f"no MoE layer found in {opts.spec} (`moec inspect {opts.spec}` says why)")
    chosen = range(len(specs))
    if opts.layer is not None:
        if not 0 <= opts.layer < len(specs):
            return _fail(f"--layer {opts.layer} is out of range: {opts.spec} has {len(specs)} MoE layers (0-{len(specs) - 1})")
        chosen = [opts.layer]
    for i in chosen:
        spec, groups = specs[i]
        split = "" if len(groups) == len(KERNEL_GROUPS) else f"; a split layer: {', '.join(groups)} kernels"
        print(f"# moec codegen {opts.spec} --layer {i} (MoE layer {i} of {len(specs)}, in graph order{split})")
        print(layer_source(spec, groups))
    return 0


def _fail(message: str) -> int:
    print(f"moec: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
