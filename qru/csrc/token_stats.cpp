// Per-row statistics of a next-token distribution, for membership scores (qru.kernels.token_stats):
//
//   token_stats(z (N, V), y (N,), scalar)  ->  (lp, mu, var), each (N,) fp32
//     lse = log sum_v exp z_v,  lp = z_y - lse,  p_v = exp(z_v - lse)
//     mu  = sum_v p_v (z_v - lse)                (the mean log-prob, -entropy)
//     var = sum_v p_v (z_v - lse - mu)^2         (two-pass: no E[x^2] - E[x]^2 cancellation)
//
// z float32 or bfloat16 (widened exactly), all math fp32. One row at a time while it sits in L1/L2:
// max; exp(z - max) into a row buffer with its sum and first moment; the centred second moment.
// AVX-512 lanes (exp512) when built for it, plain loops with scalar=true or otherwise. qru::Team over rows.
#include "qru_common.h"

#include <limits>

namespace {

using namespace qru;

// Returns (lp, mu, var) of one row; e: scratch of V floats.
template <typename T>
void row_stats(const T* z, int64_t V, int64_t y, float* e, bool scalar, float* lp, float* mu, float* var) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
#if QRU_AVX512
  if (!scalar) {
    __m512 mv = _mm512_set1_ps(m);
    for (; i + 16 <= V; i += 16) mv = _mm512_max_ps(mv, wide16(z + i));
    m = _mm512_reduce_max_ps(mv);
  }
#endif
  for (; i < V; ++i) m = std::max(m, ld(z, i));
  float a = 0.0f, b = 0.0f;  // sum e, sum e (z - m)
  i = 0;
#if QRU_AVX512
  if (!scalar) {
    const __m512 mm = _mm512_set1_ps(m);
    __m512 av = _mm512_setzero_ps(), bv = _mm512_setzero_ps();
    for (; i + 16 <= V; i += 16) {
      const __m512 d = _mm512_sub_ps(wide16(z + i), mm);
      const __m512 ev = exp512(d);
      _mm512_storeu_ps(e + i, ev);
      av = _mm512_add_ps(av, ev);
      bv = _mm512_fmadd_ps(ev, d, bv);
    }
    a = _mm512_reduce_add_ps(av);
    b = _mm512_reduce_add_ps(bv);
  }
#endif
  for (; i < V; ++i) {
    const float d = ld(z, i) - m;
    e[i] = std::exp(d);
    a += e[i];
    b += e[i] * d;
  }
  const float c = b / a;  // E_p[z - m]
  float s2 = 0.0f;
  i = 0;
#if QRU_AVX512
  if (!scalar) {
    const __m512 mc = _mm512_set1_ps(m + c);
    __m512 sv = _mm512_setzero_ps();
    for (; i + 16 <= V; i += 16) {
      const __m512 d = _mm512_sub_ps(wide16(z + i), mc);
      sv = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(e + i), d), d, sv);
    }
    s2 = _mm512_reduce_add_ps(sv);
  }
#endif
  for (; i < V; ++i) {
    const float d = ld(z, i) - (m + c);
    s2 += e[i] * d * d;
  }
  const float la = std::log(a);
  *lp = ld(z, y) - m - la;
  *mu = c - la;
  *var = s2 / a;
}

template <typename T>
void run(const at::Tensor& z, const int64_t* y, float* lp, float* mu, float* var, bool scalar) {
  const int64_t N = z.size(0), V = z.size(1), rs = z.stride(0);
  const T* zp = reinterpret_cast<const T*>(z.data_ptr());
  struct TagE;
  parallel_work(N, 1, N * V, [&](int64_t n) {
    row_stats(zp + n * rs, V, y[n], scratch<TagE>(V), scalar, lp + n, mu + n, var + n);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats(at::Tensor z, at::Tensor y, bool scalar) {
  TORCH_CHECK(z.device().is_cpu() && y.device().is_cpu(), "token_stats: CPU tensors needed");
  TORCH_CHECK(z.dim() == 2 && z.stride(1) == 1, "token_stats: logits must be (N, V) with unit last stride, got ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "token_stats: logits must be float32 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == z.size(0) && y.is_contiguous(),
              "token_stats: targets must be a contiguous int64 (N,) for logits ", z.sizes());
  TORCH_CHECK(z.size(1) > 0, "token_stats: empty vocabulary");
  const int64_t N = z.size(0), V = z.size(1);
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(yp[n] >= 0 && yp[n] < V, "token_stats: target ", yp[n], " of row ", n, " outside [0, ", V, ")");
  auto opts = z.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({N}, opts), mu = at::empty({N}, opts), var = at::empty({N}, opts);
  if (z.scalar_type() == at::kFloat)
    run<float>(z, yp, lp.data_ptr<float>(), mu.data_ptr<float>(), var.data_ptr<float>(), scalar);
  else
    run<uint16_t>(z, yp, lp.data_ptr<float>(), mu.data_ptr<float>(), var.data_ptr<float>(), scalar);
  return {lp, mu, var};
}

}  // namespace

TORCH_LIBRARY(qru_token_stats, m) {
  m.def("token_stats(Tensor logits, Tensor targets, bool scalar=False) -> (Tensor, Tensor, Tensor)", &token_stats);
}
