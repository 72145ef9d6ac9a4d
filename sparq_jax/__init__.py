"""sparq_jax: SparQ Attention (Ribar et al., ICML 2024) as pure JAX functions.

    import sparq_jax as sq
    cache = sq.KVCache.from_kv(k, v, lengths)            # K stored twice by default
    out, cache = sq.attend(q, cache, sq.SparQ(rank=16, top_k=256))

On a CUDA backend the package adds one XLA flag at import, before jax starts its backends, unless
XLA_FLAGS already sets it: see sparq_jax/xla_flags.py.
"""
from . import xla_flags

xla_flags.configure()

from . import sharding  # noqa: E402
from .attention import attend  # noqa: E402
from .cache import KVCache  # noqa: E402
from .methods import (H2O, METHOD_NAMES, METHODS, Dense, FlexGen, SparQ, Streaming, check_method,  # noqa: E402
                      dense_transfers, method_from_name, transfer_totals)

__all__ = ["sharding", "attend", "KVCache", "Dense", "SparQ", "H2O", "Streaming", "FlexGen", "METHODS", "METHOD_NAMES",
           "check_method", "dense_transfers", "method_from_name", "transfer_totals"]
__version__ = "0.1.0"
