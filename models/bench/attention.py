"""One decode step of attention, Dense vs SparQ, on random caches: every implementation at hand (each
output against a reference: sparq_jax.sparq.sparq_reference, or plain softmax attention), the floor of
streaming SparQ's bytes, the device's copy bandwidth and, on request, SparQ's parts one by one (as
sparq_jax.sparq.sparq records them: nothing here composes SparQ's steps)."""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import sparq_jax as sq
from sparq_jax import native, stages, topk
from sparq_jax.attention import candidate_mask
from sparq_jax.sparq import sparq_reference

from .timing import DTYPES, drop_failing, environment, time_interleaved

IMPL_CHOICES = ("xla", "pallas_gpu", "pallas_tpu", "cpu_fused", "all")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The flags of `benchmark.py attention`. SparQ is SparQ.for_compression(compression,
    reallocate_mean) (method_from_name's "sparq-mean", or "sparq" without reallocate_mean), or
    SparQ(rank, top_k, local_window) if both are given. ValueError (naming the flag) for a combination that cannot run."""

    batch: int = 4
    q_heads: int = 8
    kv_heads: int = 8
    seq_len: int = 32768
    head_dim: int = 128
    compression: float = 0.125
    rank: Optional[int] = None
    top_k: Optional[int] = None
    local_window: int = 0
    reallocate_mean: bool = True
    dtype: str = "float32"
    impl: str = "xla"
    single_copy: bool = False          # also time SparQ with K stored once (no K^T)
    interpret: bool = False            # the Pallas kernels in interpret mode
    reps: int = 7
    warmup: int = 2
    inner: Optional[int] = None        # calls per timed sample; None: 1 on CPU, 20 elsewhere
    breakdown: bool = False
    seed: int = 0
    sweep: Optional[tuple] = None      # sequence lengths, in place of seq_len
    plot: Optional[str] = None         # PNG path (with sweep)

    def __post_init__(self):
        if self.q_heads % self.kv_heads:
            raise ValueError(f"--q-heads={self.q_heads} must be a multiple of --kv-heads={self.kv_heads}")
        if (self.rank is None) != (self.top_k is None):
            raise ValueError("--rank and --top-k go together (or use --compression)")
        if self.rank is not None and self.rank > self.head_dim:
            raise ValueError(f"--rank={self.rank} must be <= --head-dim={self.head_dim}")
        if self.rank is not None:
            self.method(self.seq_len)      # SparQ's own checks (--local-window <= --top-k), before any work
        if self.plot and not self.sweep:
            raise ValueError("--plot needs --sweep")
        if self.dtype not in DTYPES or self.impl not in IMPL_CHOICES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)} and --impl one of {IMPL_CHOICES}, "
                             f"got {self.dtype!r}, {self.impl!r}")

    def method(self, seq_len: int) -> sq.SparQ:
        """The SparQ timed at seq_len."""
        if self.rank is not None:
            return sq.SparQ(self.rank, self.top_k, self.local_window, reallocate_mean=self.reallocate_mean)
        try:
            return sq.SparQ.for_compression(self.compression, self.head_dim, seq_len,
                                            reallocate_mean=self.reallocate_mean)
        except ValueError as err:
            raise ValueError(f"--compression {self.compression:g}: {err}") from None

    @property
    def calls_per_sample(self) -> int:
        """inner, or the backend's default: on an accelerator, back-to-back calls hide the dispatch."""
        if self.inner is not None:
            return self.inner
        return 1 if jax.default_backend() == "cpu" else 20


def kernel_impls(backend: str, interpret: bool = False) -> list[str]:
    """SparQ implementations that run compiled on a backend (--impl all); with interpret, the GPU
    kernels in the Pallas interpreter as well."""
    if interpret:
        return ["xla", "pallas_gpu"]
    if backend == "cpu":   # XLA:CPU (impl="xla") and, where the library builds, the native kernel
        return ["xla", "cpu_fused"] if native.available()[0] else ["xla"]
    return {"gpu": ["xla", "pallas_gpu"], "tpu": ["xla", "pallas_tpu"]}.get(backend, ["xla"])


def _pallas_dense(q, k, v):
    """jax's own Pallas decode attention (GPU), if it imports: the best dense kernel we can field.
    k, v: [B, S, Hkv, D], its layout (transposed before timing, so the timing holds no transpose)."""
    from jax.experimental.pallas.ops.gpu import decode_attention as da
    return da.gqa(q, k, v)


def _inputs(o: AttentionOptions, seq_len: int):
    """(q [B, Hq, D], the cache with K^T, the cache with K once or None), drawn on the device: a host
    draw of several GB would take longer than the benchmark."""
    dtype = DTYPES[o.dtype]
    kk, kv, kq = jax.random.split(jax.random.PRNGKey(o.seed), 3)
    k = jax.random.normal(kk, (o.batch, o.kv_heads, seq_len, o.head_dim), dtype)
    v = jax.random.normal(kv, (o.batch, o.kv_heads, seq_len, o.head_dim), dtype)
    q = jax.random.normal(kq, (o.batch, o.q_heads, o.head_dim), dtype)
    lengths = jnp.full((o.batch,), seq_len, jnp.int32)
    twice = sq.KVCache.from_kv(k, v, lengths, transposed_keys=True)
    once = sq.KVCache.from_kv(k, v, lengths, transposed_keys=False) if o.single_copy else None
    return q, twice, once


def _candidates(o: AttentionOptions, sparq, q, twice, once, dense_bytes: int, sparq_bytes: int):
    """The timed calls: (fns, their args, rows {name: (method, impl, bytes read)}), "stream" (a plain
    reduction over as many bytes as SparQ reads: the floor on this device) without a row."""
    def run(method, impl):
        return jax.jit(lambda q, c: sq.attend(q, c, method, impl=impl, interpret=o.interpret)[0])

    fns, fargs, rows = {}, {}, {}
    fns["dense/xla"], fargs["dense/xla"] = run(sq.Dense(), "xla"), (q, twice)
    rows["dense/xla"] = ("dense", "xla", dense_bytes)
    if jax.default_backend() == "gpu":
        try:
            kv_bshd = (q, jnp.swapaxes(twice.k, 1, 2), jnp.swapaxes(twice.v, 1, 2))
            jax.block_until_ready(jax.jit(_pallas_dense)(*kv_bshd))
            fns["dense/pallas"], fargs["dense/pallas"] = jax.jit(_pallas_dense), kv_bshd
            rows["dense/pallas"] = ("dense", "pallas_gpu(jax decode_attention)", dense_bytes)
        except Exception as err:  # noqa: BLE001 - optional comparison only
            print(f"(jax's pallas decode_attention unavailable: {type(err).__name__}: {err})", file=sys.stderr)
    for impl in _impls(o):
        name = f"sparq/{impl}"
        fns[name], fargs[name] = run(sparq, impl), (q, twice)
        rows[name] = ("sparq", impl, sparq_bytes)
        if once is not None:
            fns[name + "/single-copy"], fargs[name + "/single-copy"] = run(sparq, impl), (q, once)
            rows[name + "/single-copy"] = ("sparq (K once)", impl, sparq_bytes)
    stream = jnp.ones((sparq_bytes // jnp.dtype(DTYPES[o.dtype]).itemsize,), DTYPES[o.dtype])
    fns["stream"], fargs["stream"] = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), (stream,)
    return fns, fargs, rows


def _impls(o: AttentionOptions) -> list[str]:
    return kernel_impls(jax.default_backend(), o.interpret) if o.impl == "all" else [o.impl]


def _references(q, cache, sparq) -> dict:
    """{method: fp32 [B, Hq, D]}: SparQ by sparq_reference, dense by a plain fp32 softmax (highest precision)."""
    b, hq, d = q.shape
    qg = q.reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, d).astype(jnp.float32)
    mask = candidate_mask(cache.lengths, cache.max_len, None)

    def dense(qg, k, v):
        logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32), precision="highest") / np.sqrt(d)
        p = jax.nn.softmax(jnp.where(mask[:, None, None, :], logits, -jnp.inf), axis=-1)
        return jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32), precision="highest")

    refs = {"dense": jax.jit(dense)(qg, cache.k, cache.v),
            "sparq": jax.jit(sparq_reference, static_argnames=("method", "window"))(qg, cache, mask, method=sparq)}
    return {name: np.asarray(out, np.float32).reshape(b, hq, d) for name, out in refs.items()}


def _errors_vs_reference(fns, fargs, rows, refs) -> dict[str, float]:
    """Every row's output against its method's reference: ||out - ref|| / ||ref||, fp32."""
    errs = {}
    for name in rows:
        ref = refs[name.split("/")[0]]
        out = np.asarray(fns[name](*fargs[name]), np.float32).reshape(ref.shape)
        errs[name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return errs


def _breakdown_backends(o: AttentionOptions) -> list[str]:
    """The backends whose parts the breakdown times: each impl's, and with pallas_gpu its unfused
    kernels (a benchmark-only backend)."""
    impls = _impls(o)
    return impls + (["pallas_gpu_unfused"] if "pallas_gpu" in impls else [])


def _breakdowns(o: AttentionOptions, sparq, q, cache) -> dict:
    breakdown = {}
    for backend in _breakdown_backends(o):
        try:
            breakdown[backend] = stage_breakdown(o, sparq, q, cache, backend)
        except Exception as err:  # noqa: BLE001 - reported, the other backends still run
            print(f"breakdown of sparq/{backend} failed: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
            breakdown[backend] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    return breakdown


def attention_case(o: AttentionOptions, seq_len: int) -> dict:
    """One shape timed: {"config", "rows" (method, impl, ms, bytes, gbps, rel_err: against the method's
    reference), "dense_ms",
    "sparq_ms" (each the fastest row of its method), "speedup", "transfer_ratio", "stream_ms",
    "copy_gbps", "breakdown" (None unless asked for)}."""
    sparq = o.method(seq_len)
    q, twice, once = _inputs(o, seq_len)
    itemsize = jnp.dtype(DTYPES[o.dtype]).itemsize
    dense_bytes = o.batch * o.kv_heads * sq.Dense().transfers(seq_len, o.head_dim) * itemsize
    sparq_bytes = o.batch * o.kv_heads * sparq.transfers(seq_len, o.head_dim) * itemsize
    fns, fargs, rows = _candidates(o, sparq, q, twice, once, dense_bytes, sparq_bytes)
    drop_failing(fns, fargs, rows)
    inner = o.calls_per_sample
    ms = time_interleaved(fns, fargs, o.reps, o.warmup, inner)
    # The device's copy bandwidth (bytes read + written), on a buffer as large as dense's reads (at
    # most 1 GiB), timed after the others: interleaved, freeing its output slowed the next call
    # (dense 56 -> 89 ms on the CPU).
    copy_bytes = min(dense_bytes, 1 << 30)
    ms.update(time_interleaved({"copy": jax.jit(lambda x: x * 2)},
                               {"copy": (jnp.ones((copy_bytes // itemsize,), DTYPES[o.dtype]),)},
                               o.reps, o.warmup, inner))
    breakdown = _breakdowns(o, sparq, q, twice) if o.breakdown else None
    errs = _errors_vs_reference(fns, fargs, rows, _references(q, twice, sparq))
    out_rows = [{"method": m, "impl": impl, "ms": ms[name], "bytes": nbytes, "gbps": nbytes / ms[name] / 1e6,
                 "rel_err": errs[name]}
                for name, (m, impl, nbytes) in rows.items()]
    dense_ms = min(r["ms"] for r in out_rows if r["method"] == "dense")
    sparq_ms = min(r["ms"] for r in out_rows if r["method"] == "sparq")
    return {
        "config": {"batch": o.batch, "q_heads": o.q_heads, "kv_heads": o.kv_heads, "seq_len": seq_len,
                   "head_dim": o.head_dim, "dtype": o.dtype, "rank": sparq.rank, "top_k": sparq.top_k,
                   "local_window": sparq.local_window, "reallocate_mean": sparq.reallocate_mean,
                   **environment(), "reps": o.reps, "inner": inner, "interpret": o.interpret},
        "rows": out_rows,
        "dense_ms": dense_ms,
        "sparq_ms": sparq_ms,
        "speedup": dense_ms / sparq_ms,
        "transfer_ratio": sparq.transfers(seq_len, o.head_dim) / sq.Dense().transfers(seq_len, o.head_dim),
        "stream_ms": ms["stream"],
        "copy_gbps": 2 * copy_bytes / ms["copy"] / 1e6,
        "breakdown": breakdown,
    }


def _top_k_variants(o: AttentionOptions, backend: str, k: int) -> dict:
    """{name: top-k function of the score}: every top-k at hand for this backend, beside its own."""
    calls = {"top-k: counting (XLA)": lambda x: topk.top_k_positions(x, k),
             "top-k: lax.top_k, sorted": lambda x: topk.sorted_top_k(x, k)}
    if jax.default_backend() == "cpu" and native.available()[0]:
        calls["top-k: native (CPU)"] = lambda x: native.top_k_positions(x, k)
    if backend.startswith("pallas_gpu"):
        from pallas_kernels import sparq_gpu

        for name, kwargs in (("32 passes", {"early_exit": False}), ("a program per row", {"splits": 1})):
            calls[f"top-k: Pallas, {name}"] = functools.partial(sparq_gpu.top_k_positions, k=k,
                                                                interpret=o.interpret, **kwargs)
    return calls


def stage_breakdown(o: AttentionOptions, sparq, q, cache, backend: str) -> dict:
    """SparQ's parts on a backend (sparq_jax.backends.NAMES, or "xla": this platform's XLA backend),
    as sparq(record=True) runs them, timed one by one (interleaved), each on the previous part's real
    output (a full cache: every position valid): "scores" (step 1 and the approximate softmax),
    "top-k" (and every other top-k at hand, on the same score), "v_bar", "steps 2+3"
    -> {part: {"ms", "bytes", "gbps"}}."""
    _, parts = stages.run(q, cache, sparq, backend=backend, interpret=o.interpret)
    fns = {name: part.fn for name, part in parts.items()}
    fargs = {name: part.args for name, part in parts.items()}
    k = parts["top-k"].out.shape[-1]
    # cpu_fused's "scores" part is its one native call (all of SparQ): no score to rank with others
    for name, fn in ({} if backend == "cpu_fused" else _top_k_variants(o, backend, k)).items():
        fns[name], fargs[name] = jax.jit(fn), parts["top-k"].args
    drop_failing(fns, fargs)
    ms = time_interleaved(fns, fargs, o.reps, o.warmup, o.calls_per_sample)
    b, hkv, s, d = cache.k.shape
    item, score = cache.k.dtype.itemsize, b * hkv * s * 4
    nbytes = {"scores": b * hkv * sparq.rank * s * item, "steps 2+3": 2 * b * hkv * k * d * item,
              "v_bar": b * hkv * d * 4}
    return {name: {"ms": ms[name], "bytes": nbytes.get(name, score), "gbps": nbytes.get(name, score) / ms[name] / 1e6}
            for name in fns}


def print_case(result: dict) -> None:
    c = result["config"]
    print(f"\nB={c['batch']} Hq={c['q_heads']} Hkv={c['kv_heads']} S={c['seq_len']} D={c['head_dim']} "
          f"{c['dtype']} SparQ(r={c['rank']}, k={c['top_k']}, l={c['local_window']}) on {c['device']}")
    print(f"{'method':<16}{'impl':<34}{'ms':>10}{'MB read':>10}{'GB/s':>8}{'err vs ref':>12}")
    for r in result["rows"]:
        print(f"{r['method']:<16}{r['impl']:<34}{r['ms']:>10.3f}{r['bytes'] / 1e6:>10.1f}{r['gbps']:>8.1f}"
              f"{r['rel_err']:>12.1e}")
    print(f"speedup {result['speedup']:.2f}x (dense {result['dense_ms']:.3f} ms / sparq {result['sparq_ms']:.3f} ms), "
          f"transfer ratio {result['transfer_ratio']:.4f} (at most {1 / result['transfer_ratio']:.2f}x); "
          f"streaming SparQ's bytes takes {result['stream_ms']:.3f} ms "
          f"(sparq = {result['sparq_ms'] / result['stream_ms']:.2f}x of that); "
          f"copy bandwidth {result['copy_gbps']:.0f} GB/s")
    for impl, stages_ in (result.get("breakdown") or {}).items():
        print(f"  stages of sparq/{impl}:")
        if "error" in stages_:
            print(f"    failed: {stages_['error'][:300]}")
            continue
        for name, st in stages_.items():
            print(f"    {name:<34}{st['ms']:>10.3f} ms{st['bytes'] / 1e6:>10.1f} MB{st['gbps']:>8.1f} GB/s")


def plot_sweep(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = [r["config"]["seq_len"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({(row["method"], row["impl"]) for r in results for row in r["rows"]})
    for method, impl in names:
        ms = [next((row["ms"] for row in r["rows"] if (row["method"], row["impl"]) == (method, impl)), np.nan)
              for r in results]
        ax1.plot(s, ms, marker="o", label=f"{method} ({impl})")
    if all(r.get("stream_ms") is not None for r in results):
        ax1.plot(s, [r["stream_ms"] for r in results], ls="--", color="gray", label="stream SparQ's bytes")
    ax1.set(xscale="log", yscale="log", xlabel="sequence length S", ylabel="ms per decode step",
            title="attention time")
    ax1.legend(fontsize=8)
    ax2.plot(s, [r["speedup"] for r in results], marker="o", label="measured speedup")
    ax2.plot(s, [1 / r["transfer_ratio"] for r in results], ls="--", color="gray", label="1 / transfer ratio")
    ax2.axhline(1, color="black", lw=0.5)
    ax2.set(xscale="log", xlabel="sequence length S", ylabel="dense / SparQ", title="SparQ speedup")
    ax2.legend(fontsize=8)
    c = results[0]["config"]
    fig.suptitle(f"B={c['batch']} Hq={c['q_heads']} Hkv={c['kv_heads']} D={c['head_dim']} {c['dtype']}, "
                 f"{c['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_attention(o: AttentionOptions):
    """Every sequence length of o (sweep, else seq_len) timed and printed, plotted if o.plot -> the
    JSON document: one case's dict, or a list of them for a sweep."""
    results = []
    for s in o.sweep or [o.seq_len]:
        results.append(attention_case(o, s))
        print_case(results[-1])
    if o.plot:
        plot_sweep(results, o.plot)
    return results[0] if len(results) == 1 else results
