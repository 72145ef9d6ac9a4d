// SparQ's top-k selection on CPU as an XLA FFI custom call (sparq_jax.native).
//
// For each row of an fp32 score [rows, S]: the positions of the k largest entries, ties taken at the
// lowest positions first, written in increasing position order -- exactly the set and order of
// sparq_jax.attention.top_k_positions (the XLA counting bisection), which the tests compare against.
// Floats are compared through the same order-preserving integer image (pallas_kernels.order_key:
// -0.0 equal to +0.0). The k-th largest key is found by a three-digit radix select (11 + 11 + 10
// bits: one histogram pass over the row, then passes over the few keys that share the digits found
// so far), then one pass writes the positions. Rows are split over XLA's intra-op thread pool.
#include "common.inc.cc"

namespace ffi = xla::ffi;
using namespace sparq_native;

namespace {

// Below this many scores in all, the rows are selected on the calling thread: waking XLA's pool costs
// more than it saves (SparQ at batch 1 selects 3-32 rows of a few thousand).
constexpr int64_t kMinParallel = 1 << 16;

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> score, ffi::ResultBuffer<ffi::S32> out, int64_t k,
                    int64_t threads) {
  auto dims = score.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("sparq_top_k: score must have at least one axis");
  const int64_t s = dims.back();
  if (k < 1 || k > s || s >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("sparq_top_k: need 1 <= k <= S < 2**31");
  const int64_t rows = s ? static_cast<int64_t>(score.element_count()) / s : 0;
  const float* in = score.typed_data();
  int32_t* res = out->typed_data();
  auto work = [=](int64_t r) {
    thread_local std::vector<int32_t> keys, scratch;
    TopKRow(in + r * s, s, k, res + r * k, keys, scratch);
  };
  // Rows are taken one at a time by the caller and by tasks on XLA's intra-op pool (no thread is
  // started per call).
  Parallel(pool, rows * s < kMinParallel ? 1 : threads, rows, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));
