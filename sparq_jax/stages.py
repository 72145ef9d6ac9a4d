"""SparQ's stages as separate public functions: to time them one by one (the benchmark's breakdown)
or to inspect what each step computes. `run` composes them into attend's output.

    import sparq_jax as sq
    from sparq_jax import stages
    method = sq.SparQ(rank=16, top_k=256)
    st = stages.run(q, cache, method)                  # st.out == sq.attend(q, cache, method)[0] (fp32)
    st = stages.select(q, cache, method)               # the same up to steps 2+3 (st.out is None)
    step1, top_k, step2 = stages.step_functions("xla")  # what st's fields were computed with

Shapes: B batch, Hkv KV heads, G query heads per KV head, D head dim, S cache positions, r rank,
k top_k. The stages take the query grouped, qg [B, Hkv, G, D] fp32 (q.reshape(B, Hkv, G, D)).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from . import attention as _att
from .cache import KVCache
from .methods import SparQ

_F32 = jnp.float32

candidate_mask = _att.candidate_mask          # [B, S] bool: valid positions (inside the sliding window if any)


def query_components(qg: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Step 1's selection: (i1 [B, Hkv, r], the r largest |q| components summed over the group, which
    shares them; q1 [B, Hkv, G, r], those components of each query head)."""
    return _att._query_components(qg, rank)


def approx_scores(qg, q1, logits1, mask, lengths, local_window: int, group_scores: str = "softmax"):
    """Between steps 1 and 2: (s_hat fp32 [B, Hkv, G, S], the approximate attention of each query
    head, temperature-scaled (Eq. 9); score fp32 [B, Hkv, S], what the top-k ranks: +inf on the
    last max(local_window, 1) valid positions, -inf where mask [B, S] is False, elsewhere the group
    sum of s_hat ("softmax") or of the scaled logits ("logits")). logits1 [B, Hkv, G, S] is step 1's."""
    return _att._approx_scores(qg, q1, logits1, mask, lengths, local_window, group_scores)


def covered_mass(s_hat: jax.Array, i2: jax.Array, valid: jax.Array) -> jax.Array:
    """Step 3's alpha fp32 [B, Hkv, G]: the part of s_hat [B, Hkv, G, S] at the chosen positions i2
    [B, Hkv, k] (those where valid [B, Hkv, k])."""
    return _att._covered_mass(s_hat, i2, valid)


def mean_value(cache: KVCache, window: Optional[int] = None) -> jax.Array:
    """Step 3's v_bar fp32 [B, Hkv, D]: the mean of V over the candidate positions."""
    return _att._mean_value(cache, window)


def step_functions(impl: str = "xla", interpret: bool = False, transposed: bool = True):
    """(step 1, top-k, steps 2+3) of an implementation ("xla", "pallas_gpu", "pallas_tpu"):
      step1(q1 [B, Hkv, G, r], keys, i1 [B, Hkv, r]) -> logits1 fp32 [B, Hkv, G, S], keys K^T
          [B, Hkv, D, S] (transposed) or K [B, Hkv, S, D];
      top_k(score [B, Hkv, S], k) -> i2 [B, Hkv, k] int32;
      step2(qg, k, v [B, Hkv, S, D], i2, valid [B, Hkv, k], alpha [B, Hkv, G], v_bar [B, Hkv, D])
          -> fp32 [B, Hkv, G, D] = alpha * softmax(qg . K[i2] / sqrt(D)) . V[i2] + (1 - alpha) * v_bar.
    attend's pallas_gpu runs fused kernels instead of step 1 and step 2 (fused_scores and
    pallas_kernels.sparq_gpu.gather_attend_scored); these are the kernels' unfused forms."""
    if impl not in ("xla", "pallas_gpu", "pallas_tpu"):
        raise ValueError(f"impl must be 'xla', 'pallas_gpu' or 'pallas_tpu', got {impl!r}")
    return _att._step_functions(impl, interpret, transposed)


def fused_scores(qg, keys, mask, lengths, method: SparQ, *, window: Optional[int] = None, transposed: bool = True,
                 interpret: bool = False):
    """pallas_gpu's step 1 and scores in one kernel (pallas_kernels.sparq_gpu.approx_scores, which
    also picks the components and the temperature) -> (score [B, Hkv, S] to rank, and the kernel's
    z, m, l and bounds, which sparq_gpu.gather_attend_scored takes in place of valid and alpha)."""
    return _att._gpu_scores(qg, keys, mask, lengths, method, window, transposed, interpret)


@dataclasses.dataclass(frozen=True)
class Stages:
    """Every intermediate of one SparQ decode step (see select and run), grouped shapes; a pytree,
    so that a jitted select or run can return it."""

    qg: jax.Array        # fp32 [B, Hkv, G, D]
    mask: jax.Array      # bool [B, S]
    i1: jax.Array        # [B, Hkv, r]
    q1: jax.Array        # fp32 [B, Hkv, G, r]
    logits1: jax.Array   # fp32 [B, Hkv, G, S]
    s_hat: jax.Array     # fp32 [B, Hkv, G, S]
    score: jax.Array     # fp32 [B, Hkv, S]
    i2: jax.Array        # [B, Hkv, k], k = min(top_k, S)
    valid: jax.Array     # bool [B, Hkv, k]
    alpha: jax.Array     # fp32 [B, Hkv, G]: covered_mass, or 1 without mean reallocation
    v_bar: jax.Array     # fp32 [B, Hkv, D]: mean_value, or 0 without mean reallocation
    out: Optional[jax.Array] = None   # fp32 [B, Hq, D] (run; select leaves it None)


jax.tree_util.register_dataclass(Stages, data_fields=[f.name for f in dataclasses.fields(Stages)], meta_fields=[])


def select(q: jax.Array, cache: KVCache, method: SparQ, *, window: Optional[int] = None, impl: str = "xla",
           interpret: bool = False) -> Stages:
    """SparQ up to steps 2+3, q [B, Hq, D] as attend takes it: step 1, the scores, the top-k and the
    inputs of steps 2+3 (valid, alpha, v_bar), as attend computes them for impl "xla" or
    "pallas_tpu" (for "pallas_gpu", with the kernels' unfused forms; see step_functions)."""
    if not isinstance(method, SparQ):
        raise TypeError(f"method must be a sparq_jax.SparQ, got {method!r}")
    b, hq, d = q.shape
    hkv, s = cache.num_kv_heads, cache.max_len
    step1, top_k, _ = step_functions(impl, interpret, cache.transposed_keys)
    qg = q.reshape(b, hkv, hq // hkv, d).astype(_F32)
    mask = candidate_mask(cache.lengths, s, window)
    i1, q1 = query_components(qg, method.rank)
    logits1 = step1(q1, cache.kt if cache.transposed_keys else cache.k, i1)
    s_hat, score = approx_scores(qg, q1, logits1, mask, cache.lengths, method.local_window, method.group_scores)
    i2 = top_k(score, min(method.top_k, s))
    valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], score.shape), i2, axis=-1)
    if method.reallocate_mean:
        alpha, v_bar = covered_mass(s_hat, i2, valid), mean_value(cache, window)
    else:
        alpha, v_bar = jnp.ones(qg.shape[:3], _F32), jnp.zeros((b, hkv, d), _F32)
    return Stages(qg, mask, i1, q1, logits1, s_hat, score, i2, valid, alpha, v_bar)


def run(q: jax.Array, cache: KVCache, method: SparQ, *, window: Optional[int] = None, impl: str = "xla",
        interpret: bool = False) -> Stages:
    """select, then steps 2+3: Stages.out is attend(q, cache, method, window=window)'s output in fp32
    [B, Hq, D] (for impl "pallas_gpu" the unfused kernels', equal within fp32 rounding)."""
    st = select(q, cache, method, window=window, impl=impl, interpret=interpret)
    step2 = step_functions(impl, interpret, cache.transposed_keys)[2]
    out = step2(st.qg, cache.k, cache.v, st.i2, st.valid, st.alpha, st.v_bar)
    return dataclasses.replace(st, out=out.reshape(q.shape[0], q.shape[1], q.shape[2]))
