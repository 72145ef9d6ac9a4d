"""Native XLA:CPU custom calls (through jax.ffi): SparQ's whole decode step (sparq_cpu.cc, the
cpu_fused backend), its top-k selection (top_k.cc), prefill's dense causal attention (flash_cpu.cc), bfloat16-weight matrix products (matmul.cc: for
few rows, and a vdpbf16ps GEMM for prefill's many rows on AVX512-BF16 CPUs) and the in-place write of
new positions into a 16-bit KV cache (cache_write.cc: XLA:CPU widens a bfloat16 scatter or
dynamic-update-slice to a whole-cache convert to fp32 and back). All split their work over XLA's intra-op thread pool (common.inc.cc), never starting threads.

XLA:CPU has no fast exact top-k for long rows: `lax.top_k` sorts (22 ms for 32 rows of 32k) and
the counting bisection of `sparq_jax.attention.top_k_positions` costs ~24 passes over the scores
(~4 ms). top_k.cc selects the same positions (ties at the lowest positions, increasing order) with a
radix select in about 3 passes over each row. (Steps 2+3 alone written the same way measured no faster
than XLA's gather at B=4, S=32k: the random row reads bound them. At B=1 what costs is each layer's
many small XLA steps, which sparq_cpu.cc replaces by one call: docs/performance.md.)

XLA:CPU runs dots with bfloat16 operands ~10x slower than fp32 ones, so a bfloat16 model decoded
slower than the fp32 one while reading half the bytes; matmul.cc's kernels (matmul_bf16) read the
bfloat16 weights once, widen them and accumulate in fp32, at the speed of reading them.

The library is compiled on first use with the system's C++ compiler ($CXX, else c++) against jaxlib's
FFI headers, and kept in $SPARQ_JAX_CACHE (default ~/.cache/sparq_jax) under a name that hashes the
source, the compiler's version, jax's version and the command, so a new jax, compiler or edited
source builds anew; its sha256, recorded at build time, is checked before each load (else it is rebuilt). Without a
compiler (or with SPARQ_JAX_NATIVE=0) `available()` says why, and the caller keeps the XLA path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ..paths import cache_dir, cache_subdir
from ..validation import check_int  # noqa: F401  (cache_dir: the old home of the name)

_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_DIR, name) for name in ("top_k.cc", "matmul.cc", "sparq_cpu.cc", "cache_write.cc",
                                                  "flash_cpu.cc")]
# Included by the sources, not compiled alone, and hashed with them (an edit builds anew). Named .cc so
# that the package data (pyproject.toml: "*.cc") ships it.
_HEADERS = [os.path.join(_DIR, "common.inc.cc")]
_TARGETS = {"sparq_jax_top_k": "SparqTopK", "sparq_jax_matmul_bf16": "SparqMatmulBf16",
            "sparq_jax_matmul_bf16_nt": "SparqMatmulBf16Nt", "sparq_jax_sparq_fused": "SparqFused",
            "sparq_jax_cache_write": "SparqCacheWrite", "sparq_jax_gemm_bf16": "SparqGemmBf16",
            "sparq_jax_flash": "SparqFlash"}
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "lib": ctypes.CDLL (kept alive while registered)


def _threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _arch_flags() -> list:
    """-march=native on x86-64: the library is built on the machine that runs it (its name hashes
    the CPU's features, _cpu_identity), and GCC lowers the kernels' vector code for the baseline
    ISA before target_clones' copies inline it (sparq_cpu.cc's masking passes ran 15-20x slower)."""
    return ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []


def _cpu_identity() -> str:
    """The CPU's feature flags (Linux), else its name: a library built for one CPU is not loaded on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _build() -> str:
    """Compiles the sources once per source text, compiler (its --version), jax version and command;
    returns the library's path. The library's sha256 is written beside it at build time and checked
    before every load: a library that does not match (damaged, or replaced by someone who can write
    the cache folder) is rebuilt, never loaded."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    cmd = [cxx, "-O3", *_arch_flags(), "-std=c++17", "-Wno-psabi", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(),
           *_SOURCES, "-lpthread"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    digest = hashlib.sha256(jax.__version__.encode() + " ".join(cmd).encode() + version.stdout.encode()
                            + _cpu_identity().encode())
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = cache_subdir()
    path = os.path.join(cache, f"sparq_native-{digest.hexdigest()[:16]}.so")
    record = path + ".sha256"
    if os.path.exists(path) and os.path.exists(record):
        with open(record) as f:
            if f.read().strip() == _sha256(path):
                return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # built aside, then renamed: never half-written
    os.close(fd)
    try:
        run = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip()[-2000:]}")
        with open(tmp + ".sha256", "w") as f:
            f.write(_sha256(tmp) + "\n")
        os.replace(tmp + ".sha256", record)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.remove(leftover)
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
    check_int("k", k, 1, maximum=s)   # at most the row length
    if score.dtype != jnp.float32:
        raise ValueError(f"score must be float32, got {score.dtype}")
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the native top-k is unavailable: {reason}")
    call = jax.ffi.ffi_call("sparq_jax_top_k", jax.ShapeDtypeStruct(score.shape[:-1] + (k,), jnp.int32),
                            vmap_method="broadcast_all")
    return call(score, k=np.int64(k), threads=np.int64(_threads()))


def matmul_bf16(x, w, *, transpose_w: bool = False):
    """fp32 x [T, M, K] times bfloat16 w [T or 1, K, N] (transpose_w: w [T or 1, N, K], used as its
    transpose) -> fp32 [T, M, N], accumulated in fp32; a w with leading 1 serves every T. Meant for
    few rows M (decode): the weights are read once, at memory speed. CPU only, after available()."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 3 or w.ndim != 3:
        raise ValueError(f"x and w must be rank 3 ([T, M, K] and [T, K, N]), got x {x.shape}, w {w.shape}")
    if x.dtype != jnp.float32 or w.dtype != jnp.bfloat16:
        raise ValueError(f"x must be float32 and w bfloat16, got x {x.dtype}, w {w.dtype}")
    k = w.shape[2] if transpose_w else w.shape[1]
    if w.shape[0] not in (1, x.shape[0]) or k != x.shape[2]:
        raise ValueError(f"w {w.shape} does not fit x {x.shape} (transpose_w={transpose_w})")
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the native matmul is unavailable: {reason}")
    n = w.shape[1] if transpose_w else w.shape[2]
    name = "sparq_jax_matmul_bf16_nt" if transpose_w else "sparq_jax_matmul_bf16"
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape[:2] + (n,), jnp.float32))
    return call(x, w, threads=np.int64(_threads()))


# The dtypes sparq_fused reads K, K^T and V in, and its limits (sparq_cpu.cc's stack buffers).
FUSED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
FUSED_MAX_D, FUSED_MAX_G, FUSED_MAX_GD = 512, 64, 4096


def fused_applies(q_shape, cache) -> bool:
    """Whether sparq_fused takes this cache and grouped query shape [B, Hkv, G, D]: K, V (and K^T)
    of one dtype in FUSED_DTYPES, D and G within its limits, and the library built."""
    dtypes = {jnp.dtype(x.dtype) for x in (cache.k, cache.v, cache.kt) if x is not None}
    g, d = q_shape[-2], q_shape[-1]
    return (len(dtypes) == 1 and dtypes <= set(FUSED_DTYPES) and d <= FUSED_MAX_D and g <= FUSED_MAX_G
            and g * d <= FUSED_MAX_GD and available()[0])


def sparq_fused(qf, keys, k, v, mask, lengths, v_bar, *, rank: int, top_k: int, local_window: int,
                group_scores: str, reallocate: bool, transposed: bool):
    """All of SparQ's Algorithm 1 for one layer in one call (sparq_cpu.cc): fp32 qf [B, Hkv, G, D];
    keys K^T [B, Hkv, D, S] (transposed) or K; k, v [B, Hkv, S, D] (keys, k, v one dtype of
    FUSED_DTYPES); mask [B, S] bool, the candidates; lengths [B] int32 (the always-kept window);
    v_bar [B, Hkv, D] fp32 (read only with reallocate). -> (out fp32 [B, Hkv, G, D], i2 int32
    [B, Hkv, top_k]: the chosen positions, increasing). CPU only, after available()."""
    b, h, g, d = qf.shape
    s = k.shape[2]
    if qf.dtype != jnp.float32 or v_bar.dtype != jnp.float32:
        raise ValueError(f"qf and v_bar must be float32, got {qf.dtype} and {v_bar.dtype}")
    if {jnp.dtype(keys.dtype), jnp.dtype(k.dtype), jnp.dtype(v.dtype)} - set(FUSED_DTYPES) or \
            len({keys.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"keys, k and v must share one dtype of {[str(t) for t in FUSED_DTYPES]}, got "
                         f"{keys.dtype}, {k.dtype}, {v.dtype}")
    want_keys = (b, h, d, s) if transposed else (b, h, s, d)
    if k.shape != (b, h, s, d) or v.shape != k.shape or keys.shape != want_keys:
        raise ValueError(f"k, v must be [B, Hkv, S, D] = {(b, h, s, d)} and keys {want_keys} for qf {qf.shape}, "
                         f"got k {k.shape}, v {v.shape}, keys {keys.shape}")
    if mask.shape != (b, s) or lengths.shape != (b,) or v_bar.shape != (b, h, d):
        raise ValueError(f"mask must be [B, S] = {(b, s)}, lengths [B] and v_bar [B, Hkv, D]; got {mask.shape}, "
                         f"{lengths.shape}, {v_bar.shape}")
    check_int("rank", rank, 1, maximum=d)
    check_int("top_k", top_k, 1, maximum=s)
    check_int("local_window", local_window, 0)
    if d > FUSED_MAX_D or g > FUSED_MAX_G or g * d > FUSED_MAX_GD:
        raise ValueError(f"sparq_fused takes D <= {FUSED_MAX_D}, G <= {FUSED_MAX_G}, G * D <= {FUSED_MAX_GD}; "
                         f"got G={g}, D={d}")
    if group_scores not in ("softmax", "logits"):
        raise ValueError(f"group_scores must be 'softmax' or 'logits', got {group_scores!r}")
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the native SparQ kernel is unavailable: {reason}")
    call = jax.ffi.ffi_call("sparq_jax_sparq_fused", (jax.ShapeDtypeStruct(qf.shape, jnp.float32),
                                                      jax.ShapeDtypeStruct((b, h, top_k), jnp.int32)),
                            vmap_method="sequential")
    return call(qf, keys, k, v, mask.astype(jnp.bool_), lengths.astype(jnp.int32), v_bar, rank=np.int64(rank),
                top_k=np.int64(top_k), local_window=np.int64(local_window),
                group_logits=np.int64(group_scores == "logits"), reallocate=np.int64(bool(reallocate)),
                transposed=np.int64(bool(transposed)), threads=np.int64(_threads()))


def bf16_matmul_applies(w) -> bool:
    """Whether matmul_bf16 should take a product with weights w: w is bfloat16 and this trace is
    for the CPU (jax's default backend) with the native library built. XLA:CPU's own bfloat16 dot
    is ~6x slower than matmul_bf16 at one row (measured: 30 layers of [1, 576] x [576, 1536], 153
    vs 27 ms; fp32 38 ms)."""
    return w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" and available()[0]


# What flash_attention takes: q, k, v in these dtypes, D a multiple of 16 (its vectors) up to FLASH_MAX_D.
FLASH_MAX_D = 512


def flash_applies(q, k) -> bool:
    """Whether flash_attention takes these q [B, Tq, Hq, D] and k [B, Hkv, S, D] (dtypes float32 or
    bfloat16, D a multiple of 16 up to FLASH_MAX_D) in a trace for the CPU with the library built."""
    d = q.shape[-1]
    return (jnp.dtype(q.dtype) in FUSED_DTYPES and jnp.dtype(k.dtype) in FUSED_DTYPES and d % 16 == 0
            and d <= FLASH_MAX_D and jax.default_backend() == "cpu" and available()[0])


def flash_attention(q, k, v, key_valid, key_positions, query_positions, start, window=None):
    """Dense causal attention of the queries q [B, Tq, Hq, D] over the keys and values k, v
    [B, Hkv, S, D] (flash_cpu.cc): query i sits at key index start + i (start: an int, traced or
    not, >= 0) and sees key s when key_valid[b, s] (bool [B, S]), s <= start + i and, with a window,
    query_positions[b, i] - key_positions[b, s] < window (int32 [B, Tq] and [B, S]). Keys past
    start + Tq - 1 are never read. -> fp32 [B, Tq, Hq, D] (0 for a query that sees no key); every
    product and sum in fp32. CPU only, after flash_applies."""
    b, tq, hq, d = q.shape
    if k.ndim != 4 or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k, v must be [B, Hkv, S, D] with Hkv dividing Hq for q {q.shape}, got k {k.shape}, "
                         f"v {v.shape}")
    if k.dtype != v.dtype or {jnp.dtype(q.dtype), jnp.dtype(k.dtype)} - set(FUSED_DTYPES):
        raise ValueError(f"q, and k and v (one dtype), must be float32 or bfloat16, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    s = k.shape[2]
    if key_valid.shape != (b, s) or key_positions.shape != (b, s) or query_positions.shape != (b, tq):
        raise ValueError(f"key_valid and key_positions must be [B, S] = {(b, s)} and query_positions [B, Tq] = "
                         f"{(b, tq)}; got {key_valid.shape}, {key_positions.shape}, {query_positions.shape}")
    if d % 16 or d > FLASH_MAX_D:
        raise ValueError(f"flash_attention takes D a multiple of 16 up to {FLASH_MAX_D}, got D={d}")
    if window is not None:
        check_int("window", window, 1)
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the native flash attention is unavailable: {reason}")
    call = jax.ffi.ffi_call("sparq_jax_flash", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, key_valid.astype(jnp.bool_), key_positions.astype(jnp.int32),
                query_positions.astype(jnp.int32), jnp.asarray(start, jnp.int32), window=np.int64(window or 0),
                threads=np.int64(_threads()))
