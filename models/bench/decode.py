"""Whole decode loops (lm.decode: one jitted while_loop, the cache donated, one host sync at the end)
of a random-weight model on random caches (no prefill), Dense vs SparQ, and the same number of steps of
attention alone."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import sparq_jax as sq

from ..config import ModelConfig
from ..llama import init_model
from ..lm import LanguageModel
from .timing import DTYPES, environment

# Model shapes (random weights). "llama-8l": 8 layers with TinyLlama's widths and a 32/8-head, D=128
# attention (the README's decode shape); "smollm2-135m": SmolLM2-135M's shape.
PRESETS = {
    "llama-8l": dict(layers=8, hidden=2048, q_heads=32, kv_heads=8, head_dim=128, intermediate=5632,
                     vocab=32000, tied=False),
    "smollm2-135m": dict(layers=30, hidden=576, q_heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                         vocab=49152, tied=True),
}


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The flags of `benchmark.py decode`: a preset's shape, any field of it given here in its place
    (None: the preset's). SparQ is sparq_jax.method_from_name("sparq") at `compression`."""

    preset: str = "llama-8l"
    seq_lens: tuple = (8192, 32768, 65536)
    batch: tuple = (1,)
    steps: int = 32                    # decode steps per timed loop
    dtype: str = "float32"             # weights and cache
    layers: Optional[int] = None
    hidden: Optional[int] = None
    q_heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate: Optional[int] = None
    vocab: Optional[int] = None
    tied: Optional[bool] = None
    compression: float = 0.125
    reps: int = 5
    warmup: int = 1

    def __post_init__(self):
        if self.preset not in PRESETS or self.dtype not in DTYPES:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)} and --dtype one of {sorted(DTYPES)}, "
                             f"got {self.preset!r}, {self.dtype!r}")
        shape = self.shape()
        if shape["q_heads"] % shape["kv_heads"]:
            raise ValueError(f"--q-heads={shape['q_heads']} must be a multiple of --kv-heads={shape['kv_heads']}")

    def shape(self) -> dict:
        return {name: value if getattr(self, name) is None else getattr(self, name)
                for name, value in PRESETS[self.preset].items()}

    def config(self) -> ModelConfig:
        """The model: the preset's shape with the fields given in its place, positions for the longest
        sequence and its decode steps."""
        shape = self.shape()
        return ModelConfig(
            model_type="llama", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["q_heads"], num_key_value_heads=shape["kv_heads"],
            head_dim=shape["head_dim"], tie_word_embeddings=shape["tied"],
            max_position_embeddings=max(self.seq_lens) + self.steps + 1)


def random_caches(key, layers, batch, kv_heads, length, capacity, head_dim, dtype):
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


def _attention_loop(q, kv_new, n: int):
    """A jitted fn(caches, method) -> (caches, out): n steps of each layer's cache append and attend,
    no projections, as a fori_loop. q [layers, B, Hq, D], kv_new [2, B, Hkv, 1, D]."""
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

    return jax.jit(attention_loop, static_argnames="method", donate_argnums=0)


def _row(ms: dict, methods: dict, seq_len: int, batch: int, n: int, tokens: dict) -> dict:
    sparq = methods["sparq"]
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


def decode_case(o: DecodeOptions, lm: LanguageModel, seq_len: int, batch: int) -> dict:
    """Whole decode loops of one (S, B), per method, interleaved with the attention-only loops and a
    copy of the state -> {"seq_len", "batch", "steps", "sparq_config", "dense" and "sparq" ({"loop_ms",
    "step_ms", "tokens_per_s", "attention_ms", "attention_share"}), "cache_copy_ms", "speedup",
    "speedup_without_copy", "tokens_agree"}."""
    c = lm.config
    d, layers, hkv = c.head_dim, c.num_hidden_layers, c.num_key_value_heads
    n = o.steps
    methods = {"dense": sq.Dense(), "sparq": sq.method_from_name("sparq", o.compression, d, seq_len, grouped=c.grouped)}
    state = random_caches(jax.random.PRNGKey(seq_len), layers, batch, hkv, seq_len, seq_len + n, d, DTYPES[o.dtype])
    logits = jnp.zeros((batch, c.vocab_size), jnp.float32)
    q = jax.random.normal(jax.random.PRNGKey(1), (layers, batch, c.num_attention_heads, d), DTYPES[o.dtype])
    kv_new = jax.random.normal(jax.random.PRNGKey(2), (2, batch, hkv, 1, d), DTYPES[o.dtype])
    attention = _attention_loop(q, kv_new, n)
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

    for _ in range(o.warmup + o.reps):
        for name, method in methods.items():
            tokens[name] = timed(f"{name}/loop", lambda: lm.decode(logits, state, n, method=method, eos_token_id=[]))
        timed("copy", lambda: copy(state))
        for name, method in methods.items():
            own[name], _ = timed(f"{name}/attention", lambda: attention(own[name], method=method))
            own[name] = rewind(own[name])
    ms = {key: statistics.median(s[o.warmup:]) for key, s in samples.items()}
    return _row(ms, methods, seq_len, batch, n, tokens)


def run_decode(o: DecodeOptions):
    """Every (batch, seq_len) of o timed and printed -> the JSON document: per batch size {"config",
    "results": decode_case's rows}, one such dict for one batch size, else a list."""
    config = o.config()
    lm = LanguageModel(init_model(config, seed=0, dtype=DTYPES[o.dtype]))
    documents = []
    for batch in o.batch:
        results = []
        for s in o.seq_lens:
            start = time.perf_counter()
            row = decode_case(o, lm, s, batch)
            results.append(row)
            sp = row["sparq_config"]
            print(f"B={batch} S={s:>6}: dense {row['dense']['step_ms']:.3f} ms/step (attention "
                  f"{row['dense']['attention_share']:.0%}), SparQ(r={sp['rank']}, k={sp['top_k']}) "
                  f"{row['sparq']['step_ms']:.3f} ms/step (attention {row['sparq']['attention_share']:.0%}): "
                  f"{row['speedup']:.2f}x ({row['speedup_without_copy']:.2f}x without lm.decode's cache copy "
                  f"of {row['cache_copy_ms']:.2f} ms); {time.perf_counter() - start:.1f} s with compiles",
                  flush=True)
        documents.append({"config": {**config.to_dict(), "preset": o.preset, "batch": batch, "dtype": o.dtype,
                                     "steps": o.steps, "compression": o.compression, **environment(),
                                     "reps": o.reps},
                          "results": results})
    return documents[0] if len(documents) == 1 else documents
