"""What capture found in a model: its MoE layers, graph breaks and fallbacks.

Contract: ``Report.to_dict()`` is JSON-serialisable and has the same keys as the attributes.

Router vocabulary (``MoELayer.router``):

- ``softmax_topk``: softmax over all experts, then top-k (``renormalize`` says whether the k
  weights are divided by their sum). Mixtral, Qwen2/3-MoE, OLMoE.
- ``topk_softmax``: top-k on the logits, then softmax over the k picked. GPT-OSS.
- ``sigmoid_topk``: sigmoid scores, top-k on them.
- ``sigmoid_bias_grouped_topk``: sigmoid scores plus a correction bias used only for the choice,
  group-limited top-k, weights gathered from the unbiased scores. DeepSeek-V3.
- ``top1``: softmax, arg-max, the weight is the winning probability; optional expert capacity.
  Switch Transformers.

Activation vocabulary (``MoELayer.activation``): gated ``swiglu``, ``geglu``, ``geglu_tanh``,
``clamped_swiglu`` (GPT-OSS); ungated ``relu``, ``gelu``, ``gelu_tanh``, ``silu``.

``MoELayer.post_norm``: the RMSNorm each expert's output passes through before its routing weight
(Ergo's per-expert scale, MuSE-Spark's shared one), described; "" when there is none.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class MoELayer:
    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    expert_hidden_size: int
    router: str
    num_shared_experts: int
    activation: str
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    capacity: int = 0
    expert_bias: bool = False
    recogniser: str = ""
    post_norm: str = ""


@dataclasses.dataclass
class Fallback:
    location: str
    reason: str


@dataclasses.dataclass
class Report:
    moe_layers: list[MoELayer] = dataclasses.field(default_factory=list)
    graph_breaks: int = 0
    num_graphs: int = 0
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)
    graphs: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "moe_layers": [dataclasses.asdict(layer) for layer in self.moe_layers],
            "graph_breaks": self.graph_breaks,
            "num_graphs": self.num_graphs,
            "fallbacks": [dataclasses.asdict(f) for f in self.fallbacks],
            "graphs": list(self.graphs),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The MoE layers as an aligned text table, then the fallbacks."""
        cols = ["name", "num_experts", "top_k", "hidden_size", "expert_hidden_size", "router",
                "num_shared_experts", "activation"]
        heads = ["layer", "experts", "top_k", "hidden", "expert_hidden", "router", "shared", "activation"]
        rows = [[str(getattr(layer, c)) + (" + rms_norm" if c == "activation" and layer.post_norm else "")
                 for c in cols] for layer in self.moe_layers]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.append(
            f"{len(self.moe_layers)} MoE layer(s), {self.graph_breaks} graph break(s), {self.num_graphs} graph(s)"
        )
        recognised = {layer.name or "<root>" for layer in self.moe_layers}
        for f in self.fallbacks:
            # A note on a recognised layer (part of it kept as the model's own code) is not a miss.
            lines.append(f"{'note' if f.location in recognised else 'left alone'}: {f.location}: {f.reason}")
        return "\n".join(lines)
