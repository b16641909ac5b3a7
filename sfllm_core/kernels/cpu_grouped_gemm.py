"""CPU kernels: x @ W^T for a few rows of x, W as int8 with a float32 scale per group, or as GGUF blocks.

grouped_int8_mm: w[n, k] = q[n, k] * scale[n, k // g] (+ offset[n, k // g]), any GGUF type decoded
(GroupedIntWeight); gguf_block_mm: the file's own Q5_0 / Q8_0 blocks (0.69 / 1.06 bytes per weight).
Nothing is re-quantized and activations stay float32. torch has no such kernel
(`_weight_int8pack_mm` takes one scale per row, `_weight_int4pack_mm_for_cpu` four bits).

The weight is read once for all rows: each block of output features is converted to float32 in
registers once per 16 inputs and multiplied into 8 rows of x at a time (2 features x 8 rows, 16
accumulators; 4 x 4 for the remainder). Offsets are applied afterwards through the rows' group sums
(sum_k x[m, k] * offset = offset * sum over the group). On this workplace's 2-core Xeon the kernels
are as fast as torch's int8 kernel at one row and ~1.2-1.5x faster at 8 (both bound by memory);
their gain is accuracy. AVX-512 (F, BW, VL), built at first use by torch's C++ extension loader
(g++ and ninja), cached under torch's extensions folder; `available()` is False where they cannot
be built, and callers keep torch's kernels then.
"""

import functools
import logging

import torch

logger = logging.getLogger("sfllm.kernels")

# Rows beyond this go through a dequantized GEMM (prefill): the kernel tiles rows 4 at a time and its
# advantage over MKL fades with many rows.
MAX_ROWS = 16

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

namespace {

// Rows [0, MT) of y[:, n .. n + NB) for one block of NB output features.
template <int GS, int MT, int NB>
inline void block(const float* x, int64_t K, const int8_t* q, const float* s, int64_t NG, int64_t n,
                  float* y, int64_t N) {
  __m512 acc[NB][MT];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < MT; ++r) acc[i][r] = _mm512_setzero_ps();
  const int8_t* qn = q + n * K;
  const float* sn = s + n * NG;
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w[NB];
    for (int i = 0; i < NB; ++i) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + i * K + k));
      w[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(sn[i * NG + k / GS]));
    }
    for (int r = 0; r < MT; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int i = 0; i < NB; ++i) acc[i][r] = _mm512_fmadd_ps(w[i], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < MT; ++r) y[r * N + n + i] = _mm512_reduce_add_ps(acc[i][r]);
}

template <int GS, int NB>
inline void rows(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t NG, int64_t n,
                 float* y, int64_t N) {
  int64_t m = 0;
  if (NB == 4) {  // 8 rows against 2 features at a time: each converted weight feeds 8 FMAs
    for (; m + 8 <= M; m += 8) {
      block<GS, 8, 2>(x + m * K, K, q, s, NG, n, y + m * N, N);
      block<GS, 8, 2>(x + m * K, K, q, s, NG, n + 2, y + m * N, N);
    }
  }
  for (; m + 4 <= M; m += 4) block<GS, 4, NB>(x + m * K, K, q, s, NG, n, y + m * N, N);
  switch (M - m) {
    case 3: block<GS, 3, NB>(x + m * K, K, q, s, NG, n, y + m * N, N); break;
    case 2: block<GS, 2, NB>(x + m * K, K, q, s, NG, n, y + m * N, N); break;
    case 1: block<GS, 1, NB>(x + m * K, K, q, s, NG, n, y + m * N, N); break;
  }
}

template <int GS>
void run(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t NG, float* y, int64_t N) {
  const int64_t blocks = N / 4;
  // Grain: enough blocks per task that a task reads ~64 KiB of weights.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (4 * K));
  at::parallel_for(0, blocks + (N % 4 ? 1 : 0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (b < blocks) {
        rows<GS, 4>(x, M, K, q, s, NG, b * 4, y, N);
      } else {
        for (int64_t n = blocks * 4; n < N; ++n) rows<GS, 1>(x, M, K, q, s, NG, n, y, N);
      }
    }
  });
}

// GGUF's 32-weight blocks as stored: Q5_0 = fp16 d, 4 bytes of high bits, 16 bytes of nibbles (22 B);
// Q8_0 = fp16 d, 32 int8 (34 B). w = d * q.
template <int TYPE>
inline void load32(const uint8_t* b, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(b)));
  __m128i v0, v1;
  if (TYPE == 0) {
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6));
    const __m128i low = _mm_set1_epi8(0x0F), sixteen = _mm_set1_epi8(16);
    const __m128i lo = _mm_and_si128(qs, low), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
    // q = nibble + 16 * bit - 16: the nibble where the bit is set, nibble - 16 where not.
    v0 = _mm_mask_mov_epi8(_mm_sub_epi8(lo, sixteen), static_cast<__mmask16>(qh & 0xFFFF), lo);
    v1 = _mm_mask_mov_epi8(_mm_sub_epi8(hi, sixteen), static_cast<__mmask16>(qh >> 16), hi);
  } else {
    v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
  }
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0)), d);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1)), d);
}

template <int TYPE>
constexpr int64_t block_bytes() { return TYPE == 0 ? 22 : 34; }

template <int TYPE, int MT, int NB>
inline void qblock(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n, float* y, int64_t N) {
  __m512 acc[NB][MT];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < MT; ++r) acc[i][r] = _mm512_setzero_ps();
  const uint8_t* wn = w + n * row_bytes;
  for (int64_t k = 0, off = 0; k < K; k += 32, off += block_bytes<TYPE>()) {
    __m512 w0[NB], w1[NB];
    for (int i = 0; i < NB; ++i) load32<TYPE>(wn + i * row_bytes + off, w0[i], w1[i]);
    for (int r = 0; r < MT; ++r) {
      const __m512 x0 = _mm512_loadu_ps(x + r * K + k), x1 = _mm512_loadu_ps(x + r * K + k + 16);
      for (int i = 0; i < NB; ++i) acc[i][r] = _mm512_fmadd_ps(w1[i], x1, _mm512_fmadd_ps(w0[i], x0, acc[i][r]));
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < MT; ++r) y[r * N + n + i] = _mm512_reduce_add_ps(acc[i][r]);
}

template <int TYPE, int NB>
inline void qrows(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t rb, int64_t n, float* y, int64_t N) {
  int64_t m = 0;
  if (NB == 4) {
    for (; m + 8 <= M; m += 8) {
      qblock<TYPE, 8, 2>(x + m * K, K, w, rb, n, y + m * N, N);
      qblock<TYPE, 8, 2>(x + m * K, K, w, rb, n + 2, y + m * N, N);
    }
  }
  for (; m + 4 <= M; m += 4) qblock<TYPE, 4, NB>(x + m * K, K, w, rb, n, y + m * N, N);
  switch (M - m) {
    case 3: qblock<TYPE, 3, NB>(x + m * K, K, w, rb, n, y + m * N, N); break;
    case 2: qblock<TYPE, 2, NB>(x + m * K, K, w, rb, n, y + m * N, N); break;
    case 1: qblock<TYPE, 1, NB>(x + m * K, K, w, rb, n, y + m * N, N); break;
  }
}

template <int TYPE>
void qrun(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t rb, float* y, int64_t N) {
  const int64_t blocks = N / 4;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (4 * rb));
  at::parallel_for(0, blocks + (N % 4 ? 1 : 0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (b < blocks) {
        qrows<TYPE, 4>(x, M, K, w, rb, b * 4, y, N);
      } else {
        for (int64_t n = blocks * 4; n < N; ++n) qrows<TYPE, 1>(x, M, K, w, rb, n, y, N);
      }
    }
  });
}

}  // namespace

// type 0: Q5_0, 1: Q8_0; blocks uint8 [N, K / 32 * block bytes].
torch::Tensor gguf_block_mm(torch::Tensor x, torch::Tensor blocks, int64_t type) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && blocks.dtype() == torch::kUInt8 && x.dim() == 2 && blocks.dim() == 2);
  TORCH_CHECK(x.is_contiguous() && blocks.is_contiguous() && (type == 0 || type == 1));
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), rb = blocks.size(1);
  TORCH_CHECK(K % 32 == 0 && rb == K / 32 * (type == 0 ? 22 : 34), "blocks do not match the input width");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  if (type == 0) qrun<0>(x.data_ptr<float>(), M, K, blocks.data_ptr<uint8_t>(), rb, y.data_ptr<float>(), N);
  else qrun<1>(x.data_ptr<float>(), M, K, blocks.data_ptr<uint8_t>(), rb, y.data_ptr<float>(), N);
  return y;
}

torch::Tensor grouped_int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && q.dtype() == torch::kInt8 && scale.dtype() == torch::kFloat32);
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2 && x.size(1) == q.size(1));
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous());
  const int64_t M = x.size(0), K = q.size(1), N = q.size(0), NG = scale.size(1);
  TORCH_CHECK(K % 16 == 0 && K % NG == 0 && scale.size(0) == N);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t gs = K / NG;
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (gs == 16) run<16>(xp, M, K, qp, sp, NG, yp, N);
  else if (gs == 32) run<32>(xp, M, K, qp, sp, NG, yp, N);
  else if (gs == 64) run<64>(xp, M, K, qp, sp, NG, yp, N);
  else if (gs == 256) run<256>(xp, M, K, qp, sp, NG, yp, N);
  else TORCH_CHECK(false, "group size ", gs, " is not one of 16, 32, 64, 256");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_int8_mm", &grouped_int8_mm, "x @ (q * scale per group)^T, float32");
  m.def("gguf_block_mm", &gguf_block_mm, "x @ W^T, W as GGUF Q5_0 or Q8_0 blocks, float32");
}
"""

GROUP_SIZES = (16, 32, 64, 256)


@functools.cache
def _module():
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("no AVX-512 on this CPU: grouped int8 weights go through torch's kernels")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="sfllm_cpu_grouped_gemm",
            cpp_sources=_SOURCE,
            # -fopenmp so that at::parallel_for runs on torch's threads (without it, it runs serially);
            # libgomp.so.1 then resolves to the copy torch has already loaded.
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache: torch's kernels serve instead
        logger.warning("cannot build the CPU grouped int8 kernel (%s); using torch's kernels", exc)
        return None


def available() -> bool:
    """True where the kernel is built (or can be, on first call: that takes ~20-60 s once, then it is cached)."""
    return _module() is not None


GGUF_BLOCK_TYPES = {"Q5_0": (0, 22), "Q8_0": (1, 34)}  # type -> (kernel's code, bytes per block of 32)


def gguf_block_mm(x: torch.Tensor, blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """x [M, K] float32 @ W^T, W [N, K] held as GGUF blocks (uint8 [N, K / 32 * block bytes]): [M, N] float32."""
    return _module().gguf_block_mm(x.contiguous(), blocks, GGUF_BLOCK_TYPES[type_name][0])


def grouped_int8_mm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] float32 @ W^T with W[n, k] = q[n, k] * scale[n, k // g] (+ offset[n, k // g]): [M, N] float32."""
    y = _module().grouped_int8_mm(x.contiguous(), q, scale)
    if offset is not None:
        group = q.shape[1] // scale.shape[1]
        sums = x.view(x.shape[0], -1, group).sum(-1)  # [M, K / g]
        y = torch.addmm(y, sums, offset.t())
    return y
