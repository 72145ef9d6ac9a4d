"""The KV cache: a pytree of fixed-capacity buffers, with K optionally stored twice (the paper, Sec. 6).

Row b holds its valid positions at [0, lengths[b]) (left-aligned, whatever the prompt's padding);
positions at or past lengths[b] are never read as keys or values. Every update returns a new cache,
so under jit with the cache donated the buffers are updated in place.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import native
from .validation import check_int


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def native_write_applies(buf: jax.Array) -> bool:
    """Whether a write into buf goes through sparq_jax.native's in-place kernel: a 16-bit float
    buffer traced for the CPU with the native library built."""
    return (buf.dtype.itemsize == 2 and jnp.issubdtype(buf.dtype, jnp.floating) and jax.default_backend() == "cpu"
            and native.available()[0])


def write_rows(buf: jax.Array, start: jax.Array, new: jax.Array, transposed: bool) -> jax.Array:
    """buf [B, H, S, D] (transposed: [B, H, D, S]) with positions start[b] + t of row b set to
    new[b, :, t] (new [B, H, T, D], start int32 [B]); a position past the end is dropped.

    fp32: one scatter of whole rows into the [B*H, S, D] view, which XLA updates in place (a vmapped
    dynamic_update_slice, or a scatter XLA turns into one, makes XLA:CPU copy the buffer when a dot
    also reads it in the same program, as a decode step does).
    16-bit floats on CPU: sparq_jax.native's kernel, in place too, on the cache's own shape (a
    reshape around an aliased custom call makes XLA copy the buffer). XLA:CPU has no bfloat16
    scatter or dynamic-update-slice: its float normalisation wraps either in a convert of the whole
    buffer to fp32 and back, O(cache) per decode step instead of O(1) (measured on SmolLM2 at 4k,
    B=1: a bfloat16 step 137 ms against fp32's 58), and a uint16 view costs whole-buffer copies too
    (XLA:CPU materialises the bitcast-converts)."""
    if native_write_applies(buf):
        call = jax.ffi.ffi_call("sparq_jax_cache_write", jax.ShapeDtypeStruct(buf.shape, buf.dtype),
                                input_output_aliases={0: 0}, vmap_method="sequential")
        return call(buf, new, start, transposed=np.int64(transposed))
    b, h, t, d = new.shape
    flat = buf.reshape(b * h, *buf.shape[2:])
    rows = jnp.arange(b * h)[:, None]                                            # [B*H, 1]
    cols = jnp.repeat(start, h)[:, None] + jnp.arange(t)[None, :]                # [B*H, T]
    index = (rows, slice(None), cols) if transposed else (rows, cols)
    return flat.at[index].set(new.reshape(b * h, t, d)).reshape(buf.shape)


def _check_float_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's KV cache (stack caches on a leading axis for many layers; lax.scan slices them).

    k:          [B, Hkv, S, D]  keys, row-major per position (step 2 gathers whole rows)
    kt:         [B, Hkv, D, S]  the same keys transposed (step 1 reads r contiguous rows), or None
    v:          [B, Hkv, S, D]  values
    v_sum:      [B, Hkv, D]     fp32 running sum of V over the valid positions (v_bar = v_sum / length)
    lengths:    [B] int32       valid positions per row
    h2o_scores: [B, Hkv, S]     fp32 H2O state: attention accumulated per position (summed over each
                                KV group's query heads), -inf once evicted; None if not kept
    """

    k: jax.Array
    kt: Optional[jax.Array]
    v: jax.Array
    v_sum: jax.Array
    lengths: jax.Array
    h2o_scores: Optional[jax.Array] = None

    # Shapes are read off the trailing axes so that a layer-stacked cache reports them too.
    @property
    def batch(self) -> int:
        return self.k.shape[-4]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[-3]

    @property
    def max_len(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k.dtype

    @property
    def transposed_keys(self) -> bool:
        return self.kt is not None

    def overflowed(self) -> jax.Array:
        """bool: whether some row's length went past max_len (an append inside jit beyond the
        capacity: its writes were dropped). Traceable; eager append and attend raise on it."""
        return jnp.any(self.lengths > self.max_len)

    @classmethod
    def create(cls, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype=jnp.float32,
               transposed_keys: bool = True, h2o: bool = False) -> "KVCache":
        """An empty cache (all lengths 0). h2o=True keeps the state the H2O method needs."""
        for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            check_int(name, value)
        dtype = _check_float_dtype(dtype)
        shape = (batch, num_kv_heads, max_len, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            kt=jnp.zeros((batch, num_kv_heads, head_dim, max_len), dtype) if transposed_keys else None,
            v=jnp.zeros(shape, dtype),
            v_sum=jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32),
            lengths=jnp.zeros((batch,), jnp.int32),
            h2o_scores=jnp.zeros((batch, num_kv_heads, max_len), jnp.float32) if h2o else None,
        )

    @classmethod
    def from_kv(cls, k, v, lengths, max_len: Optional[int] = None, transposed_keys: bool = True,
                h2o_scores=None) -> "KVCache":
        """A cache holding k, v [B, Hkv, S, D], row b valid at [0, lengths[b]).

        Positions past a row's length are zeroed, so padding can never leak NaN or inf into a
        weighted sum. max_len (default S) is the capacity; it must be >= S.
        h2o_scores [B, Hkv, S] fp32 seeds H2O's accumulated attention: the column sums of the prompt's
        dense attention probabilities over all prompt queries, summed over each KV group's query
        heads (what H2O accumulates during prefill). None keeps no H2O state.
        """
        k, v = jnp.asarray(k), jnp.asarray(v)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be [B, Hkv, S, D] of one shape, got k {k.shape}, v {v.shape}")
        _check_float_dtype(k.dtype)
        _check_float_dtype(v.dtype)
        b, h, s, d = k.shape
        max_len = s if max_len is None else max_len
        check_int(f"max_len (at least the {s} positions given)", max_len, s)
        if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
            raise ValueError(f"lengths must be integers, got {lengths!r}")
        lengths = jnp.asarray(lengths, jnp.int32)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape ({b},), got {lengths.shape}")
        if _is_concrete(lengths):
            concrete = np.asarray(lengths)
            if concrete.min() < 0 or concrete.max() > s:
                raise ValueError(f"lengths must lie in [0, {s}], got {concrete.tolist()}")
        valid = jnp.arange(s)[None, :] < lengths[:, None]                      # [B, S]
        pad = ((0, 0), (0, 0), (0, max_len - s), (0, 0))
        k = jnp.pad(jnp.where(valid[:, None, :, None], k, 0), pad)
        v = jnp.pad(jnp.where(valid[:, None, :, None], v, 0), pad)
        if h2o_scores is not None:
            h2o_scores = jnp.asarray(h2o_scores, jnp.float32)
            if h2o_scores.shape != (b, h, s):
                raise ValueError(f"h2o_scores must have shape {(b, h, s)}, got {h2o_scores.shape}")
            h2o_scores = jnp.pad(jnp.where(valid[:, None, :], h2o_scores, 0), ((0, 0), (0, 0), (0, max_len - s)))
        return cls(
            k=k,
            kt=jnp.swapaxes(k, -1, -2) if transposed_keys else None,
            v=v,
            v_sum=jnp.sum(v, axis=2, dtype=jnp.float32),
            lengths=lengths,
            h2o_scores=h2o_scores,
        )

    def append(self, k_new, v_new) -> "KVCache":
        """Write k_new, v_new [B, Hkv, T, D] at each row's own length; lengths grow by T.

        With concrete lengths, overflowing max_len raises ValueError. Inside jit the lengths are
        traced: positions past max_len are then dropped, but lengths still grow by T, so the
        overflow stays visible: the next eager append or attend raises ValueError (and
        cache.overflowed() says so). generate and decode size their caches so this never happens.
        """
        expected = (self.batch, self.num_kv_heads, None, self.head_dim)
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x.ndim != 4 or any(e is not None and e != a for e, a in zip(expected, x.shape)):
                raise ValueError(f"{name} must be [B={self.batch}, Hkv={self.num_kv_heads}, T, "
                                 f"D={self.head_dim}], got {x.shape}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"k_new and v_new shapes differ: {k_new.shape} vs {v_new.shape}")
        t = k_new.shape[2]
        if t > self.max_len:
            raise ValueError(f"cannot append {t} positions to a cache of max_len={self.max_len}")
        if _is_concrete(self.lengths):
            longest = int(np.max(np.asarray(self.lengths)))
            if longest > self.max_len:
                raise ValueError(f"the cache overflowed earlier: lengths {np.asarray(self.lengths).tolist()} "
                                 f"exceed max_len={self.max_len} (an append inside jit went past the "
                                 f"capacity, and its writes were dropped)")
            if longest + t > self.max_len:
                raise ValueError(f"appending {t} positions to a row of length {longest} exceeds "
                                 f"max_len={self.max_len}")
        k_new = k_new.astype(self.dtype)
        v_new = v_new.astype(self.dtype)

        kt = None if self.kt is None else write_rows(self.kt, self.lengths, k_new, transposed=True)
        return dataclasses.replace(
            self,
            k=write_rows(self.k, self.lengths, k_new, transposed=False),
            kt=kt,
            v=write_rows(self.v, self.lengths, v_new, transposed=False),
            v_sum=self.v_sum + jnp.sum(v_new, axis=2, dtype=jnp.float32),
            lengths=self.lengths + t,
        )
