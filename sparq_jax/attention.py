"""One decode step of attention for every method: `attend(q, cache, method)`.

The XLA implementations live here; SparQ's two memory-bound steps can instead run as Pallas kernels
(pallas_kernels/), which take the same arrays and are checked against the functions below.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq / Hkv, S cache positions, D head dim.
All softmaxes and accumulations are fp32 whatever the dtypes of q and the cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import order_key

from . import native
from .cache import KVCache, _is_concrete
from .methods import H2O, Dense, FlexGen, SparQ, Streaming, check_method

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
_F32 = jnp.float32
_NEG_INF = -jnp.inf


# ---------------------------------------------------------------------------------------------
# Building blocks shared by the methods (and the specification the Pallas kernels must meet)

def candidate_mask(lengths: jax.Array, max_len: int, window: Optional[int]) -> jax.Array:
    """[B, S] bool: positions that may be attended — valid, and within the sliding window if any."""
    pos = jnp.arange(max_len)[None, :]
    mask = pos < lengths[:, None]
    if window is not None:
        mask &= pos >= lengths[:, None] - window
    return mask


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """fp32 softmax over the last axis where mask holds (every row has at least one True)."""
    logits = jnp.where(mask, logits.astype(_F32), _NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def _gather_positions(x: jax.Array, idx: jax.Array) -> jax.Array:
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
        return bits(_gather_positions(bits(x, jnp.uint16), idx), x.dtype)
    rows = idx + (jnp.arange(b * h, dtype=idx.dtype) * s).reshape(b, h, 1)
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
    out = jax.lax.gather(x.reshape(b * h * s, w), rows.reshape(-1, 1), dims, (1, w),
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return out.reshape(b, h, n, w)


def _kth_largest_key(key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """key uint32 [..., n] -> (t, count(key >= t)), [...] each: a threshold t with count(key >= t)
    >= k and count(key > t) < k (the k-th largest key, or any t that keeps exactly the k largest);
    {key > t} plus the first k - count(key > t) keys equal to t are then the k largest.

    Bisection on integers with counting passes, stopped per row as soon as the count is exactly k
    (for spread-out values, long before all 32 bits are resolved: about 16-24 passes instead of 32).
    (Bracketing the answer first from a strided sample of the keys measured slower on XLA:CPU.)
    """
    n = key.shape[-1]
    lead = key.shape[:-1]
    count_at_least = lambda t: jnp.sum(jnp.where(key >= t[..., None], 1.0, 0.0), axis=-1)  # exact fp32
    lo = jnp.zeros(lead, jnp.uint32)                # count(key >= lo) >= k (= c_lo)
    c_lo = jnp.full(lead, n, _F32)
    hi = jnp.full(lead, 0xFFFFFFFF, jnp.uint32)     # count(key > hi) < k

    def active(lo, hi, c_lo):
        return (lo < hi) & (c_lo != k)

    def narrow(state):
        lo, hi, c_lo = state
        go = active(lo, hi, c_lo)
        mid = lo + (hi - lo) // 2 + 1                  # in (lo, hi]; no uint32 overflow
        c_mid = count_at_least(mid)
        up = go & (c_mid >= k)
        return (jnp.where(up, mid, lo), jnp.where(go & ~up, mid - 1, hi), jnp.where(up, c_mid, c_lo))

    lo, _, c_lo = jax.lax.while_loop(lambda state: jnp.any(active(*state)), narrow, (lo, hi, c_lo))
    return lo, c_lo


def _first_at_least(ends: jax.Array, want: jax.Array) -> jax.Array:
    """ends [..., W] non-decreasing int32, want [k] int32, each at most every row's last entry ->
    [..., k]: for each wanted value the first index w with ends[w] >= want (searchsorted, 'left').

    Two levels: the block of `block` entries is found by comparing with every block's last entry
    (vectorised, no gathers), then log2(block) gather-and-compare steps inside the block, instead
    of the log2(W) dependent gathers of a plain binary search.
    """
    *lead, w = ends.shape
    block = 32
    while w > 64 * block:
        block *= 2
    pad = -w % block
    if pad:
        big = jnp.iinfo(ends.dtype).max
        ends = jnp.pad(ends, [(0, 0)] * len(lead) + [(0, pad)], constant_values=big)
    last = ends[..., block - 1::block]                                                     # [..., nblocks]
    blocks_before = jnp.sum((last[..., None, :] < want[:, None]).astype(jnp.int32), axis=-1)  # [..., k]
    pos = blocks_before * block
    step = block // 2
    while step >= 1:
        probe = jnp.take_along_axis(ends, pos + step - 1, axis=-1)
        pos = jnp.where(probe < want, pos + step, pos)
        step //= 2
    return pos


def top_k_positions(score: jax.Array, k: int) -> jax.Array:
    """The positions of the k largest entries of each row of score [..., S] (ties: lowest positions
    first), in increasing position order: the same set as lax.top_k's, without its partial sort.

    The k-th largest value is found by counting bisection on the order-preserving integer image of
    the floats (_kth_largest_key), then the chosen positions are compacted with 32-bit masks and
    population counts rather than a cumulative sum over S, the word of each output found by a
    two-level search of the words' running counts (_first_at_least).
    """
    *lead, s = score.shape
    if not 1 <= k <= s or s >= 2**24:
        raise ValueError(f"k must be in [1, {s}] and S < 2**24, got k={k}, S={s}")
    pad = -s % 32
    if pad:  # -inf padding sorts after every real entry, ties included (higher positions)
        score = jnp.pad(score, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
    key = jax.lax.bitcast_convert_type(order_key(score.astype(_F32)), jnp.uint32) ^ jnp.uint32(0x80000000)

    kth, c_kth = _kth_largest_key(key, k)
    kth = kth[..., None]
    words_of = lambda m: jnp.sum(m.reshape(*lead, -1, 32).astype(jnp.uint32)
                                 << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)

    def with_ties():
        # Ties fill the room left, lowest positions first: keep a tie if fewer than `room` ties precede it.
        above = key > kth
        tie = key == kth
        room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
        tie_words = words_of(tie)
        tie_counts = jax.lax.population_count(tie_words).astype(jnp.int32)
        ties_before_word = jnp.cumsum(tie_counts, axis=-1) - tie_counts
        below = (jnp.uint32(1) << jnp.arange(32, dtype=jnp.uint32)) - 1                     # bits < i
        ties_before = (ties_before_word[..., None]
                       + jax.lax.population_count(tie_words[..., None] & below).astype(jnp.int32))
        return words_of(above | (tie & (ties_before.reshape(tie.shape) < room)))

    # Usually no row has more keys >= kth than k (spread-out values), and the tie pass is skipped.
    words = jax.lax.cond(jnp.all(c_kth == k), lambda: words_of(key >= kth), with_ties)    # k bits set
    counts = jax.lax.population_count(words).astype(jnp.int32)
    ends = jnp.cumsum(counts, axis=-1)                                                      # inclusive
    want = jnp.arange(1, k + 1, dtype=jnp.int32)
    word = _first_at_least(ends, want)                                                    # [..., k]
    rank = want - (jnp.take_along_axis(ends, word, axis=-1) - jnp.take_along_axis(counts, word, axis=-1))
    bitsword = jnp.take_along_axis(words, word, axis=-1)
    pos = jnp.zeros_like(rank)
    for step in (16, 8, 4, 2, 1):  # the rank-th set bit of the word, by binary search on popcounts
        low = bitsword & ((jnp.uint32(1) << (pos + step).astype(jnp.uint32)) - 1)
        pos = jnp.where(jax.lax.population_count(low).astype(jnp.int32) < rank, pos + step, pos)
    return word * 32 + pos


def select_top_k(score: jax.Array, k: int) -> jax.Array:
    """The positions of the k largest entries of each row of score [..., S] (ties: lowest positions
    first). On CPU in increasing position order: the native radix select (sparq_jax.native, 3-7x
    faster there) where it builds, else top_k_positions, which selects the same positions; elsewhere
    lax.top_k (the same set, in decreasing score order), which a GPU runs 2-3x faster than
    top_k_positions' counting passes."""
    return jax.lax.platform_dependent(score, cpu=lambda x: _cpu_top_k(x, k),
                                      default=lambda x: jax.lax.top_k(x, k)[1])


_native_warned = False


def _cpu_top_k(score: jax.Array, k: int) -> jax.Array:
    global _native_warned
    if jax.default_backend() != "cpu":  # traced for lowering's sake only: do not build the native library
        return top_k_positions(score, k)
    ok, reason = native.available()
    if ok:
        return native.top_k_positions(score.astype(_F32), k)  # widening to fp32 keeps the order
    if not _native_warned and not reason.startswith("disabled"):
        _native_warned = True
        warnings.warn(f"sparq_jax: the native CPU top-k is unavailable ({reason}); using the XLA one "
                      f"(the same positions, slower)")
    return top_k_positions(score, k)


def approx_logits_xla(q1: jax.Array, keys: jax.Array, i1: jax.Array, *, transposed: bool = True) -> jax.Array:
    """SparQ step 1: q1 [B, Hkv, G, r] against the keys' components i1 [B, Hkv, r].

    keys is K^T [B, Hkv, D, S] or, transposed=False, K [B, Hkv, S, D]. Returns the raw dot
    products, fp32 [B, Hkv, G, S].
    With K^T, one contiguous S-long row per component is read and accumulated, so no [B, Hkv, r, S]
    copy is made. With K alone, the r components of a row share its cache lines:
    a CPU reads the whole row either way, so a dense product with q zeroed outside i1 is the cheapest
    strided read (and exact: the other terms are zeros).
    """
    b, h, g, r = q1.shape
    if not transposed:
        d = keys.shape[-1]
        sparse_q = jnp.zeros((b, h, g, d), _F32).at[
            jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
            jnp.arange(g)[None, None, :, None], i1[:, :, None, :]].set(q1.astype(_F32))
        return jnp.einsum("bhgd,bhsd->bhgs", sparse_q, keys, preferred_element_type=_F32)

    return jax.lax.platform_dependent(q1, keys, i1, cpu=_approx_logits_kt_cpu, default=_approx_logits_kt_gather)


def _approx_logits_kt_gather(q1, keys, i1):
    """Step 1 from K^T with one gather of the r rows (whole S-long rows: coalesced on a GPU)."""
    rows = jnp.take_along_axis(keys, i1[..., None], axis=2)                              # [B, Hkv, r, S]
    return jnp.einsum("bhgr,bhrs->bhgs", q1.astype(_F32), rows, preferred_element_type=_F32)


def _approx_logits_kt_cpu(q1, keys, i1):
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
        logits = jnp.einsum("bhgd,bhkd->bhgk", q, _gather_positions(k, idx), preferred_element_type=_F32)
        logits = jnp.where(valid[:, :, c, None, :], logits * scale, _NEG_INF)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(p, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bhgk,bhkd->bhgd", p, _gather_positions(v, idx),
                                                    preferred_element_type=_F32)
        return new_top, total, acc

    # A finite floor for the running max: a chunk with nothing valid then adds exp(-inf) = 0.
    init = (jnp.full((b, h, g), -1e30, _F32), jnp.zeros((b, h, g), _F32), jnp.zeros((b, h, g, d), _F32))
    _, total, acc = jax.lax.fori_loop(0, i2.shape[2], visit, init)
    y = acc / total[..., None]
    a = alpha[..., None]
    return a * y + (1 - a) * v_bar[:, :, None, :]


def _mean_value(cache: KVCache, window: Optional[int]) -> jax.Array:
    """v_bar [B, Hkv, D] fp32: the mean of V over the candidate positions."""
    lengths = cache.lengths
    if window is None or window >= cache.max_len:
        return cache.v_sum / jnp.maximum(lengths, 1)[:, None, None].astype(_F32)
    # The running sum covers all positions; a sliding window reads its own `window` rows instead.
    start = jnp.clip(lengths - window, 0, cache.max_len - window)
    rows = jax.vmap(lambda v_b, s: jax.lax.dynamic_slice_in_dim(v_b, s, window, axis=1))(cache.v, start)
    pos = start[:, None] + jnp.arange(window)[None, :]
    inside = (pos < lengths[:, None]) & (pos >= lengths[:, None] - window)             # [B, window]
    total = jnp.sum(jnp.where(inside[:, None, :, None], rows.astype(_F32), 0), axis=2)
    count = jnp.maximum(jnp.sum(inside, axis=1), 1).astype(_F32)
    return total / count[:, None, None]


def _always_kept(lengths: jax.Array, max_len: int, local_window: int) -> jax.Array:
    """[B, S] bool: the last max(local_window, 1) valid positions (the newest is always kept)."""
    pos = jnp.arange(max_len)[None, :]
    return (pos < lengths[:, None]) & (pos >= lengths[:, None] - max(local_window, 1))


# ---------------------------------------------------------------------------------------------
# The methods. Each takes q [B, Hkv, G, D] (grouped) and returns fp32 [B, Hkv, G, D] and the cache.

def _dense(qg, cache: KVCache, mask):
    b, h, g, d = qg.shape
    s = cache.max_len
    if native.bf16_matmul_applies(cache.k) and cache.v.dtype == jnp.bfloat16:
        # A bfloat16 cache on CPU: XLA's bfloat16 dot reads it ~6x slower than the native kernel.
        rows = lambda x: x.reshape(b * h, *x.shape[2:])
        logits = native.matmul_bf16(rows(qg).astype(_F32), rows(cache.k), transpose_w=True).reshape(b, h, g, s)
        p = _masked_softmax(logits / math.sqrt(d), mask[:, None, None, :])
        return native.matmul_bf16(rows(p), rows(cache.v)).reshape(b, h, g, d)
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, cache.k, preferred_element_type=_F32) / math.sqrt(d)
    p = _masked_softmax(logits, mask[:, None, None, :])
    return jnp.einsum("bhgs,bhsd->bhgd", p, cache.v, preferred_element_type=_F32)


def _approx_scores(qf, q1, logits1, mask, lengths, local_window: int, group_scores: str = "softmax"):
    """SparQ between steps 1 and 2: (s_hat fp32 [B, Hkv, G, S], the approximate attention of each
    query head; score [B, Hkv, S], what the top-k ranks: +inf on the always-kept window and newest
    position, -inf where mask [B, S] is False, elsewhere the group sum of
      "softmax": s_hat (the paper's wording), or
      "logits":  the temperature-scaled approximate logits q1 . K[:, i1] / tau, the authors' research
                 code (llm-inference-research, llminference/methods/ann_attention.py: AnnAttention.forward
                 sums SparseQ's scaled scores, mask added, over the query heads of a KV head before its
                 top-k; it forces the local positions with the dtype's max, here +inf).
    s_hat, and so step 3's alpha, stays per query head with either choice."""
    # Eq. 9: the temperature corrects for the part of q left out of the dot product.
    l1_part = jnp.sum(jnp.abs(q1), axis=-1)
    l1_full = jnp.sum(jnp.abs(qf), axis=-1)
    tau = jnp.sqrt(qf.shape[-1] * jnp.where(l1_full > 0, l1_part / jnp.where(l1_full > 0, l1_full, 1), 1))
    z = logits1.astype(_F32) / tau[..., None]
    s_hat = _masked_softmax(z, mask[:, None, None, :])
    if group_scores == "softmax":
        score = jnp.sum(s_hat, axis=2)
    elif group_scores == "logits":
        score = jnp.sum(z, axis=2)
    else:
        raise ValueError(f"group_scores must be 'softmax' or 'logits', got {group_scores!r}")
    return s_hat, _ranked(score, mask, lengths, local_window)


def _ranked(score, mask, lengths, local_window: int):
    """score [B, Hkv, S] as the top-k ranks it: +inf on the always-kept positions, -inf where mask
    [B, S] is False."""
    score = jnp.where(_always_kept(lengths, mask.shape[-1], local_window)[:, None, :], jnp.inf, score)
    return jnp.where(mask[:, None, :], score, _NEG_INF)


def _query_components(qf, rank: int):
    """SparQ step 1's selection: i1 [B, Hkv, r], the r largest |q| components summed over the group
    (which shares the selection), and q1 [B, Hkv, G, r], those components of each query head."""
    _, i1 = jax.lax.top_k(jnp.sum(jnp.abs(qf), axis=2), rank)
    return i1, jnp.take_along_axis(qf, i1[:, :, None, :], axis=-1)


def _covered_mass(s_hat, i2, valid):
    """SparQ step 3's alpha [B, Hkv, G]: the approximate attention mass s_hat that the chosen
    positions i2 cover (those that are valid), per query head."""
    covered = jnp.take_along_axis(s_hat, i2[:, :, None, :], axis=-1)
    return jnp.sum(jnp.where(valid[:, :, None, :], covered, 0), axis=-1)


def _gpu_scores(qf, keys, mask, lengths, method: SparQ, window, transposed: bool, interpret: bool):
    """pallas_gpu: step 1 and the scores between the steps from one kernel (sparq_gpu.approx_scores,
    which also picks the components and the temperature) -> (score [B, Hkv, S] to rank, and the
    kernel's z, m, l and bounds for step 2). With group_scores="softmax" the group sum of s_hat =
    exp(z - M) / L comes from the kernel's per-block partials (no softmax passes); with "logits"
    nothing between the kernels reads the whole row."""
    from pallas_kernels import sparq_gpu

    first = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)
    bounds = jnp.stack([first, lengths, lengths - max(method.local_window, 1)], axis=-1).astype(jnp.int32)
    z, m, l, score = sparq_gpu.approx_scores(qf, keys, bounds, rank=method.rank, transposed=transposed,
                                             group_scores=method.group_scores, interpret=interpret)
    if score is None:  # "softmax": the group sum of s_hat
        top = jnp.max(m, axis=-1, keepdims=True)                       # every row has a candidate
        total = jnp.sum(l * jnp.exp(m - top), axis=-1, keepdims=True)
        score = _ranked(jnp.sum(jnp.exp(z - top) / total, axis=2), mask, lengths, method.local_window)
    return score, z, m, l, bounds


def _sparq_gpu(qg, cache: KVCache, mask, method: SparQ, window, interpret):
    """SparQ as three Pallas Triton kernels (sparq_gpu): step 1 with the scores, the top-k, steps 2
    and 3 with alpha and the valid positions found in the kernel."""
    from pallas_kernels import sparq_gpu

    qf = qg.astype(_F32)
    keys = cache.kt if cache.transposed_keys else cache.k
    score, z, m, l, bounds = _gpu_scores(qf, keys, mask, cache.lengths, method, window, cache.transposed_keys,
                                         interpret)
    i2 = sparq_gpu.top_k_positions(score, min(method.top_k, cache.max_len), interpret=interpret)
    if method.reallocate_mean:
        v_bar = _mean_value(cache, window)
    else:
        v_bar = jnp.zeros(qg.shape[:2] + qg.shape[-1:], _F32)
    return sparq_gpu.gather_attend_scored(qf, cache.k, cache.v, i2, z, m, l, bounds, v_bar,
                                          reallocate=method.reallocate_mean, interpret=interpret)


def _sparq(qg, cache: KVCache, mask, method: SparQ, window, impl, interpret):
    if impl == "pallas_gpu":
        return _sparq_gpu(qg, cache, mask, method, window, interpret)
    approx_logits, top_k, gather_attend = _step_functions(impl, interpret, transposed=cache.transposed_keys)
    d, s = qg.shape[-1], cache.max_len
    qf = qg.astype(_F32)
    i1, q1 = _query_components(qf, method.rank)                                        # step 1
    keys = cache.kt if cache.transposed_keys else cache.k
    logits1 = approx_logits(q1, keys, i1)                                              # [B, Hkv, G, S]
    s_hat, score = _approx_scores(qf, q1, logits1, mask, cache.lengths, method.local_window,
                                  method.group_scores)
    i2 = top_k(score, min(method.top_k, s))                                            # [B, Hkv, k]
    valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], score.shape), i2, axis=-1)
    alpha = _covered_mass(s_hat, i2, valid)                                            # step 3
    if method.reallocate_mean:
        v_bar = _mean_value(cache, window)
    else:
        # alpha = 1, but kept data-dependent on purpose: with a constant alpha XLA:CPU schedules this
        # program about 2x slower (measured: 19 ms vs 9 ms at B=1, 32/8 heads, S=32k).
        alpha = alpha * 0 + 1
        v_bar = jnp.zeros(qg.shape[:2] + (d,), _F32)
    return gather_attend(qf, cache.k, cache.v, i2, valid, alpha, v_bar)


def _h2o(qg, cache: KVCache, mask, method: H2O):
    """Attend to the top_k positions by accumulated attention (window forced in), then accumulate
    this step's attention there and evict every other candidate for good (score -inf)."""
    s = cache.max_len
    scores = cache.h2o_scores
    keep = jnp.where(mask[:, None, :], scores, _NEG_INF)
    keep = jnp.where(_always_kept(cache.lengths, s, method.local_window)[:, None, :], jnp.inf, keep)
    idx = select_top_k(keep, min(method.top_k, s))                                      # [B, Hkv, k]
    valid = jnp.take_along_axis(keep, idx, axis=-1) > _NEG_INF
    d = qg.shape[-1]
    logits = jnp.einsum("bhgd,bhkd->bhgk", qg, _gather_positions(cache.k, idx), preferred_element_type=_F32)
    p = _masked_softmax(logits / math.sqrt(d), valid[:, :, None, :])
    out = jnp.einsum("bhgk,bhkd->bhgd", p, _gather_positions(cache.v, idx), preferred_element_type=_F32)
    b_i = jnp.arange(idx.shape[0])[:, None, None]
    h_i = jnp.arange(idx.shape[1])[None, :, None]
    selected = jnp.zeros(scores.shape, bool).at[b_i, h_i, idx].set(valid)
    gained = jnp.zeros(scores.shape, _F32).at[b_i, h_i, idx].add(jnp.where(valid, jnp.sum(p, axis=2), 0))
    scores = jnp.where(mask[:, None, :] & ~selected, _NEG_INF, scores + gained)
    return out, scores


def _streaming(qg, cache: KVCache, mask, method: Streaming):
    lengths = cache.lengths[:, None]
    sink = jnp.broadcast_to(jnp.arange(method.sink)[None, :], (lengths.shape[0], method.sink))
    recent = lengths - method.window + jnp.arange(method.window)[None, :]
    idx = jnp.concatenate([sink, recent], axis=1)                                       # [B, sink + window]
    # A recent position inside the sink would be counted twice.
    fresh = jnp.concatenate([jnp.ones_like(sink, bool), recent >= method.sink], axis=1)
    in_range = (idx >= 0) & (idx < cache.max_len)
    idx = jnp.clip(idx, 0, cache.max_len - 1)
    valid = fresh & in_range & jnp.take_along_axis(mask, idx, axis=1)
    h = qg.shape[1]
    idx = jnp.broadcast_to(idx[:, None, :], (idx.shape[0], h, idx.shape[1]))
    valid = jnp.broadcast_to(valid[:, None, :], idx.shape)
    ones = jnp.ones(qg.shape[:3], _F32)
    return gather_attend_xla(qg, cache.k, cache.v, idx, valid, ones, jnp.zeros(qg.shape[:2] + qg.shape[-1:], _F32))


def _flexgen(qg, cache: KVCache, mask, method: FlexGen):
    d = qg.shape[-1]
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, cache.k, preferred_element_type=_F32) / math.sqrt(d)
    p = _masked_softmax(logits, mask[:, None, None, :])                                 # [B, Hkv, G, S]
    score = jnp.where(mask[:, None, :], jnp.sum(p, axis=2), _NEG_INF)
    idx = select_top_k(score, min(method.top_k, cache.max_len))
    valid = (jnp.take_along_axis(score, idx, axis=-1) > _NEG_INF)[:, :, None, :]
    w = jnp.where(valid, jnp.take_along_axis(p, idx[:, :, None, :], axis=-1), 0)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("bhgk,bhkd->bhgd", w, _gather_positions(cache.v, idx), preferred_element_type=_F32)


# ---------------------------------------------------------------------------------------------
# Dispatch

def _step_functions(impl: str, interpret: bool, transposed: bool):
    """SparQ's (step 1, top-k, steps 2+3) functions for an implementation (attend's pallas_gpu runs
    _sparq_gpu's fused kernels instead; the benchmark's breakdown times both)."""
    if impl == "xla":
        return functools.partial(approx_logits_xla, transposed=transposed), select_top_k, gather_attend_xla
    if impl == "pallas_gpu":
        from pallas_kernels import sparq_gpu as kernels
        top_k = functools.partial(kernels.top_k_positions, interpret=interpret)
    else:
        from pallas_kernels import sparq_tpu as kernels
        top_k = select_top_k
    return (functools.partial(kernels.approx_logits, transposed=transposed, interpret=interpret), top_k,
            functools.partial(kernels.gather_attend, interpret=interpret))


@functools.partial(jax.jit, static_argnames=("method", "window", "impl", "interpret"))
def _attend(q, cache: KVCache, method, window, impl, interpret):
    """-> (out [B, Hq, D], H2O's new scores or None). Only state comes back, so that eager calls
    do not copy the cache."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    state = None
    qg = q.reshape(b, hkv, hq // hkv, d)
    mask = candidate_mask(cache.lengths, cache.max_len, window)
    if isinstance(method, Dense):
        out = _dense(qg, cache, mask)
    elif isinstance(method, SparQ):
        out = _sparq(qg, cache, mask, method, window, impl, interpret)
    elif isinstance(method, H2O):
        out, state = _h2o(qg, cache, mask, method)
    elif isinstance(method, Streaming):
        out = _streaming(qg, cache, mask, method)
    elif isinstance(method, FlexGen):
        out = _flexgen(qg, cache, mask, method)
    else:
        check_method(method)      # raises: a method this dispatch does not know is never run as another
    return out.reshape(b, hq, d).astype(q.dtype), state


def _resolve_impl(impl: str, method) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return impl
    if impl in ("pallas_gpu", "pallas_tpu"):
        if not isinstance(method, SparQ):
            raise ValueError(f"impl={impl!r}: the Pallas kernels implement SparQ only, not {method!r}; "
                             f"use impl='xla' or 'auto'")
        return impl
    # auto: the GPU kernels on GPU for SparQ, XLA elsewhere (the TPU kernels are interpret-validated only).
    if not isinstance(method, SparQ) or jax.default_backend() != "gpu":
        return "xla"
    from pallas_kernels import gpu_kernels_available
    ok, reason = gpu_kernels_available()
    if not ok:
        warnings.warn(f"impl='auto': SparQ's Pallas GPU kernels are unavailable ({reason}); using XLA")
        return "xla"
    return "pallas_gpu"


def attend(q, cache: KVCache, method, *, window: Optional[int] = None, impl: str = "auto",
           interpret: bool = False):
    """One decode step of attention.

    q [B, Hq, D]: the query of each row's newest position, whose k and v are already in the cache
    (so every row has length >= 1). Hq must be a multiple of the cache's Hkv: each KV head serves a
    group of G = Hq / Hkv query heads, which share SparQ's (and H2O's) selection.
    method: Dense(), SparQ(...), H2O(...), Streaming(...) or FlexGen(...).
    window: sliding-window attention (Mistral): only the last `window` valid positions are candidates
        (and v_bar is their mean).
    impl: "xla", "pallas_gpu", "pallas_tpu" (SparQ only), or "auto": the GPU kernels on GPU, else XLA.
    interpret: run a Pallas kernel in interpret mode (how the CPU tests run them).

    Returns (out [B, Hq, D] in q's dtype, cache). The cache comes back unchanged except for H2O,
    whose accumulated scores and evictions it carries (see KVCache.h2o_scores).
    """
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a sparq_jax.KVCache, got {type(cache).__name__}")
    check_method(method)
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be a floating array, got dtype {q.dtype}")
    if q.ndim != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim:
        raise ValueError(f"q must be [B={cache.batch}, Hq, D={cache.head_dim}] to match the cache, got {q.shape}")
    if cache.k.ndim != 4:
        raise ValueError(f"attend takes one layer's cache (k [B, Hkv, S, D]), got k {cache.k.shape}")
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"the number of query heads Hq={q.shape[1]} must be a multiple of the "
                         f"number of KV heads Hkv={cache.num_kv_heads}")
    if isinstance(method, SparQ) and method.rank > cache.head_dim:
        raise ValueError(f"SparQ rank must be <= head_dim={cache.head_dim}, got rank={method.rank}")
    if method.stateful and cache.h2o_scores is None:
        raise ValueError("H2O keeps its state in the cache: build it with KVCache.create(..., h2o=True) "
                         "or KVCache.from_kv(..., h2o_scores=...)")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if _is_concrete(cache.lengths):
        lengths = np.asarray(cache.lengths)
        if int(lengths.min()) < 1:
            raise ValueError(f"every row needs at least one position (the query's own); got lengths "
                             f"{lengths.tolist()}")
        if int(lengths.max()) > cache.max_len:
            raise ValueError(f"the cache overflowed: lengths {lengths.tolist()} exceed max_len={cache.max_len} "
                             f"(an append inside jit went past the capacity, and its writes were dropped); "
                             f"create the cache with a larger max_len")
    requested, impl = impl, _resolve_impl(impl, method)
    needs = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(impl)
    if needs and not interpret and jax.default_backend() != needs:
        raise ValueError(f"impl={impl!r} compiles its kernels for a {needs.upper()}, and the default backend is "
                         f"{jax.default_backend()!r}: run on a {needs.upper()}, pass interpret=True to run the "
                         f"kernels in Pallas' interpreter (slow; how the CPU tests run them), or use impl='xla'")
    window = None if window is None else int(window)
    if requested != "auto" or impl == "xla":
        out, state = _attend(q, cache, method, window, impl, bool(interpret))
    else:
        from pallas_kernels import UnsupportedShapeError
        try:
            out, state = _attend(q, cache, method, window, impl, bool(interpret))
        except UnsupportedShapeError as err:
            warnings.warn(f"impl='auto': the {impl} kernels cannot take this shape ({err}); using XLA")
            out, state = _attend(q, cache, method, window, "xla", bool(interpret))
    return out, cache if state is None else dataclasses.replace(cache, h2o_scores=state)
