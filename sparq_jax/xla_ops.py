"""XLA building blocks of SparQ's backends and of the other methods: masked fp32 softmax, row
gathers, step 1 (the partial dot products) in its CPU and gather forms, steps 2+3 with an online
softmax. Arrays in, arrays out; what each backend composes them into is in sparq_jax.backends.

Shapes: B batch, Hkv KV heads, G = Hq / Hkv, S cache positions, D head dim, r rank, K positions.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_NEG_INF = -jnp.inf


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """fp32 softmax over the last axis where mask holds (every row has at least one True)."""
    logits = jnp.where(mask, logits.astype(_F32), _NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def gather_positions(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, Hkv, S, W], idx [B, Hkv, K] -> [B, Hkv, K, W]: whole rows at the given positions.

    One flat row gather ([B*Hkv*S, W] by [B*Hkv*K] row numbers): XLA copies each slice as a row
    rather than computing an index per element, as take_along_axis would.
    """
    b, h, s, w = x.shape
    n = idx.shape[-1]
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        # 16-bit floats gathered as their bit patterns: XLA:CPU widens a bfloat16 gather's whole
        # operand to fp32 first (SparQ's steps 2+3 from a bfloat16 cache ran 4x slower than fp32's).
        bits = jax.lax.bitcast_convert_type
        return bits(gather_positions(bits(x, jnp.uint16), idx), x.dtype)
    rows = idx + (jnp.arange(b * h, dtype=idx.dtype) * s).reshape(b, h, 1)
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
    out = jax.lax.gather(x.reshape(b * h * s, w), rows.reshape(-1, 1), dims, (1, w),
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return out.reshape(b, h, n, w)


def approx_logits_xla(q1: jax.Array, keys: jax.Array, i1: jax.Array, *, transposed: bool = True,
                      cpu: bool = False) -> jax.Array:
    """SparQ step 1: q1 [B, Hkv, G, r] against the keys' components i1 [B, Hkv, r].

    keys is K^T [B, Hkv, D, S] or, transposed=False, K [B, Hkv, S, D]. Returns the raw dot
    products, fp32 [B, Hkv, G, S].
    With K^T: cpu=True reads one contiguous S-long row per component and accumulates it, so no
    [B, Hkv, r, S] copy is made (approx_logits_kt_cpu); cpu=False gathers the r rows at once
    (approx_logits_kt_gather: coalesced on a GPU, where the CPU form's loop is ~100x slower).
    With K alone, the r components of a row share its cache lines: a CPU reads the whole row either
    way, so a dense product with q zeroed outside i1 is the cheapest strided read (and exact: the
    other terms are zeros).
    """
    b, h, g, r = q1.shape
    if not transposed:
        d = keys.shape[-1]
        sparse_q = jnp.zeros((b, h, g, d), _F32).at[
            jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
            jnp.arange(g)[None, None, :, None], i1[:, :, None, :]].set(q1.astype(_F32))
        return jnp.einsum("bhgd,bhsd->bhgs", sparse_q, keys, preferred_element_type=_F32)
    return (approx_logits_kt_cpu if cpu else approx_logits_kt_gather)(q1, keys, i1)


def approx_logits_kt_gather(q1, keys, i1):
    """Step 1 from K^T with one gather of the r rows (whole S-long rows: coalesced on a GPU)."""
    rows = jnp.take_along_axis(keys, i1[..., None], axis=2)                              # [B, Hkv, r, S]
    return jnp.einsum("bhgr,bhrs->bhgs", q1.astype(_F32), rows, preferred_element_type=_F32)


def approx_logits_kt_cpu(q1, keys, i1):
    # One (batch row, KV head) at a time: its r rows of K^T are read with dynamic slices (a scalar
    # offset each, so XLA:CPU copies them as contiguous vectors; a gather would move them element by
    # element, about 2x slower) and accumulated into the logits in a single fused pass over S.
    # (On a GPU this loop of B * Hkv small steps is ~100x slower than the gather: measured 20 ms vs
    # ~0.2 ms at B=64, 32 heads, S=4096.)
    b, h, g, r = q1.shape
    d, s = keys.shape[-2], keys.shape[-1]
    flat = keys.reshape(b * h, d, s)
    q1f = q1.reshape(b * h, g, r).astype(_F32)
    i1f = i1.reshape(b * h, r)

    def visit(j, out):
        # Accumulated as [S, G] (the group minor): each row element is loaded once for all G query
        # heads; with [G, S] XLA:CPU streamed the r rows once per query head (1.6x slower at G=4).
        acc = jnp.zeros((s, g), _F32)
        for c in range(r):
            row = _bits_slice(flat, (j, i1f[j, c], 0), (1, 1, s))[0, 0].astype(_F32)         # [S]
            acc = acc + row[:, None] * q1f[j, None, :, c]
        return jax.lax.dynamic_update_slice(out, acc[None], (j, 0, 0))

    out = jax.lax.fori_loop(0, b * h, visit, jnp.zeros((b * h, s, g), _F32))
    return jnp.swapaxes(out, 1, 2).reshape(b, h, g, s)


def _bits_slice(x, start, size):
    """lax.dynamic_slice, for 16-bit floats on their bit patterns (XLA:CPU otherwise widens the
    whole bfloat16 operand to fp32 for each slice: step 1 from a bfloat16 K^T ran 8x slower)."""
    if x.dtype.itemsize != 2:
        return jax.lax.dynamic_slice(x, start, size)
    bits = jax.lax.bitcast_convert_type
    return bits(jax.lax.dynamic_slice(bits(x, jnp.uint16), start, size), x.dtype)


# Step 2 visits the gathered rows in chunks of this many, so that its temporaries stay in cache.
_CHUNK = 128


def gather_attend_xla(q, k, v, i2, valid, alpha, v_bar) -> jax.Array:
    """SparQ steps 2 and 3, fp32 [B, Hkv, G, D].

    q [B, Hkv, G, D]; k, v [B, Hkv, S, D]; i2 [B, Hkv, K] positions, of which only those with
    valid [B, Hkv, K] count; alpha [B, Hkv, G] fp32; v_bar [B, Hkv, D] fp32.
    y = softmax(q . K[i2] / sqrt(D)) . V[i2];  out = alpha * y + (1 - alpha) * v_bar.
    Computed chunk by chunk with a running (online) softmax.
    """
    b, h, g, d = q.shape
    n = i2.shape[-1]
    chunk = min(_CHUNK, n)
    pad = -n % chunk
    if pad:
        i2 = jnp.pad(i2, ((0, 0), (0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, 0), (0, pad)))
    i2 = i2.reshape(b, h, -1, chunk)
    valid = valid.reshape(b, h, -1, chunk)
    scale = 1 / math.sqrt(d)

    def visit(c, carry):
        top, total, acc = carry
        idx = i2[:, :, c]
        logits = jnp.einsum("bhgd,bhkd->bhgk", q, gather_positions(k, idx), preferred_element_type=_F32)
        logits = jnp.where(valid[:, :, c, None, :], logits * scale, _NEG_INF)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(p, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bhgk,bhkd->bhgd", p, gather_positions(v, idx),
                                                    preferred_element_type=_F32)
        return new_top, total, acc

    # A finite floor for the running max: a chunk with nothing valid then adds exp(-inf) = 0.
    init = (jnp.full((b, h, g), -1e30, _F32), jnp.zeros((b, h, g), _F32), jnp.zeros((b, h, g, d), _F32))
    _, total, acc = jax.lax.fori_loop(0, i2.shape[2], visit, init)
    y = acc / total[..., None]
    a = alpha[..., None]
    return a * y + (1 - a) * v_bar[:, :, None, :]
