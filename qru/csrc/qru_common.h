// Shared prelude of the qru CPU kernels (csrc/*.cpp): the few ATen headers they need, the SIMD
// feature macros, and the scalar / AVX2 helpers every file used to repeat.
//
// Headers are deliberately narrow: <torch/extension.h> pulls in the whole C++ frontend and
// pybind11 (~23 s of parsing per translation unit with g++ -O3); these take ~4 s. The ops are
// registered with TORCH_LIBRARY (schema strings, so keyword arguments and defaults work from
// Python as ``torch.ops.qru_<file>.<op>``) instead of a pybind11 module.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QRU_AVX2 1
#else
#define QRU_AVX2 0
#endif
#if QRU_AVX2 && defined(__F16C__)
#define QRU_AVX2_F16C 1
#else
#define QRU_AVX2_F16C 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QRU_AVX512 1
#else
#define QRU_AVX512 0
#endif
#if QRU_AVX512 && defined(__AVX512BF16__)
#define QRU_AVX512_BF16 1  // vdpbf16ps: bf16 pair dot products into fp32 lanes
#else
#define QRU_AVX512_BF16 0
#endif

namespace qru {

// Team size: torch's intra-op thread count (torch.set_num_threads), at least 1.
inline int num_threads() { return std::max(1, at::get_num_threads()); }

// The team every parallel qru kernel runs on, so that none stalls on a busy machine.
// An OpenMP region ends when its last thread arrives, so a thread that another job keeps off its
// core, even one that never started, holds up the caller, and libgomp's idle threads spin. Here
// workers wait passively (condition variable), take chunks of items from a shared counter, and only
// the workers that joined a job before it closed are waited for: a late one finds it closed and goes
// back to sleep. The caller works too. One team per process, created on first use and never torn
// down (the threads sleep): Team::get's statics are unique symbols, shared by every extension built
// from this header (so builds from different versions of it must not share a process; the build
// flags carry the header's hash, see _backend._common_header_tag, so qru's own never do). Which
// items a thread runs never changes a result.
// Small jobs: waking a sleeping thread (futex, and on a VM an IPI to an idle vCPU) takes tens of
// microseconds, as long as a whole 1M-value kernel. So both sides wait briefly before sleeping, each
// bounded by kSpinUs: a worker that finished a job watches for the next one (back-to-back calls skip
// the wake-up), and the caller watches for the joined workers' last chunks (a chunk is a few
// microseconds) instead of sleeping and being woken. The wait yields the core between looks (to
// another job, or to a worker placed on the same core) and ends within kSpinUs; no one waits for a
// worker that never joined.
// Fork-safe: a forked child has none of the parent's workers (and maybe a mutex some thread held),
// so a pthread_atfork handler gives the child a fresh team, whose workers it starts on first use.
class Team {
 public:
  static Team& get() {
    static std::once_flag once;
    std::call_once(once, [] {
      slot() = new Team();  // leaked on purpose: no join at exit
      pthread_atfork(nullptr, nullptr, [] { slot() = new Team(); });  // the parent's is left untouched
    });
    return *slot();
  }

  // body(i) for i in [0, n), in chunks of `chunk` items, on up to `threads` threads (the caller included).
  template <class F>
  void run(int64_t n, int64_t chunk, int threads, const F& body) {
    chunk = std::max<int64_t>(1, chunk);
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    threads = int(std::min<int64_t>(threads, n_chunks));
    if (threads <= 1) {
      trampoline<F>(&body, 0, n);  // the same compiled loop as the team's (see trampoline)
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);  // one job at a time per team
    while (open_ || joined_.load(std::memory_order_relaxed) > 0) done_.wait(lock);
    while (int(workers_.size()) < threads - 1) workers_.emplace_back([this] { work(); });
    fn_ = &trampoline<F>;
    ctx_ = &body;
    n_ = n;
    chunk_ = chunk;
    seats_ = threads - 1;
    next_.store(0, std::memory_order_relaxed);
    open_ = true;
    gen_.fetch_add(1, std::memory_order_release);
    const bool sleeping = sleepers_ > 0;
    lock.unlock();
    if (sleeping) wake_.notify_all();  // spinning workers see gen_ without a system call
    take(&trampoline<F>, &body, n, chunk);
    lock.lock();
    open_ = false;  // no one joins from now on; wait only for those who did
    if (joined_.load(std::memory_order_acquire) > 0) {
      lock.unlock();
      spin_until([this] { return joined_.load(std::memory_order_acquire) == 0; });
      lock.lock();
      done_.wait(lock, [this] { return joined_.load(std::memory_order_acquire) == 0; });
    }
    lock.unlock();
    done_.notify_all();
  }

  // Microseconds a waiting thread spins (pausing) before it sleeps.
  static constexpr int kSpinUs = 50;

 private:
  static Team*& slot() {
    static Team* team = nullptr;
    return team;
  }
  using Fn = void (*)(const void*, int64_t, int64_t);
  // Never inlined: the body is compiled once, so a single thread and a team run the same code (two
  // inlined copies could contract a * b + c into FMAs differently and differ in the last bit).
  template <class F>
  __attribute__((noinline)) static void trampoline(const void* ctx, int64_t lo, int64_t hi) {
    const F& f = *static_cast<const F*>(ctx);
    for (int64_t i = lo; i < hi; ++i) f(i);
  }
  void take(Fn fn, const void* ctx, int64_t n, int64_t chunk) {
    for (;;) {
      const int64_t lo = next_.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= n) return;
      fn(ctx, lo, std::min(n, lo + chunk));
    }
  }
  // pred() within kSpinUs of waiting (true), or false when the time is up. A few pauses first, then
  // sched_yield between looks: a thread waiting for a worker that the scheduler put on its own core
  // (or another job there) lets it run instead of holding the core for the whole spin.
  template <class P>
  static bool spin_until(const P& pred) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    for (;;) {
      if (pred()) return true;
      std::this_thread::yield();
      if (std::chrono::steady_clock::now() >= end) return pred();
    }
  }
  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (gen_.load(std::memory_order_relaxed) == seen) {
        lock.unlock();
        spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; });
        lock.lock();
        ++sleepers_;
        wake_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
      }
      seen = gen_.load(std::memory_order_relaxed);
      if (!open_ || seats_ == 0) continue;
      --seats_;
      joined_.fetch_add(1, std::memory_order_relaxed);
      const Fn fn = fn_;
      const void* ctx = ctx_;
      const int64_t n = n_, chunk = chunk_;
      lock.unlock();
      take(fn, ctx, n, chunk);
      lock.lock();
      if (joined_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};  // changed under mu_; read without it while spinning
  bool open_ = false;
  int seats_ = 0, sleepers_ = 0;
  std::atomic<int> joined_{0};  // changed under mu_; read without it while spinning
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
};

// body(i) for i in [0, n) on torch's thread count through the Team (dynamic chunks of `chunk` items).
template <class F>
inline void parallel_items(int64_t n, int64_t chunk, const F& body) {
  Team::get().run(n, chunk, num_threads(), body);
}

// Items per chunk that make about this many values: enough work to repay taking a chunk.
constexpr int64_t kChunkValues = int64_t(1) << 14;

// Below this many values of work a kernel runs on the calling thread: waking the team costs more.
constexpr int64_t kSmallWork = int64_t(1) << 16;

// parallel_items for a loop over `work` values in all: one thread when that is small (kSmallWork)
// or when `par` is false.
template <class F>
inline void parallel_work(int64_t n, int64_t chunk, int64_t work, const F& body, bool par = true) {
  Team::get().run(n, chunk, (par && work >= kSmallWork) ? num_threads() : 1, body);
}

// A per-thread scratch buffer of at least n values, one per call site (Tag), kept between calls.
template <class Tag, class T = float>
inline T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float bf16_to_f32(uint16_t b) { return u2f(uint32_t(b) << 16); }
// torch's fp32 -> bf16: round to nearest even, NaN -> 0x7FC0.
inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = f2u(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Element access for the fp32 / bf16 row kernels (T = float or uint16_t bf16 bits).
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
// the value a store then a load would give: rounding to the tensor's dtype
inline float rnd(const float*, float v) { return v; }
inline float rnd(const uint16_t*, float v) { return bf16_to_f32(f32_to_bf16(v)); }

// Cephes expf: x = n ln2 + r (ln2 split hi + lo), exp(r) = 1 + r + r^2 (c0 r^5 + c1 r^4 + ... + c5).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpC[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpLo = -87.3f;  // below: exp -> 0 (fp32 denormal range, irrelevant to a softmax)
constexpr float kExpHi = 88.7f;

enum DType { F32 = 0, BF16 = 1, F16 = 2 };

inline int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
  }
  return F32;
}

// fp16 bits <-> fp32, exactly as torch converts (c10::Half).
inline float half_to_f32(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline uint16_t f32_to_half(float v) { return c10::Half(v).x; }

// Element DT (F32 / BF16 / F16) of a raw buffer, read as or written from fp32 (bf16: round to nearest even).
template <int DT>
inline float load_f32(const void* p, int64_t i) {
  if constexpr (DT == F32) return static_cast<const float*>(p)[i];
  if constexpr (DT == BF16) return u2f(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  return half_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <int DT>
inline void store_f32(void* p, int64_t i, float v) {
  if constexpr (DT == F32) static_cast<float*>(p)[i] = v;
  if constexpr (DT == BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  if constexpr (DT == F16) static_cast<uint16_t*>(p)[i] = f32_to_half(v);
}

#if QRU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
// 8 bf16 values widened exactly to fp32.
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// fp32 -> bf16 bits in the low half of each lane: round to nearest even, NaN -> 0x7FC0.
inline __m256i bf16_bits(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  __m256i r = bf16_bits(v);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline __m256 rnd8(const float*, __m256 v) { return v; }
inline __m256 rnd8(const uint16_t*, __m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Cephes expf (constants above): |r| <= ln2/2, exp(r) by the degree-6 polynomial, times 2^n.
// Within 2 ulp of expf; 0 below kExpLo, clamped above kExpHi.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(kExpHi));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

#if QRU_AVX512
// Sums of 16 vectors' lanes, in order, as one vector: out[i] = sum(lanes of v[i]).
inline __m512 reduce16(const __m512* v) {
  // pairwise: each step halves the vector count and doubles the partial sums per vector
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // lanes (0..15) of v[2i] and v[2i+1] -> 8+8 pair sums interleaved by 64 bits
    __m512 lo = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    __m512 hi = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    a[i] = _mm512_add_ps(lo, hi);  // per 128-bit lane: [v0a v1a v0b v1b]
  }
  for (int i = 0; i < 4; ++i) {
    __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    b[i] = _mm512_add_ps(lo, hi);  // per 128-bit lane j: [v0 v1 v2 v3] partial sums (lane j of 4)
  }
  for (int i = 0; i < 2; ++i) {  // combine 128-bit lanes: (0,1,2,3) of b0 with b1 -> pairs
    __m512 lo = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 hi = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
    c[i] = _mm512_add_ps(lo, hi);
  }
  __m512 lo = _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0));
  __m512 hi = _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1));
  return _mm512_add_ps(lo, hi);
}

// The first 8 of reduce16: out[i] = sum(lanes of v[i]) for i < 8 (v[8..15] unused).
inline __m256 reduce8(const __m512* v) {
  __m512 w[16];
  for (int i = 0; i < 8; ++i) w[i] = v[i];
  for (int i = 8; i < 16; ++i) w[i] = _mm512_setzero_ps();
  return _mm512_castps512_ps256(reduce16(w));
}

// 16 fp32 lanes from fp32, or from bf16 widened exactly.
inline __m512 wide16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 wide16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// exp256 on 16 lanes (the same constants and range handling).
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpLo);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(kExpHi));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(__mmask16(~under), p, _mm512_castsi512_ps(e));
}
#endif
#if QRU_AVX512_BF16
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
#endif

}  // namespace qru
