// The KV cache's append for 16-bit caches on CPU, as an XLA FFI custom call writing in place
// (sparq_jax.cache; the output aliases the cache operand).
//
// XLA:CPU has no bfloat16 (or float16) scatter or dynamic-update-slice: its float normalisation
// wraps either in a convert of the whole cache to fp32 and back, so appending one position cost
// O(cache) per layer and decode step (a bfloat16 SmolLM2 decode step at 4k took 2.4x the fp32 one).
// Viewing the cache as uint16 instead costs whole-cache copies of its own (XLA materialises the
// bitcast-converts). This kernel copies only the new positions.
//
//   SparqCacheWrite  buf [B, H, S, D] (transposed: [B, H, D, S]), new [B, H, T, D] of buf's type,
//                    start int32 [B] -> buf with positions start[b] + t of row b set to new[b, :, t]
//                    (a position outside [0, S) is dropped, as the scatter drops it).
// The cache's own rank-4 shape, not a [B*H, ...] view: a reshape in front of an aliased custom call
// makes XLA copy the buffer before and after it.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error CacheWrite(ffi::AnyBuffer buf, ffi::AnyBuffer update, ffi::Buffer<ffi::S32> start,
                      ffi::Result<ffi::AnyBuffer> out, int64_t transposed) {
  auto bd = buf.dimensions();
  auto ud = update.dimensions();
  if (bd.size() != 4 || ud.size() != 4 || start.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("sparq_cache_write: buf and new must be rank 4, start rank 1");
  if (buf.element_type() != update.element_type() || out->element_type() != buf.element_type())
    return ffi::Error::InvalidArgument("sparq_cache_write: buf and new must have one dtype");
  const int64_t b = bd[0], h = bd[1], s = transposed ? bd[3] : bd[2], d = transposed ? bd[2] : bd[3], t = ud[2];
  if (ud[0] != b || ud[1] != h || ud[3] != d || start.dimensions()[0] != b)
    return ffi::Error::InvalidArgument("sparq_cache_write: shapes of buf, new and start do not match");
  const int64_t rows = b * h;
  const size_t width = ffi::ByteWidth(buf.element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(update.untyped_data());
  // The output aliases buf; should XLA ever hand over a distinct buffer, it starts as buf's copy.
  if (dst != buf.untyped_data()) std::memcpy(dst, buf.untyped_data(), buf.size_bytes());
  const int32_t* cols = start.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < t; ++j) {
      const int64_t col = static_cast<int64_t>(cols[r / h]) + j;
      if (col < 0 || col >= s) continue;
      const char* from = src + (r * t + j) * d * width;
      if (!transposed) {
        std::memcpy(dst + (r * s + col) * d * width, from, d * width);
      } else {
        char* base = dst + (r * d * s + col) * width;
        for (int64_t i = 0; i < d; ++i) std::memcpy(base + i * s * width, from + i * width, width);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparqCacheWrite, CacheWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("transposed"));
