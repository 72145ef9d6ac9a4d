"""One decode step of attention, Dense vs SparQ, on random caches: every implementation at hand, the
floor of streaming SparQ's bytes, the device's copy bandwidth and, on request, SparQ's stages one by one."""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import sparq_jax as sq
from sparq_jax import stages
from sparq_jax.attention import top_k_positions

from .timing import DTYPES, drop_failing, environment, time_interleaved

IMPL_CHOICES = ("xla", "pallas_gpu", "pallas_tpu", "all")


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


def _errors_vs_xla(fns, fargs, rows) -> dict[str, float]:
    """Every row's output against the XLA row of its method: ||out - xla|| / ||xla||, fp32."""
    outs = {name: np.asarray(fns[name](*fargs[name]), np.float32) for name in rows}
    refs = {name: outs[name.split("/")[0] + "/xla"] for name in rows}
    return {name: float(np.linalg.norm(outs[name].reshape(refs[name].shape) - refs[name]) / np.linalg.norm(refs[name]))
            for name in rows}


def _breakdowns(o: AttentionOptions, sparq, q, cache) -> dict:
    breakdown = {}
    for impl in _impls(o):
        try:
            breakdown[impl] = stage_breakdown(o, sparq, q, cache, impl)
        except Exception as err:  # noqa: BLE001 - reported, the other implementations still run
            print(f"breakdown of sparq/{impl} failed: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
            breakdown[impl] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    return breakdown


def attention_case(o: AttentionOptions, seq_len: int) -> dict:
    """One shape timed: {"config", "rows" (method, impl, ms, bytes, gbps, rel_err_vs_xla), "dense_ms",
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
    errs = _errors_vs_xla(fns, fargs, rows)
    out_rows = [{"method": m, "impl": impl, "ms": ms[name], "bytes": nbytes, "gbps": nbytes / ms[name] / 1e6,
                 "rel_err_vs_xla": errs[name]}
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


def _stage_calls(o: AttentionOptions, sparq, st: stages.Stages, cache, impl: str) -> dict:
    """{stage name: (jitted fn, args)}, each on the previous stage's real output (st)."""
    from sparq_jax import native

    step1, top_k, step2 = stages.step_functions(impl, o.interpret, transposed=True)
    k = st.i2.shape[-1]
    scores = jax.jit(lambda lg: stages.approx_scores(st.qg, st.q1, lg, st.mask, cache.lengths, sparq.local_window,
                                                     sparq.group_scores))
    calls = {
        "step 1": (jax.jit(step1), (st.q1, cache.kt, st.i1)),
        "softmax + group sum": (scores, (st.logits1,)),
        "top-k: counting (XLA)": (jax.jit(lambda x: top_k_positions(x, k)), (st.score,)),
        "top-k: lax.top_k": (jax.jit(lambda x: jax.lax.top_k(x, k)[1]), (st.score,)),
        "alpha (s_hat at top-k)": (jax.jit(stages.covered_mass), (st.s_hat, st.i2, st.valid)),
        "steps 2+3": (jax.jit(step2), (st.qg, cache.k, cache.v, st.i2, st.valid, st.alpha, st.v_bar)),
    }
    if jax.default_backend() == "cpu" and native.available()[0]:
        calls["top-k: native (CPU)"] = (jax.jit(lambda x: native.top_k_positions(x, k)), (st.score,))
    if impl == "pallas_gpu":
        calls.update(_fused_stage_calls(o, sparq, st, cache))
    return calls


def _fused_stage_calls(o: AttentionOptions, sparq, st: stages.Stages, cache) -> dict:
    """pallas_gpu's own kernels: the top-k variants, and what it runs in place of step 1 and the
    softmax (one kernel, + the group sum of s_hat from its partials under group_scores="softmax")
    and of steps 2+3 with alpha."""
    from pallas_kernels import sparq_gpu

    def top_k(**kwargs):
        return jax.jit(lambda x: sparq_gpu.top_k_positions(x, st.i2.shape[-1], interpret=o.interpret, **kwargs))

    fused = jax.jit(lambda q, keys: stages.fused_scores(q, keys, st.mask, cache.lengths, sparq, interpret=o.interpret))
    calls = {"top-k: Pallas kernel": (top_k(), (st.score,)),
             "top-k: Pallas, 32 passes": (top_k(early_exit=False), (st.score,)),
             "top-k: Pallas, a program per row": (top_k(splits=1), (st.score,)),
             "step 1 + scores, fused": (fused, (st.qg, cache.kt))}
    try:
        _, z, m, l, bounds = fused(st.qg, cache.kt)
    except Exception as err:  # noqa: BLE001 - dropped (and reported) with its stage
        print(f"(no input for 'steps 2+3 + alpha, fused': {type(err).__name__})", file=sys.stderr)
        return calls
    scored = jax.jit(lambda *a: sparq_gpu.gather_attend_scored(*a, reallocate=sparq.reallocate_mean,
                                                               interpret=o.interpret))
    v_bar = cache.v_sum / cache.max_len
    calls["steps 2+3 + alpha, fused"] = (scored, (st.qg, cache.k, cache.v, st.i2, z, m, l, bounds, v_bar))
    return calls


def stage_breakdown(o: AttentionOptions, sparq, q, cache, impl: str) -> dict:
    """SparQ's stages timed one by one (interleaved), each on the previous stage's real output (a full
    cache: every position valid): step 1, the softmax and group sum, the top-k (each implementation
    at hand), alpha, steps 2+3 -> {stage: {"ms", "bytes", "gbps"}}."""
    st = jax.jit(functools.partial(stages.select, method=sparq, impl=impl, interpret=o.interpret))(q, cache)
    calls = _stage_calls(o, sparq, st, cache, impl)
    fns, fargs = {n: f for n, (f, _) in calls.items()}, {n: a for n, (_, a) in calls.items()}
    drop_failing(fns, fargs)
    ms = time_interleaved(fns, fargs, o.reps, o.warmup, o.calls_per_sample)
    b, hkv, s, d = cache.k.shape
    k, item = st.i2.shape[-1], cache.k.dtype.itemsize
    logits, s_hat, score = st.logits1.size * 4, st.s_hat.size * 4, st.score.size * 4
    nbytes = {"step 1": b * hkv * sparq.rank * s * item, "steps 2+3": 2 * b * hkv * k * d * item,
              "step 1 + scores, fused": b * hkv * sparq.rank * s * item + logits,
              "steps 2+3 + alpha, fused": 2 * b * hkv * k * d * item + logits * k // s,
              "softmax + group sum": logits + s_hat + score, "alpha (s_hat at top-k)": s_hat * k // s}
    for name in fns:
        nbytes.setdefault(name, score)
    return {name: {"ms": ms[name], "bytes": nbytes[name], "gbps": nbytes[name] / ms[name] / 1e6} for name in fns}


def print_case(result: dict) -> None:
    c = result["config"]
    print(f"\nB={c['batch']} Hq={c['q_heads']} Hkv={c['kv_heads']} S={c['seq_len']} D={c['head_dim']} "
          f"{c['dtype']} SparQ(r={c['rank']}, k={c['top_k']}, l={c['local_window']}) on {c['device']}")
    print(f"{'method':<16}{'impl':<34}{'ms':>10}{'MB read':>10}{'GB/s':>8}{'err vs xla':>12}")
    for r in result["rows"]:
        print(f"{r['method']:<16}{r['impl']:<34}{r['ms']:>10.3f}{r['bytes'] / 1e6:>10.1f}{r['gbps']:>8.1f}"
              f"{r['rel_err_vs_xla']:>12.1e}")
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
