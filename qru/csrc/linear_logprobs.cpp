// CPU row kernels for qru.kernels.linear_logprobs: the softmax work on one (chunk, V) block of
// logits, one row at a time while the row sits in L2 (V = 32000 fp32 is 125 KiB).
//
//   lse_gather(z, y, ignore)         -> (lse, logp): lse[n] = logsumexp_v z[n,v], logp[n] = z[n,y[n]] - lse[n]
//   dlogits_(z, y, lse, g, ignore)   z[n,:] <- g[n] (e_{y[n]} - exp(z[n,:] - lse[n]))          (in place)
//   lse_gather_dlogits_(z, y, ignore) both at once with g = 1: exp computed once per element,
//                                    z[n,:] <- e_{y[n]} - softmax(z[n,:])                   (in place)
//
// Ignored rows (y == ignore) get logp 0 and a zero gradient row. z is fp32 or bf16 (read and
// written as torch rounds: nearest even); the math is fp32. exp: AVX2/FMA Cephes polynomial
// (within 2 ulp of expf; 0 below -87.3), scalar std::exp when compiled without AVX2 or with
// scalar=true. qru::Team over rows, torch's thread count.
#include "qru_common.h"

#include <limits>

namespace {

using namespace qru;

inline float exp1(float x) { return x < kExpLo ? 0.0f : std::exp(std::min(x, kExpHi)); }

template <typename T>
float row_max(const T* z, int64_t V, bool scalar) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
#if QRU_AVX2
  if (!scalar && V >= 8) {
    __m256 acc = _mm256_set1_ps(m);
    for (; v + 8 <= V; v += 8) acc = _mm256_max_ps(acc, load8(z + v));
    m = hmax(acc);
  }
#endif
  for (; v < V; ++v) m = std::max(m, ld(z, v));
  return m;
}

// sum_v exp(z[v] - m); with WRITE, z[v] <- exp(z[v] - m) on the way (fp32 rows only).
template <typename T, bool WRITE>
float row_expsum(T* z, int64_t V, float m, bool scalar) {
  float s = 0.0f;
  int64_t v = 0;
#if QRU_AVX2
  if (!scalar) {
    __m256 acc = _mm256_setzero_ps(), mm = _mm256_set1_ps(m);
    for (; v + 8 <= V; v += 8) {
      __m256 e = exp256(_mm256_sub_ps(load8(z + v), mm));
      if constexpr (WRITE) store8(z + v, e);
      acc = _mm256_add_ps(acc, e);
    }
    s = hsum(acc);
    for (; v < V; ++v) {  // same polynomial for the tail
      alignas(32) float t[8] = {ld(z, v) - m, 0, 0, 0, 0, 0, 0, 0};
      __m256 e = exp256(_mm256_load_ps(t));
      float ev = _mm256_cvtss_f32(e);
      if constexpr (WRITE) st(z, v, ev);
      s += ev;
    }
    return s;
  }
#endif
  for (; v < V; ++v) {
    float e = exp1(ld(z, v) - m);
    if constexpr (WRITE) st(z, v, e);
    s += e;
  }
  return s;
}

// z[v] <- a * exp(z[v] - c)  (EXP) or  z[v] <- a * z[v]  (!EXP), then z[y] += b.
template <typename T, bool EXP>
void row_scale(T* z, int64_t V, float c, float a, bool scalar) {
  int64_t v = 0;
#if QRU_AVX2
  if (!scalar) {
    __m256 cc = _mm256_set1_ps(c), aa = _mm256_set1_ps(a);
    for (; v + 8 <= V; v += 8) {
      __m256 x = load8(z + v);
      if constexpr (EXP) x = exp256(_mm256_sub_ps(x, cc));
      store8(z + v, _mm256_mul_ps(aa, x));
    }
    for (; v < V; ++v) {
      float x = ld(z, v);
      if constexpr (EXP) {
        alignas(32) float t[8] = {x - c, 0, 0, 0, 0, 0, 0, 0};
        x = _mm256_cvtss_f32(exp256(_mm256_load_ps(t)));
      }
      st(z, v, a * x);
    }
    return;
  }
#endif
  for (; v < V; ++v) {
    float x = ld(z, v);
    if constexpr (EXP) x = exp1(x - c);
    st(z, v, a * x);
  }
}

template <typename T>
void zero_row(T* z, int64_t V) { std::memset(static_cast<void*>(z), 0, sizeof(T) * size_t(V)); }

void check(const at::Tensor& z, const at::Tensor& y) {
  TORCH_CHECK(z.device().is_cpu() && y.device().is_cpu(), "linear_logprobs cpp: tensors must be on the CPU");
  TORCH_CHECK(z.dim() == 2 && z.stride(1) == 1, "linear_logprobs cpp: z must be 2-D with unit column stride");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "linear_logprobs cpp: z must be float32 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == z.size(0) && y.is_contiguous(),
              "linear_logprobs cpp: y must be contiguous int64 of length ", z.size(0));
}

template <typename T>
void lse_gather_impl(T* z, int64_t ld_z, const int64_t* y, float* lse, float* logp, int64_t N, int64_t V,
                     int64_t ignore, bool dlogits, bool scalar) {
  parallel_work(N, 1, N * V, [&](int64_t n) {
    T* row = z + n * ld_z;
    const float m = row_max(row, V, scalar);
    const int64_t t = y[n];
    const bool valid = t != ignore;
    const float zt = valid ? ld(row, t) : 0.0f;
    float s;
    if (dlogits && std::is_same<T, float>::value)
      s = row_expsum<T, true>(row, V, m, scalar);  // row <- exp(z - m)
    else
      s = row_expsum<T, false>(row, V, m, scalar);
    const float l = m + std::log(s);
    lse[n] = l;
    logp[n] = valid ? zt - l : 0.0f;
    if (!dlogits) return;
    if (!valid) { zero_row(row, V); return; }
    if (std::is_same<T, float>::value)
      row_scale<T, false>(row, V, 0.0f, -1.0f / s, scalar);  // -softmax
    else
      row_scale<T, true>(row, V, l, -1.0f, scalar);
    st(row, t, ld(row, t) + 1.0f);
  });
}

std::tuple<at::Tensor, at::Tensor> lse_gather(at::Tensor z, at::Tensor y, int64_t ignore, bool dlogits, bool scalar) {
  check(z, y);
  const int64_t N = z.size(0), V = z.size(1);
  at::Tensor lse = at::empty({N}, at::kFloat), logp = at::empty({N}, at::kFloat);
  if (z.scalar_type() == at::kFloat)
    lse_gather_impl<float>(z.data_ptr<float>(), z.stride(0), y.data_ptr<int64_t>(), lse.data_ptr<float>(),
                           logp.data_ptr<float>(), N, V, ignore, dlogits, scalar);
  else
    lse_gather_impl<uint16_t>(reinterpret_cast<uint16_t*>(z.data_ptr<at::BFloat16>()), z.stride(0),
                              y.data_ptr<int64_t>(), lse.data_ptr<float>(), logp.data_ptr<float>(), N, V, ignore,
                              dlogits, scalar);
  return {lse, logp};
}

template <typename T>
void dlogits_impl(T* z, int64_t ld_z, const int64_t* y, const float* lse, const float* g, int64_t N, int64_t V,
                  int64_t ignore, bool scalar) {
  parallel_work(N, 1, N * V, [&](int64_t n) {
    T* row = z + n * ld_z;
    const int64_t t = y[n];
    if (t == ignore || g[n] == 0.0f) { zero_row(row, V); return; }
    row_scale<T, true>(row, V, lse[n], -g[n], scalar);
    st(row, t, ld(row, t) + g[n]);
  });
}

at::Tensor dlogits_(at::Tensor z, at::Tensor y, at::Tensor lse, at::Tensor g, int64_t ignore, bool scalar) {
  check(z, y);
  const int64_t N = z.size(0), V = z.size(1);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == N, "lse: float32 (N,)");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.numel() == N, "g: float32 (N,)");
  if (z.scalar_type() == at::kFloat)
    dlogits_impl<float>(z.data_ptr<float>(), z.stride(0), y.data_ptr<int64_t>(), lse.data_ptr<float>(),
                        g.data_ptr<float>(), N, V, ignore, scalar);
  else
    dlogits_impl<uint16_t>(reinterpret_cast<uint16_t*>(z.data_ptr<at::BFloat16>()), z.stride(0),
                           y.data_ptr<int64_t>(), lse.data_ptr<float>(), g.data_ptr<float>(), N, V, ignore, scalar);
  return z;
}

}  // namespace

TORCH_LIBRARY(qru_linear_logprobs, m) {
  // (lse, logp) per row; with dlogits, z <- e_y - softmax(z) in place
  m.def("lse_gather(Tensor(a!) z, Tensor y, int ignore_index, bool dlogits=False, bool scalar=False) -> (Tensor, Tensor)",
        &lse_gather);
  // z <- g (e_y - exp(z - lse)) in place
  m.def("dlogits_(Tensor(a!) z, Tensor y, Tensor lse, Tensor g, int ignore_index, bool scalar=False) -> Tensor(a!)",
        &dlogits_);
}
