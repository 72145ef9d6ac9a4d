"""The package's one cache folder: built native libraries, fetched models and data."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """$SPARQ_JAX_CACHE, default ~/.cache/sparq_jax. Not created here."""
    return os.environ.get("SPARQ_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparq_jax")


def cache_subdir(*parts: str) -> str:
    """cache_dir()/parts..., created if missing; OSError naming the cache folder (and $SPARQ_JAX_CACHE)
    when it cannot be created or written."""
    folder = os.path.join(cache_dir(), *parts)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"not writable: {folder}")
    except OSError as err:
        raise OSError(f"the cache folder {cache_dir()} (set by $SPARQ_JAX_CACHE, default ~/.cache/sparq_jax) "
                      f"cannot hold {folder}: {err.strerror or err}; set SPARQ_JAX_CACHE to a writable "
                      f"folder") from None
    return folder
