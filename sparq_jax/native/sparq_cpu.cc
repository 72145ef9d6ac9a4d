// SparQ Attention's decode step on CPU, all of Algorithm 1 in one XLA FFI custom call
// (sparq_jax.native.sparq_fused; the cpu_fused backend of sparq_jax.backends).
//
// For each (batch row, KV head), on one thread, with every intermediate in that thread's cache:
//   i1      the r largest components of sum_g |q_g| (ties to the lowest component), q1 = q[:, i1]
//   z_g     = q1_g . K[:, i1]^T / tau_g, tau_g = sqrt(D |q1_g|_1 / |q_g|_1) (sqrt(D) for q_g = 0),
//           read as r rows of K^T (or strided from K), only over the span of the mask's candidates
//   s_hat_g = softmax of z_g over the mask's candidates (fp32; exp by a vectorised polynomial)
//   score   = sum_g s_hat_g ("softmax") or sum_g z_g ("logits"); +inf on the always-kept positions
//           (the last max(local_window, 1) below lengths[b]), -inf off the mask
//   i2      the k largest scores, ties to the lowest positions, in increasing order (TopKRow, the
//           native top-k's own row select)
//   out_g   = softmax(q_g . K[i2]^T / sqrt(D)) . V[i2] over the valid (masked) entries of i2, the
//           gathered rows read once for the whole group; with reallocation
//           alpha_g = sum s_hat_g[i2 valid] and out_g = alpha_g out_g + (1 - alpha_g) v_bar.
// Keys and values are float32 or bfloat16 (widened on load); every sum is fp32. The (row, head)
// items are taken by the caller and by tasks on XLA's intra-op pool.
#include <cmath>

#include "common.inc.cc"

namespace ffi = xla::ffi;
using namespace sparq_native;

namespace {

constexpr int64_t kMaxD = 512, kMaxG = 64, kMaxGD = 4096;  // the stack buffers' sizes

struct Shape {
  int64_t b, h, g, d, s, k, rank, local_window;
  bool group_logits, reallocate, transposed;
};

struct Scratch {
  std::vector<float> z;        // [G, Sp]: the approximate logits, then exp(z - max)
  std::vector<float> score;    // [Sp]
  std::vector<float> logits;   // [G, K]: step 2's logits, then their exps
  std::vector<int32_t> keys, select;
};

// One (batch row, KV head) item: see the comment at the top. T: the cache's element type (float, bfloat16 bits).
template <typename T>
__attribute__((always_inline)) inline void Item(const Shape& sh, int64_t item, const float* q_all, const T* keys1_all,
                                                const T* k_all, const T* v_all, const bool* mask_all,
                                                const int32_t* lengths, const float* v_bar_all, float* out_all,
                                                int32_t* i2_all, Scratch& w) {
  const int64_t G = sh.g, D = sh.d, S = sh.s, K = sh.k, R = sh.rank;
  const int64_t b = item / sh.h;
  const float* q = q_all + item * G * D;
  const T* keys1 = keys1_all + item * S * D;   // K^T [D, S] or K [S, D]
  const T* kk = k_all + item * S * D;
  const T* vv = v_all + item * S * D;
  const bool* mask = mask_all + b * S;
  int32_t* i2 = i2_all + item * K;
  float* out = out_all + item * G * D;

  // Step 1's components: the r largest of sum_g |q_g| (ties to the lower component), as lax.top_k.
  int32_t i1[kMaxD];
  float absq[kMaxD];
  for (int64_t c = 0; c < D; ++c) {
    float a = 0;
    for (int64_t g = 0; g < G; ++g) a += std::fabs(q[g * D + c]);
    absq[c] = a;
    i1[c] = static_cast<int32_t>(c);
  }
  std::partial_sort(i1, i1 + R, i1 + D, [&](int32_t x, int32_t y) { return absq[x] > absq[y] || (absq[x] == absq[y] && x < y); });
  float q1[kMaxGD];  // [G, R]
  float tau[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    float part = 0, full = 0;
    for (int64_t c = 0; c < R; ++c) {
      q1[g * R + c] = q[g * D + i1[c]];
      part += std::fabs(q1[g * R + c]);
    }
    for (int64_t c = 0; c < D; ++c) full += std::fabs(q[g * D + c]);
    tau[g] = std::sqrt(static_cast<float>(D) * (full > 0 ? part / full : 1.0f));
  }

  // The span of the candidates: step 1 and the softmax read only [lo, hi) (whole vectors [lo_v, hi_v)).
  int64_t lo = 0, hi = S;
  while (lo < S && !mask[lo]) ++lo;
  while (hi > lo && !mask[hi - 1]) --hi;
  const int64_t lo_v = lo / kLanes * kLanes, hi_v = (hi + kLanes - 1) / kLanes * kLanes;
  // Usually the candidates are all of [lo, hi) (valid positions, a sliding window); else the
  // positions off the mask inside the span are handled one by one.
  const bool contiguous = hi <= lo || std::memchr(mask + lo, 0, hi - lo) == nullptr;
  const int64_t sp = (S + kLanes - 1) / kLanes * kLanes;
  w.z.resize(G * sp + kLanes);
  w.score.resize(sp + kLanes);
  float* z = w.z.data();

  // z_g = q1_g . K[:, i1] over [lo_v, hi_v) (positions past S read as 0 from the padding below).
  for (int64_t g = 0; g < G; ++g) std::fill(z + g * sp + lo_v, z + g * sp + hi_v, 0.0f);
  if (sh.transposed) {
    constexpr int64_t kBlock = 512;  // z's block stays in L1 across the r rows
    for (int64_t s0 = lo_v; s0 < hi_v; s0 += kBlock) {
      const int64_t s1 = std::min(hi_v, s0 + kBlock);
      const int64_t full_end = std::min(s1, S / kLanes * kLanes);
      for (int64_t c = 0; c < R; ++c) {
        const T* row = keys1 + int64_t{i1[c]} * S;
        for (int64_t g = 0; g < G; ++g) {
          const float qc = q1[g * R + c];
          float* zg = z + g * sp;
          int64_t s = s0;
          for (; s < full_end; s += kLanes) Store(zg + s, Load(zg + s) + qc * Load(row + s));
          for (; s < std::min(s1, S); ++s) zg[s] += qc * Scalar(row[s]);
        }
      }
    }
  } else {
    for (int64_t s = lo; s < hi; ++s) {
      const T* row = keys1 + s * D;
      for (int64_t c = 0; c < R; ++c) {
        const float kv = Scalar(row[i1[c]]);
        for (int64_t g = 0; g < G; ++g) z[g * sp + s] += q1[g * R + c] * kv;
      }
    }
  }

  // z /= tau; -inf off the mask (and on the vector padding); the max per head.
  float m[kMaxG], l[kMaxG];
  const F16 lo_f = F16{} + static_cast<float>(lo), hi_f = F16{} + static_cast<float>(hi);
  for (int64_t g = 0; g < G; ++g) {
    float* zg = z + g * sp;
    if (!contiguous)
      for (int64_t s = lo; s < hi; ++s) zg[s] = mask[s] ? zg[s] : -INFINITY;
    F16 top = F16{} - INFINITY;
    for (int64_t s = lo_v; s < hi_v; s += kLanes) {
      const F16 pos = Iota() + static_cast<float>(s);
      F16 x = Load(zg + s) / tau[g];
      x = (pos >= lo_f) & (pos < hi_f) ? x : -INFINITY;
      Store(zg + s, x);
      top = top > x ? top : x;
    }
    float t = -INFINITY;
    for (int l2 = 0; l2 < kLanes; ++l2) t = std::max(t, top[l2]);
    m[g] = t;
  }
  float* score = w.score.data();
  const bool need_exp = !sh.group_logits || sh.reallocate;
  if (sh.group_logits) {  // the group's summed logits, before z becomes exp(z - m)
    for (int64_t s = lo_v; s < hi_v; s += kLanes) {
      F16 acc = Load(z + s);
      for (int64_t g = 1; g < G; ++g) acc += Load(z + g * sp + s);
      Store(score + s, acc);
    }
  }
  if (need_exp) {
    for (int64_t g = 0; g < G; ++g) {
      float* zg = z + g * sp;
      F16 sum{};
      for (int64_t s = lo_v; s < hi_v; s += kLanes) {
        const F16 e = Exp(Load(zg + s) - m[g]);
        Store(zg + s, e);
        sum += e;
      }
      l[g] = Sum(sum);
    }
  }
  if (!sh.group_logits) {  // sum_g s_hat_g
    for (int64_t s = lo_v; s < hi_v; s += kLanes) {
      F16 acc = Load(z + s) / l[0];
      for (int64_t g = 1; g < G; ++g) acc += Load(z + g * sp + s) / l[g];
      Store(score + s, acc);
    }
  }
  // As the top-k ranks it: -inf off the mask, +inf on the always-kept positions.
  const int64_t len = lengths[b];
  const int64_t kept_from = len - std::max<int64_t>(sh.local_window, 1);
  std::fill(score, score + lo_v, -INFINITY);
  std::fill(score + std::min(hi_v, S), score + S, -INFINITY);
  if (contiguous) {
    const F16 kept_lo = F16{} + static_cast<float>(std::max<int64_t>(kept_from, 0)),
              kept_hi = F16{} + static_cast<float>(len);
    for (int64_t s = lo_v; s < hi_v; s += kLanes) {
      const F16 pos = Iota() + static_cast<float>(s);
      F16 x = (pos >= kept_lo) & (pos < kept_hi) ? F16{} + INFINITY : Load(score + s);
      Store(score + s, (pos >= lo_f) & (pos < hi_f) ? x : -INFINITY);
    }
  } else {
    for (int64_t s = lo_v; s < std::min(hi_v, S); ++s) {
      const bool in = s >= lo && s < hi && mask[s];
      score[s] = !in ? -INFINITY : (s < len && s >= kept_from) ? INFINITY : score[s];
    }
  }
  TopKRow(score, S, K, i2, w.keys, w.select);

  // Steps 2 and 3 over the valid positions of i2: logits for the whole group from each K row, then
  // the softmax, then each V row weighted for the whole group.
  w.logits.resize(G * K);
  float* lg = w.logits.data();
  const int64_t dv = D / kLanes * kLanes;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float alpha[kMaxG], top2[kMaxG], total[kMaxG];
  for (int64_t g = 0; g < G; ++g) alpha[g] = 0, top2[g] = -INFINITY, total[g] = 0;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  auto prefetch_row = [&](const T* row) {
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + o);
  };
  for (int64_t j = 0; j < std::min<int64_t>(K, 32); ++j) prefetch_row(kk + int64_t{i2[j]} * D);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t p = i2[j];
    if (j + 32 < K) prefetch_row(kk + int64_t{i2[j + 32]} * D);
    prefetch_row(vv + p * D);
    if (!mask[p]) {
      for (int64_t g = 0; g < G; ++g) lg[g * K + j] = -INFINITY;
      continue;
    }
    const T* row = kk + p * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      F16 acc{};
      for (int64_t c = 0; c < dv; c += kLanes) acc += Load(qg + c) * Load(row + c);
      float dot = Sum(acc);
      for (int64_t c = dv; c < D; ++c) dot += qg[c] * Scalar(row[c]);
      lg[g * K + j] = dot * scale;
      top2[g] = std::max(top2[g], lg[g * K + j]);
      if (sh.reallocate) alpha[g] += z[g * sp + p] / l[g];
    }
  }
  float acc[kMaxGD];  // [G, D]
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = 0; j < K; ++j) {
      const float e = std::exp(lg[g * K + j] - top2[g]);  // 0 for the invalid (-inf) entries
      lg[g * K + j] = e;
      total[g] += e;
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    const int64_t p = i2[j];
    if (!mask[p]) continue;
    const T* row = vv + p * D;
    for (int64_t g = 0; g < G; ++g) {
      const float e = lg[g * K + j];
      float* ag = acc + g * D;
      int64_t c = 0;
      for (; c < dv; c += kLanes) Store(ag + c, Load(ag + c) + e * Load(row + c));
      for (; c < D; ++c) ag[c] += e * Scalar(row[c]);
    }
  }
  const float* v_bar = v_bar_all + item * D;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < D; ++c) {
      const float y = acc[g * D + c] / total[g];
      out[g * D + c] = sh.reallocate ? alpha[g] * y + (1 - alpha[g]) * v_bar[c] : y;
    }
  }
}

// The per-item entries (built with -march=native: see sparq_jax.native._arch_flags).
void ItemF32(const Shape& sh, int64_t item, const float* q, const float* keys1, const float* k, const float* v,
             const bool* mask, const int32_t* lengths, const float* v_bar, float* out, int32_t* i2, Scratch& w) {
  Item<float>(sh, item, q, keys1, k, v, mask, lengths, v_bar, out, i2, w);
}

void ItemBf16(const Shape& sh, int64_t item, const float* q, const uint16_t* keys1, const uint16_t* k,
              const uint16_t* v, const bool* mask, const int32_t* lengths, const float* v_bar, float* out,
              int32_t* i2, Scratch& w) {
  Item<uint16_t>(sh, item, q, keys1, k, v, mask, lengths, v_bar, out, i2, w);
}

ffi::Error FusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys1, ffi::AnyBuffer k,
                     ffi::AnyBuffer v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> lengths,
                     ffi::Buffer<ffi::F32> v_bar, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::S32> i2,
                     int64_t rank, int64_t top_k, int64_t local_window, int64_t group_logits, int64_t reallocate,
                     int64_t transposed, int64_t threads) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = keys1.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("sparq_fused: q, keys, k and v must be rank 4");
  Shape sh{qd[0], qd[1], qd[2], qd[3], kd[2], top_k, rank, local_window, group_logits != 0, reallocate != 0,
           transposed != 0};
  const auto type = k.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || keys1.element_type() != type ||
      v.element_type() != type)
    return ffi::Error::InvalidArgument("sparq_fused: keys, k and v must all be float32 or all bfloat16");
  const bool shapes_ok = kd[0] == sh.b && kd[1] == sh.h && kd[3] == sh.d && vd[0] == sh.b && vd[1] == sh.h &&
                         vd[2] == sh.s && vd[3] == sh.d && td[0] == sh.b && td[1] == sh.h &&
                         (sh.transposed ? td[2] == sh.d && td[3] == sh.s : td[2] == sh.s && td[3] == sh.d);
  if (!shapes_ok) return ffi::Error::InvalidArgument("sparq_fused: q, keys, k and v shapes do not match");
  if (sh.d > kMaxD || sh.g > kMaxG || sh.g * sh.d > kMaxGD || rank < 1 || rank > sh.d || top_k < 1 || top_k > sh.s ||
      sh.s >= (int64_t{1} << 24))
    return ffi::Error::InvalidArgument(
        "sparq_fused: need D <= 512, G <= 64, G * D <= 4096, 1 <= rank <= D, 1 <= top_k <= S < 2**24");
  if (mask.element_count() != static_cast<size_t>(sh.b * sh.s) || lengths.element_count() != static_cast<size_t>(sh.b) ||
      v_bar.element_count() != static_cast<size_t>(sh.b * sh.h * sh.d))
    return ffi::Error::InvalidArgument("sparq_fused: mask [B, S], lengths [B] or v_bar [B, Hkv, D] misshapen");
  const float* qp = q.typed_data();
  const bool* mp = mask.typed_data();
  const int32_t* lp = lengths.typed_data();
  const float* vb = v_bar.typed_data();
  float* op = out->typed_data();
  int32_t* ip = i2->typed_data();
  const bool bf16 = type == ffi::DataType::BF16;
  const void *t1 = keys1.untyped_data(), *kp = k.untyped_data(), *vp = v.untyped_data();
  auto work = [=](int64_t item) {
    thread_local Scratch scratch;
    if (bf16)
      ItemBf16(sh, item, qp, static_cast<const uint16_t*>(t1), static_cast<const uint16_t*>(kp),
               static_cast<const uint16_t*>(vp), mp, lp, vb, op, ip, scratch);
    else
      ItemF32(sh, item, qp, static_cast<const float*>(t1), static_cast<const float*>(kp),
              static_cast<const float*>(vp), mp, lp, vb, op, ip, scratch);
  };
  Parallel(pool, threads, sh.b * sh.h, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqFused, FusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, Hkv, G, D]
                                  .Arg<ffi::AnyBuffer>()          // K^T [B, Hkv, D, S], or K
                                  .Arg<ffi::AnyBuffer>()          // K [B, Hkv, S, D]
                                  .Arg<ffi::AnyBuffer>()          // V [B, Hkv, S, D]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths [B]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_bar [B, Hkv, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, Hkv, G, D]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // i2 [B, Hkv, k]
                                  .Attr<int64_t>("rank")
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("local_window")
                                  .Attr<int64_t>("group_logits")
                                  .Attr<int64_t>("reallocate")
                                  .Attr<int64_t>("transposed")
                                  .Attr<int64_t>("threads"));
