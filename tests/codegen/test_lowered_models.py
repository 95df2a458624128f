"""The models of the capture tests give eager's results through each lowering, forward and backward.

The CPU lowering (``target="cpu"``) already runs under every capture test (it is the default on
CPU); here the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``; on a GPU the
compiled kernels) on a subset that covers every router kind and FFN layout the zoo has: softmax
top-k (Mixtral), sigmoid with correction bias and groups plus a shared expert (DeepSeek-V3),
top-k-then-softmax with a router bias, clamped SwiGLU, interleaved gate/up, transposed weights and
expert biases (GPT-OSS), top-1 with an expert capacity (Switch: its route and dispatch stay
reference ops), and the hand-written idioms.

Tolerances: fp32; outputs and gradients within assert_close(rtol=1e-4, atol=1e-5) of eager: the
kernels sum in another order than eager's matmuls, and the zoo's outputs are O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch

import moec
from moec.capture import convert_model
from moec.models.builtin import BUILTIN_MODELS
from moec.models.hf import make_hf_model, primary_output

TRITON_CASES = ["mixtral", "deepseek_v3", "gpt_oss", "switch_transformers", "moe-mlp", "stacked-bmm"]


def _subject(name):
    return BUILTIN_MODELS[name]() if name in BUILTIN_MODELS else make_hf_model(name)


def _check(name: str, target: str, train: bool, device: str = "cpu") -> None:
    model, args = _subject(name)
    model, args = model.to(device), tuple(a.to(device) for a in args)
    model.train(train)
    ref = copy.deepcopy(model)
    compiled = moec.compile(model, inner="aot_eager", target=target)
    with torch.set_grad_enabled(train):
        out = primary_output(compiled(*args))
        out_ref = primary_output(ref(*args))
    assert out.device.type == device and convert_model(model).layers, "no MoE layer recognised"
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    if not train:
        return
    out.float().pow(2).mean().backward()
    out_ref.float().pow(2).mean().backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g_ref = ref_params[n].grad if ref_params[n].grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


# The hand-written idioms' training runs repeat the HF families' kernels (interpreted: minutes),
# so they run in the slow run only.
_SLOW_TRAIN = {"moe-mlp", "stacked-bmm"}
_TRITON_PARAMS = [pytest.param(name, train, id=f"{name}-{'train' if train else 'eval'}",
                               marks=pytest.mark.slow if train and name in _SLOW_TRAIN else ())
                  for name in TRITON_CASES for train in (False, True)]


@pytest.mark.parametrize("name,train", _TRITON_PARAMS)
def test_triton_lowering_matches_eager(triton_here, name, train):
    _check(name, "triton", train)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss", "switch_transformers", "shared-expert"])
def test_cpu_lowering_matches_eager_with_inductor(name):
    # The capture tests run the CPU lowering under aot_eager; here Inductor compiles around it.
    model, args = _subject(name)
    ref = copy.deepcopy(model)
    compiled = moec.compile(model, target="cpu")
    with torch.no_grad():
        torch.testing.assert_close(primary_output(compiled(*args)), primary_output(ref(*args)),
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# On a CUDA GPU: capture, probes and compiled Triton kernels all on the device
# ----------------------------------------------------------------------------------------------

_CUDA_CASES = ["mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss", "moe-mlp", "stacked-bmm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", _CUDA_CASES)
def test_triton_lowering_on_cuda(triton_here, name, train):
    """The model and its inputs on the GPU from the start, so capture probes there too: fp32
    (Triton's dots in IEEE fp32), the same tolerances as the interpreted table above."""
    _check(name, "triton", train, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_triton_lowering_on_cuda_bf16(triton_here, name):
    """bf16 end to end (Inductor around moec's kernels): within bf16 rounding of eager in bf16."""
    model, args = _subject(name)
    model, args = model.to("cuda", torch.bfloat16), tuple(a.cuda() for a in args)
    ref = copy.deepcopy(model)
    compiled = moec.compile(model, target="triton")
    with torch.no_grad():
        out = primary_output(compiled(*args)).float()
        out_ref = primary_output(ref(*args)).float()
    assert convert_model(model).layers, "no MoE layer recognised on the GPU"
    err = (out - out_ref).abs().max().item() / out_ref.abs().max().item()
    assert err <= 2e-2, f"max |moec - eager| / max |eager| = {err:.2e} in bf16"
