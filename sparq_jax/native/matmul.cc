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
//
// T = 1 broadcasts one w to every batch entry of x. Work is split into (batch entry, column block)
// pieces taken from a shared counter by the caller and by tasks on XLA's intra-op thread pool;
// the caller waits for the pieces, never for the tasks (a task that starts late finds no work left).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "common.inc.cc"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using sparq_native::Bf16;
using sparq_native::F16;
using sparq_native::Parallel;
using sparq_native::Widen;

namespace {

constexpr int kMaxRows = 8;  // rows of x kept in registers per pass over w

// y[m, n0:n1] = sum_k x[m, k] w[k, n] for m < R (a constant, so the loops unroll), n1 - n0 <= kBlock.
// Row by row of w (its segment [n0, n1) read contiguously, rows in order: what the prefetcher
// follows), accumulating into a block of y that stays in L1.
constexpr int64_t kBlock = 512;

template <int R>
__attribute__((always_inline)) inline void BlockKnRows(const float* x, int64_t x_stride, const uint16_t* w, int64_t k,
                                                       int64_t n, int64_t n0, int64_t n1, float* y, int64_t y_stride) {
  alignas(64) float acc[R][kBlock];
  const int64_t len = n1 - n0, vec = len / 16 * 16;
  for (int m = 0; m < R; ++m) std::memset(acc[m], 0, len * sizeof(float));
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = w + i * n + n0;
    float xv[R];
    for (int m = 0; m < R; ++m) xv[m] = x[m * x_stride + i];
    for (int64_t c = 0; c < vec; c += 16) {
      const F16 wv = Widen(row + c);
      for (int m = 0; m < R; ++m) {
        F16 a;
        std::memcpy(&a, acc[m] + c, sizeof a);
        a += xv[m] * wv;
        std::memcpy(acc[m] + c, &a, sizeof a);
      }
    }
    for (int64_t c = vec; c < len; ++c)
      for (int m = 0; m < R; ++m) acc[m][c] += xv[m] * Bf16(row[c]);
  }
  for (int m = 0; m < R; ++m) std::memcpy(y + m * y_stride + n0, acc[m], len * sizeof(float));
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
  auto work = [=](int64_t p) {
    const int64_t b = p / blocks, c0 = p % blocks * block, c1 = std::min(n, c0 + block);
    const uint16_t* wb = wp + (shared ? 0 : b * k * n);
    for (int64_t r = 0; r < m; r += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - r);
      const float* xb = xp + (b * m + r) * k;
      float* yb = yp + (b * m + r) * n;
      if (nt)
        BlockNt(xb, k, rows, wb, k, c0, c1, yb, n);
      else
        BlockKn(xb, k, rows, wb, k, n, c0, c1, yb, n);
    }
  };
  Parallel(pool, threads, t * blocks, work);
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
