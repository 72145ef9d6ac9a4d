#!/usr/bin/env python
"""Benchmarks: one decode step of attention (Dense vs SparQ), and whole decode steps of a model.

    python scripts/benchmark.py attention --batch 4 --kv-heads 8 --seq-len 32768 --compression 1/8
    python scripts/benchmark.py attention --sweep 1024,4096,16384,65536 --plot sweep.png
    python scripts/benchmark.py decode --seq-lens 8192,32768 --batch 1,8
    python scripts/benchmark.py decode --preset smollm2-135m --seq-lens 8192 --dtype bfloat16
    python scripts/benchmark.py model --model smollm2-135m-instruct --contexts 2048,4096,8192 --batches 1,4

Every timing is measured side by side in one process: the candidates run interleaved, repetition
after repetition, and each reports the median after warm-up. Speedups are ratios of those medians.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import inspect
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparq_jax as sq
from models.cli import int_list, positive_int, ratio

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def time_interleaved(fns: dict, args: dict, reps: int, warmup: int, inner: int = 1) -> dict[str, float]:
    """Median milliseconds of each fns[name](*args[name]), run round-robin.

    Each sample dispatches the call `inner` times back to back and waits once, so that on an
    accelerator the host's dispatch overlaps the device's work (a decode loop is one program there).
    """
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args[name]))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs = [fn(*args[name]) for _ in range(inner)]
            jax.block_until_ready(outs)
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def drop_failing(fns: dict, args: dict, rows: dict = None) -> None:
    """Run each fns[name](*args[name]) once; one that raises (a kernel that does not compile on this
    device) is reported and dropped, so that the others are still timed."""
    for name in list(fns):
        try:
            jax.block_until_ready(fns[name](*args[name]))
        except Exception as err:  # noqa: BLE001 - reported, the run goes on without it
            print(f"{name} failed and is left out: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
            del fns[name], args[name]
            if rows is not None:
                rows.pop(name, None)


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


def attention_case(args, seq_len: int) -> dict:
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    if hq % hkv:
        raise SystemExit(f"--q-heads={hq} must be a multiple of --kv-heads={hkv}")
    dtype = DTYPES[args.dtype]
    if args.rank is not None or args.top_k is not None:
        if args.rank is None or args.top_k is None:
            raise SystemExit("--rank and --top-k go together (or use --compression)")
        sparq = sq.SparQ(args.rank, args.top_k, args.local_window, reallocate_mean=not args.no_reallocate)
    else:
        sparq = sq.SparQ.for_compression(args.compression, d, seq_len, reallocate_mean=not args.no_reallocate)
    if sparq.rank > d:
        raise SystemExit(f"--rank={sparq.rank} must be <= --head-dim={d}")
    # drawn on the device: a host draw of several GB would take longer than the benchmark
    kk, kv, kq = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    k = jax.random.normal(kk, (b, hkv, seq_len, d), dtype)
    v = jax.random.normal(kv, (b, hkv, seq_len, d), dtype)
    q = jax.random.normal(kq, (b, hq, d), dtype)
    lengths = jnp.full((b,), seq_len, jnp.int32)
    twice = sq.KVCache.from_kv(k, v, lengths, transposed_keys=True)
    once = sq.KVCache.from_kv(k, v, lengths, transposed_keys=False) if args.single_copy else None
    del k, v

    def run(method, impl):
        return jax.jit(lambda q, c: sq.attend(q, c, method, impl=impl, interpret=args.interpret)[0])

    itemsize = jnp.dtype(dtype).itemsize
    dense_bytes = b * hkv * sq.Dense().transfers(seq_len, d) * itemsize
    sparq_bytes = b * hkv * sparq.transfers(seq_len, d) * itemsize
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
    impls = kernel_impls(jax.default_backend(), args.interpret) if args.impl == "all" else [args.impl]
    for impl in impls:
        name = f"sparq/{impl}"
        fns[name], fargs[name] = run(sparq, impl), (q, twice)
        rows[name] = ("sparq", impl, sparq_bytes)
        if once is not None:
            fns[name + "/single-copy"], fargs[name + "/single-copy"] = run(sparq, impl), (q, once)
            rows[name + "/single-copy"] = ("sparq (K once)", impl, sparq_bytes)
    # The floor on this device: a plain reduction over as many bytes as SparQ reads.
    stream = jnp.ones((sparq_bytes // itemsize,), dtype)
    fns["stream"], fargs["stream"] = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), (stream,)
    drop_failing(fns, fargs, rows)
    ms = time_interleaved(fns, fargs, args.reps, args.warmup, args.inner)
    # The device's copy bandwidth (bytes read + written), on a buffer as large as dense's reads (at
    # most 1 GiB), timed after the others: interleaved, freeing its output slowed the next call
    # (dense 56 -> 89 ms on the CPU).
    copy_bytes = min(dense_bytes, 1 << 30)
    ms.update(time_interleaved({"copy": jax.jit(lambda x: x * 2)},
                               {"copy": (jnp.ones((copy_bytes // itemsize,), dtype),)},
                               args.reps, args.warmup, args.inner))
    breakdown = None
    if args.breakdown:
        breakdown = {}
        for impl in impls:
            try:
                breakdown[impl] = stage_breakdown(args, sparq, q, twice, impl)
            except Exception as err:  # noqa: BLE001 - reported, the other implementations still run
                print(f"breakdown of sparq/{impl} failed: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
                breakdown[impl] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    # Every row's output against the XLA row of its method (||out - xla|| / ||xla||, fp32).
    outs = {name: np.asarray(fns[name](*fargs[name]), np.float32) for name in rows}
    refs = {name: outs[name.split("/")[0] + "/xla"] for name in rows}
    outs = {name: out.reshape(refs[name].shape) for name, out in outs.items()}
    errs = {name: float(np.linalg.norm(outs[name] - refs[name]) / np.linalg.norm(refs[name])) for name in rows}
    del outs, refs
    out_rows = [{"method": m, "impl": impl, "ms": ms[name], "bytes": nbytes, "gbps": nbytes / ms[name] / 1e6,
                 "rel_err_vs_xla": errs[name]}
                for name, (m, impl, nbytes) in rows.items()]
    dense_ms = min(r["ms"] for r in out_rows if r["method"] == "dense")
    sparq_ms = min(r["ms"] for r in out_rows if r["method"] == "sparq")
    return {
        "config": {"batch": b, "q_heads": hq, "kv_heads": hkv, "seq_len": seq_len, "head_dim": d,
                   "dtype": args.dtype, "rank": sparq.rank, "top_k": sparq.top_k,
                   "local_window": sparq.local_window, "reallocate_mean": sparq.reallocate_mean,
                   "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                   "jax": jax.__version__, "reps": args.reps, "inner": args.inner, "interpret": args.interpret},
        "rows": out_rows,
        "dense_ms": dense_ms,
        "sparq_ms": sparq_ms,
        "speedup": dense_ms / sparq_ms,
        "transfer_ratio": sparq.transfers(seq_len, d) / sq.Dense().transfers(seq_len, d),
        "stream_ms": ms["stream"],
        "copy_gbps": 2 * copy_bytes / ms["copy"] / 1e6,
        "breakdown": breakdown,
    }


def stage_breakdown(args, sparq, q, cache, impl: str) -> dict:
    """SparQ's stages timed one by one (interleaved), each on the previous stage's real output:
    step 1 (approximate logits), the softmax and group sum, the top-k (each implementation at hand),
    steps 2+3."""
    from sparq_jax import attention as att
    from sparq_jax import native

    step1, top_k, step2 = att._step_functions(impl, args.interpret, transposed=True)
    b, hq, d = q.shape
    hkv, s = cache.k.shape[1], cache.max_len
    qf = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    i1, q1 = att._query_components(qf, sparq.rank)
    logits = jax.jit(step1)(q1, cache.kt, i1)
    k = min(sparq.top_k, s)
    # The pipeline's own code for what lies between the steps (the cache is full: every position valid).
    mask = att.candidate_mask(cache.lengths, s, None)
    scores = jax.jit(lambda lg: att._approx_scores(qf, q1, lg, mask, cache.lengths, sparq.local_window))
    s_hat, score = scores(logits)
    i2 = jax.jit(top_k, static_argnums=1)(score, k)
    valid = jnp.ones(i2.shape, bool)
    covered = jax.jit(att._covered_mass)
    alpha = covered(s_hat, i2, valid)
    v_bar = cache.v_sum / s
    fns = {
        "step 1": (jax.jit(step1), (q1, cache.kt, i1)),
        "softmax + group sum": (scores, (logits,)),
        "top-k: counting (XLA)": (jax.jit(lambda x: att.top_k_positions(x, k)), (score,)),
        "top-k: lax.top_k": (jax.jit(lambda x: jax.lax.top_k(x, k)[1]), (score,)),
        "alpha (s_hat at top-k)": (covered, (s_hat, i2, valid)),
        "steps 2+3": (jax.jit(step2), (qf, cache.k, cache.v, i2, valid, alpha, v_bar)),
    }
    if jax.default_backend() == "cpu" and native.available()[0]:
        fns["top-k: native (CPU)"] = (jax.jit(lambda x: native.top_k_positions(x, k)), (score,))
    if impl == "pallas_gpu":
        from pallas_kernels import sparq_gpu
        fns["top-k: Pallas kernel"] = (jax.jit(lambda x: sparq_gpu.top_k_positions(x, k, interpret=args.interpret)),
                                       (score,))
        fns["top-k: Pallas, 32 passes"] = (
            jax.jit(lambda x: sparq_gpu.top_k_positions(x, k, early_exit=False, interpret=args.interpret)), (score,))
        fns["top-k: Pallas, a program per row"] = (
            jax.jit(lambda x: sparq_gpu.top_k_positions(x, k, splits=1, interpret=args.interpret)), (score,))
        # what pallas_gpu runs instead of step 1 and the softmax: one kernel (+ the group sum of s_hat
        # from its partials under group_scores="softmax")
        fused = jax.jit(lambda q, keys: att._gpu_scores(q, keys, mask, cache.lengths, sparq, None, True,
                                                        args.interpret))
        fns["step 1 + scores, fused"] = (fused, (qf, cache.kt))
        try:
            _, z, m, l, bounds = fused(qf, cache.kt)
        except Exception as err:  # noqa: BLE001 - dropped (and reported) with its stage below
            print(f"(no input for 'steps 2+3 + alpha, fused': {type(err).__name__})", file=sys.stderr)
        else:
            scored = jax.jit(lambda *a: sparq_gpu.gather_attend_scored(*a, reallocate=sparq.reallocate_mean,
                                                                       interpret=args.interpret))
            fns["steps 2+3 + alpha, fused"] = (scored, (qf, cache.k, cache.v, i2, z, m, l, bounds, v_bar))
    fs, fargs = {n: f for n, (f, _) in fns.items()}, {n: a for n, (_, a) in fns.items()}
    drop_failing(fs, fargs)
    ms = time_interleaved(fs, fargs, args.reps, args.warmup, args.inner)
    item = cache.k.dtype.itemsize
    nbytes = {"step 1": b * hkv * sparq.rank * s * item, "steps 2+3": 2 * b * hkv * k * d * item,
              "step 1 + scores, fused": b * hkv * sparq.rank * s * item + logits.size * 4,
              "steps 2+3 + alpha, fused": 2 * b * hkv * k * d * item + logits.size * 4 * k // s,
              "softmax + group sum": logits.size * 4 + s_hat.size * 4 + score.size * 4,
              "alpha (s_hat at top-k)": s_hat.size * 4 * k // s}
    for name in fs:
        nbytes.setdefault(name, score.size * 4)
    return {name: {"ms": ms[name], "bytes": nbytes[name], "gbps": nbytes[name] / ms[name] / 1e6} for name in fs}


def print_case(result: dict) -> None:
    c = result["config"]
    print(f"\nB={c['batch']} Hq={c['q_heads']} Hkv={c['kv_heads']} S={c['seq_len']} D={c['head_dim']} "
          f"{c['dtype']} SparQ(r={c['rank']}, k={c['top_k']}, l={c['local_window']}) on {c['device']}")
    print(f"{'method':<16}{'impl':<34}{'ms':>10}{'MB read':>10}{'GB/s':>8}{'err vs xla':>12}")
    for r in result["rows"]:
        print(f"{r['method']:<16}{r['impl']:<34}{r['ms']:>10.3f}{r['bytes'] / 1e6:>10.1f}{r['gbps']:>8.1f}"
              f"{r['rel_err_vs_xla']:>12.1e}")
    line = (f"speedup {result['speedup']:.2f}x (dense {result['dense_ms']:.3f} ms / sparq "
            f"{result['sparq_ms']:.3f} ms), transfer ratio {result['transfer_ratio']:.4f} "
            f"(at most {1 / result['transfer_ratio']:.2f}x)")
    line += (f"; streaming SparQ's bytes takes {result['stream_ms']:.3f} ms "
             f"(sparq = {result['sparq_ms'] / result['stream_ms']:.2f}x of that); "
             f"copy bandwidth {result['copy_gbps']:.0f} GB/s")
    print(line)
    for impl, stages in (result.get("breakdown") or {}).items():
        print(f"  stages of sparq/{impl}:")
        if "error" in stages:
            print(f"    failed: {stages['error'][:300]}")
            continue
        for name, st in stages.items():
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


def cmd_attention(args) -> None:
    lens = args.sweep if args.sweep else [args.seq_len]
    results = []
    for s in lens:
        result = attention_case(args, s)
        print_case(result)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(results, args.plot)


def _random_caches(key, layers, batch, kv_heads, length, capacity, head_dim, dtype):
    """The state lm.prefill returns (one sq.KVCache per layer, [B, Hkv, capacity, D], K^T kept so
    that every method can read it), holding `length` random positions per row."""
    caches = []
    valid = (jnp.arange(capacity) < length)[:, None]
    for i in range(layers):
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        shape = (batch, kv_heads, capacity, head_dim)
        k = jnp.where(valid, jax.random.normal(kk, shape, jnp.float32), 0).astype(dtype)
        v = jnp.where(valid, jax.random.normal(kv, shape, jnp.float32), 0).astype(dtype)
        caches.append(sq.KVCache(k=k, kt=jnp.swapaxes(k, -1, -2), v=v,
                                 v_sum=jnp.sum(v.astype(jnp.float32), axis=2),
                                 lengths=jnp.full((batch,), length, jnp.int32)))
    return tuple(caches)


# Model shapes for `decode` (random weights). "llama-8l": 8 layers with TinyLlama's widths and a
# 32/8-head, D=128 attention (the README's decode shape); "smollm2-135m": SmolLM2-135M's shape.
PRESETS = {
    "llama-8l": dict(layers=8, hidden=2048, q_heads=32, kv_heads=8, head_dim=128, intermediate=5632,
                     vocab=32000, tied=False),
    "smollm2-135m": dict(layers=30, hidden=576, q_heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                         vocab=49152, tied=True),
}


def decode_config(args):
    """The ModelConfig of --preset with any shape flag given on the command line in its place."""
    import models

    shape = {name: getattr(args, name) if getattr(args, name) is not None else value
             for name, value in PRESETS[args.preset].items()}
    if shape["q_heads"] % shape["kv_heads"]:
        raise SystemExit(f"--q-heads={shape['q_heads']} must be a multiple of --kv-heads={shape['kv_heads']}")
    return models.ModelConfig(
        model_type="llama", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["q_heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], tie_word_embeddings=shape["tied"],
        max_position_embeddings=max(args.seq_lens) + args.steps + 1)


def decode_case(args, lm, seq_len: int, batch: int) -> dict:
    """Whole decode loops of one (S, B): lm.decode of --steps tokens per method (one jitted
    while_loop, the cache donated, one host sync at the end), interleaved, and the same number of
    steps of attention alone (each layer's cache append and attend, no projections) as a jitted
    fori_loop."""
    c = lm.config
    d, layers, hkv = c.head_dim, c.num_hidden_layers, c.num_key_value_heads
    dtype = DTYPES[args.dtype]
    n = args.steps
    sparq = sq.SparQ.for_compression(args.compression, d, seq_len, reallocate_mean=False)
    methods = {"dense": sq.Dense(), "sparq": sparq}
    state = _random_caches(jax.random.PRNGKey(seq_len), layers, batch, hkv, seq_len, seq_len + n, d, dtype)
    logits = jnp.zeros((batch, c.vocab_size), jnp.float32)
    q = jax.random.normal(jax.random.PRNGKey(1), (layers, batch, c.num_attention_heads, d), dtype)
    kv_new = jax.random.normal(jax.random.PRNGKey(2), (2, batch, hkv, 1, d), dtype)

    def attention_loop(caches, method):
        # Each layer's query depends on the previous layer's output, as in the model, so that XLA
        # cannot run the layers' attention side by side (it would on independent inputs).
        def step(_, carry):
            caches, out = carry
            new = []
            for i, cache in enumerate(caches):
                out, cache = sq.attend(q[i] + 0 * out, cache.append(kv_new[0], kv_new[1]), method)
                new.append(cache)
            return tuple(new), out
        return jax.lax.fori_loop(0, n, step, (caches, jnp.zeros_like(q[0])))

    attention = jax.jit(attention_loop, static_argnames="method", donate_argnums=0)
    # lengths back to S after each timed loop, so that the cache never fills
    rewind = jax.jit(lambda caches: tuple(dataclasses.replace(x, lengths=x.lengths - n) for x in caches),
                     donate_argnums=0)
    own = {name: jax.tree.map(jnp.copy, state) for name in methods}
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
    samples = {key: [] for key in ("copy", *(f"{m}/{part}" for m in methods for part in ("loop", "attention")))}
    tokens = {}

    def timed(key, fn):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        samples[key].append((time.perf_counter() - start) * 1e3)
        return out

    for _ in range(args.warmup + args.reps):
        for name, method in methods.items():
            tokens[name] = timed(f"{name}/loop", lambda: lm.decode(logits, state, n, method=method, eos_token_id=[]))
        timed("copy", lambda: copy(state))
        for name, method in methods.items():
            own[name], _ = timed(f"{name}/attention", lambda: attention(own[name], method=method))
            own[name] = rewind(own[name])
    ms = {key: statistics.median(s[args.warmup:]) for key, s in samples.items()}
    row = {"seq_len": seq_len, "batch": batch, "steps": n,
           "sparq_config": {"rank": sparq.rank, "top_k": sparq.top_k, "local_window": sparq.local_window}}
    for name in methods:
        loop_ms = ms[f"{name}/loop"]
        step_ms = loop_ms / n
        attention_ms = ms[f"{name}/attention"] / n
        row[name] = {"loop_ms": loop_ms, "step_ms": step_ms, "tokens_per_s": batch * 1e3 / step_ms,
                     "attention_ms": attention_ms, "attention_share": attention_ms / step_ms}
    row["cache_copy_ms"] = ms["copy"]
    row["speedup"] = row["dense"]["loop_ms"] / row["sparq"]["loop_ms"]
    # lm.decode copies the state before its loop (the caller keeps theirs): the same copy for both
    row["speedup_without_copy"] = ((row["dense"]["loop_ms"] - ms["copy"])
                                   / max(row["sparq"]["loop_ms"] - ms["copy"], 1e-9))
    row["tokens_agree"] = float(np.mean(tokens["dense"] == tokens["sparq"]))
    return row


def cmd_decode(args) -> None:
    """Whole decode loops of a random-weight model on random caches (no prefill), Dense vs SparQ."""
    import models

    config = decode_config(args)
    lm = models.LanguageModel(models.init_model(config, seed=0, dtype=DTYPES[args.dtype]))
    documents = []
    for batch in args.batch:
        results = []
        for s in args.seq_lens:
            start = time.perf_counter()
            row = decode_case(args, lm, s, batch)
            results.append(row)
            sp = row["sparq_config"]
            print(f"B={batch} S={s:>6}: dense {row['dense']['step_ms']:.3f} ms/step (attention "
                  f"{row['dense']['attention_share']:.0%}), SparQ(r={sp['rank']}, k={sp['top_k']}) "
                  f"{row['sparq']['step_ms']:.3f} ms/step (attention {row['sparq']['attention_share']:.0%}): "
                  f"{row['speedup']:.2f}x ({row['speedup_without_copy']:.2f}x without lm.decode's cache copy "
                  f"of {row['cache_copy_ms']:.2f} ms); {time.perf_counter() - start:.1f} s with compiles",
                  flush=True)
        documents.append({"config": {**config.to_dict(), "preset": args.preset, "batch": batch,
                                     "dtype": args.dtype, "steps": args.steps, "compression": args.compression,
                                     "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                                     "jax": jax.__version__, "reps": args.reps},
                          "results": results})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(documents[0] if len(documents) == 1 else documents, f, indent=2)
        print(f"wrote {args.json}")


# Instructions of an optimized HLO module that launch nothing of their own.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
              "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id", "domain"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_OPCODE = re.compile(r" = .*?[\]\})] ([a-z][a-z0-9\-]*)\(")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    comps["__entry__"] = comps[name]
        elif line == "}":
            name = None
        else:
            comps[name].append(line)
    return comps


def hlo_launches(hlo: str) -> dict:
    """Kernel launches per iteration of the largest `while` loop of an optimized HLO module's entry
    (a decode loop: one iteration = one decode step), counted statically.

    Every instruction of the loop's body and condition counts as one launch except those in
    _NO_LAUNCH (a fusion is one kernel); nested loops, conditionals and calls are entered (a nested
    loop's body once, its trip count unknown; a conditional's largest branch). Returns {"launches",
    "pallas": Pallas Triton calls among them, "nested_loops"}; all zero if the entry has no loop.
    """
    comps = _computations(hlo)

    def count(name, seen=()):
        total = {"launches": 0, "pallas": 0, "nested_loops": 0}
        if name in seen or name not in comps:
            return total
        for line in comps[name]:
            m = _OPCODE.search(line)
            if not m:
                continue
            op = m.group(1)
            if op not in _NO_LAUNCH:
                total["launches"] += 1
                total["pallas"] += op == "custom-call" and "xla.gpu.triton" in line
                continue
            if op == "while":
                inner = [count(c, seen + (name,)) for c in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
                inner.append({"nested_loops": 1})
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else \
                    re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
                inner = [max((count(c, seen + (name,)) for c in names), key=lambda t: t["launches"],
                             default={})]
            elif op == "call":
                inner = [count(c, seen + (name,)) for c in re.findall(r"to_apply=%?([\w.\-]+)", line)]
            else:
                continue
            for t in inner:
                for key, value in t.items():
                    total[key] += value
        return total

    best = {"launches": 0, "pallas": 0, "nested_loops": 0}
    for line in comps.get("__entry__", []):
        m = _OPCODE.search(line)
        if m and m.group(1) == "while":
            names = re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)
            found = {"launches": 0, "pallas": 0, "nested_loops": 0}
            for c in names:
                for key, value in count(c).items():
                    found[key] += value
            if found["launches"] > best["launches"]:
                best = found
    return best


def cmd_launches(args) -> None:
    """Launches per decode step (and per layer) in the decode loops of an XLA dump folder."""
    paths = sorted(glob.glob(os.path.join(args.dump, f"*{args.module}*after_optimizations.txt")))
    if not paths:
        raise SystemExit(f"no '*{args.module}*after_optimizations.txt' in {args.dump!r}: dump with "
                         f"XLA_FLAGS='--xla_dump_to={args.dump} --xla_dump_hlo_as_text'")
    rows = []
    for path in paths:
        with open(path) as f:
            found = hlo_launches(f.read())
        found = {"file": os.path.basename(path), **found, "per_layer": found["launches"] / args.layers}
        rows.append(found)
        print(f"{found['file']}: {found['launches']} launches per step ({found['per_layer']:.1f} per layer of "
              f"{args.layers}), {found['pallas']} Pallas, {found['nested_loops']} nested loops")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")


def _torch_peer(path: str, dtype: str):
    """transformers' model of the same checkpoint (torch, this machine), or (None, why not)."""
    try:
        import torch
        import transformers
    except ImportError as err:
        return None, f"torch / transformers not importable ({err})"
    import os
    kwargs = {"dtype": getattr(torch, dtype)}
    if os.path.isfile(path) and path.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.split(path)
    elif os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        folder = path
    else:
        return None, f"{path} is neither a safetensors folder nor a .gguf file"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    except Exception as err:  # an architecture or file transformers cannot read: no peer, say why
        return None, f"transformers could not load {path} ({type(err).__name__}: {err})"
    return model, None


def _time_torch(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) of transformers' model with its KV cache."""
    import torch

    with torch.inference_mode():
        x = torch.tensor(ids, dtype=torch.long)
        start = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        prefill = time.perf_counter() - start
        # transformers 5 calls the KV cache `cache`, 4 `past_key_values`
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{name: past})
            past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - start


def cmd_model(args) -> None:
    """Prefill and decode throughput of a real checkpoint: ours (Dense, SparQ) and transformers' torch model."""
    import models

    lm = models.from_pretrained(args.model, dtype=args.dtype)
    config, d = lm.config, lm.config.head_dim
    peer, why = (None, "--no-torch") if args.no_torch else _torch_peer(_checkpoint_path(args.model), args.dtype)
    if peer is None:
        print(f"no torch peer: {why}")
    else:
        _time_torch(peer, np.zeros((1, 16), np.int64), 2)       # warm-up: first calls set up torch's kernels
    results = []
    rng = np.random.default_rng(args.seed)
    n = args.new_tokens
    for s in args.contexts:
        if s + n > config.max_position_embeddings:
            print(f"note: context {s} + {n} new tokens exceeds max_position_embeddings="
                  f"{config.max_position_embeddings}")
        sparq = sq.SparQ.for_compression(args.compression, d, s, reallocate_mean=False)
        methods = {"dense": sq.Dense(), "sparq": sparq}
        for b in args.batches:
            ids = rng.integers(0, config.vocab_size, (b, s)).astype(np.int32)
            prefill_s = []
            for _ in range(1 + args.reps):          # the first call compiles
                start = time.perf_counter()
                logits, state = lm.prefill(ids, max_len=s + n, transposed_keys=True)
                jax.block_until_ready(logits)
                prefill_s.append(time.perf_counter() - start)
            decode_s = {name: [] for name in methods}
            for _ in range(1 + args.reps):
                for name, method in methods.items():
                    _, stats = lm.decode(logits, state, n, method=method, eos_token_id=[], return_stats=True)
                    decode_s[name].append(stats.decode_s / stats.decode_steps)
            del state
            row = {"batch": b, "context": s, "new_tokens": n,
                   "sparq_method": {"rank": sparq.rank, "top_k": sparq.top_k, "local_window": sparq.local_window},
                   "prefill_compile_s": prefill_s[0] - statistics.median(prefill_s[1:]),
                   "prefill_tokens_per_s": b * s / statistics.median(prefill_s[1:])}
            for name in methods:
                step = statistics.median(decode_s[name][1:])
                row[name] = {"step_ms": step * 1e3, "tokens_per_s": b / step}
            row["sparq_speedup"] = row["dense"]["step_ms"] / row["sparq"]["step_ms"]
            if peer is not None:
                tp, td = zip(*(_time_torch(peer, ids, n) for _ in range(args.reps)))
                row["torch"] = {"prefill_tokens_per_s": b * s / statistics.median(tp),
                                "step_ms": statistics.median(td) / (n - 1) * 1e3,
                                "tokens_per_s": b * (n - 1) / statistics.median(td)}
            results.append(row)
            peer_text = "" if peer is None else (
                f"; torch prefill {row['torch']['prefill_tokens_per_s']:.0f} tok/s, "
                f"decode {row['torch']['tokens_per_s']:.2f} tok/s")
            print(f"B={b} S={s}: prefill {row['prefill_tokens_per_s']:.0f} tok/s (compile "
                  f"{row['prefill_compile_s']:.1f} s); decode dense {row['dense']['tokens_per_s']:.2f} tok/s, "
                  f"SparQ(r={sparq.rank}, k={sparq.top_k}) {row['sparq']['tokens_per_s']:.2f} tok/s "
                  f"({row['sparq_speedup']:.2f}x){peer_text}", flush=True)
    if args.json:
        import platform
        with open(args.json, "w") as f:
            json.dump({"config": {**config.to_dict(), "model": args.model, "dtype": args.dtype,
                                  "compression": args.compression, "device": str(jax.devices()[0].device_kind),
                                  "cpu_count": __import__("os").cpu_count(), "machine": platform.machine(),
                                  "jax": jax.__version__, "torch_peer": why or "transformers"},
                       "results": results}, f, indent=2)
        print(f"wrote {args.json}")


def _checkpoint_path(name: str) -> str:
    """The local path behind a model name from_pretrained accepts (a folder, a file or a known name)."""
    from models import hf
    return hf.resolve_path(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="one decode step of attention: Dense vs SparQ")
    a.add_argument("--batch", type=positive_int, default=4)
    a.add_argument("--q-heads", type=positive_int, default=8)
    a.add_argument("--kv-heads", type=positive_int, default=8)
    a.add_argument("--seq-len", type=positive_int, default=32768)
    a.add_argument("--head-dim", type=positive_int, default=128)
    a.add_argument("--compression", type=ratio, default=0.125,
                   help="target transfer ratio for SparQ.for_compression (0.125 or 1/8)")
    a.add_argument("--rank", type=positive_int, help="SparQ r (with --top-k, instead of --compression)")
    a.add_argument("--top-k", type=positive_int, help="SparQ k")
    a.add_argument("--local-window", type=int, default=0)
    a.add_argument("--no-reallocate", action="store_true", help="SparQ without mean reallocation")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    a.add_argument("--impl", choices=["xla", "pallas_gpu", "pallas_tpu", "all"], default="xla")
    a.add_argument("--single-copy", action="store_true", help="also time SparQ with K stored once")
    a.add_argument("--interpret", action="store_true",
                   help="run the Pallas kernels in interpret mode (a CPU check of the GPU code path; slow)")
    a.add_argument("--reps", type=positive_int, default=7)
    a.add_argument("--warmup", type=positive_int, default=2)
    a.add_argument("--inner", type=positive_int, default=None,
                   help="calls per timed sample, dispatched back to back (default 1 on CPU, 20 elsewhere)")
    a.add_argument("--breakdown", action="store_true",
                   help="also time SparQ's stages one by one (step 1, softmax + top-k variants, steps 2+3)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--sweep", type=int_list, help="comma-separated sequence lengths (overrides --seq-len)")
    a.add_argument("--plot", help="PNG of time and speedup vs S (with --sweep)")
    a.add_argument("--json", help="write the results as JSON")
    a.set_defaults(func=cmd_attention)
    d = sub.add_parser("decode", help="whole decode loops (lm.decode) of a random-weight model: Dense vs SparQ")
    d.add_argument("--preset", choices=sorted(PRESETS), default="llama-8l",
                   help="model shape; the flags below override its fields")
    d.add_argument("--seq-lens", type=int_list, default=[8192, 32768, 65536])
    d.add_argument("--batch", type=int_list, default=[1], help="comma-separated batch sizes")
    d.add_argument("--steps", type=positive_int, default=32, help="decode steps per timed loop")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and cache")
    for flag in ("layers", "hidden", "q-heads", "kv-heads", "head-dim", "intermediate", "vocab"):
        d.add_argument(f"--{flag}", type=positive_int)
    d.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                   help="tie the output head to the embedding")
    d.add_argument("--compression", type=ratio, default=0.125)
    d.add_argument("--reps", type=positive_int, default=5)
    d.add_argument("--warmup", type=positive_int, default=1)
    d.add_argument("--json", help="write the results as JSON")
    d.set_defaults(func=cmd_decode)
    n = sub.add_parser("launches", help="kernel launches per step in the decode loops of an XLA dump")
    n.add_argument("dump", help="the --xla_dump_to folder (with --xla_dump_hlo_as_text)")
    n.add_argument("--layers", type=positive_int, required=True, help="the model's layers (for launches per layer)")
    n.add_argument("--module", default="decode_loop", help="modules whose name contains this")
    n.add_argument("--json", help="write the counts as JSON")
    n.set_defaults(func=cmd_launches)
    m = sub.add_parser("model", help="prefill and decode throughput of a real checkpoint, with transformers as peer")
    m.add_argument("--model", required=True, help="what models.from_pretrained takes: a folder, a .gguf, a name")
    m.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192], help="prompt lengths")
    m.add_argument("--batches", type=int_list, default=[1, 4])
    m.add_argument("--new-tokens", type=positive_int, default=16, help="decode steps timed per run (+1 from prefill)")
    m.add_argument("--compression", type=ratio, default=0.125)
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--reps", type=positive_int, default=2, help="timed repetitions after the compiling one")
    m.add_argument("--no-torch", action="store_true", help="skip transformers' model")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", help="write the results as JSON")
    m.set_defaults(func=cmd_model)
    args = parser.parse_args(argv)
    if getattr(args, "inner", 0) is None:
        args.inner = 1 if jax.default_backend() == "cpu" else 20
    if args.command == "model" and args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first token comes from the prefill)")
    if getattr(args, "plot", None) and not getattr(args, "sweep", None):
        parser.error("--plot needs --sweep")
    args.func(args)


if __name__ == "__main__":
    main()
