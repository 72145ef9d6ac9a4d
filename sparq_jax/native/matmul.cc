// bfloat16-weight matrix products for few rows on CPU, as XLA FFI custom calls (sparq_jax.native).
//
// XLA:CPU runs a dot with bfloat16 operands about 10x slower than the fp32 one (measured 0.7 GB/s of
// weights against 8.7 GB/s for fp32 at [1, 576] x [576, 1536]), so a bfloat16 model decoded slower
// than its fp32 twin although it moves half the bytes. With one or a few rows of activations the
// product is bound by reading the weights: these kernels stream them once, widen each bfloat16 to
// fp32 (a 16-bit shift), and accumulate in fp32.
//
//   SparqMatmulBf16    x [T, M, K] f32, w [T, K, N] bf16 -> x @ w    [T, M, N] f32
//   SparqMatmulBf16Nt  x [T, M, K] f32, w [T, N, K] bf16 -> x @ w^T  [T, M, N] f32
//   SparqGemmBf16      the same for many rows (prefill) on AVX512-BF16 CPUs, x rounded to bf16
//                      (attribute transposed: w^T); see its section below
//
// T = 1 broadcasts one w to every batch entry of x. Work is split into (batch entry, column block)
// pieces taken from a shared counter by the caller and by tasks on XLA's intra-op thread pool;
// the caller waits for the pieces, never for the tasks (a task that starts late finds no work left).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common.inc.cc"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using sparq_native::Bf16;
using sparq_native::HasBf16Dot;
using sparq_native::F16;
using sparq_native::Parallel;
using sparq_native::Widen;

namespace {

constexpr int kMaxRows = 8;  // rows of x kept in registers per pass over w

// Column blocks of the kn kernel (tasks), each walked in register panels (BlockKnRows). The former
// kernel kept a block of y in L1 and loaded and stored it for every row of w: 13.9 GB/s of bfloat16
// weights against XLA's fp32 28.9 (30 distinct [576, 1536] at one row); the panels read 20.9.
constexpr int64_t kBlock = 512;

// y[m, c:c + 16 NV] over all k rows of w for m < R, the accumulators in registers (w read as
// 32 NV-byte segments of each row, rows in order).
template <int R, int NV>
__attribute__((always_inline)) inline void KnPanel(const float* x, int64_t x_stride, const uint16_t* w, int64_t k,
                                                   int64_t n, int64_t c, float* y, int64_t y_stride) {
  F16 acc[R][NV];
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NV; ++t) acc[m][t] = F16{};
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = w + i * n + c;
    F16 wv[NV];
    for (int t = 0; t < NV; ++t) wv[t] = Widen(row + 16 * t);
    for (int m = 0; m < R; ++m) {
      const float xm = x[m * x_stride + i];
      for (int t = 0; t < NV; ++t) acc[m][t] += xm * wv[t];
    }
  }
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NV; ++t) std::memcpy(y + m * y_stride + c + 16 * t, &acc[m][t], sizeof(F16));
}

// y[m, n0:n1] = sum_k x[m, k] w[k, n] for m < R (a constant, so the loops unroll): panels of 16 NV
// columns (NV as many as the registers hold for R rows), then single vectors, then scalars.
template <int R>
__attribute__((always_inline)) inline void BlockKnRows(const float* x, int64_t x_stride, const uint16_t* w, int64_t k,
                                                       int64_t n, int64_t n0, int64_t n1, float* y, int64_t y_stride) {
  constexpr int NV = R <= 3 ? 8 : (R <= 6 ? 4 : 3);
  int64_t c = n0;
  for (; c + 16 * NV <= n1; c += 16 * NV) KnPanel<R, NV>(x, x_stride, w, k, n, c, y, y_stride);
  for (; c + 16 <= n1; c += 16) KnPanel<R, 1>(x, x_stride, w, k, n, c, y, y_stride);
  for (; c < n1; ++c)
    for (int m = 0; m < R; ++m) {
      float sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += x[m * x_stride + i] * Bf16(w[i * n + c]);
      y[m * y_stride + c] = sum;
    }
}

// y[m, j] = sum_k x[m, k] w[j, k] for j in [n0, n1), m < R.
template <int R>
__attribute__((always_inline)) inline void BlockNtRows(const float* x, int64_t x_stride, const uint16_t* w, int64_t k,
                                                       int64_t n0, int64_t n1, float* y, int64_t y_stride) {
  const int64_t kv = k / 16 * 16;
  for (int64_t j = n0; j < n1; ++j) {
    const uint16_t* row = w + j * k;
    F16 acc[R] = {};
    for (int64_t i = 0; i < kv; i += 16) {
      F16 wv = Widen(row + i);
      for (int m = 0; m < R; ++m) {
        F16 xv;
        std::memcpy(&xv, x + m * x_stride + i, sizeof xv);
        acc[m] += xv * wv;
      }
    }
    for (int m = 0; m < R; ++m) {
      float s = 0;
      for (int l = 0; l < 16; ++l) s += acc[m][l];
      for (int64_t i = kv; i < k; ++i) s += x[m * x_stride + i] * Bf16(row[i]);
      y[m * y_stride + j] = s;
    }
  }
}

#define SPARQ_DISPATCH_ROWS(FN, ...)         \
  switch (rows) {                            \
    case 1: FN<1>(__VA_ARGS__); break;       \
    case 2: FN<2>(__VA_ARGS__); break;       \
    case 3: FN<3>(__VA_ARGS__); break;       \
    case 4: FN<4>(__VA_ARGS__); break;       \
    case 5: FN<5>(__VA_ARGS__); break;       \
    case 6: FN<6>(__VA_ARGS__); break;       \
    case 7: FN<7>(__VA_ARGS__); break;       \
    default: FN<8>(__VA_ARGS__); break;      \
  }

__attribute__((target_clones("avx512f", "avx2", "default")))
void BlockKn(const float* x, int64_t x_stride, int64_t rows, const uint16_t* w, int64_t k, int64_t n,
             int64_t n0, int64_t n1, float* y, int64_t y_stride) {
  SPARQ_DISPATCH_ROWS(BlockKnRows, x, x_stride, w, k, n, n0, n1, y, y_stride)
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void BlockNt(const float* x, int64_t x_stride, int64_t rows, const uint16_t* w, int64_t k, int64_t n0,
             int64_t n1, float* y, int64_t y_stride) {
  SPARQ_DISPATCH_ROWS(BlockNtRows, x, x_stride, w, k, n0, n1, y, y_stride)
}

ffi::Error Check(ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& w, int64_t* t, int64_t* m, int64_t* k, int64_t* n,
                 bool nt) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3)
    return ffi::Error::InvalidArgument("sparq_matmul_bf16: x and w must be rank 3");
  if (w.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("sparq_matmul_bf16: w must be bfloat16");
  *t = xd[0];
  *m = xd[1];
  *k = xd[2];
  *n = nt ? wd[1] : wd[2];
  if ((wd[0] != 1 && wd[0] != *t) || (nt ? wd[2] : wd[1]) != *k)
    return ffi::Error::InvalidArgument("sparq_matmul_bf16: x and w shapes do not match");
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> out, int64_t threads, bool nt) {
  int64_t t, m, k, n;
  if (auto err = Check(x, w, &t, &m, &k, &n, nt); err.failure()) return err;
  const float* xp = x.typed_data();
  const uint16_t* wp = static_cast<const uint16_t*>(w.untyped_data());
  const bool shared = w.dimensions()[0] == 1;
  float* yp = out->typed_data();
  // Column blocks: whole cache lines of w per row (kn) or enough rows to be worth a task (nt).
  const int64_t block = nt ? 64 : kBlock;
  const int64_t blocks = (n + block - 1) / block;
  // kn with few column blocks (a [576, 1536] projection has 3, a [1536, 576] one 2: one thread would
  // idle) also splits w's rows: each piece sums its rows' share into its own partial y, then the
  // partials are added. Pieces of at least 64 rows of w, about 4 per thread in all.
  const int64_t splits = nt ? 1 : std::max<int64_t>(1, std::min<int64_t>((4 * threads + t * blocks - 1) / (t * blocks), k / 64));
  std::vector<float> partial(splits > 1 ? t * splits * m * n : 0);
  float* pp = partial.data();
  auto work = [=](int64_t p) {
    const int64_t b = p / (blocks * splits), rest = p % (blocks * splits);
    const int64_t c0 = rest / splits * block, c1 = std::min(n, c0 + block), s = rest % splits;
    const int64_t k0 = k * s / splits, k1 = k * (s + 1) / splits;
    const uint16_t* wb = wp + (shared ? 0 : b * k * n);
    for (int64_t r = 0; r < m; r += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - r);
      const float* xb = xp + (b * m + r) * k;
      float* yb = splits > 1 ? pp + ((b * splits + s) * m + r) * n : yp + (b * m + r) * n;
      if (nt)
        BlockNt(xb, k, rows, wb, k, c0, c1, yb, n);
      else
        BlockKn(xb + k0, k, rows, wb + k0 * n, k1 - k0, n, c0, c1, yb, n);
    }
  };
  Parallel(pool, threads, t * blocks * splits, work);
  if (splits > 1)
    Parallel(pool, threads, t * m, [=](int64_t p) {
      const int64_t b = p / m, r = p % m;
      float* y = yp + p * n;
      const float* first = pp + (b * splits * m + r) * n;
      std::memcpy(y, first, n * sizeof(float));
      for (int64_t s = 1; s < splits; ++s) {
        const float* part = pp + ((b * splits + s) * m + r) * n;
        for (int64_t c = 0; c < n; ++c) y[c] += part[c];
      }
    });
  return ffi::Error::Success();
}

ffi::Error MatmulKn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  return MatmulImpl(pool, x, w, out, threads, false);
}

ffi::Error MatmulNt(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  return MatmulImpl(pool, x, w, out, threads, true);
}

// ---------------------------------------------------------------------------------------------
// Many rows (prefill): SparqGemmBf16 rounds x to bfloat16 and multiplies with AVX512-BF16's
// vdpbf16ps (two bfloat16 products summed into an fp32 lane per instruction: twice the fp32 FMA's
// work per instruction), accumulating in fp32. w is packed once per call into pairs of rows,
// [K/2][N][2], the layout vdpbf16ps reads; a piece is kGemmRows rows x kGemmCols columns, its
// accumulators held in registers over the whole K.
//
//   SparqGemmBf16  x [T, M, K] f32, w [T or 1, K, N] bf16 (transposed: [T or 1, N, K]) -> [T, M, N] f32
//
// Runs only where the CPU has avx512_bf16 (else InvalidArgument: the caller checks first).
constexpr int64_t kGemmCols = 64;    // 4 zmm of fp32 accumulators per row
constexpr int64_t kGemmRowTile = 6;  // rows of x per microkernel: 24 accumulators
constexpr int64_t kGemmRows = 96;    // rows per piece (16 microkernel tiles)

inline uint16_t RoundBf16(float f) {  // round to nearest even (NaN kept quiet)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// wp[(k / 2) * n_pad * 2 + j * 2 + (k % 2)] = w[k, j] (kn) or w[j, k] (nt); zero past k and n.
void PackW(const uint16_t* w, int64_t k, int64_t n, int64_t n_pad, bool nt, uint16_t* wp) {
  const int64_t k2 = (k + 1) / 2;
  std::memset(wp, 0, k2 * n_pad * 2 * sizeof(uint16_t));
  if (!nt) {
    for (int64_t i = 0; i < k; ++i) {
      const uint16_t* row = w + i * n;
      uint16_t* dst = wp + (i / 2) * n_pad * 2 + (i % 2);
      for (int64_t j = 0; j < n; ++j) dst[j * 2] = row[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* row = w + j * k;
      for (int64_t i = 0; i < k; ++i) wp[(i / 2) * n_pad * 2 + j * 2 + (i % 2)] = row[i];
    }
  }
}

// y[r, c0:c0+kGemmCols] for R rows of xb (bf16 pairs as uint32 [R][k2]), columns masked at n.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void GemmTile(
    const uint32_t* xb, int64_t k2, const uint16_t* wp, int64_t n_pad, int64_t c0, int64_t n, float* y,
    int64_t y_stride) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint16_t* wcol = wp + c0 * 2;
  for (int64_t i = 0; i < k2; ++i) {
    const uint16_t* wrow = wcol + i * n_pad * 2;
    __m512bh wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(wrow + c * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[r * k2 + i]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t col = c0 + c * 16;
    if (col >= n) break;
    const __mmask16 mask = col + 16 <= n ? 0xffff : static_cast<__mmask16>((1u << (n - col)) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * y_stride + col, mask, acc[r][c]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void GemmRows(
    const uint32_t* xb, int64_t rows, int64_t k2, const uint16_t* wp, int64_t n_pad, int64_t c0, int64_t n,
    float* y, int64_t y_stride) {
  int64_t r = 0;
  for (; r + kGemmRowTile <= rows; r += kGemmRowTile)
    GemmTile<kGemmRowTile>(xb + r * k2, k2, wp, n_pad, c0, n, y + r * y_stride, y_stride);
  const uint32_t* xr = xb + r * k2;
  float* yr = y + r * y_stride;
  switch (rows - r) {
    case 1: GemmTile<1>(xr, k2, wp, n_pad, c0, n, yr, y_stride); break;
    case 2: GemmTile<2>(xr, k2, wp, n_pad, c0, n, yr, y_stride); break;
    case 3: GemmTile<3>(xr, k2, wp, n_pad, c0, n, yr, y_stride); break;
    case 4: GemmTile<4>(xr, k2, wp, n_pad, c0, n, yr, y_stride); break;
    case 5: GemmTile<5>(xr, k2, wp, n_pad, c0, n, yr, y_stride); break;
    default: break;
  }
}

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::ResultBuffer<ffi::F32> out, int64_t threads, int64_t transposed) {
  const bool nt = transposed != 0;
  int64_t t, m, k, n;
  if (auto err = Check(x, w, &t, &m, &k, &n, nt); err.failure()) return err;
  if (!HasBf16Dot()) return ffi::Error::InvalidArgument("sparq_gemm_bf16: this CPU has no avx512_bf16");
  const int64_t k2 = (k + 1) / 2, n_pad = (n + kGemmCols - 1) / kGemmCols * kGemmCols;
  const int64_t wt = w.dimensions()[0];
  const uint16_t* wsrc = static_cast<const uint16_t*>(w.untyped_data());
  // w packed (each batch entry of w), x rounded to bfloat16 pairs: one pass each, in parallel.
  std::vector<uint16_t> wp(wt * k2 * n_pad * 2);
  std::vector<uint32_t> xb(t * m * k2);
  const float* xp = x.typed_data();
  const int64_t xrows = t * m, xchunk = 256;
  const int64_t xpieces = (xrows + xchunk - 1) / xchunk;
  Parallel(pool, threads, wt + xpieces, [&, xp](int64_t p) {
    if (p < wt) {
      PackW(wsrc + p * k * n, k, n, n_pad, nt, wp.data() + p * k2 * n_pad * 2);
      return;
    }
    const int64_t r0 = (p - wt) * xchunk, r1 = std::min(xrows, r0 + xchunk);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < k2; ++i) {
        const uint16_t lo = RoundBf16(xp[r * k + 2 * i]);
        const uint16_t hi = 2 * i + 1 < k ? RoundBf16(xp[r * k + 2 * i + 1]) : 0;
        xb[r * k2 + i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
  });
  float* yp = out->typed_data();
  const int64_t col_blocks = n_pad / kGemmCols, row_blocks = (m + kGemmRows - 1) / kGemmRows;
  const uint16_t* wpd = wp.data();
  const uint32_t* xbd = xb.data();
  // Pieces ordered column block by column block, so the two threads share w's block in L2/L3.
  Parallel(pool, threads, t * col_blocks * row_blocks, [=](int64_t p) {
    const int64_t b = p / (col_blocks * row_blocks), rest = p % (col_blocks * row_blocks);
    const int64_t c0 = rest / row_blocks * kGemmCols, r0 = rest % row_blocks * kGemmRows;
    const int64_t rows = std::min(kGemmRows, m - r0);
    const uint16_t* wb = wpd + (wt == 1 ? 0 : b * k2 * n_pad * 2);
    GemmRows(xbd + (b * m + r0) * k2, rows, k2, wb, n_pad, c0, n, yp + (b * m + r0) * n, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqGemmBf16, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("transposed"));

namespace {
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqMatmulBf16, MatmulKn,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqMatmulBf16Nt, MatmulNt,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
