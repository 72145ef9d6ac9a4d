"""SparQ Attention (Ribar et al., 2024), Algorithm 1, written once: `sparq` over a Backend, and
`sparq_reference` beside it, the same algorithm verbatim with no speed tricks, which every backend is
tested against (and which is tested against a float64 NumPy transcription of the paper).

    step 1   i1 = the r largest |q| components (summed over the KV group, which shares them);
             s_hat = softmax(q[i1] . K[:, i1]^T / tau), tau = sqrt(D * |q[i1]|_1 / |q|_1)   (Eq. 9)
    step 2   i2 = the k positions of largest group score (the sum of s_hat, or of the scaled
             logits: group_scores), the last max(local_window, 1) valid positions always in;
             y = softmax(q . K[i2]^T / sqrt(D)) . V[i2]
    step 3   alpha = sum(s_hat[i2]); out = alpha * y + (1 - alpha) * mean(V)    (reallocate_mean)

A Backend supplies the three parts that differ between XLA:CPU, XLA elsewhere and the Pallas kernels
(sparq_jax.backends); sparq() alone composes them. Shapes: qg [B, Hkv, G, D] (q grouped by KV head),
mask [B, S] bool (the candidate positions), every result fp32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .cache import KVCache
from .methods import SparQ
from .xla_ops import masked_softmax

_F32 = jnp.float32
_NEG_INF = -jnp.inf


class Backend(NamedTuple):
    """How one platform runs SparQ's three parts; static under jit (chosen once, in Python).

    scores(qf, cache, mask, *, method, window) -> (score fp32 [B, Hkv, S], aux): step 1 and the
        approximate softmax; score is what the top-k ranks (+inf on the always-kept positions, -inf
        off the mask); aux is the backend's own pytree for attend_selected (s_hat, or a kernel's
        partial sums).
    top_k(score, k) -> i2 int32 [B, Hkv, k]: the k largest, ties to the lowest positions, in
        increasing position order (sparq_jax.topk; one order on every platform).
    attend_selected(qf, cache, mask, i2, aux, v_bar) -> fp32 [B, Hkv, G, D]: steps 2 and 3, exact
        attention over the valid positions of i2, then alpha * y + (1 - alpha) * v_bar; v_bar None:
        no reallocation (alpha = 1).
    """

    name: str
    scores: Callable
    top_k: Callable
    attend_selected: Callable


class Stage(NamedTuple):
    """One part of a recorded sparq call: fn(*args) is out; fn is jitted, so it can be timed alone."""

    fn: Callable
    args: tuple
    out: Any


def sparq(qg, cache: KVCache, mask, method: SparQ, window: Optional[int], backend: Backend, record: bool = False):
    """Algorithm 1 -> fp32 [B, Hkv, G, D]; with record=True (eager calls only) (out, {stage name: Stage}):
    each part's inputs and output, as the benchmark's breakdown times them."""
    stages = {}

    def part(name, fn, *args):
        if not record:
            return fn(*args)
        fn = jax.jit(fn)
        stages[name] = Stage(fn, args, jax.block_until_ready(fn(*args)))
        return stages[name].out

    qf = qg.astype(_F32)
    score, aux = part("scores", functools.partial(backend.scores, method=method, window=window), qf, cache, mask)
    i2 = part("top-k", functools.partial(backend.top_k, k=min(method.top_k, cache.max_len)), score)
    v_bar = part("v_bar", functools.partial(mean_value, window=window), cache) if method.reallocate_mean else None
    out = part("steps 2+3", backend.attend_selected, qf, cache, mask, i2, aux, v_bar)
    return (out, stages) if record else out


def sparq_reference(qg, cache: KVCache, mask, method: SparQ, window: Optional[int] = None):
    """Algorithm 1 verbatim from K and V (not K^T, not the running V sum), lax.top_k for both
    selections, no speed tricks -> fp32 [B, Hkv, G, D]. What every backend is tested against."""
    q, keys, values = qg.astype(_F32), cache.k.astype(_F32), cache.v.astype(_F32)
    d, s = q.shape[-1], cache.max_len
    # Step 1: the r components of largest |q|, shared by the group, and the temperature (Eq. 9; a
    # query of zeros keeps tau = sqrt(D)).
    i1 = jax.lax.top_k(jnp.sum(jnp.abs(q), axis=2), method.rank)[1]                 # [B, Hkv, r]
    q1 = jnp.take_along_axis(q, i1[:, :, None, :], axis=-1)                           # [B, Hkv, G, r]
    k1 = jnp.take_along_axis(keys, i1[:, :, None, :], axis=-1)                        # [B, Hkv, S, r]
    part, full = jnp.sum(jnp.abs(q1), axis=-1), jnp.sum(jnp.abs(q), axis=-1)
    tau = jnp.sqrt(d * jnp.where(full > 0, part / jnp.where(full > 0, full, 1), 1))
    z = jnp.einsum("bhgr,bhsr->bhgs", q1, k1, precision="highest") / tau[..., None]
    s_hat = jax.nn.softmax(jnp.where(mask[:, None, None, :], z, _NEG_INF), axis=-1)
    # Step 2: the group's score, the local window forced in, the top k, exact attention there.
    score = jnp.sum(s_hat if method.group_scores == "softmax" else z, axis=2)        # [B, Hkv, S]
    score = jnp.where(always_kept(cache.lengths, s, method.local_window)[:, None, :], jnp.inf, score)
    score = jnp.where(mask[:, None, :], score, _NEG_INF)
    i2 = jax.lax.top_k(score, min(method.top_k, s))[1]                                # [B, Hkv, k]
    valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], score.shape), i2, axis=-1)
    k2 = jnp.take_along_axis(keys, i2[..., None], axis=2)                             # [B, Hkv, k, D]
    v2 = jnp.take_along_axis(values, i2[..., None], axis=2)
    logits = jnp.einsum("bhgd,bhkd->bhgk", q, k2, precision="highest") / math.sqrt(d)
    y = jnp.einsum("bhgk,bhkd->bhgd", masked_softmax(logits, valid[:, :, None, :]), v2, precision="highest")
    if not method.reallocate_mean:
        return y
    # Step 3: the approximate mass covered by i2, and the rest given to the mean value.
    alpha = jnp.sum(jnp.where(valid[:, :, None, :], jnp.take_along_axis(s_hat, i2[:, :, None, :], axis=-1), 0),
                    axis=-1)[..., None]
    count = jnp.sum(mask, axis=-1)[:, None, None]
    v_bar = jnp.sum(jnp.where(mask[:, None, :, None], values, 0), axis=2) / count     # [B, Hkv, D]
    return alpha * y + (1 - alpha) * v_bar[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# The parts the backends share (sparq_jax.backends)

def always_kept(lengths: jax.Array, max_len: int, local_window: int) -> jax.Array:
    """[B, S] bool: the last max(local_window, 1) valid positions (the newest is always kept)."""
    pos = jnp.arange(max_len)[None, :]
    return (pos < lengths[:, None]) & (pos >= lengths[:, None] - max(local_window, 1))


def query_components(qf, rank: int):
    """Step 1's selection: i1 [B, Hkv, r], the r largest |q| components summed over the group
    (which shares the selection), and q1 [B, Hkv, G, r], those components of each query head."""
    _, i1 = jax.lax.top_k(jnp.sum(jnp.abs(qf), axis=2), rank)
    return i1, jnp.take_along_axis(qf, i1[:, :, None, :], axis=-1)


def approx_scores(qf, q1, logits1, mask, lengths, local_window: int, group_scores: str = "softmax"):
    """Between steps 1 and 2: (s_hat fp32 [B, Hkv, G, S], the approximate attention of each query
    head; score [B, Hkv, S], what the top-k ranks: +inf on the always-kept window and newest
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
    s_hat = masked_softmax(z, mask[:, None, None, :])
    if group_scores == "softmax":
        score = jnp.sum(s_hat, axis=2)
    elif group_scores == "logits":
        score = jnp.sum(z, axis=2)
    else:
        raise ValueError(f"group_scores must be 'softmax' or 'logits', got {group_scores!r}")
    return s_hat, ranked(score, mask, lengths, local_window)


def ranked(score, mask, lengths, local_window: int):
    """score [B, Hkv, S] as the top-k ranks it: +inf on the always-kept positions, -inf where mask
    [B, S] is False."""
    score = jnp.where(always_kept(lengths, mask.shape[-1], local_window)[:, None, :], jnp.inf, score)
    return jnp.where(mask[:, None, :], score, _NEG_INF)


def selected_valid(mask, i2):
    """valid [B, Hkv, k]: which of the chosen positions i2 are candidates (k may exceed a row's)."""
    return jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], i2.shape[:2] + mask.shape[-1:]), i2, axis=-1)


def covered_mass(s_hat, i2, valid):
    """Step 3's alpha [B, Hkv, G]: the approximate attention mass s_hat that the chosen positions
    i2 cover (those that are valid), per query head."""
    covered = jnp.take_along_axis(s_hat, i2[:, :, None, :], axis=-1)
    return jnp.sum(jnp.where(valid[:, :, None, :], covered, 0), axis=-1)


def mean_value(cache: KVCache, window: Optional[int] = None) -> jax.Array:
    """Step 3's v_bar [B, Hkv, D] fp32: the mean of V over the candidate positions (the cache's
    running sum; a sliding window reads its own `window` rows)."""
    lengths = cache.lengths
    if window is None or window >= cache.max_len:
        return cache.v_sum / jnp.maximum(lengths, 1)[:, None, None].astype(_F32)
    start = jnp.clip(lengths - window, 0, cache.max_len - window)
    rows = jax.vmap(lambda v_b, s: jax.lax.dynamic_slice_in_dim(v_b, s, window, axis=1))(cache.v, start)
    pos = start[:, None] + jnp.arange(window)[None, :]
    inside = (pos < lengths[:, None]) & (pos >= lengths[:, None] - window)             # [B, window]
    total = jnp.sum(jnp.where(inside[:, None, :, None], rows.astype(_F32), 0), axis=2)
    count = jnp.maximum(jnp.sum(inside, axis=1), 1).astype(_F32)
    return total / count[:, None, None]
