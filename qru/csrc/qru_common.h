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

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// ---- Which threads run a parallel loop: torch's OpenMP pool, or qru's own Team (below).
// Where other processes leave the loop's threads a core each, the loop joins the OpenMP pool that
// torch's own ops (and bitsandbytes') use. libgomp's workers spin for milliseconds after every
// parallel op, so they start at once, and each takes the same contiguous part of the data call after
// call (it stays in that core's cache). A Team worker would first have to win its core from that
// spinning thread: NF4 dequantize of 1M values right after a 2-thread bf16 matmul took 131 us on a
// 2-thread Team, 116 us on one thread, 54 us joining OpenMP (2-core Intel Xeon AMX VM). Where another
// process holds a core, an OpenMP region waits a scheduler slice (ms) for a thread kept off its core,
// so the loop runs on the Team, which never waits for a worker that did not turn up.
// The load is read at most every kLoadSampleUs: /proc/loadavg's runnable count less this process's
// own runnable threads (its spinning OpenMP workers among them); unreadable counts as busy.
// QRU_CPU_POOL=auto|omp|team (default auto) forces a pool. A forked child never joins OpenMP (libgomp
// can hang in a child after the parent used it); nor does a loop called from inside an OpenMP region.
enum class Pool { Team, OpenMP };

constexpr int64_t kLoadSampleUs = 10000;

// Runnable tasks on the machine right now (the 4th field of /proc/loadavg, "R/T"), or -1.
inline int loadavg_runnable() {
  static const int fd = ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);  // opened once: pread is cheap
  if (fd < 0) return -1;
  char buf[160];
  const ssize_t k = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (k <= 0) return -1;
  buf[k] = 0;
  const char* p = buf;
  for (int field = 0; field < 3; ++field) {
    p = std::strchr(p, ' ');
    if (p == nullptr) return -1;
    ++p;
  }
  char* end = nullptr;
  const long r = std::strtol(p, &end, 10);
  return (end == p || *end != '/') ? -1 : int(r);
}

// This process's threads in state R (running or runnable; the caller is one), or -1.
inline int own_runnable_threads() {
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return -1;
  int count = 0;
  char path[64], buf[512];
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // the thread has just exited
    const ssize_t k = ::read(fd, buf, sizeof(buf) - 1);
    ::close(fd);
    if (k <= 0) continue;
    buf[k] = 0;
    const char* r = std::strrchr(buf, ')');  // "tid (comm) S ...": comm may hold spaces and parentheses
    if (r != nullptr && r[1] == ' ' && r[2] == 'R') ++count;
  }
  ::closedir(dir);
  return count;
}

// Other processes' runnable tasks right now, read from /proc (tens of microseconds, 40-140 us right
// after a long call on a VM), or -1 where unknown.
inline int read_other_processes_running() {
  const int total = loadavg_runnable(), own = own_runnable_threads();
  return total < 0 || own < 0 ? -1 : std::max(0, total - own);
}

// True in a child forked after these kernels were loaded (set by a pthread_atfork handler).
inline std::atomic<bool>& in_forked_child() {
  static std::atomic<bool> forked{false};
  return forked;
}
inline const int kForkWatch = ::pthread_atfork(nullptr, nullptr, [] { in_forked_child().store(true); });

// read_other_processes_running, refreshed in the background so that no kernel call waits for /proc.
// While kernels are being called (one within kActiveUs), the reader thread reads every kLoadSampleUs
// on its own and a call only loads the last value: no system call. Otherwise the reader sleeps, and
// the first call that finds the reading stale wakes it and goes on with the last value. The reader
// runs at SCHED_IDLE, so it never preempts a kernel on its core. The first call (and any call in a
// forked child, which has no reader) reads itself.
class LoadReader {
 public:
  static constexpr int64_t kActiveUs = 100000;

  static LoadReader& get() {
    static LoadReader* r = new LoadReader();  // leaked on purpose: the thread sleeps, no join at exit
    return *r;
  }
  int others() {
    if (in_forked_child().load(std::memory_order_relaxed)) return read_other_processes_running();
    const int64_t now = now_us();
    last_call_.store(now, std::memory_order_relaxed);
    if (stamp_.load(std::memory_order_acquire) < 0) {
      std::lock_guard<std::mutex> lock(mu_);
      if (stamp_.load(std::memory_order_relaxed) < 0) {
        value_.store(read_other_processes_running(), std::memory_order_relaxed);
        stamp_.store(now, std::memory_order_release);
        std::thread([this] { loop(); }).detach();
      }
    } else if (asleep_.load(std::memory_order_acquire) && now - stamp_.load(std::memory_order_relaxed) >= kLoadSampleUs &&
               !pending_.exchange(true, std::memory_order_acq_rel)) {
      { std::lock_guard<std::mutex> lock(mu_); }  // the reader is waiting, or about to test pending_
      wake_.notify_one();
    }
    return value_.load(std::memory_order_relaxed);
  }

 private:
  static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void loop() {
#if defined(SCHED_IDLE)
    sched_param sp{};
    ::pthread_setschedparam(::pthread_self(), SCHED_IDLE, &sp);
#endif
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (now_us() - last_call_.load(std::memory_order_relaxed) < kActiveUs) {
        wake_.wait_for(lock, std::chrono::microseconds(kLoadSampleUs));
      } else {
        asleep_.store(true, std::memory_order_release);
        wake_.wait(lock, [this] { return pending_.load(std::memory_order_acquire); });
        asleep_.store(false, std::memory_order_relaxed);
      }
      pending_.store(false, std::memory_order_relaxed);
      lock.unlock();
      value_.store(read_other_processes_running(), std::memory_order_relaxed);
      stamp_.store(now_us(), std::memory_order_release);
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<int64_t> stamp_{-1}, last_call_{0};
  std::atomic<int> value_{-1};
  std::atomic<bool> pending_{false}, asleep_{false};
};

// Other processes' runnable tasks, a reading at most about kLoadSampleUs old, or -1 where unknown.
inline int other_processes_running() { return LoadReader::get().others(); }

// Cores this process may run on.
inline int usable_cores() {
  static const int cores = [] {
    cpu_set_t set;
    if (::sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, int(std::thread::hardware_concurrency()));
  }();
  return cores;
}

// QRU_CPU_POOL: 0 auto, 1 omp, 2 team (an unknown value is an error that names it).
inline int pool_setting() {
  const char* v = std::getenv("QRU_CPU_POOL");
  if (v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "omp") == 0) return 1;
  if (std::strcmp(v, "team") == 0) return 2;
  TORCH_CHECK(false, "QRU_CPU_POOL must be auto, omp or team, got '", v, "'");
}

// The pool a loop on `threads` (> 1) threads runs on.
inline Pool pick_pool(int threads) {
  const int setting = pool_setting();
#if defined(_OPENMP)
  if (setting == 2 || omp_in_parallel() || in_forked_child().load(std::memory_order_relaxed)) return Pool::Team;
  if (setting == 1) return Pool::OpenMP;
  const int others = other_processes_running();
  return others >= 0 && usable_cores() - others >= threads ? Pool::OpenMP : Pool::Team;
#else
  (void)setting;
  (void)threads;
  return Pool::Team;
#endif
}

// Items [0, n) cut into contiguous chunk-aligned ranges, one per thread (a "seat"): a thread takes
// its own range's chunks in order, then helps with the others', so a thread that starts late (or
// never) leaves no work undone, and on a quiet machine each thread writes the same part call after call.
struct alignas(64) Range {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

inline void split_ranges(Range* r, int parts, int64_t n, int64_t chunk) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  for (int p = 0; p < parts; ++p) {
    r[p].next.store(std::min(n, n_chunks * p / parts * chunk), std::memory_order_relaxed);
    r[p].end = std::min(n, n_chunks * (p + 1) / parts * chunk);
  }
}

using ChunkFn = void (*)(const void*, int64_t, int64_t);

inline void take_ranges(ChunkFn fn, const void* ctx, Range* r, int parts, int seat, int64_t chunk) {
  for (int k = 0; k < parts; ++k) {
    Range& g = r[(seat + k) % parts];
    for (;;) {
      const int64_t lo = g.next.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= g.end) break;
      fn(ctx, lo, std::min(g.end, lo + chunk));
    }
  }
}

// The Team every parallel qru kernel runs on where it does not join OpenMP (see pick_pool).
// An OpenMP region ends when its last thread arrives, so a thread that another job keeps off its
// core, even one that never started, holds up the caller, and libgomp's idle threads spin. Here
// workers wait passively (condition variable), take chunks of items (take_ranges), and only
// the workers that joined a job before it closed are waited for: a late one finds it closed and goes
// back to sleep. The caller works too. Chunks come from contiguous ranges, one per seat (Range). One team per process, created on first use and never torn
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

  // body(i) for i in [0, n), in chunks of `chunk` items, on up to `threads` threads (the caller
  // included): on the OpenMP pool or on this Team, as pick_pool says.
  template <class F>
  void run(int64_t n, int64_t chunk, int threads, const F& body) {
    chunk = std::max<int64_t>(1, chunk);
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    threads = int(std::min<int64_t>(threads, n_chunks));
    if (threads <= 1) {
      trampoline<F>(&body, 0, n);  // the same compiled loop as the team's (see trampoline)
      return;
    }
#if defined(_OPENMP)
    if (pick_pool(threads) == Pool::OpenMP) {
      std::unique_ptr<Range[]> ranges(new Range[threads]);
      split_ranges(ranges.get(), threads, n, chunk);
      Range* r = ranges.get();
      const void* ctx = &body;
#pragma omp parallel num_threads(threads)
      take_ranges(&trampoline<F>, ctx, r, threads, omp_get_thread_num(), chunk);
      return;
    }
#endif
    std::unique_lock<std::mutex> lock(mu_);  // one job at a time per team
    while (open_ || joined_.load(std::memory_order_relaxed) > 0) done_.wait(lock);
    while (int(workers_.size()) < threads - 1) workers_.emplace_back([this] { work(); });
    if (n_ranges_ < threads) {
      ranges_.reset(new Range[threads]);
      n_ranges_ = threads;
    }
    split_ranges(ranges_.get(), threads, n, chunk);
    fn_ = &trampoline<F>;
    ctx_ = &body;
    parts_ = threads;
    chunk_ = chunk;
    seats_ = threads - 1;
    open_ = true;
    gen_.fetch_add(1, std::memory_order_release);
    const bool sleeping = sleepers_ > 0;
    lock.unlock();
    if (sleeping) wake_.notify_all();  // spinning workers see gen_ without a system call
    take_ranges(&trampoline<F>, &body, ranges_.get(), threads, 0, chunk);
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
  // Never inlined: the body is compiled once, so a single thread and a team run the same code (two
  // inlined copies could contract a * b + c into FMAs differently and differ in the last bit).
  template <class F>
  __attribute__((noinline)) static void trampoline(const void* ctx, int64_t lo, int64_t hi) {
    const F& f = *static_cast<const F*>(ctx);
    for (int64_t i = lo; i < hi; ++i) f(i);
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
      const int seat = parts_ - seats_--;  // the first to join takes range 1 (the caller has 0)
      joined_.fetch_add(1, std::memory_order_relaxed);
      const ChunkFn fn = fn_;
      const void* ctx = ctx_;
      Range* ranges = ranges_.get();
      const int parts = parts_;
      const int64_t chunk = chunk_;
      lock.unlock();
      take_ranges(fn, ctx, ranges, parts, seat, chunk);
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
  ChunkFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  std::unique_ptr<Range[]> ranges_;  // one per seat of the present job; replaced only between jobs
  int n_ranges_ = 0, parts_ = 0;
  int64_t chunk_ = 1;
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
