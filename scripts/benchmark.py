#!/usr/bin/env python
"""Benchmarks: one decode step of attention (Dense vs SparQ), and whole decode steps of a model.

    python scripts/benchmark.py attention --batch 4 --kv-heads 8 --seq-len 32768 --compression 1/8
    python scripts/benchmark.py attention --sweep 1024,4096,16384,65536 --plot sweep.png
    python scripts/benchmark.py decode --seq-lens 8192,32768
    python scripts/benchmark.py model --model smollm2-135m-instruct --contexts 2048,4096,8192 --batches 1,4

Every timing is measured side by side in one process: the candidates run interleaved, repetition
after repetition, and each reports the median after warm-up. Speedups are ratios of those medians.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparq_jax as sq
from cli_args import int_list, positive_int, ratio

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


def kernel_impls(backend: str) -> list[str]:
    """SparQ implementations that run compiled on a backend (--impl all)."""
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
        return jax.jit(lambda q, c: sq.attend(q, c, method, impl=impl)[0])

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
    impls = kernel_impls(jax.default_backend()) if args.impl == "all" else [args.impl]
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
    ms = time_interleaved(fns, fargs, args.reps, args.warmup, args.inner)
    # The device's copy bandwidth (bytes read + written), on a buffer as large as dense's reads (at
    # most 1 GiB), timed after the others: interleaved, freeing its output slowed the next call
    # (dense 56 -> 89 ms on the CPU).
    copy_bytes = min(dense_bytes, 1 << 30)
    ms.update(time_interleaved({"copy": jax.jit(lambda x: x * 2)},
                               {"copy": (jnp.ones((copy_bytes // itemsize,), dtype),)},
                               args.reps, args.warmup, args.inner))
    breakdown = {impl: stage_breakdown(args, sparq, q, twice, impl) for impl in impls} if args.breakdown else None
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
                   "jax": jax.__version__, "reps": args.reps, "inner": args.inner},
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

    step1, top_k, step2 = att._step_functions(impl, False, transposed=True)
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
        fns["top-k: Pallas kernel"] = (jax.jit(lambda x: sparq_gpu.top_k_positions(x, k)), (score,))
        fns["top-k: Pallas, 32 passes"] = (jax.jit(lambda x: sparq_gpu.top_k_positions(x, k, early_exit=False)),
                                           (score,))
    ms = time_interleaved({n: f for n, (f, _) in fns.items()}, {n: a for n, (_, a) in fns.items()},
                          args.reps, args.warmup, args.inner)
    item = cache.k.dtype.itemsize
    nbytes = {"step 1": b * hkv * sparq.rank * s * item, "steps 2+3": 2 * b * hkv * k * d * item,
              "softmax + group sum": logits.size * 4 + s_hat.size * 4 + score.size * 4,
              "alpha (s_hat at top-k)": s_hat.size * 4 * k // s}
    for name in fns:
        nbytes.setdefault(name, score.size * 4)
    return {name: {"ms": ms[name], "bytes": nbytes[name], "gbps": nbytes[name] / ms[name] / 1e6} for name in fns}


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
        for name, st in stages.items():
            print(f"    {name:<26}{st['ms']:>10.3f} ms{st['bytes'] / 1e6:>10.1f} MB{st['gbps']:>8.1f} GB/s")


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


def _random_caches(key, layers, batch, kv_heads, length, capacity, head_dim, transposed):
    """One cache per layer ([B, Hkv, capacity, D]) holding `length` random positions per row."""
    caches = []
    for i in range(layers):
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        shape = (batch, kv_heads, capacity, head_dim)
        valid = (jnp.arange(capacity) < length)[:, None]
        k = jnp.where(valid, jax.random.normal(kk, shape, jnp.float32), 0)
        v = jnp.where(valid, jax.random.normal(kv, shape, jnp.float32), 0)
        caches.append(sq.KVCache(k=k, kt=jnp.swapaxes(k, -1, -2) if transposed else None, v=v,
                                 v_sum=jnp.sum(v, axis=2), lengths=jnp.full((batch,), length, jnp.int32)))
    return tuple(caches)


def cmd_decode(args) -> None:
    """Decode-step throughput of a Llama-shaped random model on random caches (no prefill)."""
    import models

    if args.q_heads % args.kv_heads:
        raise SystemExit(f"--q-heads={args.q_heads} must be a multiple of --kv-heads={args.kv_heads}")
    d = args.head_dim
    config = models.ModelConfig(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.q_heads, num_key_value_heads=args.kv_heads, head_dim=d,
        max_position_embeddings=max(args.seq_lens) + 1024)
    lm = models.LanguageModel(models.init_model(config, seed=0))
    steps = args.warmup + args.reps
    results = []
    for s in args.seq_lens:
        sparq = sq.SparQ.for_compression(args.compression, d, s, reallocate_mean=False)
        methods = {"dense": sq.Dense(), "sparq": sparq}
        states = {name: _random_caches(jax.random.PRNGKey(s), args.layers, 1, args.kv_heads, s,
                                              s + steps + 1, d, m.reads_transposed_keys)
                  for name, m in methods.items()}
        token = np.zeros((1,), np.int32)
        q = jax.random.normal(jax.random.PRNGKey(1), (args.layers, 1, args.q_heads, d), jnp.float32)
        kv_new = jax.random.normal(jax.random.PRNGKey(2), (2, 1, args.kv_heads, d), jnp.float32)

        def attention_only(caches, method):
            # What a decode step spends in attention: the same appends and attends, no projections.
            # Each layer's query depends on the previous layer's output, as in the model, so that
            # XLA cannot run the layers' attention side by side (it would on independent inputs).
            outs, new = [], []
            out = jnp.zeros_like(q[0])
            for i, cache in enumerate(caches):
                qi = q[i] + 0 * out
                out, cache = sq.attend(qi, cache.append(kv_new[0][:, :, None], kv_new[1][:, :, None]), method)
                outs.append(out)
                new.append(cache)
            return tuple(new), jnp.stack(outs)

        rewind = lambda caches: tuple(dataclasses.replace(c, lengths=c.lengths - 1) for c in caches)
        attn = {name: jax.jit(attention_only, static_argnames="method", donate_argnums=0) for name in methods}
        step_ms = {name: [] for name in methods}
        attn_ms = {name: [] for name in methods}
        for rep in range(steps):
            for name, method in methods.items():
                start = time.perf_counter()
                logits, states[name] = lm.decode_step(token, states[name], method=method)
                jax.block_until_ready(logits)
                step_ms[name].append((time.perf_counter() - start) * 1e3)
            for name, method in methods.items():
                # Rewind the lengths so the cache never fills; the timings do not depend on contents.
                states[name] = rewind(states[name])
                start = time.perf_counter()
                states[name], out = attn[name](states[name], method=method)
                jax.block_until_ready(out)
                attn_ms[name].append((time.perf_counter() - start) * 1e3)
                states[name] = rewind(states[name])
        row = {"seq_len": s, "sparq": {"rank": sparq.rank, "top_k": sparq.top_k, "local_window": sparq.local_window}}
        for name in methods:
            ms = statistics.median(step_ms[name][args.warmup:])
            a = statistics.median(attn_ms[name][args.warmup:])
            row[name] = {"step_ms": ms, "tokens_per_s": 1e3 / ms, "attention_ms": a, "attention_share": a / ms}
        row["speedup"] = row["dense"]["step_ms"] / row["sparq"]["step_ms"]
        results.append(row)
        del states
        print(f"S={s:>6}: dense {row['dense']['tokens_per_s']:.2f} tok/s (attention {row['dense']['attention_share']:.0%}"
              f" of the step), SparQ(r={sparq.rank}, k={sparq.top_k}) {row['sparq']['tokens_per_s']:.2f} tok/s "
              f"(attention {row['sparq']['attention_share']:.0%}): {row['speedup']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {**config.to_dict(), "batch": 1, "compression": args.compression,
                                  "device": str(jax.devices()[0].device_kind), "jax": jax.__version__},
                       "results": results}, f, indent=2)
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
    resolve = getattr(hf, "resolve_path", None)
    return resolve(name) if resolve is not None else hf._resolve(name)


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
    d = sub.add_parser("decode", help="decode-step throughput of a Llama-shaped random model")
    d.add_argument("--seq-lens", type=int_list, default=[8192, 32768, 65536])
    d.add_argument("--layers", type=positive_int, default=8)
    d.add_argument("--hidden", type=positive_int, default=2048)
    d.add_argument("--q-heads", type=positive_int, default=32)
    d.add_argument("--kv-heads", type=positive_int, default=8)
    d.add_argument("--head-dim", type=positive_int, default=128)
    d.add_argument("--intermediate", type=positive_int, default=5632, help="MLP width (TinyLlama's by default)")
    d.add_argument("--vocab", type=positive_int, default=32000)
    d.add_argument("--compression", type=ratio, default=0.125)
    d.add_argument("--reps", type=positive_int, default=7)
    d.add_argument("--warmup", type=positive_int, default=2)
    d.add_argument("--json", help="write the results as JSON")
    d.set_defaults(func=cmd_decode)
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
