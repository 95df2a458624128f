"""What capture costs: `moec inspect` on 2 vs 48 layers of one kind, and one DeepSeek-V3-wide layer.

Usage::

    python benchmarks/capture_cost.py --out benchmarks/results/capture-cost-cpu.json

1. ``moec inspect hf:ARCH:num_hidden_layers=L`` for L = 2 and 48, each as its own process (what a
   user runs: imports, building the model, capture, the trace), ``--repeat`` times, median wall
   seconds; and, inside one process, the time ``convert_model`` takes (recording the call,
   recognising, verifying) and the dynamo trace, for the same two models. Identical layers share
   one recognition and one traced region, so the 48-layer run should cost at most 2x the 2-layer
   one (issue 13).
2. One MoE layer at DeepSeek-V3 width (transformers' DeepseekV3MoE: hidden 7168, 256 routed
   experts, top-8, 8 groups keep 4, sigmoid + correction bias, one shared expert), fp32 on CPU:
   the seconds ``convert_model`` takes on it, called with [1, 16, 7168]. The experts' hidden size
   is ``--moe-intermediate`` (default 256: DeepSeek-V3's 2048 would need 45 GB of fp32 weights;
   capture's cost grows with the weights it reads, and the result says which was used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _cli_seconds(spec: str, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moec.cli.main", "inspect", spec], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - start)
    return out


def _in_process(arch: str, layers: int) -> dict:
    import torch

    from moec.capture import convert_model
    from moec.capture.trace import capture_graphs
    from moec.models.hf import make_hf_model

    model, args = make_hf_model(arch, {"num_hidden_layers": layers})
    torch._dynamo.reset()
    start = time.perf_counter()
    result = convert_model(model, (args, {}))
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    capture_graphs(model, *args, share_layers=True)
    return {"layers": layers, "moe_layers": len(result.layers), "convert_s": round(convert_s, 3),
            "trace_s": round(time.perf_counter() - start, 3)}


def _deepseek_layer(intermediate: int) -> dict:
    import torch
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from moec.capture import convert_model

    config = transformers.DeepseekV3Config(
        hidden_size=7168, moe_intermediate_size=intermediate, n_routed_experts=256, num_experts_per_tok=8,
        n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = DeepseekV3MoE(config).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
    x = torch.randn(1, 16, 7168, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    result = convert_model(layer, ((x,), {}))
    seconds = time.perf_counter() - start
    (rec,) = result.layers or [None]
    return {"hidden": 7168, "experts": 256, "top_k": 8, "moe_intermediate": intermediate, "dtype": "float32",
            "tokens": 16, "expert_weight_bytes": 256 * 3 * 7168 * intermediate * 4,
            "recognised": rec is not None, "router": getattr(rec, "router", None),
            "fallbacks": [f.reason for f in result.fallbacks], "convert_s": round(seconds, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--moe-intermediate", type=int, default=256)
    p.add_argument("--skip-deepseek", action="store_true")
    p.add_argument("--out")
    opts = p.parse_args(argv)
    result: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "processor": platform.processor() or platform.machine()}}
    cli = {}
    for layers in (2, 48):
        seconds = _cli_seconds(f"hf:{opts.arch}:num_hidden_layers={layers}", opts.repeat)
        cli[layers] = {"median_s": round(statistics.median(seconds), 2), "runs_s": [round(s, 2) for s in seconds]}
        print(f"moec inspect hf:{opts.arch}, {layers} layers: median {cli[layers]['median_s']} s "
              f"over {opts.repeat} runs", flush=True)
    ratio = cli[48]["median_s"] / cli[2]["median_s"]
    print(f"48 / 2 layers: {ratio:.2f}x", flush=True)
    result["inspect_cli"] = {"arch": opts.arch, "by_layers": cli, "ratio_48_over_2": round(ratio, 2)}
    result["in_process"] = [_in_process(opts.arch, layers) for layers in (2, 48)]
    for row in result["in_process"]:
        print(f"in process, {row['layers']} layers: convert {row['convert_s']} s, trace {row['trace_s']} s", flush=True)
    if not opts.skip_deepseek:
        result["deepseek_v3_layer"] = _deepseek_layer(opts.moe_intermediate)
        print(f"DeepSeek-V3-wide layer (I={opts.moe_intermediate}): convert "
              f"{result['deepseek_v3_layer']['convert_s']} s, recognised "
              f"{result['deepseek_v3_layer']['recognised']}", flush=True)
    if opts.out:
        from moec.runtime.jsonfile import write_json

        write_json(opts.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
