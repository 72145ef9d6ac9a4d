"""SparQ's parts one by one: `run` calls sparq_jax.sparq.sparq with record=True (nothing here
composes the steps again), to time each part alone (the benchmark's breakdown) or to inspect it.

    import sparq_jax as sq
    from sparq_jax import stages
    out, parts = stages.run(q, cache, sq.SparQ(rank=16, top_k=256))   # out == sq.attend(q, cache, method)[0]
    parts["top-k"].out                  # i2 [B, Hkv, k]; parts[name].fn(*parts[name].args) runs it again

Parts, in order: "scores" (step 1 and the approximate softmax -> (score [B, Hkv, S], the backend's
aux)), "top-k" (-> i2), "v_bar" (-> [B, Hkv, D]; with reallocate_mean only), "steps 2+3" (->
fp32 [B, Hkv, G, D]). Eager calls only (each part is jitted on its own).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from . import backends
from .attention import _platform, candidate_mask
from .cache import KVCache
from .methods import SparQ
from .sparq import Stage, sparq

__all__ = ["run", "Stage"]


def run(q, cache: KVCache, method: SparQ, *, window: Optional[int] = None, backend: str = "xla",
        interpret: bool = False) -> tuple[jnp.ndarray, dict[str, Stage]]:
    """q [B, Hq, D] as attend takes it -> (out fp32 [B, Hq, D], {part name: Stage}) from the backend
    `backend`: a name of sparq_jax.backends.NAMES, or "xla" for this platform's XLA backend."""
    if not isinstance(method, SparQ):
        raise TypeError(f"method must be a sparq_jax.SparQ, got {method!r}")
    chosen = backends.for_platform(_platform()) if backend == "xla" else backends.get(backend, interpret)
    b, hq, d = q.shape
    qg = jnp.asarray(q).reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, d)
    mask = candidate_mask(cache.lengths, cache.max_len, window)
    out, parts = sparq(qg, cache, mask, method, window, chosen, record=True)
    return out.reshape(b, hq, d), parts
