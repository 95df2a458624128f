"""Native CPU kernels for the routed experts at small token counts (a few rows per expert).

Contract: ``load()`` returns the compiled extension, or ``None`` when it cannot be built here (no C++
compiler, a build error; ``why_not()`` says why), in which case ``moec.codegen.cpu`` keeps its
PyTorch path. The extension is C++ compiled on first use with ``torch.utils.cpp_extension``
(cached by torch in ``TORCH_EXTENSIONS_DIR``, rebuilt when this source changes), as Inductor's CPU
backend compiles its own kernels. ``MOEC_NATIVE=0`` turns it off.

Why: with one to a few tokens an MoE layer is a handful of matrix-vector products over the active
experts' weights, bound by reading those weights. BLAS runs a one-row product on one thread, and
every PyTorch call from Python costs microseconds; over a layer's 8-30 small calls that cost is
larger than the weight read. These kernels do each op's work for all experts in one call, with
both threads streaming disjoint rows of each weight.

Kernels (fp32, nn.Linear weight layout ``w [E, out, in]``, contiguous):

- ``gemv_act(x_TD, token_N or empty, spans_S3, w_in_EFD, b_in_EF or empty, act, interleaved, alpha,
  limit, N) -> a_NI``: for each span ``(expert, start, end)`` the rows ``start:end`` (gathered from
  ``x`` by ``token_N``, in the kernel) times ``w_in[expert]``, plus the bias, through the activation;
  rows past the last span are zero.
- ``gemv_combine(a_NI, spans_S3, w_out_EHI, b_out_EH or empty, weights_TK, slot_N, K, T) -> out_TH``:
  each row's expert output times its routing weight ``weights.flat[slot]``, summed into row
  ``slot // K``; a token's slots are added in expert order, so the result is deterministic.

Each output element is one dot product accumulated in fp32 in another order than BLAS: results
agree with the references to fp32 rounding.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Optional

from moec import _torch

# Gated activations are the codes below 4, 8, and 10 and up; the others (4-7, 9) are ungated.
ACT_CODES = {"swiglu": 0, "geglu": 1, "geglu_tanh": 2, "clamped_swiglu": 3, "relu": 4, "gelu": 5, "gelu_tanh": 6,
             "silu": 7, "reglu": 8, "relu2": 9, "swiglu_limit": 10, "swiglu_limit_post": 11, "softcap_swiglu": 12}

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
  #pragma omp simd reduction(+:acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }
inline float gelu_tanh(float v) {
  return 0.5f * v * (1.f + std::tanh(0.79788456080286535f * (v + 0.044715f * v * v * v)));
}

inline float ungated(int act, float h) {
  switch (act) {
    case 4: return h > 0.f ? h : 0.f;
    case 5: return gelu(h);
    case 6: return gelu_tanh(h);
    case 9: { const float r = h > 0.f ? h : 0.f; return r * r; }
    default: return silu(h);
  }
}

inline float clamp_up(float u, float limit) { return std::max(std::min(u, limit), -limit); }

inline float gated(int act, float g, float u, float alpha, float limit) {
  switch (act) {
    case 0: return silu(g) * u;
    case 1: return gelu(g) * u;
    case 2: return gelu_tanh(g) * u;
    case 8: return (g > 0.f ? g : 0.f) * u;
    case 10: return silu(std::min(g, limit)) * clamp_up(u, limit);
    case 11: return std::min(silu(g), limit) * clamp_up(u, limit);
    case 12: return (alpha * std::tanh(g / alpha)) * (1.f / (1.f + std::exp(-g))) * (limit * std::tanh(u / limit));
    default: {
      g = std::min(g, limit);
      u = std::max(std::min(u, limit), -limit);
      return (u + 1.f) * (g / (1.f + std::exp(-g * alpha)));
    }
  }
}

constexpr int64_t kGrain = 16;  // output rows per task: each task streams kGrain weight rows

}  // namespace

torch::Tensor gemv_act(torch::Tensor x, torch::Tensor token, torch::Tensor spans, torch::Tensor w, torch::Tensor b,
                       int64_t act, bool interleaved, double alpha, double limit, int64_t N) {
  const int64_t D = x.size(1), F = w.size(1);
  const int64_t* tk = token.numel() ? token.data_ptr<int64_t>() : nullptr;
  const bool is_gated = act <= 3 || act == 8 || act >= 10;
  const int64_t I = is_gated ? F / 2 : F;
  auto out = torch::zeros({N, I}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  const float fa = static_cast<float>(alpha), fl = static_cast<float>(limit);
  for (int64_t s = 0; s < spans.size(0); ++s) {
    const int64_t e = sp[3 * s], r0 = sp[3 * s + 1], r1 = sp[3 * s + 2];
    const float* we = wp + e * F * D;
    const float* be = bp ? bp + e * F : nullptr;
    at::parallel_for(0, I, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t gi = is_gated ? (interleaved ? 2 * i : i) : i;
        const int64_t ui = interleaved ? 2 * i + 1 : I + i;
        for (int64_t r = r0; r < r1; ++r) {
          const float* xr = xp + (tk ? tk[r] : r) * D;
          float g = dot(we + gi * D, xr, D) + (be ? be[gi] : 0.f);
          float v;
          if (is_gated) {
            float u = dot(we + ui * D, xr, D) + (be ? be[ui] : 0.f);
            v = gated(static_cast<int>(act), g, u, fa, fl);
          } else {
            v = ungated(static_cast<int>(act), g);
          }
          op[r * I + i] = v;
        }
      }
    });
  }
  return out;
}

torch::Tensor gemv_combine(torch::Tensor a, torch::Tensor spans, torch::Tensor w, torch::Tensor b,
                           torch::Tensor weights, torch::Tensor slot, int64_t K, int64_t T) {
  const int64_t I = a.size(1), H = w.size(1);
  auto out = torch::zeros({T, H}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
  const float* gp = weights.data_ptr<float>();
  const int64_t* slp = slot.data_ptr<int64_t>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t s = 0; s < spans.size(0); ++s) {
    const int64_t e = sp[3 * s], r0 = sp[3 * s + 1], r1 = sp[3 * s + 2];
    const float* we = wp + e * H * I;
    const float* be = bp ? bp + e * H : nullptr;
    // Threads own disjoint output columns h, so adding into a token's row never races.
    at::parallel_for(0, H, kGrain, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t r = r0; r < r1; ++r) {
          const float y = dot(we + h * I, ap + r * I, I) + (be ? be[h] : 0.f);
          op[(slp[r] / K) * H + h] += gp[slp[r]] * y;
        }
      }
    });
  }
  return out;
}
"""

_module = None
_why_not: Optional[str] = None


def load():
    """The compiled extension, or None (see ``why_not()``)."""
    global _module, _why_not
    if _module is not None or _why_not is not None:
        return _module
    if os.environ.get("MOEC_NATIVE", "1") == "0":
        _why_not = "disabled by MOEC_NATIVE=0"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        import torch

        # The source, the CPU's vector ISA and torch's version in the name: each builds in its own
        # directory, so processes running different moec versions never load one another's library,
        # a -march=native build is not reused by a machine without the instructions it uses, and a
        # library built against one torch is never loaded by another (torch 2.14's, loaded by 2.11
        # from the shared py311_cu130 directory, crashed it).
        key = _SOURCE + torch.backends.cpu.get_cpu_capability() + torch.__version__
        name = "moec_cpu_native_" + hashlib.sha256(key.encode()).hexdigest()[:16]
        clear_stale_lock(os.path.join(_torch.extension_build_dir(name), "lock"))
        _module = load_inline(
            name, cpp_sources=_SOURCE, functions=["gemv_act", "gemv_combine"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as err:  # no compiler, or it failed: the PyTorch path still works
        _why_not = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return None
    return _module


# A build on the 2-core machine takes a few minutes; a lock this old was left by a killed build,
# and torch would wait on it forever.
STALE_LOCK_S = 20 * 60


def clear_stale_lock(path: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build lock at ``path`` when it is older than ``max_age_s``; whether it did."""
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return False
    if age <= max_age_s:
        return False
    warnings.warn(f"moec: removing a build lock {age / 60:.0f} minutes old (a killed build left it): {path}",
                  RuntimeWarning)
    try:
        os.remove(path)
    except OSError:
        return False
    return True


def why_not() -> Optional[str]:
    return _why_not
