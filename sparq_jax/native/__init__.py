"""SparQ's top-k selection on CPU as a native XLA custom call (top_k.cc, through jax.ffi).

XLA:CPU has no fast exact top-k for long rows: `lax.top_k` sorts (22 ms for 32 rows of 32k) and
the counting bisection of `sparq_jax.attention.top_k_positions` costs ~24 passes over the scores
(~4 ms). top_k.cc selects the same positions (ties at the lowest positions, increasing order) with a
radix select in about 3 passes over each row. (Steps 2+3 written the same way, rows read whole and
prefetched on both cores, measured no faster than XLA's gather on this project's 2-core VM, so they
stay in XLA: the random row reads bound them, not XLA.)

The library is compiled on first use with the system's C++ compiler ($CXX, else c++) against jaxlib's
FFI headers, and kept in $SPARQ_JAX_CACHE (default ~/.cache/sparq_jax) under a name that hashes the
source, jax's version and the command, so a new jax or an edited source builds anew. Without a
compiler (or with SPARQ_JAX_NATIVE=0) `available()` says why, and the caller keeps the XLA path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_DIR, "top_k.cc")]
_TARGETS = {"sparq_jax_top_k": "SparqTopK"}
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "lib": ctypes.CDLL (kept alive while registered)


def _threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def cache_dir() -> str:
    """The package's one cache folder (built libraries, fetched models): $SPARQ_JAX_CACHE, default
    ~/.cache/sparq_jax. Not created here."""
    return os.environ.get("SPARQ_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparq_jax")


def _build() -> str:
    """Compiles the sources (once per source text, jax version and command); returns the library's path."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(), *_SOURCES, "-lpthread"]
    digest = hashlib.sha256(jax.__version__.encode() + " ".join(cmd).encode())
    for path in _SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest = digest.hexdigest()[:16]
    cache = cache_dir()
    path = os.path.join(cache, f"sparq_native-{digest}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # built aside, then renamed: never half-written
    os.close(fd)
    try:
        run = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def available() -> tuple[bool, str]:
    """(True, "") once the native kernels are built and registered with XLA for the CPU; else (False, why)."""
    with _lock:
        if "ok" not in _state:
            if os.environ.get("SPARQ_JAX_NATIVE", "1") == "0":
                _state.update(ok=False, reason="disabled by SPARQ_JAX_NATIVE=0")
            else:
                try:
                    lib = ctypes.CDLL(_build())
                    for target, symbol in _TARGETS.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                    _state.update(ok=True, reason="", lib=lib)
                except Exception as err:  # noqa: BLE001 - any failure means: keep the XLA path
                    _state.update(ok=False, reason=f"{type(err).__name__}: {err}")
        return _state["ok"], _state["reason"]


def top_k_positions(score, k: int):
    """The positions of the k largest entries of each row of fp32 score [..., S] (ties: lowest
    positions first), in increasing position order, int32 [..., k]: CPU only, after available()."""
    s = score.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s:
        raise ValueError(f"k must be an integer in [1, {s}] (the row length), got {k!r}")
    if score.dtype != jnp.float32:
        raise ValueError(f"score must be float32, got {score.dtype}")
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the native top-k is unavailable: {reason}")
    call = jax.ffi.ffi_call("sparq_jax_top_k", jax.ShapeDtypeStruct(score.shape[:-1] + (k,), jnp.int32),
                            vmap_method="broadcast_all")
    return call(score, k=np.int64(k), threads=np.int64(_threads()))
