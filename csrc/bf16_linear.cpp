// CPU kernel for qru.kernels.bf16_linear: y = x W^T (+ b) for bf16 x and W with few rows of x
// (decoding: one token per sequence), on CPUs without native bf16 matmul, where torch's bf16
// GEMM converts and is several times slower than fp32. Each weight row is read once per call
// (bf16: half the bytes of fp32), widened exactly to fp32 in registers, and multiplied into up to
// 8 rows of x at a time with fp32 FMA accumulation; the result is rounded once to bf16
// (nearest even), bias added in fp32 before the rounding. OpenMP over output columns.
#include "qru_common.h"

namespace {

using namespace qru;

#if QRU_AVX2
// out[m] = sum_k x[m, k] w[k] for MB (<= 8) rows of fp32 x (row stride K)
template <int MB>
inline void dot_rows(const float* x, int64_t K, const uint16_t* w, float* out) {
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(acc[m]);
    for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * bf16_to_f32(w[kk]);
    out[m] = s;
  }
}
#endif

void dot_rows_scalar(const float* x, int64_t mb, int64_t K, const uint16_t* w, float* out) {
  for (int64_t m = 0; m < mb; ++m) {
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * bf16_to_f32(w[k]);
    out[m] = s;
  }
}

at::Tensor skinny_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool scalar) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_linear: x and weight must be bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1),
              "bf16_linear: x (M, K) and weight (N, K) must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N,
                "bf16_linear: bias must be contiguous bfloat16 (N,)");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
  // x widened to fp32 once (M x K, small)
  std::vector<float> xf(size_t(M * K));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_f32(xp[i]);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const bool par = M * N * K >= (int64_t(1) << 20);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* wr = wp + n * K;
    const float b = bp ? bf16_to_f32(bp[n]) : 0.0f;
    float out[8];
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mb = std::min<int64_t>(8, M - m0);
      const float* xr = xf.data() + m0 * K;
#if QRU_AVX2
      if (!scalar) {
        switch (mb) {
          case 8: dot_rows<8>(xr, K, wr, out); break;
          case 7: dot_rows<7>(xr, K, wr, out); break;
          case 6: dot_rows<6>(xr, K, wr, out); break;
          case 5: dot_rows<5>(xr, K, wr, out); break;
          case 4: dot_rows<4>(xr, K, wr, out); break;
          case 3: dot_rows<3>(xr, K, wr, out); break;
          case 2: dot_rows<2>(xr, K, wr, out); break;
          default: dot_rows<1>(xr, K, wr, out); break;
        }
      } else {
        dot_rows_scalar(xr, mb, K, wr, out);
      }
#else
      dot_rows_scalar(xr, mb, K, wr, out);
#endif
      for (int64_t m = 0; m < mb; ++m) yp[(m0 + m) * N + n] = f32_to_bf16(out[m] + b);
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(qru_bf16_linear, m) {
  // y = x W^T + b, bf16, fp32 accumulation, few rows of x
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias=None, bool scalar=False) -> Tensor", &skinny_linear);
}
