"""Top-k selection: the positions of the k largest entries of each row of a score [..., S].

One order everywhere: ties go to the lowest positions, and the k positions come back in increasing
position order (every backend of sparq_jax.sparq, and H2O and FlexGen, select this way):
  top_k_positions  XLA, no sort: counting bisection on the floats' integer image, then compaction;
  cpu_top_k        on CPU: the native radix select (sparq_jax.native, 3-7x faster) where it builds,
                   else top_k_positions (the same positions);
  sorted_top_k     elsewhere: lax.top_k (decreasing score, ties to the lower position; a GPU runs it
                   2-3x faster than top_k_positions' counting passes), its positions then sorted.
(The Pallas GPU kernel pallas_kernels.sparq_gpu.top_k_positions selects in the same order.)
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from pallas_kernels import order_key

from . import native

_F32 = jnp.float32


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


def sorted_top_k(score: jax.Array, k: int) -> jax.Array:
    """lax.top_k's positions, sorted (increasing position order)."""
    return jnp.sort(jax.lax.top_k(score, k)[1], axis=-1)


_native_warned = False


def cpu_top_k(score: jax.Array, k: int) -> jax.Array:
    """On CPU: the native top-k where it builds (warning once why not, else), else top_k_positions."""
    global _native_warned
    ok, reason = native.available()
    if ok:
        return native.top_k_positions(score.astype(_F32), k)  # widening to fp32 keeps the order
    if not _native_warned and not reason.startswith("disabled"):
        _native_warned = True
        warnings.warn(f"sparq_jax: the native CPU top-k is unavailable ({reason}); using the XLA one "
                      f"(the same positions, slower)")
    return top_k_positions(score, k)


def select_top_k(score: jax.Array, k: int, platform: str | None = None) -> jax.Array:
    """The documented order on `platform` (default: jax's default backend, read here in Python):
    cpu_top_k on "cpu", else sorted_top_k."""
    platform = jax.default_backend() if platform is None else platform
    return cpu_top_k(score, k) if platform == "cpu" else sorted_top_k(score, k)
