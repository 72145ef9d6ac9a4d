// Dense causal attention over a prompt on the CPU, flash-attention style (blocks of keys, an online
// softmax), one XLA FFI custom call per layer: sparq_jax.native.flash_attention, which
// models.llama.attend_blocks takes for prefill on the CPU.
//
// Query i of row b and query head h sits at index start + i of the keys; it sees key s of KV head
// h / G when key_valid[b, s], s <= start + i and, with a window W > 0, q_pos[b, i] - k_pos[b, s] < W:
//   out[b, i, h] = softmax_s(q . k_s / sqrt(D)) . V over the keys it sees; 0 for a query that sees none.
// Keys past the last query of a tile are never read (so the rest of a preallocated buffer may hold
// anything).
//
// Work items: (row, query head, tile of kTileQ queries), the latest (heaviest) tiles first, taken by
// the caller and by tasks on XLA's intra-op pool. Per item, for each block of kTileK keys: the block's
// K^T and V packed (bfloat16 widened), S = Q K^T by a register-tiled product (8 rows x 32 keys of
// accumulators), the mask and the online softmax (exp by the vectorised polynomial of common.inc.cc),
// then acc += P V (6 rows x 64 columns of accumulators). Every product and sum is fp32.
//
// Why: XLA:CPU runs models.llama.attend_blocks' blocks as separate passes over [G*c, c] fp32 logits
// (products, mask, max, exp, sum, product), several MB each; here a block's logits stay in L1/L2.
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.inc.cc"

namespace ffi = xla::ffi;
using namespace sparq_native;

namespace {

constexpr int64_t kTileQ = 64;   // queries per work item
constexpr int64_t kTileK = 256;  // keys per block (a multiple of 32)
constexpr int kQkRows = 8;       // S = Q K^T micro-tile: 8 rows x 32 keys
constexpr int kPvRows = 6;       // acc += P V micro-tile: 6 rows x up to 64 columns
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<R>{}, r) for the tiles of R = kPvRows rows of [0, rows), then the remainder's R < kPvRows.
template <typename F>
inline void RowTiles(int64_t rows, F f) {
  int64_t r = 0;
  for (; r + kPvRows <= rows; r += kPvRows) f(Int<kPvRows>{}, r);
  switch (rows - r) {
    case 1: f(Int<1>{}, r); break;
    case 2: f(Int<2>{}, r); break;
    case 3: f(Int<3>{}, r); break;
    case 4: f(Int<4>{}, r); break;
    case 5: f(Int<5>{}, r); break;
    default: break;
  }
}

// f(Int<NV>{}, c0) for column panels of NV = 4 vectors (64 columns) of [0, d), then the rest's NV < 4.
template <typename F>
inline void ColTiles(int64_t d, F f) {
  int64_t c0 = 0;
  for (; c0 + 64 <= d; c0 += 64) f(Int<4>{}, c0);
  switch ((d - c0) / 16) {
    case 1: f(Int<1>{}, c0); break;
    case 2: f(Int<2>{}, c0); break;
    case 3: f(Int<3>{}, c0); break;
    default: break;
  }
}

struct FlashShape {
  int64_t b, tq, hq, hkv, s, d, window, start;
  float scale;
  bool round_p;  // bfloat16 values: P rounded to bfloat16 for P V, as transformers' bfloat16 attention
};

// p rounded to the nearest bfloat16 (ties to even), kept as fp32 (p: finite, >= 0).
__attribute__((always_inline)) inline F16 RoundToBf16(F16 p) {
  U16 u;
  std::memcpy(&u, &p, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&p, &u, sizeof p);
  return p;
}

// s[r, 0:32) = q[r, :] . kt[:, 0:32) for R rows of q (row stride d); kt [d][ldk].
template <int R>
__attribute__((always_inline)) inline void QkTile(const float* q, int64_t d, const float* kt, int64_t ldk,
                                                  float* s, int64_t lds) {
  F16 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = F16{};
  for (int64_t e = 0; e < d; ++e) {
    const F16 k0 = Load(kt + e * ldk), k1 = Load(kt + e * ldk + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float x = q[r * d + e];
      acc[r][0] += x * k0;
      acc[r][1] += x * k1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Store(s + r * lds, acc[r][0]);
    Store(s + r * lds + 16, acc[r][1]);
  }
}

// acc[r, c0:c0+16 NV) += p[r, 0:kn) . v[0:kn, c0:c0+16 NV) for R rows (v [kn][d], acc [R][d]).
template <int R, int NV>
__attribute__((always_inline)) inline void PvTile(const float* p, int64_t ldp, int64_t kn, const float* v, int64_t d,
                                                  int64_t c0, float* acc) {
  F16 a[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) a[r][t] = Load(acc + r * d + c0 + 16 * t);
  for (int64_t j = 0; j < kn; ++j) {
    F16 vv[NV];
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) vv[t] = Load(v + j * d + c0 + 16 * t);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float x = p[r * ldp + j];
#pragma GCC unroll 4
      for (int t = 0; t < NV; ++t) a[r][t] += x * vv[t];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) Store(acc + r * d + c0 + 16 * t, a[r][t]);
}

// acc[0:rows) += p[0:rows) . v (register tiles of rows x 64 columns).
void Pv(const float* p, int64_t ldp, int64_t rows, int64_t kn, const float* v, int64_t d, float* acc) {
  RowTiles(rows, [&](auto R, int64_t r) {
    ColTiles(d, [&](auto NV, int64_t c0) { PvTile<R(), NV()>(p + r * ldp, ldp, kn, v, d, c0, acc + r * d); });
  });
}

// The AVX512-BF16 products (bfloat16 q, k and v on a CPU with vdpbf16ps): each instruction sums 16
// pairs of bfloat16 products into fp32, twice the fp32 FMA's rate. q . k of bfloat16 values is exact in
// fp32 before the sums; P is rounded to bfloat16 for P V, as transformers' bfloat16 attention.
//   S[r, j] = sum_e2 q2[r, e2] . kt2[e2, j]: q2 [rows8][d/2] and kt2 [d/2][sp] hold (even, odd) pairs
//   acc[r, :] += sum_j2 p2[r, j2] . v2[j2, :]: p2 [rows][kTileK/2] and v2 [sp/2][d] hold key pairs
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void QkTileBf16(
    const uint32_t* q2, int64_t d2, const uint32_t* kt2, int64_t ldk, float* s, int64_t lds) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d2; ++e) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt2 + e * ldk);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt2 + e * ldk + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(q2[r * d2 + e]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, k1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void QkBlockBf16(
    const uint32_t* q2, int64_t rows8, int64_t d2, const uint32_t* kt2, int64_t sp, int64_t knp, float* S) {
  for (int64_t r = 0; r < rows8; r += kQkRows)
    for (int64_t j = 0; j < knp; j += 32) QkTileBf16<kQkRows>(q2 + r * d2, d2, kt2 + j, sp, S + r * kTileK + j, kTileK);
}

template <int R, int NV>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void PvTileBf16(
    const uint32_t* p2, int64_t ldp, int64_t kn2, const uint32_t* v2, int64_t d, int64_t c0, float* acc) {
  __m512 a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NV; ++t) a[r][t] = _mm512_loadu_ps(acc + r * d + c0 + 16 * t);
  for (int64_t j = 0; j < kn2; ++j) {
    __m512bh vv[NV];
    for (int t = 0; t < NV; ++t) vv[t] = (__m512bh)_mm512_loadu_si512(v2 + j * d + c0 + 16 * t);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(p2[r * ldp + j]));
      for (int t = 0; t < NV; ++t) a[r][t] = _mm512_dpbf16_ps(a[r][t], x, vv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NV; ++t) _mm512_storeu_ps(acc + r * d + c0 + 16 * t, a[r][t]);
}

// P (fp32 rows of S) to bfloat16 key pairs p2 (round to nearest even), then acc += P V.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void PvBlockBf16(
    const float* S, int64_t rows, int64_t knp, int64_t kn, const uint32_t* v2, int64_t d, uint32_t* p2, float* acc) {
  const int64_t ldp = kTileK / 2, kn2 = (kn + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < knp; j += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(S + r * kTileK + j + 16),
                                                _mm512_loadu_ps(S + r * kTileK + j));
      _mm512_storeu_si512(p2 + r * ldp + j / 2, (__m512i)pair);
    }
  RowTiles(rows, [&](auto R, int64_t r) {
    ColTiles(d, [&](auto NV, int64_t c0) { PvTileBf16<R(), NV()>(p2 + r * ldp, ldp, kn2, v2, d, c0, acc + r * d); });
  });
}

struct Scratch {
  std::vector<float> q, s, acc, m, l;
  std::vector<float> bias;
  std::vector<uint32_t> q2, p2;  // the bfloat16 path's q and P pairs
};

// The pre-pass's packed keys and values of all (row, KV head)s: fp32 K^T [D][sp] and V [S][D] (V: the
// input itself when fp32), or bfloat16 pairs K^T [D/2][sp] and V [sp/2][D] (kBf16).
struct Packed {
  const float* kt;
  const float* v;
  const uint32_t* kt2;
  const uint32_t* v2;
  int64_t sp;
};

// One (row, query head, tile) item. TQ: q's element type (float, bfloat16 bits); kBf16: the AVX512-BF16
// products (q, k, v all bfloat16).
template <typename TQ, bool kBf16>
void Item(const FlashShape& sh, int64_t item, const TQ* q_all, const Packed& pk, const bool* key_valid,
          const int32_t* k_pos, const int32_t* q_pos, float* out, Scratch& w) {
  const int64_t d = sh.d, tiles = (sh.tq + kTileQ - 1) / kTileQ;
  const int64_t bh = item % (sh.b * sh.hq), tile = tiles - 1 - item / (sh.b * sh.hq);
  const int64_t b = bh / sh.hq, h = bh % sh.hq, hk = h / (sh.hq / sh.hkv);
  const int64_t i0 = tile * kTileQ, rows = std::min(kTileQ, sh.tq - i0);
  const int64_t rows8 = (rows + kQkRows - 1) / kQkRows * kQkRows;
  const int64_t sp = pk.sp, d2 = d / 2;
  if (kBf16) {
    w.q2.assign(rows8 * d2, 0u);
    w.p2.resize(rows8 * kTileK / 2);
  } else {
    w.q.assign(rows8 * d, 0.0f);
  }
  w.s.resize(rows8 * kTileK);
  w.acc.assign(rows * d, 0.0f);
  w.m.assign(rows, kNegInf);
  w.l.assign(rows, 0.0f);
  w.bias.resize(kTileK);
  for (int64_t r = 0; r < rows; ++r) {
    const TQ* src = q_all + ((b * sh.tq + i0 + r) * sh.hq + h) * d;
    if (kBf16)
      std::memcpy(w.q2.data() + r * d2, src, d * sizeof(uint16_t));  // bfloat16 (even, odd) pairs as they lie
    else
      for (int64_t e = 0; e < d; ++e) w.q[r * d + e] = Scalar(src[e]);
  }
  const int32_t* qp = q_pos + b * sh.tq + i0;
  const int32_t* kp = k_pos + b * sh.s;
  const bool* kv = key_valid + b * sh.s;
  int32_t q_min = std::numeric_limits<int32_t>::max();
  for (int64_t r = 0; r < rows; ++r) q_min = std::min(q_min, qp[r]);
  const int64_t key_end = std::min(sh.s, sh.start + i0 + rows);  // keys [0, key_end) can be seen
  const int64_t head = b * sh.hkv + hk;
  const float* kt = kBf16 ? nullptr : pk.kt + head * d * sp;
  const float* vb = kBf16 ? nullptr : pk.v + head * sh.s * d;
  const uint32_t* kt2 = kBf16 ? pk.kt2 + head * d2 * sp : nullptr;
  const uint32_t* v2 = kBf16 ? pk.v2 + head * (sp / 2) * d : nullptr;
  float* S = w.s.data();
  for (int64_t k0 = 0; k0 < key_end; k0 += kTileK) {
    const int64_t kn = std::min(kTileK, key_end - k0);
    bool any = false;
    int32_t k_max = std::numeric_limits<int32_t>::min();
    for (int64_t j = 0; j < kn; ++j) {
      w.bias[j] = kv[k0 + j] ? 0.0f : kNegInf;
      if (kv[k0 + j]) {
        any = true;
        k_max = std::max(k_max, kp[k0 + j]);
      }
    }
    if (!any) continue;                                                     // no valid key in the block
    if (sh.window > 0 && static_cast<int64_t>(q_min) - k_max >= sh.window) continue;  // all out of the window
    const int64_t knp = (kn + 31) / 32 * 32;
    for (int64_t j = kn; j < knp; ++j) w.bias[j] = kNegInf;
    if (kBf16) {
      QkBlockBf16(w.q2.data(), rows8, d2, kt2 + k0, sp, knp, S);
    } else {
      for (int64_t r = 0; r < rows8; r += kQkRows)
        for (int64_t j = 0; j < knp; j += 32)
          QkTile<kQkRows>(w.q.data() + r * d, d, kt + k0 + j, sp, S + r * kTileK + j, kTileK);
    }
    // Mask, online softmax: S row r becomes P = exp(x - m_new); acc and l rescaled.
    for (int64_t r = 0; r < rows; ++r) {
      float* x = S + r * kTileK;
      const int64_t last = sh.start + i0 + r - k0;  // the last visible column (causal)
      const bool cut = last < knp - 1;
      F16 mx = F16{} + kNegInf;
      for (int64_t j = 0; j < knp; j += kLanes) {
        F16 y = Load(x + j) * sh.scale + Load(w.bias.data() + j);
        if (cut) y = (Iota() + static_cast<float>(j)) > static_cast<float>(last) ? F16{} + kNegInf : y;
        if (sh.window > 0) {
          for (int t = 0; t < kLanes && j + t < kn; ++t)
            if (static_cast<int64_t>(qp[r]) - kp[k0 + j + t] >= sh.window) y[t] = kNegInf;
        }
        Store(x + j, y);
        mx = mx > y ? mx : y;
      }
      float row_max = kNegInf;
      for (int t = 0; t < kLanes; ++t) row_max = std::max(row_max, mx[t]);
      const float m_new = std::max(w.m[r], row_max);
      if (m_new == kNegInf) {  // nothing seen yet
        std::fill(x, x + knp, 0.0f);
        continue;
      }
      F16 sum = F16{};
      for (int64_t j = 0; j < knp; j += kLanes) {
        const F16 p = Exp(Load(x + j) - m_new);
        Store(x + j, sh.round_p && !kBf16 ? RoundToBf16(p) : p);  // (the bf16 path rounds as it packs)
        sum += p;
      }
      const float alpha = w.m[r] == kNegInf ? 0.0f : std::exp(w.m[r] - m_new);
      w.l[r] = w.l[r] * alpha + Sum(sum);
      if (alpha != 1.0f) {
        float* a = w.acc.data() + r * d;
        for (int64_t e = 0; e < d; e += kLanes) Store(a + e, Load(a + e) * alpha);
      }
      w.m[r] = m_new;
    }
    if (kBf16)
      PvBlockBf16(S, rows, knp, kn, v2 + k0 / 2 * d, d, w.p2.data(), w.acc.data());
    else
      Pv(S, kTileK, rows, kn, vb + k0 * d, d, w.acc.data());  // rows past kn never read
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
    float* dst = out + ((b * sh.tq + i0 + r) * sh.hq + h) * d;
    const float* a = w.acc.data() + r * d;
    for (int64_t e = 0; e < d; e += kLanes) Store(dst + e, Load(a + e) * inv);
  }
}

// The pre-pass (Packed), in pieces of 256 keys of a (row, KV head), up to the last key any query
// sees (kv_end); then the items.
template <typename TQ, typename TKV, bool kBf16>
void Run(ffi::ThreadPool& pool, int64_t threads, const FlashShape& sh, const void* q, const void* k, const void* v,
         const bool* key_valid, const int32_t* k_pos, const int32_t* q_pos, float* out) {
  const int64_t d = sh.d, d2 = d / 2, sp = (sh.s + 31) / 32 * 32, kv_end = std::min(sh.s, sh.start + sh.tq);
  const int64_t piece = 256, pieces = (kv_end + piece - 1) / piece, heads = sh.b * sh.hkv;
  thread_local std::vector<float> kt_buf, v_buf;  // kept between calls (one layer after another)
  thread_local std::vector<uint32_t> kt2_buf, v2_buf;
  constexpr bool widen_v = !kBf16 && !std::is_same<TKV, float>::value;
  if (kBf16) {
    kt2_buf.resize(heads * d2 * sp);
    v2_buf.resize(heads * (sp / 2) * d);
  } else {
    kt_buf.resize(heads * d * sp);
    if (widen_v) v_buf.resize(heads * sh.s * d);
  }
  Packed pk{kt_buf.data(), widen_v ? v_buf.data() : reinterpret_cast<const float*>(v), kt2_buf.data(),
            v2_buf.data(), sp};
  float* kt_w = kt_buf.data();
  float* v_w = v_buf.data();
  uint32_t* kt2_w = kt2_buf.data();
  uint32_t* v2_w = v2_buf.data();
  const TKV* ks = static_cast<const TKV*>(k);
  const TKV* vs = static_cast<const TKV*>(v);
  Parallel(pool, threads, heads * pieces, [=](int64_t p) {
    const int64_t hd = p / pieces, j0 = p % pieces * piece, j1 = std::min(kv_end, j0 + piece);
    const int64_t pad_end = std::min(sp, (j1 + 31) / 32 * 32);  // zero to the next multiple of 32
    const TKV* src = ks + hd * sh.s * d;
    const TKV* vsrc = vs + hd * sh.s * d;
    if (kBf16) {
      const uint16_t* k16 = reinterpret_cast<const uint16_t*>(src);
      const uint16_t* v16 = reinterpret_cast<const uint16_t*>(vsrc);
      uint32_t* kt2 = kt2_w + hd * d2 * sp;
      uint32_t* v2 = v2_w + hd * (sp / 2) * d;
      const uint32_t* k32 = reinterpret_cast<const uint32_t*>(k16);
      for (int64_t jb = j0; jb < j1; jb += 16)  // see the fp32 transpose below
        for (int64_t e = 0; e < d2; ++e)
          for (int64_t j = jb; j < std::min(j1, jb + 16); ++j) kt2[e * sp + j] = k32[j * d2 + e];
      for (int64_t j = j0; j < j1; j += 2)  // j0 even: key pairs (j, j + 1), 0 past kv_end
        for (int64_t c = 0; c < d; ++c)
          v2[j / 2 * d + c] = v16[j * d + c] | (j + 1 < j1 ? static_cast<uint32_t>(v16[(j + 1) * d + c]) << 16 : 0u);
      if (j1 == kv_end) {
        for (int64_t e = 0; e < d2; ++e) std::fill(kt2 + e * sp + j1, kt2 + e * sp + pad_end, 0u);
        for (int64_t j = (j1 + 1) / 2 * 2; j < pad_end; j += 2) std::fill(v2 + j / 2 * d, v2 + j / 2 * d + d, 0u);
      }
      return;
    }
    float* kt = kt_w + hd * d * sp;
    // 16 keys at a time, each K^T row's 16 entries written as one cache line: walking e innermost
    // wrote 4 bytes to each of d lines sp * 4 bytes apart, all in one L1 set (sp a multiple of 32).
    for (int64_t jb = j0; jb < j1; jb += 16)
      for (int64_t e = 0; e < d; ++e)
        for (int64_t j = jb; j < std::min(j1, jb + 16); ++j) kt[e * sp + j] = Scalar(src[j * d + e]);
    if (j1 == kv_end)
      for (int64_t e = 0; e < d; ++e) std::fill(kt + e * sp + j1, kt + e * sp + pad_end, 0.0f);
    if (widen_v)
      for (int64_t i = j0 * d; i < j1 * d; ++i) v_w[hd * sh.s * d + i] = Scalar(vsrc[i]);
  });
  const int64_t items = sh.b * sh.hq * ((sh.tq + kTileQ - 1) / kTileQ);
  Parallel(pool, threads, items, [=](int64_t item) {
    thread_local Scratch w;
    Item<TQ, kBf16>(sh, item, static_cast<const TQ*>(q), pk, key_valid, k_pos, q_pos, out, w);
  });
}

bool IsF32OrBf16(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::Error FlashImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::PRED> key_valid, ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::S32> q_pos,
                     ffi::Buffer<ffi::S32> start, ffi::ResultBuffer<ffi::F32> out, int64_t window, int64_t threads) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("sparq_flash: q must be [B, Tq, Hq, D] and k, v [B, Hkv, S, D]");
  FlashShape sh;
  sh.b = qd[0], sh.tq = qd[1], sh.hq = qd[2], sh.d = qd[3], sh.hkv = kd[1], sh.s = kd[2];
  for (int i = 0; i < 4; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("sparq_flash: k and v shapes differ");
  if (kd[0] != sh.b || kd[3] != sh.d || sh.hkv < 1 || sh.hq % sh.hkv != 0 || sh.d % kLanes != 0)
    return ffi::Error::InvalidArgument("sparq_flash: k, v [B, Hkv, S, D] do not fit q, or D is not a multiple of 16");
  if (!IsF32OrBf16(q.element_type()) || !IsF32OrBf16(k.element_type()) || k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("sparq_flash: q float32/bfloat16, k and v one of those");
  if (key_valid.element_count() != sh.b * sh.s || k_pos.element_count() != sh.b * sh.s ||
      q_pos.element_count() != sh.b * sh.tq || start.element_count() != 1)
    return ffi::Error::InvalidArgument("sparq_flash: key_valid, k_pos [B, S], q_pos [B, Tq], start []");
  sh.window = window;
  sh.start = start.typed_data()[0];
  sh.scale = 1.0f / std::sqrt(static_cast<float>(sh.d));
  sh.round_p = v.element_type() == ffi::DataType::BF16;
  if (sh.start < 0) return ffi::Error::InvalidArgument("sparq_flash: start must be >= 0");
  const bool* kv = key_valid.typed_data();
  const int32_t *kp = k_pos.typed_data(), *qp = q_pos.typed_data();
  float* o = out->typed_data();
  const bool q16 = q.element_type() == ffi::DataType::BF16, k16 = k.element_type() == ffi::DataType::BF16;
  const void *qv = q.untyped_data(), *kk = k.untyped_data(), *vv = v.untyped_data();
  if (q16 && k16 && HasBf16Dot()) Run<uint16_t, uint16_t, true>(pool, threads, sh, qv, kk, vv, kv, kp, qp, o);
  else if (q16 && k16) Run<uint16_t, uint16_t, false>(pool, threads, sh, qv, kk, vv, kv, kp, qp, o);
  else if (q16) Run<uint16_t, float, false>(pool, threads, sh, qv, kk, vv, kv, kp, qp, o);
  else if (k16) Run<float, uint16_t, false>(pool, threads, sh, qv, kk, vv, kv, kp, qp, o);
  else Run<float, float, false>(pool, threads, sh, qv, kk, vv, kv, kp, qp, o);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqFlash, FlashImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q [B, Tq, Hq, D]
                                  .Arg<ffi::AnyBuffer>()          // k [B, Hkv, S, D]
                                  .Arg<ffi::AnyBuffer>()          // v [B, Hkv, S, D]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // key_valid [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // k_pos [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B, Tq]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // start []
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, Tq, Hq, D]
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("threads"));
