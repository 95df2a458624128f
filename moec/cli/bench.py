"""Time one model under eager, Inductor and moec in one process, and check moec's numerics.

Contract: ``run_bench(model, args, ...)`` returns a JSON-serialisable dict: the machine
(``machine_info``), the settings, and one result row per (token count, backend) with the median
and every timed run in milliseconds, the seconds of the first call (which compiles), and for the
compiled backends the error against eager. It never changes ``model``: the compiled backends each
run on a deep copy. ``bench_main`` is the ``moec bench`` command on top of it.

Method, the same for every backend: ``torch.compiler.reset()`` and a fresh compile per token count
(static shapes, no recompile limit shared between backends); the first call is timed apart as
compile time; ``warmup`` more untimed calls; then ``repeat`` calls each timed with
``time.perf_counter`` (after ``torch.cuda.synchronize()`` on CUDA), of which the median is
reported. Inputs are seeded, so every backend sees the same tensors. ``train=True`` times forward
plus backward of ``output.float().sum()``, still in eval mode so that dropout and router noise
stay off, and also compares parameter gradients.

Compile seconds are made comparable between backends: before anything is timed, one trivial
function is compiled with Inductor (``toolchain_warmup_s``: the one-off start-up of the C++
toolchain and compile workers, which would otherwise land on whichever backend compiles first),
and Inductor's FX-graph and AOT-autograd caches are off for the run, so a backend does not
inherit graphs another backend or an earlier run compiled. Generated kernels may still come from
Inductor's on-disk kernel cache.

The error is ``max |out - ref|`` and that divided by ``max |ref|`` (scaled to the output, so a
tolerance cannot hide values smaller than itself); a row is ``ok`` when the scaled error is at
most ``REL_TOL`` for the output's dtype. A model in bf16 or fp16 is judged differently, since
there eager is no oracle (routing near-ties flip between correct programs): a float32 copy of it
runs the same inputs, and a row is ``ok`` when its RMS error against that copy (output, and in
training the parameter gradients) is at most ``HALF_FACTOR`` times eager's (``fp32_rms_err`` on
each row).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from moec import _torch
from moec.runtime.cost_model import cpu_model

BACKENDS = ("eager", "inductor", "moec")
BASELINES = ("eager", "inductor")
# `moec bench` with no model: the default builtin at Mixtral-8x7B's proportions (hidden : expert
# hidden = 4096 : 14336, 8 experts, top-2) at 1/8 of its width, at decode (1, 16) and prefill
# (256, 1024) token counts: large enough that the experts' weights, not per-call overhead, set
# the time, small enough to run in under a minute on a 2-core CPU.
DEFAULT_SPEC = "builtin:moe-mlp:hidden=512,intermediate=1792"
DEFAULT_TOKENS = (1, 16, 256, 1024)
DEFAULT_REPEAT = 10
DEFAULT_WARMUP = 3
REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# In bf16/fp16 a backend passes when its RMS error against a float32 copy of the model is at most
# HALF_FACTOR times eager's own: tokens whose expert scores nearly tie change experts between any two
# correct programs, and which ones do is chance (hf:mixtral, bf16, training, 128 tokens: eager 3%,
# moec 8%, per parameter the two within 20% of each other); an expert dropped or computed wrong
# moves the error by tens of percent.
HALF_FACTOR = 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(Exception):
    """A benchmark request that cannot run as asked; the message is one line for the user."""


@dataclasses.dataclass
class BenchSettings:
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    repeat: int = DEFAULT_REPEAT
    warmup: int = DEFAULT_WARMUP
    train: bool = False
    backends: tuple[str, ...] = BACKENDS
    inner: str = "inductor"

    def check(self) -> None:
        if not self.tokens or any(n < 1 for n in self.tokens):
            raise BenchError(f"--tokens must be positive integers, got {list(self.tokens)}")
        if self.repeat < 1:
            raise BenchError(f"--repeat must be at least 1, got {self.repeat}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be at least 0, got {self.warmup}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or "eager" not in self.backends:
            raise BenchError(f"--backends must name eager (the reference) and any of {', '.join(BACKENDS)}, got {','.join(self.backends)}")


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": _cpu_name(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


_cpu_name = cpu_model


def resize_args(model: nn.Module, args: tuple, tokens: int, generator: torch.Generator) -> tuple:
    """The example args with their token (sequence) dimension set to ``tokens``.

    The first tensor argument is the one resized: integer [B, S] becomes random ids [1, tokens]
    below the vocabulary size; float [B, S, H] becomes random [1, tokens, H]; float [S, H] becomes
    [tokens, H]. Other arguments pass through unchanged unless they share the old sequence
    length, which we cannot resize safely.
    """
    index = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if index is None:
        raise BenchError("the model's example arguments hold no tensor to resize to --tokens")
    x = args[index]
    if not x.is_floating_point() and x.dim() == 2:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or int(x.max()) + 1
        new = torch.randint(0, vocab, (1, tokens), generator=generator, dtype=x.dtype).to(x.device)
        old_len = x.shape[1]
    elif x.is_floating_point() and x.dim() == 3:
        new = torch.randn(1, tokens, x.shape[2], generator=generator).to(x.device, x.dtype)
        old_len = x.shape[1]
    elif x.is_floating_point() and x.dim() == 2:
        new = torch.randn(tokens, x.shape[1], generator=generator).to(x.device, x.dtype)
        old_len = x.shape[0]
    else:
        raise BenchError(f"cannot resize an example input of shape {list(x.shape)} and dtype {x.dtype} to --tokens: "
                         "give ids [B, S] or hidden states [B, S, H]")
    out = list(args)
    out[index] = new
    for i, a in enumerate(args):
        if i != index and isinstance(a, torch.Tensor) and old_len in a.shape and tokens != old_len:
            raise BenchError(f"example argument {i} (shape {list(a.shape)}) also depends on the sequence length: "
                             "benchmark a factory that takes a single input")
    return tuple(out)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor to time and compare: ``logits``, ``last_hidden_state`` or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise BenchError(f"the model returned {type(out).__name__}, which holds no tensor to compare")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable, module: nn.Module, args: tuple, train: bool) -> torch.Tensor:
    if not train:
        with torch.no_grad():
            return output_tensor(fn(*args))
    module.zero_grad(set_to_none=True)
    out = output_tensor(fn(*args))
    out.float().sum().backward()
    return out.detach()


def _time_backend(fn: Callable, module: nn.Module, args: tuple, device: torch.device,
                  s: BenchSettings) -> tuple[float, list[float], torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = _step(fn, module, args, s.train)
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(s.warmup):
        _step(fn, module, args, s.train)
    times_ms = []
    for _ in range(s.repeat):
        _sync(device)
        t0 = time.perf_counter()
        _step(fn, module, args, s.train)
        _sync(device)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return first_s, times_ms, out


def _error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    max_abs = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def _float32_twin(model: nn.Module) -> nn.Module | None:
    """A float32 copy of a model in bf16 or fp16 (made tensor by tensor); None otherwise."""
    from moec.capture.recognise import copy_as

    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return copy_as(model, torch.float32) if dtype in (torch.bfloat16, torch.float16) else None


def _float32_truth(twin: nn.Module | None, inputs: tuple, train: bool) -> tuple[torch.Tensor, dict] | None:
    """The float32 twin's output (and parameter gradients in training) on ``inputs``."""
    if twin is None:
        return None
    up = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs)
    out = _step(twin, twin, up, train)
    return out, {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}


def _rms_rel(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||a - ref|| / ||ref|| over all pairs together (float64). A few tokens routed to other
    experts move this little; a wrong kernel moves it everywhere."""
    num = sum(float((a.double() - r.double()).pow(2).sum()) for a, r in pairs)
    den = sum(float(r.double().pow(2).sum()) for _, r in pairs)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _error_vs_truth(out: torch.Tensor, module: nn.Module, truth: tuple[torch.Tensor, dict], train: bool) -> float:
    """The larger of the output's and (training) the gradients' RMS error against the float32
    truth; inf when a shape or a gradient is missing."""
    out_t, grads_t = truth
    if out.shape != out_t.shape:
        return float("inf")
    err = _rms_rel([(out, out_t)])
    if train:
        params = dict(module.named_parameters())
        if any(params.get(n) is None or params[n].grad is None for n in grads_t):
            return float("inf")
        err = max(err, _rms_rel([(params[n].grad, g) for n, g in grads_t.items()]))
    return err


def _grad_error(module: nn.Module, ref_module: nn.Module) -> tuple[float, float]:
    worst_abs, worst_scale = 0.0, 0.0
    ref_grads = {n: p.grad for n, p in ref_module.named_parameters() if p.grad is not None}
    for n, p in module.named_parameters():
        ref = ref_grads.get(n)
        if ref is None:
            continue
        if p.grad is None:
            return float("inf"), float("inf")
        a, _ = _error(p.grad, ref)
        worst_abs = max(worst_abs, a)
        worst_scale = max(worst_scale, ref.float().abs().max().item())
    return worst_abs, (worst_abs / worst_scale if worst_scale > 0 else worst_abs)


def _compilers(s: BenchSettings) -> dict[str, Callable[[nn.Module], Callable]]:
    def moec_compile(m: nn.Module) -> Callable:
        import moec

        return moec.compile(m, inner=s.inner)

    return {"inductor": lambda m: torch.compile(m, backend="inductor"), "moec": moec_compile}


def _warm_toolchain(settings: BenchSettings, device: torch.device, log: Callable[[str], None]) -> float | None:
    if "inductor" not in settings.backends and not ("moec" in settings.backends and settings.inner == "inductor"):
        return None
    log("warming up the Inductor toolchain ...")
    t0 = time.perf_counter()
    torch.compile(lambda a: a.sin() + 1, backend="inductor")(torch.randn(8, device=device))
    _sync(device)
    torch.compiler.reset()
    return time.perf_counter() - t0


def _no_graph_caches() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(_torch.inductor_config().patch(fx_graph_cache=False))
    stack.enter_context(_torch.functorch_config().patch(enable_autograd_cache=False))
    return stack


def run_bench(model: nn.Module, args: tuple, settings: BenchSettings, *, name: str = "model",
              spec: str = "", log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    settings.check()
    with _no_graph_caches():
        return _run_bench(model, args, settings, name=name, spec=spec, log=log)


def _run_bench(model: nn.Module, args: tuple, settings: BenchSettings, *, name: str, spec: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    toolchain_s = _warm_toolchain(settings, device, log)
    copies = {b: copy.deepcopy(model) for b in settings.backends if b != "eager"}
    twin = _float32_twin(model)
    compilers = _compilers(settings)
    results: list[dict[str, Any]] = []
    for tokens in settings.tokens:
        generator = torch.Generator().manual_seed(tokens)
        inputs = resize_args(model, args, tokens, generator)
        ref_out = None
        truth = _float32_truth(twin, inputs, settings.train)  # None unless the model is half precision
        eager_err = None
        # Eager first: it is the reference the others are checked against.
        for backend in [b for b in BACKENDS if b in settings.backends]:
            log(f"{backend} at {tokens} tokens ...")
            torch.compiler.reset()
            module = model if backend == "eager" else copies[backend]
            fn = module if backend == "eager" else compilers[backend](module)
            first_s, times_ms, out = _time_backend(fn, module, inputs, device, settings)
            row: dict[str, Any] = {
                "backend": backend,
                "tokens": tokens,
                "median_ms": statistics.median(times_ms),
                "min_ms": min(times_ms),
                "times_ms": times_ms,
                "first_call_s": first_s,
                "compile_s": None,
            }
            if backend == "eager":
                ref_out = out
                if truth is not None:
                    eager_err = _error_vs_truth(out, module, truth, settings.train)
                    row["fp32_rms_err"] = eager_err
            else:
                # The first call compiles and runs once; what it costs beyond a run is the compile.
                row["compile_s"] = max(first_s - row["median_ms"] / 1e3, 0.0)
                max_abs, rel = _error(out, ref_out)
                row.update(max_abs_err=max_abs, rel_err=rel)
                if settings.train:
                    g_abs, g_rel = _grad_error(module, model)
                    row.update(grad_max_abs_err=g_abs, grad_rel_err=g_rel)
                    rel = max(rel, g_rel)
                row["ok"] = rel <= REL_TOL.get(ref_out.dtype, 1e-4)
                if truth is not None and eager_err is not None:
                    # Half precision: a token whose top-k scores nearly tie can pick other experts
                    # in any two correct programs, so eager is no oracle; both are held against a
                    # float32 copy of the model, and the backend passes when it is about as
                    # accurate as eager there.
                    err = _error_vs_truth(out, module, truth, settings.train)
                    row["fp32_rms_err"] = err
                    row["ok"] = err <= max(REL_TOL.get(ref_out.dtype, 1e-4), HALF_FACTOR * eager_err)
                # Strict JSON has no infinity: a shape mismatch or a missing gradient reads null.
                row.update({k: None for k, v in row.items() if isinstance(v, float) and math.isinf(v)})
            results.append(row)
        _add_speedups([r for r in results if r["tokens"] == tokens])
    return {
        "name": name,
        "spec": spec,
        "mode": "train" if settings.train else "inference",
        "dtype": str(next((p.dtype for p in model.parameters()), torch.float32)).removeprefix("torch."),
        "repeat": settings.repeat,
        "warmup": settings.warmup,
        "moec_inner": settings.inner,
        "toolchain_warmup_s": toolchain_s,
        "graph_caches": "off",
        "machine": machine_info(device),
        "results": results,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    eager = next(r["median_ms"] for r in rows if r["backend"] == "eager")
    best = min(r["median_ms"] for r in rows if r["backend"] in BASELINES)
    for r in rows:
        # Speedups, >1 means faster: eager time / this time, best baseline time / this time.
        r["speedup_vs_eager"] = eager / r["median_ms"]
        r["speedup_vs_best_baseline"] = best / r["median_ms"]


def format_table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = (f"{doc['spec'] or doc['name']}: {doc['mode']}, {doc['dtype']}, {m['device']} ({m['device_name']}), "
            f"{m['torch_threads']} threads, median of {doc['repeat']} after {doc['warmup']} warm-up")
    heads = ["backend", "tokens", "median ms", "x eager", "x best baseline", "compile s", "rel err", "check"]
    rows = []
    for r in doc["results"]:
        compiled = r["compile_s"] is not None
        rows.append([
            r["backend"] if r["backend"] != "moec" else f"moec({doc['moec_inner']})",
            str(r["tokens"]),
            f"{r['median_ms']:.3f}",
            f"{r['speedup_vs_eager']:.2f}",
            f"{r['speedup_vs_best_baseline']:.2f}",
            f"{r['compile_s']:.1f}" if compiled else "-",
            ("n/a" if r["rel_err"] is None else f"{r['rel_err']:.1e}") if compiled else "-",
            ("ok" if r["ok"] else "MISMATCH") if compiled else "reference",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = [head, "  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines.append("x eager / x best baseline: speedups, >1 is faster; best baseline = faster of eager and Inductor;"
                 " rel err = max|out - eager| / max|eager|"
                 + (f"; bf16/fp16 check: RMS error against a float32 copy of the model at most {HALF_FACTOR}x eager's"
                    if any("fp32_rms_err" in r for r in doc["results"]) else ""))
    return "\n".join(lines)


def bench_main(opts) -> int:
    """``moec bench``: ``opts`` is the argparse namespace built in ``moec.cli.main``."""
    from moec.models.spec import load_spec

    settings = BenchSettings(tokens=tuple(opts.tokens), repeat=opts.repeat, warmup=opts.warmup,
                             train=opts.train, backends=tuple(opts.backends.split(",")), inner=opts.inner)
    settings.check()
    device = _pick_device(opts.device)
    model, args, name = load_spec(opts.spec)
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    model = model.to(device=device, dtype=dtype)
    args = tuple(a.to(device=device, dtype=dtype if a.is_floating_point() else None)
                 if isinstance(a, torch.Tensor) else a for a in args)
    out_path = opts.out or f"moec-bench-{name}.json"
    log = (lambda msg: print(f"moec bench: {msg}", file=sys.stderr, flush=True)) if not opts.quiet else (lambda msg: None)
    doc = run_bench(model, args, settings, name=name, spec=opts.spec, log=log)
    try:
        with open(out_path, "w") as f:
            json.dump(doc, f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as e:
        raise BenchError(f"cannot write {out_path}: {e.strerror}: pick another --out") from None
    print(format_table(doc))
    print(f"wrote {out_path}")
    bad = [r for r in doc["results"] if r.get("ok") is False]
    for r in bad:
        print(f"moec bench: {r['backend']} output differs from eager at {r['tokens']} tokens "
              f"(rel err {r['rel_err']:.2e})", file=sys.stderr)
    return 1 if any(r["backend"] == "moec" for r in bad) else 0


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown --device '{name}': use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    return device
