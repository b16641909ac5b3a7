"""CPU kernel: one decode token's attention over its keys and values, every key visible, in one call.

TorchPagedAttention's lone-decode path (layers/attention.py `_decode_one`) is two grouped bmm calls and
a softmax: ~12 torch ops per layer, most of their time dispatch at Gemma 3 270M's size (4 query
heads, 1 KV head, 256 dims). This computes the same in float32 (softmax with the max subtracted, sums
in float32), reading the keys either as a run of cache slots (a slice) or through a slot index.
Built at first use like kernels/cpu_grouped_gemm.py; `available()` is False where it cannot be.
"""

import functools
import logging

import torch

logger = logging.getLogger("sfllm.kernels")

_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

// out[h] = softmax(scale * q[h] . k[l, h / group]) @ v[l, h / group] over the L keys, which are the
// cache rows slots[l] (slots given) or first + l.
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      c10::optional<torch::Tensor> slots, int64_t first, int64_t length, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 && v_cache.dtype() == torch::kFloat32);
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  const int64_t heads = q.size(0), dim = q.size(1), kv_heads = k_cache.size(1), group = heads / kv_heads;
  TORCH_CHECK(k_cache.size(2) == dim && heads % kv_heads == 0 && length > 0);
  const int64_t* idx = nullptr;
  torch::Tensor s;
  if (slots.has_value()) {
    s = slots->contiguous();
    TORCH_CHECK(s.dtype() == torch::kInt64 && s.numel() == length);
    idx = s.data_ptr<int64_t>();
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row = kv_heads * dim;
  std::vector<float> p(length);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    const float* qh = qp + h * dim;
    float best = 0;
    for (int64_t l = 0; l < length; ++l) {
      const float* kl = kp + (idx ? idx[l] : first + l) * row + g * dim;
      float dot = 0;
      for (int64_t j = 0; j < dim; ++j) dot += qh[j] * kl[j];
      p[l] = dot * float(scale);
      best = l == 0 ? p[l] : std::max(best, p[l]);
    }
    float total = 0;
    for (int64_t l = 0; l < length; ++l) total += (p[l] = std::exp(p[l] - best));
    float* oh = op + h * dim;
    for (int64_t j = 0; j < dim; ++j) oh[j] = 0;
    for (int64_t l = 0; l < length; ++l) {
      const float* vl = vp + (idx ? idx[l] : first + l) * row + g * dim;
      const float w = p[l] / total;
      for (int64_t j = 0; j < dim; ++j) oh[j] += w * vl[j];
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one token's attention over all its keys, float32");
}
"""


@functools.cache
def _module():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # -ffast-math lets the dot products vectorise (reassociated float32 sums).
        return load_inline(
            name="sfllm_cpu_decode_attention",
            cpp_sources=_SOURCE,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-ffast-math"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache: torch ops serve instead
        logger.warning("cannot build the CPU decode attention kernel (%s); using torch ops", exc)
        return None


def available() -> bool:
    """True where the kernel is built (the first call builds it: ~20 s once, then torch caches it)."""
    return _module() is not None


def decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor | None,
    first: int,
    length: int,
    scale: float,
) -> None:
    """Writes into out [H, D] the attention of q [H, D] over cache rows slots (or first .. first + length)."""
    _module().decode_attention(out, q, k_cache, v_cache, slots, first, length, scale)
