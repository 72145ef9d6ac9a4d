"""One decode step of attention for every method: `attend(q, cache, method)`.

attend checks its arguments, chooses SparQ's backend once, in Python (sparq_jax.backends: the fused
native kernel on CPU, XLA on CPU with the native hooks, XLA elsewhere, the fused Pallas GPU kernels,
the Pallas TPU kernels), and
runs the method's function from a {method type: function} table. SparQ itself is sparq_jax.sparq
(Algorithm 1 once, and its reference); the other methods are below.

The one platform read is jax.default_backend(), in Python when attend resolves the backend (and in
sparq_jax.native.bf16_matmul_applies, for Dense on a bfloat16 cache); nothing traced branches on it.

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

from . import backends, native
from .backends import Backend
from .cache import KVCache, _is_concrete
from .methods import H2O, Dense, FlexGen, SparQ, Streaming, check_method
from .sparq import always_kept, sparq
from .topk import select_top_k, top_k_positions  # noqa: F401 - re-exported (tests, the benchmark)
from .validation import check_int
from .xla_ops import approx_logits_xla, gather_attend_xla, gather_positions, masked_softmax  # noqa: F401

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu", "cpu_fused")
_F32 = jnp.float32
_NEG_INF = -jnp.inf


def candidate_mask(lengths: jax.Array, max_len: int, window: Optional[int]) -> jax.Array:
    """[B, S] bool: positions that may be attended — valid, and within the sliding window if any."""
    pos = jnp.arange(max_len)[None, :]
    mask = pos < lengths[:, None]
    if window is not None:
        mask &= pos >= lengths[:, None] - window
    return mask


# ---------------------------------------------------------------------------------------------
# The methods: each takes q [B, Hkv, G, D] (grouped), the cache, the candidate mask, the method and
# the backend, and returns (fp32 [B, Hkv, G, D], H2O's new scores or None).

def _dense(qg, cache: KVCache, mask, method: Dense, window, backend: Backend):
    b, h, g, d = qg.shape
    s = cache.max_len
    if backend.name == "xla_cpu" and native.bf16_matmul_applies(cache.k) and cache.v.dtype == jnp.bfloat16:
        # A bfloat16 cache on CPU: XLA's bfloat16 dot reads it ~6x slower than the native kernel.
        rows = lambda x: x.reshape(b * h, *x.shape[2:])
        logits = native.matmul_bf16(rows(qg).astype(_F32), rows(cache.k), transpose_w=True).reshape(b, h, g, s)
        p = masked_softmax(logits / math.sqrt(d), mask[:, None, None, :])
        return native.matmul_bf16(rows(p), rows(cache.v)).reshape(b, h, g, d), None
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, cache.k, preferred_element_type=_F32) / math.sqrt(d)
    p = masked_softmax(logits, mask[:, None, None, :])
    return jnp.einsum("bhgs,bhsd->bhgd", p, cache.v, preferred_element_type=_F32), None


def _sparq(qg, cache: KVCache, mask, method: SparQ, window, backend: Backend):
    return sparq(qg, cache, mask, method, window, backend), None


def _h2o(qg, cache: KVCache, mask, method: H2O, window, backend: Backend):
    """Attend to the top_k positions by accumulated attention (window forced in), then accumulate
    this step's attention there and evict every other candidate for good (score -inf)."""
    s = cache.max_len
    scores = cache.h2o_scores
    keep = jnp.where(mask[:, None, :], scores, _NEG_INF)
    keep = jnp.where(always_kept(cache.lengths, s, method.local_window)[:, None, :], jnp.inf, keep)
    idx = backend.top_k(keep, min(method.top_k, s))                                      # [B, Hkv, k]
    valid = jnp.take_along_axis(keep, idx, axis=-1) > _NEG_INF
    d = qg.shape[-1]
    logits = jnp.einsum("bhgd,bhkd->bhgk", qg, gather_positions(cache.k, idx), preferred_element_type=_F32)
    p = masked_softmax(logits / math.sqrt(d), valid[:, :, None, :])
    out = jnp.einsum("bhgk,bhkd->bhgd", p, gather_positions(cache.v, idx), preferred_element_type=_F32)
    b_i = jnp.arange(idx.shape[0])[:, None, None]
    h_i = jnp.arange(idx.shape[1])[None, :, None]
    selected = jnp.zeros(scores.shape, bool).at[b_i, h_i, idx].set(valid)
    gained = jnp.zeros(scores.shape, _F32).at[b_i, h_i, idx].add(jnp.where(valid, jnp.sum(p, axis=2), 0))
    scores = jnp.where(mask[:, None, :] & ~selected, _NEG_INF, scores + gained)
    return out, scores


def _streaming(qg, cache: KVCache, mask, method: Streaming, window, backend: Backend):
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
    ones, zeros = jnp.ones(qg.shape[:3], _F32), jnp.zeros(qg.shape[:2] + qg.shape[-1:], _F32)
    return gather_attend_xla(qg, cache.k, cache.v, idx, valid, ones, zeros), None


def _flexgen(qg, cache: KVCache, mask, method: FlexGen, window, backend: Backend):
    d = qg.shape[-1]
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, cache.k, preferred_element_type=_F32) / math.sqrt(d)
    p = masked_softmax(logits, mask[:, None, None, :])                                 # [B, Hkv, G, S]
    score = jnp.where(mask[:, None, :], jnp.sum(p, axis=2), _NEG_INF)
    idx = backend.top_k(score, min(method.top_k, cache.max_len))
    valid = (jnp.take_along_axis(score, idx, axis=-1) > _NEG_INF)[:, :, None, :]
    w = jnp.where(valid, jnp.take_along_axis(p, idx[:, :, None, :], axis=-1), 0)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("bhgk,bhkd->bhgd", w, gather_positions(cache.v, idx), preferred_element_type=_F32), None


_METHODS = {Dense: _dense, SparQ: _sparq, H2O: _h2o, Streaming: _streaming, FlexGen: _flexgen}


# ---------------------------------------------------------------------------------------------
# Dispatch

@functools.partial(jax.jit, static_argnames=("method", "window", "backend"))
def _attend(q, cache: KVCache, method, window, backend: Backend):
    """-> (out [B, Hq, D], H2O's new scores or None). Only state comes back, so that eager calls
    do not copy the cache."""
    b, hq, d = q.shape
    qg = q.reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, d)
    mask = candidate_mask(cache.lengths, cache.max_len, window)
    run = next(_METHODS[t] for t in type(method).__mro__ if t in _METHODS)   # check_method ran: one matches
    out, state = run(qg, cache, mask, method, window, backend)
    return out.reshape(b, hq, d).astype(q.dtype), state


def _platform() -> str:
    """jax's default backend: the one platform read, in Python, when attend picks the backend."""
    return jax.default_backend()


def _resolve_backend(impl: str, method, interpret: bool, q=None, cache: Optional[KVCache] = None) -> tuple[Backend, bool]:
    """-> (the backend for impl, whether a kernel that fails to compile falls back to XLA: "auto").
    q [B, Hq, D] and cache (as attend gets them) decide whether the native CPU kernel takes them."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    platform = _platform()
    xla = backends.for_platform(platform)
    if impl == "xla":
        return xla, False
    if impl == "cpu_fused":
        if not isinstance(method, SparQ):
            raise ValueError(f"impl='cpu_fused' implements SparQ only, not {method!r}; use impl='xla' or 'auto'")
        if platform != "cpu":
            raise ValueError(f"impl='cpu_fused' is a CPU custom call, and the default backend is {platform!r}; "
                             f"use impl='auto' or 'xla'")
        ok, reason = native.available()
        if not ok:
            raise ValueError(f"impl='cpu_fused' needs the native library, which is unavailable ({reason}); "
                             f"use impl='auto' or 'xla'")
        if q is not None and not _fused_takes(q, cache):
            raise ValueError(f"impl='cpu_fused' takes K, V (and K^T) of one dtype of "
                             f"{[str(t) for t in native.FUSED_DTYPES]} and D <= {native.FUSED_MAX_D}, "
                             f"G <= {native.FUSED_MAX_G}, G * D <= {native.FUSED_MAX_GD}; got cache k "
                             f"{cache.k.dtype} {cache.k.shape}, v {cache.v.dtype}, q {q.shape}; use impl='xla'")
        return backends.get("cpu_fused"), False
    if impl in ("pallas_gpu", "pallas_tpu"):
        if not isinstance(method, SparQ):
            raise ValueError(f"impl={impl!r}: the Pallas kernels implement SparQ only, not {method!r}; "
                             f"use impl='xla' or 'auto'")
        needs = impl.split("_")[1]
        if not interpret and platform != needs:
            raise ValueError(f"impl={impl!r} compiles its kernels for a {needs.upper()}, and the default backend is "
                             f"{platform!r}: run on a {needs.upper()}, pass interpret=True to run the kernels in "
                             f"Pallas' interpreter (slow; how the CPU tests run them), or use impl='xla'")
        return backends.get(impl, interpret), False
    # auto: SparQ runs natively on CPU where the library builds (else XLA:CPU) and in the GPU kernels
    # on GPU; everything else, and SparQ on TPU (its kernels are interpret-validated only), in XLA.
    if isinstance(method, SparQ) and platform == "cpu" and q is not None and _fused_takes(q, cache):
        return backends.get("cpu_fused"), False
    if not isinstance(method, SparQ) or platform != "gpu":
        return xla, False
    from pallas_kernels import gpu_kernels_available
    ok, reason = gpu_kernels_available()
    if not ok:
        warnings.warn(f"impl='auto': SparQ's Pallas GPU kernels are unavailable ({reason}); using XLA")
        return xla, False
    return backends.get("pallas_gpu", interpret), True


def _fused_takes(q, cache: KVCache) -> bool:
    """Whether the native CPU kernel (sparq_jax.native.sparq_fused) takes this query and cache."""
    b, hq, d = q.shape
    return native.fused_applies((b, cache.num_kv_heads, hq // cache.num_kv_heads, d), cache)


# (method, window, backend, the abstract q and cache) -> "" if _attend compiled, else the error
_compile_errors: dict = {}


def _compile_error(q, cache: KVCache, method, window, backend: Backend) -> str:
    """Compiles _attend for these shapes once (eager calls and calls under an outer jit alike: the
    kernels lower with the outer program, past any try around the call) -> "" or the error, which
    is warned about once."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (q, cache))
    leaves, tree = jax.tree.flatten(abstract)
    key = (method, window, backend, tree, tuple((x.shape, x.dtype) for x in leaves))
    if key not in _compile_errors:
        try:
            _attend.lower(*abstract, method, window, backend).compile()
            _compile_errors[key] = ""
        except Exception as err:  # noqa: BLE001 - any failure to lower or compile the kernels
            _compile_errors[key] = f"{type(err).__name__}: {err}"
            warnings.warn(f"impl='auto': SparQ's {backend.name} kernels failed to compile for this shape "
                          f"({_compile_errors[key][:2000]}); using XLA")
    return _compile_errors[key]


def attend(q, cache: KVCache, method, *, window: Optional[int] = None, impl: str = "auto",
           interpret: bool = False):
    """One decode step of attention.

    q [B, Hq, D]: the query of each row's newest position, whose k and v are already in the cache
    (so every row has length >= 1). Hq must be a multiple of the cache's Hkv: each KV head serves a
    group of G = Hq / Hkv query heads, which share SparQ's (and H2O's) selection.
    method: Dense(), SparQ(...), H2O(...), Streaming(...) or FlexGen(...).
    window: sliding-window attention (Mistral): only the last `window` valid positions are candidates
        (and v_bar is their mean).
    impl: "xla", "pallas_gpu", "pallas_tpu", "cpu_fused" (SparQ only), or "auto": on CPU the native
        kernel (cpu_fused: K and V float32 or bfloat16, the library built; else XLA), the GPU kernels
        on GPU, else XLA; with "auto", GPU kernels that fail to lower or compile for a shape fall back
        to XLA with one warning naming the error (an explicit "pallas_gpu" raises it).
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
    window = None if window is None else check_int("window", window)
    if _is_concrete(cache.lengths):
        lengths = np.asarray(cache.lengths)
        if int(lengths.min()) < 1:
            raise ValueError(f"every row needs at least one position (the query's own); got lengths "
                             f"{lengths.tolist()}")
        if int(lengths.max()) > cache.max_len:
            raise ValueError(f"the cache overflowed: lengths {lengths.tolist()} exceed max_len={cache.max_len} "
                             f"(an append inside jit went past the capacity, and its writes were dropped); "
                             f"create the cache with a larger max_len")
    backend, fallback = _resolve_backend(impl, method, bool(interpret), q, cache)
    if fallback and _compile_error(q, cache, method, window, backend):
        backend = backends.for_platform(_platform())
    out, state = _attend(q, cache, method, window, backend)
    return out, cache if state is None else dataclasses.replace(cache, h2o_scores=state)
