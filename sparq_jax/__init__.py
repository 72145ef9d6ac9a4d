"""sparq_jax: SparQ Attention (Ribar et al., ICML 2024) as pure JAX functions.

    import sparq_jax as sq
    cache = sq.KVCache.from_kv(k, v, lengths)            # K stored twice by default
    out, cache = sq.attend(q, cache, sq.SparQ(rank=16, top_k=256))
"""
from . import sharding
from .attention import attend
from .cache import KVCache
from .methods import H2O, METHODS, Dense, FlexGen, SparQ, Streaming, dense_transfers

__all__ = ["sharding", "attend", "KVCache", "Dense", "SparQ", "H2O", "Streaming", "FlexGen", "METHODS", "dense_transfers"]
__version__ = "0.1.0"
