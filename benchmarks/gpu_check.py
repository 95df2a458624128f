#!/usr/bin/env python3
"""Every GPU check of moec in one command, for a bare GPU machine without network.

Contract: ``benchmarks/gpu_check.sh OUT_DIR [--dry-run]`` (this file does the work) runs the steps
below in order, printing one progress line as each starts and ends, and writes
``OUT_DIR/gpu-check.json``: the device name, the versions, every step's command, exit status,
seconds, limit and output tail, and the results the benchmark steps wrote (``layers``,
``decode``, ``train``), rewritten after every step, and ``OUT_DIR/steps.log``, every step's whole
output. A step that fails or runs past its limit is recorded and the next one runs; the exit
status is 1 if any step failed, else 0.

Steps (real mode: CUDA, bf16, full-size layers; their limits add up to 580 s):

1. ``install``   ``pip install --no-deps --no-build-isolation -e .`` (offline; the image has
                 torch, triton, transformers, networkx, sympy, pytest). If it fails the other
                 steps import moec from the checkout (``PYTHONPATH``), and the record says so.
2. ``gpu-tests`` ``pytest -m gpu`` on tests/codegen/test_lowered_models.py (HF and hand-written
                 models captured, probed and lowered to Triton on the GPU) and
                 tests/capture/test_identity_experts.py (experts modules asked about ids past E).
   ``gpu-kernels`` ``pytest -m gpu tests/codegen/test_triton_kernels.py``: full-size kernels against
                 the moec oracle.
3. ``layers``    ``benchmarks/moe_layer.py`` at the Mixtral-8x7B, DeepSeek-V3 and Qwen3-30B-A3B
                 shapes, bf16, 128 / 2048 / 8192 tokens: HF eager, HF grouped_mm, Inductor, moec.
4. ``decode``    the same at 1 / 8 / 64 tokens for Mixtral with the weight-read floor
                 (``stream-read``): the GB/s column is the decode bandwidth.
5. ``train``     ``moec bench hf:mixtral --train``: one forward + backward step on one GPU,
                 eager, Inductor and moec, bf16, 512 tokens.

``--dry-run`` runs the same steps on the CPU with tiny layers (``tiny-*`` shapes, float32, Triton
in the interpreter, one timed call), skips ``install`` (the running Python's moec is used) and
finishes in a few minutes; it is part of the default test run so the script cannot rot.
``--only STEP ...`` runs the named steps alone (a rerun of the ones that failed). A step past its
limit prints every thread's stack (SIGABRT under ``PYTHONFAULTHANDLER``) before it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


# The gpu tests in two steps, each under its own limit, so that a slow one cannot take the
# other's failure summary with it (on the H200 the single step was cut before pytest's summary).
_GPU_MODEL_TESTS = ["tests/codegen/test_lowered_models.py", "tests/capture/test_identity_experts.py"]
_PYTEST_GPU = [PY, "-m", "pytest", "-q", "-m", "gpu", "-n", "0", "-p", "no:cacheprovider", "-rfE", "--tb=short",
               "--durations=10"]


def steps(out: str, dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, limit in seconds) of each step."""
    layer = [PY, "benchmarks/moe_layer.py", "--backends"]
    if dry:
        return [
            ("gpu-tests", _PYTEST_GPU + _GPU_MODEL_TESTS, 120),
            ("gpu-kernels", _PYTEST_GPU + ["tests/codegen/test_triton_kernels.py"], 120),
            ("layers", layer + ["hf-eager,hf-grouped_mm,moec", "--device", "cpu", "--dtype", "float32",
                                "--target", "triton", "--shapes", "tiny-mixtral", "tiny-deepseek", "tiny-qwen",
                                "--tokens", "4", "--repeat", "1", "--warmup", "0", "--hot",
                                "--out", os.path.join(out, "layers.json")], 300),
            ("decode", layer + ["hf-eager,moec,stream-read", "--device", "cpu", "--dtype", "float32", "--target",
                                "triton", "--shapes", "tiny-mixtral", "--tokens", "1", "--repeat", "1", "--warmup",
                                "0", "--hot", "--out", os.path.join(out, "decode.json")], 180),
            ("train", [PY, "-m", "moec.cli", "bench", "hf:mixtral", "--train", "--device", "cpu", "--tokens", "8",
                       "--repeat", "1", "--warmup", "0", "--backends", "eager,moec", "--quiet",
                       "--out", os.path.join(out, "train.json")], 600),  # a cold build of moec's C++ kernels
        ]
    return [
        ("install", [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
         30),
        ("gpu-tests", _PYTEST_GPU + _GPU_MODEL_TESTS, 150),
        ("gpu-kernels", _PYTEST_GPU + ["tests/codegen/test_triton_kernels.py"], 105),
        ("layers", layer + ["hf-eager,hf-grouped_mm,moec,inductor", "--device", "cuda", "--dtype", "bfloat16",
                            "--shapes", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "--tokens", "128", "2048",
                            "8192", "--repeat", "10", "--warmup", "2", "--out", os.path.join(out, "layers.json")], 185),
        ("decode", layer + ["hf-eager,hf-grouped_mm,moec,stream-read", "--device", "cuda", "--dtype", "bfloat16",
                            "--shapes", "mixtral-8x7b", "--tokens", "1", "8", "64", "--repeat", "20",
                            "--warmup", "3", "--out", os.path.join(out, "decode.json")], 45),
        ("train", [PY, "-m", "moec.cli", "bench", "hf:mixtral", "--train", "--device", "cuda", "--dtype", "bfloat16",
                   "--tokens", "512", "--repeat", "5", "--warmup", "1", "--quiet",
                   "--out", os.path.join(out, "train.json")], 65),
    ]


def device_name(dry: bool) -> str:
    import torch

    if not dry and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, dry run)" if dry else "no CUDA device"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "missing"
    return found


def run_step(name: str, cmd: list[str], limit: int, env: dict[str, str], i: int, n: int) -> dict:
    """A step past its limit gets SIGABRT first: with ``PYTHONFAULTHANDLER`` set its Python
    prints every thread's stack (where it hung: the H200's train step once wrote its JSON and
    never exited), then its whole process group is killed."""
    print(f"[{i}/{n}] {name}: started (limit {limit} s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = 124
        for sig, wait in ((signal.SIGABRT, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                output, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                output = ""
    seconds = round(time.perf_counter() - t0, 1)
    status = "ok" if rc == 0 else ("TIMEOUT" if rc == 124 else f"FAILED (exit {rc})")
    print(f"[{i}/{n}] {name}: {status} in {seconds} s", flush=True)
    return {"name": name, "command": " ".join(cmd), "rc": rc, "seconds": seconds, "limit_s": limit,
            "output_tail": output[-4000:], "output": output}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for gpu-check.json and the benchmarks' own JSON")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run these steps alone (a rerun of what failed)")
    opts = p.parse_args(argv)
    out = os.path.abspath(opts.out_dir)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if opts.dry_run:
        env["TRITON_INTERPRET"] = "1"
    plan = steps(out, opts.dry_run)
    if opts.only:
        unknown = sorted(set(opts.only) - {name for name, _, _ in plan})
        if unknown:
            p.error(f"no step named {', '.join(unknown)}; the steps: {', '.join(name for name, _, _ in plan)}")
        plan = [step for step in plan if step[0] in opts.only]
    t0 = time.perf_counter()
    doc = {"check": "gpu_check", "mode": "dry-run" if opts.dry_run else "gpu", "device": device_name(opts.dry_run),
           "versions": versions(), "steps": []}
    print(f"gpu_check ({doc['mode']}) on {doc['device']}: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}",
          flush=True)
    path = os.path.join(out, "gpu-check.json")
    with open(os.path.join(out, "steps.log"), "w") as log:
        for i, (name, cmd, limit) in enumerate(plan, 1):
            step = run_step(name, cmd, limit, env, i, len(plan))
            log.write(f"==== {name}: {step['command']}\n{step.pop('output')}\n==== {name}: exit {step['rc']} in "
                      f"{step['seconds']} s\n")
            log.flush()
            doc["steps"].append(step)
            # After every step, so that a machine taken back mid-run leaves what was measured.
            _finish(doc, out, t0, path)
    failed = _finish(doc, out, t0, path)
    print(f"wrote {path} ({doc['seconds']} s); " + (f"failed: {', '.join(failed)}" if failed else "every step ok"),
          flush=True)
    return 1 if failed else 0


def _finish(doc: dict, out: str, t0: float, path: str) -> list[str]:
    for key in ("layers", "decode", "train"):
        part = os.path.join(out, f"{key}.json")
        if os.path.exists(part):
            with open(part) as f:
                doc[key] = json.load(f)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    doc["failed"] = [s["name"] for s in doc["steps"] if s["rc"] != 0]
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return doc["failed"]


if __name__ == "__main__":
    sys.exit(main())
