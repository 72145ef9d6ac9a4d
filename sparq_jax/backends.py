"""SparQ's backends: the three parts that sparq_jax.sparq.sparq composes, per platform.

    cpu_fused           on CPU with the native library: all of Algorithm 1 in one custom call
                        (sparq_jax.native.sparq_fused); its three parts are that call and two
                        pass-throughs (below)
    xla_cpu             XLA on CPU: step 1 row by row from K^T, the native top-k (sparq_jax.native,
                        else the counting one), and XLA:CPU's scheduling trick for alpha = 1
    xla                 XLA elsewhere: step 1 as one gather of the r rows, lax.top_k (sorted)
    pallas_gpu          the fused Pallas Triton kernels (pallas_kernels.sparq_gpu): step 1 with the
                        scores, the top-k, steps 2+3 with the valid positions and alpha
    pallas_tpu          the Pallas Mosaic kernels (pallas_kernels.sparq_tpu) for step 1 and steps 2+3
    pallas_gpu_unfused  benchmark only: sparq_gpu's separate step-1 and step-2 kernels, XLA between

`get(name, interpret)` returns one object per (name, interpret), so that a Backend is a stable
static argument under jit; sparq_jax.attention.attend picks the name once, in Python.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from . import native, topk, xla_ops
from .sparq import (Backend, approx_scores, covered_mass, mean_value, query_components, ranked,
                    selected_valid)

NAMES = ("xla_cpu", "xla", "pallas_gpu", "pallas_tpu", "pallas_gpu_unfused", "cpu_fused")
_F32 = jnp.float32


def _split_scores(qf, cache, mask, *, method, window, step1):
    """Step 1 by step1(q1, keys, i1, transposed=...), then the approximate softmax in XLA; aux = s_hat."""
    del window  # the mask holds it
    i1, q1 = query_components(qf, method.rank)
    logits1 = step1(q1, cache.kt if cache.transposed_keys else cache.k, i1, transposed=cache.transposed_keys)
    s_hat, score = approx_scores(qf, q1, logits1, mask, cache.lengths, method.local_window, method.group_scores)
    return score, s_hat


def _split_attend_selected(qf, cache, mask, i2, s_hat, v_bar, *, step2, cpu=False):
    """valid and alpha in XLA, then steps 2+3 by step2(q, k, v, i2, valid, alpha, v_bar)."""
    valid = selected_valid(mask, i2)
    if v_bar is not None:
        alpha = covered_mass(s_hat, i2, valid)
    elif cpu:
        # alpha = 1, but kept data-dependent on purpose: with a constant alpha XLA:CPU schedules this
        # program about 2x slower (measured: 19 ms vs 9 ms at B=1, 32/8 heads, S=32k).
        alpha = covered_mass(s_hat, i2, valid) * 0 + 1
    else:
        alpha = jnp.ones(qf.shape[:3], _F32)
    if v_bar is None:
        v_bar = jnp.zeros(qf.shape[:2] + qf.shape[-1:], _F32)
    return step2(qf, cache.k, cache.v, i2, valid, alpha, v_bar)


def _split(name, step1, top_k, step2, cpu=False) -> Backend:
    return Backend(name, functools.partial(_split_scores, step1=step1), top_k,
                   functools.partial(_split_attend_selected, step2=step2, cpu=cpu))


def _gpu_scores(qf, cache, mask, *, method, window, interpret):
    """sparq_gpu.approx_scores: step 1 and the scores in one kernel, which also picks the components
    and the temperature; aux = its (z, m, l, bounds) for gather_attend_scored. With
    group_scores="softmax" the group sum of s_hat = exp(z - M) / L comes from the kernel's per-block
    partials (no softmax passes); with "logits" nothing between the kernels reads the whole row."""
    from pallas_kernels import sparq_gpu

    lengths = cache.lengths
    first = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)
    bounds = jnp.stack([first, lengths, lengths - max(method.local_window, 1)], axis=-1).astype(jnp.int32)
    keys = cache.kt if cache.transposed_keys else cache.k
    z, m, l, score = sparq_gpu.approx_scores(qf, keys, bounds, rank=method.rank, transposed=cache.transposed_keys,
                                             group_scores=method.group_scores, interpret=interpret)
    if score is None:  # "softmax": the group sum of s_hat
        top = jnp.max(m, axis=-1, keepdims=True)                       # every row has a candidate
        total = jnp.sum(l * jnp.exp(m - top), axis=-1, keepdims=True)
        score = ranked(jnp.sum(jnp.exp(z - top) / total, axis=2), mask, lengths, method.local_window)
    return score, (z, m, l, bounds)


def _gpu_attend_selected(qf, cache, mask, i2, aux, v_bar, *, interpret):
    """sparq_gpu.gather_attend_scored: steps 2+3 with the valid positions and alpha found in the kernel."""
    from pallas_kernels import sparq_gpu

    del mask  # aux's bounds hold it
    z, m, l, bounds = aux
    reallocate = v_bar is not None
    if not reallocate:
        v_bar = jnp.zeros(qf.shape[:2] + qf.shape[-1:], _F32)
    return sparq_gpu.gather_attend_scored(qf, cache.k, cache.v, i2, z, m, l, bounds, v_bar, reallocate=reallocate,
                                          interpret=interpret)


def _fused_scores(qf, cache, mask, *, method, window):
    """cpu_fused: the whole of Algorithm 1 in one native call (step 1, the approximate softmax and
    group score, the top-k, steps 2+3). Its "score" is the chosen positions i2 [B, Hkv, k], which
    _fused_top_k passes on, and its aux the output, which _fused_attend_selected returns; so
    sparq() composes it like any backend, and record=True times the call as the "scores" stage (the
    "top-k" and "steps 2+3" stages then time pass-throughs)."""
    k = min(method.top_k, cache.max_len)
    if method.reallocate_mean:   # the same XLA as sparq()'s own v_bar part (merged under jit)
        v_bar = mean_value(cache, window)
    else:
        v_bar = jnp.zeros(qf.shape[:2] + qf.shape[-1:], _F32)
    keys = cache.kt if cache.transposed_keys else cache.k
    out, i2 = native.sparq_fused(qf, keys, cache.k, cache.v, mask, cache.lengths, v_bar, rank=method.rank,
                                 top_k=k, local_window=method.local_window, group_scores=method.group_scores,
                                 reallocate=method.reallocate_mean, transposed=cache.transposed_keys)
    return i2, out


def _fused_top_k(i2, k):
    """cpu_fused: the positions the native call chose (its "score")."""
    if i2.dtype != jnp.int32 or i2.shape[-1] != k:
        raise ValueError(f"cpu_fused's top_k takes the positions its scores part chose (int32 [..., {k}]), "
                         f"got {i2.dtype} {i2.shape}; it does not rank scores")
    return i2


def _fused_attend_selected(qf, cache, mask, i2, out, v_bar):
    """cpu_fused: the output the native call computed (its aux); v_bar went into that call."""
    del qf, cache, mask, i2, v_bar
    return out


@functools.cache
def get(name: str, interpret: bool = False) -> Backend:
    """The backend `name` (one of NAMES); interpret runs a Pallas backend's kernels in interpret mode."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name == "xla_cpu":
        return _split(name, functools.partial(xla_ops.approx_logits_xla, cpu=True), topk.cpu_top_k,
                      xla_ops.gather_attend_xla, cpu=True)
    if name == "xla":
        return _split(name, xla_ops.approx_logits_xla, topk.sorted_top_k, xla_ops.gather_attend_xla)
    if name == "cpu_fused":
        return Backend(name, _fused_scores, _fused_top_k, _fused_attend_selected)
    if name == "pallas_tpu":
        from pallas_kernels import sparq_tpu
        return _split(name, functools.partial(sparq_tpu.approx_logits, interpret=interpret), topk.sorted_top_k,
                      functools.partial(sparq_tpu.gather_attend, interpret=interpret))
    from pallas_kernels import sparq_gpu
    top_k = functools.partial(sparq_gpu.top_k_positions, interpret=interpret)
    if name == "pallas_gpu_unfused":
        return _split(name, functools.partial(sparq_gpu.approx_logits, interpret=interpret), top_k,
                      functools.partial(sparq_gpu.gather_attend, interpret=interpret))
    return Backend(name, functools.partial(_gpu_scores, interpret=interpret), top_k,
                   functools.partial(_gpu_attend_selected, interpret=interpret))


def for_platform(platform: str) -> Backend:
    """The XLA backend of a platform ("cpu", "gpu", "tpu", ...): xla_cpu on "cpu", else xla."""
    return get("xla_cpu" if platform == "cpu" else "xla")
