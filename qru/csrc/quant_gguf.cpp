// CPU kernels for qru.kernels.quant_gguf: llama.cpp's block formats q8_0, q4_0, q4_1, q5_0, q5_1,
// q4_k and mxfp4, quantize (to llama.cpp's block structs, byte for byte) and dequantize.
//
// Bit-identical to the torch reference: the arithmetic is ggml-quants.c's reference code, every
// fp32 operation in source order (FMA contraction is switched off below). Flat input, cut into blocks of
// 32 (q4_k: 256) elements, the last one zero-padded. Parallel over blocks on qru::Team (qru_common.h), thread count = torch's.
#include "qru_common.h"

// g++ contracts a * b + c into an FMA under -march=native even in C++17 mode; ggml's reference
// results need every product rounded on its own.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "gguf_blocks.h"  // after the pragma: its block math must not contract either

namespace {

using namespace qru;
using namespace qru::gguf;

constexpr int kBlock[7] = {32, 32, 32, 32, 32, 256, 32};
constexpr int kTypeSize[7] = {34, 18, 20, 22, 24, 144, 17};

inline void put16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v & 255); p[1] = uint8_t(v >> 8); }
inline uint16_t get16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

// ggml's nearest_int: round half to even for |v| <= 2**22.
inline int nearest_int(float fval) {
  const float val = fval + 12582912.f;
  return int(f2u(val) & 0x007fffff) - 0x00400000;
}

void pack_halves(const int* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = uint8_t((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

void quant_q8_0(const float* x, uint8_t* y) {
  int q[32];
  put16(y, f32_to_half(q8_0_codes(x, q)));
  for (int j = 0; j < 32; ++j) y[2 + j] = uint8_t(int8_t(q[j]));
}

// the fifth bits of q5_0 / q5_1's codes, then their low nibbles
void pack_codes(const int* q, uint8_t* y, bool five) {
  if (five) {
    uint32_t qh = 0;
    for (int j = 0; j < 32; ++j) qh |= uint32_t((q[j] >> 4) & 1) << j;
    for (int k = 0; k < 4; ++k) y[k] = uint8_t((qh >> (8 * k)) & 255);
    y += 4;
  }
  pack_halves(q, y);
}

void quant_q_0(const float* x, uint8_t* y, bool five) {
  int q[32];
  put16(y, f32_to_half(q_0_codes(x, five, q)));
  pack_codes(q, y + 2, five);
}

void quant_q_1(const float* x, uint8_t* y, bool five) {
  int q[32];
  float mn;
  put16(y, f32_to_half(q_1_codes(x, five, &mn, q)));
  put16(y + 2, f32_to_half(mn));
  pack_codes(q, y + 4, five);
}

void quant_mxfp4(const float* x, uint8_t* y, const int32_t* thr) {
  int q[32];
  y[0] = uint8_t(mxfp4_codes(x, thr, q));
  pack_halves(q, y + 1);
}

// ggml's make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad = false).
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    const float wx = w * x[i];
    sum_x += wx;
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = float(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = uint8_t(std::max(0, std::min(nmax, l)));
    const float sl = scale * L[i];
    float diff = sl + min - x[i];
    diff = diff * diff;
    const float wd = weights[i] * diff;
    best_error += wd;
  }
  for (int is = 0; is <= nstep; ++is) {
    const float rs = rdelta * float(is);
    const float num = rmin + rs + float(nmax);
    iscale = num / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = uint8_t(l);
      const float wl = weights[i] * float(l);
      sum_l += wl;
      const float wll = wl * float(l);
      sum_l2 += wll;
      const float wlx = wl * x[i];
      sum_xl += wlx;
    }
    const float p1 = sum_w * sum_l2, p2 = sum_l * sum_l;
    const float D = p1 - p2;
    if (D > 0) {
      const float a1 = sum_w * sum_xl, a2 = sum_x * sum_l;
      float this_scale = (a1 - a2) / D;
      const float b1 = sum_l2 * sum_x, b2 = sum_l * sum_xl;
      float this_min = (b1 - b2) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        const float sl = this_scale * float(Laux[i]);
        float diff = sl + this_min - x[i];
        diff = diff * diff;
        const float wd = weights[i] * diff;
        cur_error += wd;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// ggml's quantize_row_q4_K_ref for one 256-element super-block.
void quant_q4_k(const float* x, uint8_t* y) {
  uint8_t L[256], Laux[32];
  float weights[32], mins[8], scales[8];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) { const float sq = x[32 * j + l] * x[32 * j + l]; sum_x2 += sq; }
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t* sc = y + 4;
  uint8_t ls_[8], lm_[8];
  for (int j = 0; j < 8; ++j) {
    uint8_t ls = uint8_t(nearest_int(inv_scale * scales[j]));
    uint8_t lm = uint8_t(nearest_int(inv_min * mins[j]));
    ls = std::min<uint8_t>(63, ls);
    lm = std::min<uint8_t>(63, lm);
    ls_[j] = ls;
    lm_[j] = lm;
    if (j < 4) {
      sc[j] = ls;
      sc[j + 4] = lm;
    } else {
      sc[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
      sc[j - 4] |= uint8_t((ls >> 4) << 6);
      sc[j - 0] |= uint8_t((lm >> 4) << 6);
    }
  }
  const uint16_t dh = f32_to_half(max_scale / 63.f), mh = f32_to_half(max_min / 63.f);
  put16(y, dh);
  put16(y + 2, mh);
  for (int j = 0; j < 8; ++j) {
    const float d = half_to_f32(dh) * float(ls_[j]);
    if (!(d != 0.0f)) continue;
    const float dm = half_to_f32(mh) * float(lm_[j]);
    for (int ii = 0; ii < 32; ++ii) {
      int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = uint8_t(std::max(0, std::min(15, l)));
    }
  }
  uint8_t* q = y + 16;
  for (int j = 0; j < 256; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = uint8_t(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

template <int DT>
void quantize_impl(const void* x, int64_t n, int kind, const int32_t* thr, uint8_t* out) {
  const int B = kBlock[kind], TS = kTypeSize[kind];
  const int64_t nb = (n + B - 1) / B;
  parallel_items(nb, 64, [&](int64_t b) {
    float buf[256];
    const int64_t start = b * B, len = std::min<int64_t>(B, n - start);
    for (int64_t i = 0; i < len; ++i) buf[i] = load_f32<DT>(x, start + i);
    for (int64_t i = len; i < B; ++i) buf[i] = 0.0f;  // the zero padding of a partial last block
    uint8_t* y = out + b * TS;
    switch (kind) {
      case Q8_0: quant_q8_0(buf, y); break;
      case Q4_0: quant_q_0(buf, y, false); break;
      case Q5_0: quant_q_0(buf, y, true); break;
      case Q4_1: quant_q_1(buf, y, false); break;
      case Q5_1: quant_q_1(buf, y, true); break;
      case Q4_K: quant_q4_k(buf, y); break;
      default: quant_mxfp4(buf, y, thr); break;
    }
  });
}

at::Tensor quantize(const at::Tensor& x, int64_t kind, const at::Tensor& thr) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(kind >= 0 && kind <= 6, "unknown GGUF format ", kind);
  TORCH_CHECK(thr.scalar_type() == at::kInt && thr.numel() == 256 && thr.is_contiguous(), "thr must be int32[256]");
  const int dt = dtype_code(x.scalar_type(), "x");
  const int64_t n = x.numel();
  const int k = int(kind);
  auto out = at::empty({(n + kBlock[k] - 1) / kBlock[k] * kTypeSize[k]}, x.options().dtype(at::kByte));
  const int32_t* t = thr.data_ptr<int32_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  if (dt == F32) quantize_impl<F32>(x.data_ptr(), n, k, t, o);
  else if (dt == BF16) quantize_impl<BF16>(x.data_ptr(), n, k, t, o);
  else quantize_impl<F16>(x.data_ptr(), n, k, t, o);
  return out;
}

// One block -> B fp32 values, in the order and rounding of ggml's dequantize_row_* (= gguf.quants).
void dequant_block(const uint8_t* y, int kind, float* v) {
  if (kind == Q8_0) {
    const float d = half_to_f32(get16(y));
    for (int j = 0; j < 32; ++j) v[j] = float(int8_t(y[2 + j])) * d;
    return;
  }
  if (kind == MXFP4) {
    const float d = e8m0_half(y[0]);
    for (int j = 0; j < 16; ++j) {
      v[j] = d * float(kMxfp4[y[1 + j] & 15]);
      v[j + 16] = d * float(kMxfp4[y[1 + j] >> 4]);
    }
    return;
  }
  if (kind == Q4_K) {
    const float d = half_to_f32(get16(y)), dmin = half_to_f32(get16(y + 2));
    const uint8_t* s = y + 4;
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      if (j < 4) { sc = s[j] & 63; m = s[j + 4] & 63; }
      else { sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
      const float d1 = d * float(sc), m1 = dmin * float(m);
      const uint8_t* q = y + 16 + (j / 2) * 32;
      for (int l = 0; l < 32; ++l) {
        const int c = (j & 1) ? (q[l] >> 4) : (q[l] & 15);
        const float p = d1 * float(c);
        v[32 * j + l] = p - m1;
      }
    }
    return;
  }
  const float d = half_to_f32(get16(y));
  const bool one = kind == Q4_1 || kind == Q5_1, five = kind == Q5_0 || kind == Q5_1;
  const float m = one ? half_to_f32(get16(y + 2)) : 0.0f;
  int off = one ? 4 : 2;
  uint32_t qh = 0;
  if (five) {
    qh = uint32_t(y[off]) | (uint32_t(y[off + 1]) << 8) | (uint32_t(y[off + 2]) << 16) | (uint32_t(y[off + 3]) << 24);
    off += 4;
  }
  for (int j = 0; j < 32; ++j) {
    int q = j < 16 ? (y[off + j] & 15) : (y[off + j - 16] >> 4);
    if (five) q |= int((qh >> j) & 1) << 4;
    if (one) {
      const float p = d * float(q);
      v[j] = p + m;
    } else {
      v[j] = d * float(q - (five ? 16 : 8));
    }
  }
}

template <int DT>
void dequantize_impl(const uint8_t* data, int64_t n, int kind, void* out) {
  const int B = kBlock[kind], TS = kTypeSize[kind];
  const int64_t nb = (n + B - 1) / B;
  parallel_items(nb, 64, [&](int64_t b) {
    float v[256];
    dequant_block(data + b * TS, kind, v);
    const int64_t start = b * B, len = std::min<int64_t>(B, n - start);
    for (int64_t i = 0; i < len; ++i) store_f32<DT>(out, start + i, v[i]);
  });
}

at::Tensor dequantize(const at::Tensor& data, int64_t kind, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(data.device().is_cpu() && data.is_contiguous() && data.scalar_type() == at::kByte,
              "data must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(kind >= 0 && kind <= 6, "unknown GGUF format ", kind);
  const int k = int(kind);
  const int64_t nb = (n + kBlock[k] - 1) / kBlock[k];
  TORCH_CHECK(data.numel() == nb * kTypeSize[k], "data has ", data.numel(), " bytes, expected ", nb * kTypeSize[k]);
  const int dt = dtype_code(dtype, "dtype");
  auto out = at::empty({n}, data.options().dtype(dtype));
  const uint8_t* d = data.data_ptr<uint8_t>();
  if (dt == F32) dequantize_impl<F32>(d, n, k, out.data_ptr());
  else if (dt == BF16) dequantize_impl<BF16>(d, n, k, out.data_ptr());
  else dequantize_impl<F16>(d, n, k, out.data_ptr());
  return out;
}

}  // namespace

TORCH_LIBRARY(qru_quant_gguf, m) {
  // flat bf16/fp16/fp32 -> flat uint8 llama.cpp blocks (kind: q8_0 q4_0 q4_1 q5_0 q5_1 q4_k mxfp4)
  m.def("quantize(Tensor x, int kind, Tensor thr) -> Tensor", &quantize);
  // flat uint8 blocks -> flat tensor of n elements
  m.def("dequantize(Tensor data, int kind, int n, ScalarType dtype) -> Tensor", &dequantize);
}
