// CPU kernels for qru.kernels.fake_quant: W_q = dequantize(quantize(W)) in one pass, per block,
// with no packed intermediate. Optionally (LoRA mode) the block's values are first merged:
// x = W + s * sum_k B[i, k] * A[k, j] (fp32, k in order, each product and sum rounded), so that the
// fp32 merged layer never exists as a whole.
//
// Bit-identical to quantize + dequantize of csrc/quant.cpp and csrc/quant_gguf.cpp (and the torch
// references): the same fp32 operations in the same order, FMA contraction off. Formats: nf4 / fp4
// (flat blocks, bitsandbytes' partial-block arithmetic), int4 / int4_sym / int8 (groups along the
// rows), and the 32-element GGUF blocks q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4 (flat, zero-padded).
// Parallel over blocks on qru::Team (qru_common.h), thread count = torch's.
#include "qru_common.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "gguf_blocks.h"  // after the pragma: its block math must not contract either

namespace {

using namespace qru;

constexpr uint32_t kTinyBits = 0x006CE3EEu;  // fp32(1e-38), bitsandbytes' divisor clamp
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;

inline float half_round(float v) { return half_to_f32(c10::Half(v).x); }


// The LoRA factors (fp32, contiguous): B [rows, rank], A [rank, cols]; null for plain fake-quant.
struct Lora {
  const float* a;
  const float* b;
  int64_t rank;
  float s;
};

// x[0:len] = the (merged) fp32 values of flat elements start .. start + len of W [rows, cols]. LoRA: per
// row segment of the block, acc[j] += B[r, k] * A[k, c + j] for k ascending (contiguous in j, so it
// vectorizes; each element's sum still runs over k in order), then x = w + s * acc. acc: scratch [len].
template <int DT>
inline void fill(const void* w, int64_t start, int64_t len, int64_t cols, const Lora* L, float* x, float* acc) {
  for (int64_t i = 0; i < len; ++i) x[i] = load_f32<DT>(w, start + i);
  if (L == nullptr) return;
  for (int64_t i = 0; i < len;) {
    const int64_t e = start + i, r = e / cols, c = e % cols, seg = std::min(len - i, cols - c);
    float* ac = acc + i;
    for (int64_t j = 0; j < seg; ++j) ac[j] = 0.0f;
    for (int64_t k = 0; k < L->rank; ++k) {
      const float bk = L->b[r * L->rank + k];
      const float* ak = L->a + k * cols + c;
      for (int64_t j = 0; j < seg; ++j) {
        const float p = bk * ak[j];
        ac[j] = ac[j] + p;
      }
    }
    for (int64_t j = 0; j < seg; ++j) {
      const float d = L->s * ac[j];
      x[i + j] = x[i + j] + d;
    }
    i += seg;
  }
}

// ================================================================ NF4 / FP4

// values[pos] = code[order[pos]]: the dequantized code of sorted position pos
struct Q4Tables {
  float bounds[15];
  float values[16];
};

void fq_q4(const float* x, int64_t len, bool partial, const Q4Tables& t, float* v) {
  uint32_t m = 0;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, f2u(x[i]) & kAbsMask);
  const float amc = u2f(std::max(m, kTinyBits));
  const float am = partial ? amc : u2f(m);  // the stored absmax
  const float recip = 1.0f / amc;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float s = std::min(std::max(partial ? x[i] / amc : x[i] * recip, -1.0f), 1.0f);
    // the number of midpoints below s (ascending bounds): a branch-free binary search
    int pos = s > t.bounds[7] ? 8 : 0;
    pos += s > t.bounds[pos + 3] ? 4 : 0;
    pos += s > t.bounds[pos + 1] ? 2 : 0;
    pos += s > t.bounds[pos] ? 1 : 0;
    v[i] = t.values[pos] * am;
  }
}

// ================================================================ int4 / int4_sym / int8

enum IntKind { INT4 = 0, INT4_SYM = 1, INT8 = 2 };

void fq_int(const float* x, int64_t len, int kind, float eps, float* v) {
  uint32_t am = 0;
  float mx = -INFINITY, mn = INFINITY;
  for (int64_t i = 0; i < len; ++i) {
    am = std::max(am, f2u(x[i]) & kAbsMask);
    mx = std::max(mx, x[i]);
    mn = std::min(mn, x[i]);
  }
  if (am >= kInfBits) {
    for (int64_t i = 0; i < len; ++i) v[i] = NAN;
    return;
  }
  if (kind == INT4) {
    const float scale = std::max(mx - mn, eps) / 15.0f;
    const float zero = std::min(std::max(std::rint(-mn / scale), 0.0f), 15.0f);
    const int z = int(zero);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const int c = int(std::min(std::max(std::rint(x[i] / scale) + zero, 0.0f), 15.0f));
      v[i] = float(c - z) * scale;
    }
    return;
  }
  const float qmax = kind == INT4_SYM ? 7.0f : 127.0f;
  const float scale = u2f(am) / qmax;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float q = scale > 0.0f ? std::min(std::max(std::rint(x[i] / scale), -qmax), qmax) : 0.0f;
    v[i] = float(int(q)) * scale;
  }
}

// ================================================================ GGUF 32-element blocks

using namespace qru::gguf;

// x: 32 values (a partial last block zero-padded), v: their fake-quantized values: the codes of
// gguf_blocks.h, decoded as quant_gguf.cpp's dequantize does (scales rounded to fp16).
void fq_gguf(const float* x, int kind, const int32_t* thr, float* v) {
  int q[32];
  if (kind == Q8_0) {
    const float dh = half_round(q8_0_codes(x, q));
    for (int j = 0; j < 32; ++j) v[j] = float(q[j]) * dh;
    return;
  }
  if (kind == MXFP4) {
    const float d = e8m0_half(mxfp4_codes(x, thr, q));
    for (int j = 0; j < 32; ++j) v[j] = d * float(kMxfp4[q[j]]);
    return;
  }
  const bool five = kind == Q5_0 || kind == Q5_1;
  if (kind == Q4_0 || kind == Q5_0) {
    const float dh = half_round(q_0_codes(x, five, q));
    for (int j = 0; j < 32; ++j) v[j] = dh * float(q[j] - (five ? 16 : 8));
    return;
  }
  float mn;
  const float dh = half_round(q_1_codes(x, five, &mn, q)), mh = half_round(mn);
  for (int j = 0; j < 32; ++j) {
    const float p = dh * float(q[j]);
    v[j] = p + mh;
  }
}

// ================================================================ drivers

// family: 0 = nf4/fp4 (param: block size), 1 = int (param: group; kind 0..2), 2 = gguf (kind)
template <int DT>
void fq_impl(const void* w, int64_t rows, int64_t cols, int family, int kind, int64_t block, const Q4Tables* q4,
             float eps, const int32_t* thr, const Lora* L, void* out) {
  const int64_t n = rows * cols;
  if (family == 1) {
    const int64_t g = block, groups = (cols + g - 1) / g;
    parallel_items(rows * groups, 16, [&](int64_t u) {
      thread_local std::vector<float> x, v, acc;  // per-thread scratch, kept across calls
      x.resize(g), v.resize(g), acc.resize(L != nullptr ? g : 0);
      const int64_t r = u / groups, c0 = (u % groups) * g, len = std::min(g, cols - c0), start = r * cols + c0;
      fill<DT>(w, start, len, cols, L, x.data(), acc.data());
      fq_int(x.data(), len, kind, eps, v.data());
      for (int64_t i = 0; i < len; ++i) store_f32<DT>(out, start + i, v[i]);
    });
    return;
  }
  const int64_t B = family == 0 ? block : 32;
  const int64_t nb = (n + B - 1) / B;
  parallel_items(nb, 16, [&](int64_t b) {
    thread_local std::vector<float> x, v, acc;  // per-thread scratch, kept across calls
    x.resize(B), v.resize(B), acc.resize(L != nullptr ? B : 0);
    const int64_t start = b * B, len = std::min(B, n - start);
    fill<DT>(w, start, len, cols, L, x.data(), acc.data());
    if (family == 0) {
      fq_q4(x.data(), len, len < B, *q4, v.data());
    } else {
      for (int64_t i = len; i < B; ++i) x[i] = 0.0f;  // the zero padding of a partial last block
      fq_gguf(x.data(), kind, thr, v.data());
    }
    for (int64_t i = 0; i < len; ++i) store_f32<DT>(out, start + i, v[i]);
  });
}

at::Tensor fake_quant_impl(const at::Tensor& w, int64_t cols, int64_t family, int64_t kind, int64_t block,
                           const at::Tensor& table, const at::Tensor& thr, double eps, const Lora* L) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "w must be a contiguous CPU tensor");
  const int dt = dtype_code(w.scalar_type(), "w");
  TORCH_CHECK(family >= 0 && family <= 2, "unknown format family ", family);
  TORCH_CHECK(cols > 0 && w.numel() % cols == 0, "cols ", cols, " does not divide numel ", w.numel());
  TORCH_CHECK(family == 2 ? (kind >= 0 && kind <= 6 && kind != Q4_K) : (block > 0), "bad kind / block");
  TORCH_CHECK(family != 1 || (kind >= 0 && kind <= 2), "unknown int kind ", kind);
  Q4Tables q4{};
  if (family == 0) {
    TORCH_CHECK(table.numel() == 31 && table.scalar_type() == at::kFloat, "table: 15 bounds + 16 values, fp32");
    const float* t = table.contiguous().data_ptr<float>();
    for (int k = 0; k < 15; ++k) q4.bounds[k] = t[k];
    for (int k = 0; k < 16; ++k) q4.values[k] = t[15 + k];
  }
  const int32_t* th = nullptr;
  at::Tensor thr_c;
  if (family == 2 && kind == MXFP4) {
    thr_c = thr.contiguous();
    TORCH_CHECK(thr_c.numel() == 256 && thr_c.scalar_type() == at::kInt, "thr must be int32[256]");
    th = thr_c.data_ptr<int32_t>();
  }
  auto out = at::empty_like(w);
  const int64_t rows = w.numel() / cols;
  const int f = int(family), k = int(kind);
  const float e = float(eps);
  if (dt == F32) fq_impl<F32>(w.data_ptr(), rows, cols, f, k, block, &q4, e, th, L, out.data_ptr());
  else if (dt == BF16) fq_impl<BF16>(w.data_ptr(), rows, cols, f, k, block, &q4, e, th, L, out.data_ptr());
  else fq_impl<F16>(w.data_ptr(), rows, cols, f, k, block, &q4, e, th, L, out.data_ptr());
  return out;
}

at::Tensor fake_quant(const at::Tensor& w, int64_t cols, int64_t family, int64_t kind, int64_t block,
                      const at::Tensor& table, const at::Tensor& thr, double eps) {
  return fake_quant_impl(w, cols, family, kind, block, table, thr, eps, nullptr);
}

at::Tensor fake_quant_lora(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s, int64_t family,
                           int64_t kind, int64_t block, const at::Tensor& table, const at::Tensor& thr, double eps) {
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [out, in]");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.is_contiguous() &&
                  b.is_contiguous() && a.device().is_cpu() && b.device().is_cpu(),
              "a and b must be contiguous fp32 CPU tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == w.size(1) && b.size(0) == w.size(0) &&
                  a.size(0) == b.size(1),
              "shapes: w [out, in], a [r, in], b [out, r]");
  const Lora L{a.data_ptr<float>(), b.data_ptr<float>(), a.size(0), float(s)};
  return fake_quant_impl(w, w.size(1), family, kind, block, table, thr, eps, &L);
}

}  // namespace

TORCH_LIBRARY(qru_fake_quant, m) {
  // dequantize(quantize(w)) of flat w viewed as [numel / cols, cols], in w's dtype.
  // family 0: nf4/fp4 (block; table = 15 bounds + 16 sorted values); 1: int4/int4_sym/int8 (kind 0..2,
  // block = group, the row length for int8); 2: GGUF 32-blocks (kind as qru.kernels.quant_gguf.KIND, not q4_k)
  m.def("fake_quant(Tensor w, int cols, int family, int kind, int block, Tensor table, Tensor thr, float eps) "
        "-> Tensor", &fake_quant);
  // the same of w + s * b @ a, merged block by block (a [r, in], b [out, r] fp32)
  m.def("fake_quant_lora(Tensor w, Tensor a, Tensor b, float s, int family, int kind, int block, Tensor table, "
        "Tensor thr, float eps) -> Tensor", &fake_quant_lora);
}
