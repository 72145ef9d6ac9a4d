// Shared by the native kernels (sparq_jax.native): the radix top-k of one row (top_k.cc, sparq_cpu.cc),
// bfloat16 widening, and the work-splitting helper over XLA's intra-op thread pool (all three).
// A header, #included by the sources and never compiled alone; named .cc so that the package data
// (pyproject.toml's "*.cc" for sparq_jax.native) ships it.
#ifndef SPARQ_JAX_NATIVE_COMMON_H_
#define SPARQ_JAX_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace sparq_native {
namespace {

// The order-preserving image of a float as a signed int32 (compared signed; -0.0 -> +0.0).
inline int32_t OrderKey(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits = f == 0.0f ? 0 : bits;
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

// The digit of the key at `shift` (masked by `mask`), in unsigned order (the sign bit flipped).
inline uint32_t Digit(int32_t key, int shift, uint32_t mask) {
  return ((static_cast<uint32_t>(key) ^ 0x80000000u) >> shift) & mask;
}

// Walks the histogram from the largest digit down to the one that holds the need-th largest key;
// returns that digit and leaves in `need` the key's rank among the keys with this digit.
uint32_t SelectDigit(const uint32_t* hist, int bins, int64_t* need) {
  int b = bins - 1;
  for (; b > 0; --b) {
    if (hist[b] >= *need) break;
    *need -= hist[b];
  }
  return static_cast<uint32_t>(b);
}

// For each 8-bit mask: the positions of its set bits, lowest first, and how many there are (to
// write a block's selected positions with two vector stores and no branch: "left packing").
struct PackTable {
  alignas(16) int32_t index[256][8];
  int32_t count[256];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) index[m][n++] = b;
      for (int b = n; b < 8; ++b) index[m][b] = 0;
      count[m] = n;
    }
  }
};
const PackTable kPack;

// Bits of 16 keys: keys[i] > t (gt) and keys[i] == t (eq).
inline void CompareMasks16(const int32_t* keys, int32_t t, uint32_t* gt, uint32_t* eq) {
#if defined(__SSE2__)
  const __m128i tv = _mm_set1_epi32(t);
  uint32_t g = 0, e = 0;
  for (int j = 0; j < 4; ++j) {
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + 4 * j));
    g |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(x, tv)))) << (4 * j);
    e |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(x, tv)))) << (4 * j);
  }
  *gt = g;
  *eq = e;
#else
  uint32_t g = 0, e = 0;
  for (int j = 0; j < 16; ++j) {
    g |= static_cast<uint32_t>(keys[j] > t) << j;
    e |= static_cast<uint32_t>(keys[j] == t) << j;
  }
  *gt = g;
  *eq = e;
#endif
}

// Bits of 16 keys: lo <= keys[i] < lo + span.
inline uint32_t RangeMask16(const int32_t* keys, int32_t lo, uint32_t span) {
  uint32_t r = 0;
#if defined(__SSE2__)
  // (x - lo) < span, unsigned, as a signed comparison with the sign bits flipped
  const __m128i lov = _mm_set1_epi32(lo), sign = _mm_set1_epi32(INT32_MIN);
  const __m128i limit = _mm_set1_epi32(static_cast<int32_t>(span ^ 0x80000000u));
  for (int j = 0; j < 4; ++j) {
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + 4 * j));
    __m128i off = _mm_xor_si128(_mm_sub_epi32(x, lov), sign);
    r |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmplt_epi32(off, limit)))) << (4 * j);
  }
#else
  for (int j = 0; j < 16; ++j)
    r |= static_cast<uint32_t>(static_cast<uint32_t>(keys[j]) - static_cast<uint32_t>(lo) < span) << j;
#endif
  return r;
}

// Appends t + (the set bits of the 16-bit mask) to out[n...] (writing up to 16 entries past n).
inline int64_t Pack16(uint32_t mask, int32_t t, int32_t* out, int64_t n) {
#if defined(__SSE2__)
  for (int half = 0; half < 2; ++half) {
    const uint32_t m = (mask >> (8 * half)) & 255;
    const __m128i base = _mm_set1_epi32(t + 8 * half);
    const __m128i* idx = reinterpret_cast<const __m128i*>(kPack.index[m]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + n), _mm_add_epi32(_mm_load_si128(idx), base));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + n + 4), _mm_add_epi32(_mm_load_si128(idx + 1), base));
    n += kPack.count[m];
  }
#else
  for (; mask; mask &= mask - 1) out[n++] = t + __builtin_ctz(mask);
#endif
  return n;
}

// The positions of the k largest of score[0, s), ties to the lowest positions, increasing, into out[0, k);
// keys and scratch are the caller's reusable buffers.
inline void TopKRow(const float* score, int64_t s, int64_t k, int32_t* out, std::vector<int32_t>& keys,
                    std::vector<int32_t>& scratch) {
  const int64_t padded = (s + 15) / 16 * 16;
  keys.resize(padded);
  scratch.resize(std::max(padded, k) + 16);
  int32_t* key = keys.data();
  for (int64_t i = 0; i < s; ++i) key[i] = OrderKey(score[i]);
  // Padding: INT32_MIN is -NaN's key, never above a threshold, and equal to it only when every
  // real key is -NaN too (then the real ones, at lower positions, are taken first).
  for (int64_t i = s; i < padded; ++i) key[i] = INT32_MIN;
  // Pass 1: histogram of the top 11 bits (four interleaved tables, so that runs of equal digits do
  // not wait on each other's increments).
  uint32_t hist4[4][2048] = {};
  int64_t i = 0;
  for (; i + 4 <= s; i += 4)
    for (int j = 0; j < 4; ++j) ++hist4[j][Digit(key[i + j], 21, 2047)];
  for (; i < s; ++i) ++hist4[0][Digit(key[i], 21, 2047)];
  uint32_t hist[2048];
  for (int b = 0; b < 2048; ++b) hist[b] = hist4[0][b] + hist4[1][b] + hist4[2][b] + hist4[3][b];
  int64_t need = k;  // the wanted key's rank among the keys that share its digits so far
  const uint32_t top = SelectDigit(hist, 2048, &need);
  // Pass 2: the keys with that top digit (a contiguous range of signed keys; usually a small share
  // of the row), then their next 11 bits and their last 10.
  const int32_t lo = static_cast<int32_t>((top << 21) ^ 0x80000000u);
  int32_t* cand = scratch.data();
  int64_t n_cand = 0;
  for (int64_t t = 0; t < s; t += 16) {
    uint32_t in_range = RangeMask16(key + t, lo, 1u << 21);
    if (t + 16 > s) in_range &= (1u << (s - t)) - 1;  // not the padding
    for (; in_range; in_range &= in_range - 1) cand[n_cand++] = key[t + __builtin_ctz(in_range)];
  }
  std::memset(hist, 0, sizeof hist);
  for (int64_t c = 0; c < n_cand; ++c) ++hist[Digit(cand[c], 10, 2047)];
  const uint32_t mid = SelectDigit(hist, 2048, &need);
  std::memset(hist, 0, 1024 * sizeof(uint32_t));
  for (int64_t c = 0; c < n_cand; ++c)
    if (Digit(cand[c], 10, 2047) == mid) ++hist[Digit(cand[c], 0, 1023)];
  const uint32_t low = SelectDigit(hist, 1024, &need);
  const int32_t kth = static_cast<int32_t>(((top << 21) | (mid << 10) | low) ^ 0x80000000u);
  // Pass 3: every key above kth and the first `need` keys equal to it, in position order.
  int64_t ties = need, n = 0;
  int32_t* picked = scratch.data();
  for (int64_t t = 0; t < padded && n < k; t += 16) {
    uint32_t gt, eq;
    CompareMasks16(key + t, kth, &gt, &eq);
    for (; eq && ties > 0; --ties) {  // keep the lowest `ties` equal keys
      gt |= eq & (~eq + 1);
      eq &= eq - 1;
    }
    n = Pack16(gt, static_cast<int32_t>(t), picked, n);
  }
  std::memcpy(out, picked, k * sizeof(int32_t));
}

// 16 floats, and bfloat16 widened to float32 (a 16-bit shift): 16 at once, or one.
typedef float F16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline F16 Widen(const uint16_t* p) {
  H16 h;
  std::memcpy(&h, p, sizeof h);
  U16 u = __builtin_convertvector(h, U16) << 16;
  F16 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float Bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Vector helpers of the kernels that work on 16 fp32 lanes (sparq_cpu.cc, flash_cpu.cc).
typedef int32_t I16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
__attribute__((always_inline)) inline F16 Load(const float* p) {
  F16 f;
  std::memcpy(&f, p, sizeof f);
  return f;
}

__attribute__((always_inline)) inline F16 Load(const uint16_t* p) { return Widen(p); }  // bfloat16 bits

__attribute__((always_inline)) inline void Store(float* p, F16 f) { std::memcpy(p, &f, sizeof f); }

inline float Scalar(float x) { return x; }
inline float Scalar(uint16_t h) { return Bf16(h); }

typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

__attribute__((always_inline)) inline float Sum(F16 v) {  // by halves (log2 16 dependent adds)
  F8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  F4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

__attribute__((always_inline)) inline F16 Iota() {
  return F16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

// exp(x) for 16 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). Lanes
// below -87.3 (including -inf) give 0.
__attribute__((always_inline)) inline F16 Exp(F16 x) {
  const F16 lo = x < -87.3f ? F16{} + 1 : F16{};  // nonzero where the result is 0
  x = x < -87.3f ? F16{} - 87.3f : x;
  x = x > 88.3f ? F16{} + 88.3f : x;
  F16 t = x * 1.44269504088896341f + 0.5f;
  I16 n = __builtin_convertvector(t, I16);
  n -= (__builtin_convertvector(n, F16) > t) ? I16{} + 1 : I16{};  // floor
  const F16 fn = __builtin_convertvector(n, F16);
  F16 r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  F16 p = F16{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  I16 bits = (n + 127) << 23;
  F16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  p *= scale;
  return lo != 0 ? F16{} : p;
}

// Whether this CPU has AVX512-BF16's vdpbf16ps (matmul.cc's GEMM, flash_cpu.cc's bfloat16 path).
inline bool HasBf16Dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

// Runs pieces [0, total) of `work` on the caller and on XLA's pool, returning once all are done.
template <typename Work>
void Parallel(xla::ffi::ThreadPool& pool, int64_t threads, int64_t total, Work work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), threads - 1, total - 1});
  // The helpers hold `state` and a copy of `work`, whose captures (buffers) outlive this call only
  // in tasks that find the counter exhausted and touch nothing.
  auto run = [state, work, total]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < total;) {
      work(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace
}  // namespace sparq_native

#endif  // SPARQ_JAX_NATIVE_COMMON_H_
