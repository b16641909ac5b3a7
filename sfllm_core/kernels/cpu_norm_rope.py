"""CPU kernels for the small per-token steps of a layer: RMSNorm with its residual add, and q/k norm + RoPE.

On the CPU a decode step of a small model is mostly dispatcher overhead: Gemma 3 270M's sandwich
norms cost ~18 torch ops per add_norm and the q/k norms with RoPE ~40 per layer, a few microseconds
each. These do the same float32 arithmetic as the references in layers/norms.py and layers/rotary.py
in one call each (sums in double, so they agree to float32 rounding, not bit for bit). Built at
first use like kernels/cpu_grouped_gemm.py; `available()` is False where they cannot be built.
"""

import functools
import logging

import torch

logger = logging.getLogger("sfllm.kernels")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {

// out = normed(x) * (gemma ? 1 + w : w), normed in float32 with the mean of squares summed in double.
inline void norm_row(const float* x, const float* w, int64_t d, float eps, bool gemma, float* out) {
  double ss = 0;
  for (int64_t j = 0; j < d; ++j) ss += double(x[j]) * x[j];
  const float r = 1.0f / std::sqrt(float(ss / d) + eps);
  if (gemma) {
    for (int64_t j = 0; j < d; ++j) out[j] = (x[j] * r) * (1.0f + w[j]);
  } else {
    for (int64_t j = 0; j < d; ++j) out[j] = w[j] * (x[j] * r);
  }
}

}  // namespace

// (norm(residual + x_norm(x)), residual + x_norm(x)); without residual: (norm(x), x). Rows of x contiguous.
std::vector<torch::Tensor> add_norm(torch::Tensor x, torch::Tensor weight, double eps, bool gemma,
                                    c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> x_weight,
                                    double x_eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous());
  const int64_t n = x.size(0), d = x.size(1);
  auto out = torch::empty({n, d}, x.options());
  const float* w = weight.data_ptr<float>();
  if (!residual.has_value()) {
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        norm_row(x.data_ptr<float>() + i * x.stride(0), w, d, float(eps), gemma, out.data_ptr<float>() + i * d);
    });
    return {out, x};
  }
  auto res = residual->contiguous();
  TORCH_CHECK(res.dtype() == torch::kFloat32 && res.size(0) == n && res.size(1) == d);
  auto sum = torch::empty({n, d}, x.options());
  const float* xw = x_weight.has_value() ? x_weight->data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(d);
    for (int64_t i = b; i < e; ++i) {
      const float* xi = x.data_ptr<float>() + i * x.stride(0);
      float* si = sum.data_ptr<float>() + i * d;
      const float* ri = res.data_ptr<float>() + i * d;
      if (xw != nullptr) {
        norm_row(xi, xw, d, float(x_eps), gemma, tmp.data());
        xi = tmp.data();
      }
      for (int64_t j = 0; j < d; ++j) si[j] = ri[j] + xi[j];
      norm_row(si, w, d, float(eps), gemma, out.data_ptr<float>() + i * d);
    }
  });
  return {out, sum};
}

// Per-head RMSNorm of x [T, H, D] (heads contiguous, any token stride), then rotate-half RoPE at the
// tokens' positions from cos_sin [max_pos, D] (cos in the first half, sin in the second).
torch::Tensor norm_rope(torch::Tensor x, torch::Tensor weight, double eps, bool gemma, torch::Tensor cos_sin,
                        torch::Tensor positions) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2));
  TORCH_CHECK(positions.dtype() == torch::kInt64 && cos_sin.is_contiguous() && weight.is_contiguous());
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  auto out = torch::empty({t, h, d}, x.options());
  auto pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  const float* cs = cos_sin.data_ptr<float>();
  at::parallel_for(0, t * h, 32, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(d);
    for (int64_t i = b; i < e; ++i) {
      const int64_t tok = i / h, head = i % h;
      norm_row(x.data_ptr<float>() + tok * x.stride(0) + head * d, w, d, float(eps), gemma, tmp.data());
      const float* c = cs + p[tok] * d;
      const float* s = c + half;
      float* o = out.data_ptr<float>() + i * d;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = tmp[j], x2 = tmp[j + half];
        o[j] = x1 * c[j] - x2 * s[j];
        o[j + half] = x2 * c[j] + x1 * s[j];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_norm", &add_norm, "RMSNorm with the residual add (and Gemma's sandwich norm) in one call");
  m.def("norm_rope", &norm_rope, "per-head RMSNorm then rotate-half RoPE");
}
"""


@functools.cache
def _module():
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="sfllm_cpu_norm_rope",
            cpp_sources=_SOURCE,
            # -fopenmp: at::parallel_for on torch's threads (libgomp.so.1 resolves to torch's copy).
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the torch references serve instead
        logger.warning("cannot build the CPU norm/RoPE kernels (%s); using torch ops", exc)
        return None


def available() -> bool:
    """True where the kernels are built (the first call builds them: ~20 s once, then torch caches them)."""
    return _module() is not None


def add_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gemma: bool,
    residual: torch.Tensor | None = None,
    x_weight: torch.Tensor | None = None,
    x_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x_norm(x)), residual + x_norm(x)) for float32 x [T, D]; without residual (norm(x), x)."""
    out, total = _module().add_norm(x, weight, eps, gemma, residual, x_weight, x_eps)
    return out, total


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, cos_sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """RoPE(RMSNorm(x)) per head for float32 x [T, H, D]: a new contiguous tensor."""
    if x.stride(2) != 1 or x.stride(1) != x.size(2):  # the kernel walks each token's heads as one run
        x = x.contiguous()
    return _module().norm_rope(x, weight, eps, gemma, cos_sin, positions.long())
