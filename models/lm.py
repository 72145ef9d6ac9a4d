"""LanguageModel: logits, prefill, decode_step and generate with Hugging Face conventions.

Conventions kept from transformers: left padding in input_ids, position ids from the attention mask
(cumsum - 1), eos / pad from the generation config, eos possibly a list, rows that finished filled
with pad, output always T + max_new_tokens wide.

generate is a jitted prefill, then one jitted lax.while_loop of decode steps (the cache donated) that
stops once every row is done, sampling on device: no host round trip per token. Prompt widths are
left-padded to buckets so nearby lengths share one compile.

The jitted functions take the model as (graphdef, state) from nnx.split, made once per
LanguageModel, and merge it at trace time: one compile per shape and method, whatever the weights.

On a device mesh (from_pretrained(..., mesh=...)) the same jitted functions run SPMD: inputs are split
by rows over "data", the weights as llama.weight_specs, the caches as sparq_jax.sharding.cache_specs,
and each layer's cache update and attention run per shard under shard_map.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings
import weakref
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import sparq_jax as sq
from sparq_jax.methods import transfer_totals
from sparq_jax.validation import check_int, check_number
from sparq_jax.sharding import DATA

from . import llama
from .config import ModelConfig

# prefill's default cache capacity beyond the prompt: generate's default max_new_tokens
DEFAULT_NEW_TOKENS = 32


def bucket_length(t: int) -> int:
    """The padded prompt width for t tokens: 16 at least, then 4 buckets per octave (<= 25% padding)."""
    if t <= 16:
        return 16
    unit = 1 << ((t - 1).bit_length() - 3)
    return -(-t // unit) * unit


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Sample [B] token ids from fp32 logits [B, V] with temperature then nucleus (top-p) filtering,
    as transformers' TemperatureLogitsWarper + TopPLogitsWarper: keep the most likely tokens whose
    mass, before each one, is below top_p (so at least one)."""
    logits = logits / temperature
    ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p, axis=-1)            # [B] >= 1
    threshold = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
    return jax.random.categorical(key, jnp.where(logits >= threshold, logits, -jnp.inf), axis=-1)


def _decode_loop(graphdef, state, logits, cache, key, temperature, top_p, eos, pad, *, method,
                 max_new_tokens: int, do_sample: bool, mesh=None):
    """From the prefill's logits [B, V] and cache, pick and feed tokens until every row is done.

    Returns new tokens int32 [B, max_new_tokens] (pad after a row's eos), the number of decode steps
    run, and the final cache (returned so that the donated input buffers carry the loop's cache in
    place). eos int32 [E] (E may be 0); pad int32 scalar. One lax.while_loop, no host round trip.
    """
    model = nnx.merge(graphdef, state)
    b = logits.shape[0]

    def pick(logits, step, done):
        if do_sample:
            token = sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p)
        else:
            token = jnp.argmax(logits, axis=-1)
        token = jnp.where(done, pad, token.astype(jnp.int32))
        return token, done | jnp.any(token[:, None] == eos[None, :], axis=-1)

    token, done = pick(logits, 0, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)

    def cond(state):
        step, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, done, out, cache = state
        logits, cache = llama.decode_step(model, token, cache, method=method, mesh=mesh)
        token, done = pick(logits, step, done)
        return step + 1, token, done, lax.dynamic_update_slice(out, token[:, None], (0, step)), cache

    steps, _, _, out, cache = lax.while_loop(cond, body, (jnp.int32(1), token, done, out, cache))
    return out, steps - 1, cache


@dataclasses.dataclass(frozen=True)
class GenerateStats:
    """What a generate / decode call did: wall times (compilation included on a first call; prefill_s
    is 0 for decode), the number of decode steps (every row runs each one), each row's prompt length,
    and transfer_ratio: the KV-cache elements the method read over the run as a fraction of what
    dense attention reads for the same steps (see transfer_ratio)."""

    prefill_s: float
    decode_s: float
    decode_steps: int
    prompt_lengths: np.ndarray
    transfer_ratio: float


class TransferMeter:
    """The KV-cache elements a method reads, and dense attention would read, summed over decode steps
    and rows: a run's measured transfer ratio. step(lengths) once per decode step, lengths [B] each
    row's cache length during it (its new token included; capped at a sliding window)."""

    def __init__(self, method, head_dim: int, window: Optional[int] = None):
        sq.check_method(method)
        self.method, self.head_dim, self.window = method, head_dim, window
        self.method_total = 0
        self.dense_total = 0

    def step(self, lengths) -> None:
        lengths = np.asarray(lengths).reshape(-1).tolist()
        if self.window is not None:
            lengths = [min(int(n), self.window) for n in lengths]
        method_total, dense_total = transfer_totals(self.method, lengths, self.head_dim)
        self.method_total += method_total
        self.dense_total += dense_total

    @property
    def ratio(self) -> float:
        """method's reads / dense's; nan before any step."""
        return self.method_total / self.dense_total if self.dense_total else float("nan")


def transfer_ratio(method, prompt_lengths, decode_steps: int, head_dim: int, window: Optional[int] = None) -> float:
    """Sum over the decode steps run and the rows of method.transfers(n, D) / Dense().transfers(n, D),
    n the row's cache length at that step (its prompt plus the tokens fed so far, capped at a sliding
    window). The ratio is the same in every layer and KV head, so those cancel. nan with no step."""
    meter = TransferMeter(method, head_dim, window)
    prompt_lengths = np.asarray(prompt_lengths).reshape(-1)
    for step in range(1, int(decode_steps) + 1):
        meter.step(prompt_lengths + step)
    return meter.ratio


# The model comes in as (graphdef, state) from nnx.split, graphdef static, and is merged at trace time.
def _logits(graphdef, state, input_ids, attention_mask, *, mesh):
    return llama.logits(nnx.merge(graphdef, state), input_ids, attention_mask, mesh=mesh)


def _prefill(graphdef, state, input_ids, attention_mask, *, max_len, transposed_keys, h2o, mesh):
    return llama.prefill(nnx.merge(graphdef, state), input_ids, attention_mask, max_len=max_len,
                         transposed_keys=transposed_keys, h2o=h2o, mesh=mesh)


def _decode_step(graphdef, state, tokens, cache, *, method, mesh):
    return llama.decode_step(nnx.merge(graphdef, state), tokens, cache, method=method, mesh=mesh)


def _prefill_chunk(graphdef, state, carry, input_ids, attention_mask, start, *, block):
    return llama.prefill_chunk(nnx.merge(graphdef, state), carry, input_ids, attention_mask, start, block=block)


def _prefill_carry(graphdef, state, *, batch, width, h2o):
    return llama.prefill_carry(nnx.merge(graphdef, state), batch, width, h2o=h2o)


def _prefill_finish(graphdef, state, carry, attention_mask, *, max_len, transposed_keys):
    return llama.prefill_finish(nnx.merge(graphdef, state), carry, attention_mask, max_len=max_len,
                                transposed_keys=transposed_keys)


_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnums=0, static_argnames=("block",), donate_argnames=("carry",))
_prefill_carry_jit = jax.jit(_prefill_carry, static_argnums=0, static_argnames=("batch", "width", "h2o"))
_prefill_finish_jit = jax.jit(_prefill_finish, static_argnums=0, static_argnames=("max_len", "transposed_keys"))
_logits_jit = jax.jit(_logits, static_argnums=0, static_argnames=("mesh",))
_prefill_jit = jax.jit(_prefill, static_argnums=0, static_argnames=("max_len", "transposed_keys", "h2o", "mesh"))
_decode_step_jit = jax.jit(_decode_step, static_argnums=0, static_argnames=("method", "mesh"),
                           donate_argnames=("cache",))
decode_loop_jit = jax.jit(_decode_loop, static_argnums=0,
                          static_argnames=("method", "max_new_tokens", "do_sample", "mesh"), donate_argnames=("cache",))


def _progress_reporter(progress, total: int):
    """lm.prefill's progress argument as report(done): done tokens so far, None once finished."""
    if progress is None or progress is False:
        return lambda done: None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, leave=False, file=sys.stderr)

        def report(done):
            if done is None:
                bar.close()
            else:
                bar.update(done - bar.n)
        return report
    if not callable(progress):
        raise ValueError(f"progress must be None, True or a callable (done, total), got {progress!r}")
    return lambda done: None if done is None else progress(done, total)


def prefill_options(methods) -> dict:
    """prefill's cache options that serve every method in `methods` (one prefill, several methods):
    {"transposed_keys": any reads K^T, "h2o": any is stateful}; lm.prefill(ids, **prefill_options(ms))."""
    methods = list(methods)
    for m in methods:
        sq.check_method(m)
    return {"transposed_keys": any(m.reads_transposed_keys for m in methods), "h2o": any(m.stateful for m in methods)}


class LanguageModel:
    """A loaded Llama / Mistral: model (the llama.Llama nnx.Module), its config, tokenizer (or None),
    the generation defaults (eos_token_id: a tuple, possibly empty; pad_token_id) and the device mesh
    (None: one device). params is the model's nnx.State (the same arrays, not a copy): a change to
    the model's params shows in every later call. With a mesh, the params are placed as
    llama.weight_specs (from_pretrained does it) and every batch is split over its "data" axis, so B
    must be a multiple of that size."""

    def __init__(self, model: llama.Llama, tokenizer=None, eos_token_id: Optional[Sequence[int]] = None,
                 pad_token_id: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None):
        self.model = model
        self.config: ModelConfig = model.config
        self._graphdef, self.params = nnx.split(model)
        self.mesh = mesh
        # id(state[0].lengths) -> the longest row, for the states this object made: decode_step's
        # "cache is full" check then needs no read from the device.
        self._longest: dict[int, int] = {}
        self.tokenizer = tokenizer
        self.eos_token_id = tuple(self.config.eos_token_id if eos_token_id is None else eos_token_id)
        self.pad_token_id = pad_token_id

    def __repr__(self):
        c = self.config
        return (f"LanguageModel({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}/{c.num_key_value_heads}, vocab={c.vocab_size})")

    # -----------------------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """fp32 logits [B, T, V]. input_ids, attention_mask [B, T] (left padding as transformers)."""
        ids, mask = self._batch(input_ids, attention_mask)
        return _logits_jit(self._graphdef, self.params, *self._place(ids, mask), mesh=self.mesh)

    def prefill(self, input_ids, attention_mask=None, max_len: Optional[int] = None, *,
                transposed_keys: bool = False, h2o: bool = False, progress=None):
        """Dense prefill of a prompt batch [B, T] -> (fp32 logits [B, V] of each row's last prompt
        token, state). state is a tuple of L per-layer sq.KVCaches ([B, Hkv, max_len, D]), each row
        left-aligned; max_len is its capacity (default T + 32). What the decoding methods need of the
        cache: transposed_keys=True keeps K^T too (SparQ reads it; the others ignore it), h2o=True seeds
        H2O's accumulated scores. prefill_options(methods) derives both from the methods that will decode.
        progress: None or False; True (a tqdm bar on stderr, in prompt tokens, with tokens/s); or a callable
        progress(done, total) called after each chunk (about llama.PREFILL_STEP tokens) with the prompt
        tokens (B x positions, padding included) prefilled so far and in all."""
        for name, flag in (("transposed_keys", transposed_keys), ("h2o", h2o)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        ids, mask = self._batch(input_ids, attention_mask)
        self._warn_beyond_positions(int(mask.sum(axis=1).max()), "the prompt")
        t = ids.shape[1]
        max_len = t + DEFAULT_NEW_TOKENS if max_len is None else max_len
        check_int(f"max_len (at least the prompt width {t})", max_len, t)
        logits, state = self._run_prefill(ids, mask, int(max_len), transposed_keys, h2o, progress)
        self._remember(state, int(mask.sum(axis=1).max()))
        return logits, state

    def _run_prefill(self, ids: np.ndarray, mask: np.ndarray, max_len: int, transposed_keys: bool, h2o: bool,
                     progress=None):
        """prefill's work on checked host arrays: chunk by chunk from Python (llama.prefill_chunk,
        about llama.PREFILL_STEP tokens each), reporting to progress after each, or one jitted call
        under a mesh or with dynamic RoPE (which reads the whole prompt's length)."""
        b, t = ids.shape
        report = _progress_reporter(progress, b * t)
        if self.mesh is not None or self.config.rope_parameters.rope_type == "dynamic":
            out = _prefill_jit(self._graphdef, self.params, *self._place(ids, mask), max_len=max_len,
                               transposed_keys=transposed_keys, h2o=h2o, mesh=self.mesh)
            if progress is not None:
                jax.block_until_ready(out[0])
                report(b * t)
            report(None)
            return out
        # 512-query blocks measured faster at B=1 (docs/performance.md), but at B=8 a 512-position call
        # is 4k tokens (~15 s between progress reports, and slower): blocks shrink to keep calls near
        # PREFILL_STEP tokens, down to 256 queries
        block = min(llama.PREFILL_CHUNK, t, max(256, llama.PREFILL_STEP // b))
        step = block * max(1, min(llama.PREFILL_STEP // b // block, -(-t // block)))
        width = -(-t // step) * step
        ids_w = np.pad(ids, ((0, 0), (0, width - t)))
        mask_w = np.pad(mask, ((0, 0), (0, width - t)))
        carry = _prefill_carry_jit(self._graphdef, self.params, batch=b, width=width, h2o=h2o)
        mask_d = jnp.asarray(mask_w)
        for start in range(0, width, step):
            carry = _prefill_chunk_jit(self._graphdef, self.params, carry, jnp.asarray(ids_w[:, start:start + step]),
                                       mask_d, jnp.int32(start), block=block)
            if progress is not None:
                jax.block_until_ready(carry[2])
                report(b * min(start + step, t))
        out = _prefill_finish_jit(self._graphdef, self.params, carry, jnp.asarray(mask), max_len=max_len,
                                  transposed_keys=transposed_keys)
        report(None)
        return out

    def _warn_beyond_positions(self, positions: int, what: str) -> None:
        """Warns once per model (as transformers does) when a call reaches past max_position_embeddings."""
        limit = self.config.max_position_embeddings
        if positions > limit and not getattr(self, "_warned_beyond_positions", False):
            self._warned_beyond_positions = True
            warnings.warn(f"{what} reaches {positions} positions, past the model's max_position_embeddings={limit}: "
                          f"the model was not trained on positions that far, its outputs may degrade", stacklevel=3)

    def _remember(self, state: tuple, longest: int) -> None:
        lengths = state[0].lengths
        self._longest[id(lengths)] = longest
        weakref.finalize(lengths, self._longest.pop, id(lengths), None)

    def decode_step(self, tokens, state: tuple, method=sq.Dense()):
        """tokens [B] (each row's next token) -> (fp32 logits [B, V], state). The state passed in is
        donated (its buffers are reused): keep only the returned one."""
        _check_method(method)
        self._check_state(state)
        first = state[0]
        tokens = np.asarray(tokens)
        if tokens.shape != (first.batch,) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers of shape ({first.batch},), got {tokens.dtype} {tokens.shape}")
        self._check_ids(tokens, "tokens")
        longest = self._longest.get(id(first.lengths))
        if longest is None:                      # a state made elsewhere: read its lengths
            longest = int(jnp.max(first.lengths))
        if longest >= first.max_len:
            raise ValueError(f"the cache is full ({longest} of max_len={first.max_len} positions); "
                             f"prefill with a larger max_len")
        if method.stateful and first.h2o_scores is None:
            raise ValueError(f"{method!r} keeps state in the cache: prefill with h2o=True")
        logits, state = _decode_step_jit(self._graphdef, self.params, self._place(tokens.astype(np.int32))[0],
                                         state, method=method, mesh=self.mesh)
        self._remember(state, longest + 1)
        return logits, state

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, method=sq.Dense(),
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id=None, pad_token_id: Optional[int] = None, return_stats: bool = False):
        """Greedy or sampled continuation: int32 [B, T + max_new_tokens], input_ids then new tokens.

        eos_token_id (an id or a list) and pad_token_id default to the model's generation config;
        pad falls back to the first eos, then 0. A row that emitted eos continues with pad.
        return_stats: also return a GenerateStats (prefill and decode times, decode steps, the
        measured transfer ratio).
        """
        _check_method(method)
        ids, mask = self._batch(input_ids, attention_mask)
        max_new_tokens = _check_new_tokens(max_new_tokens)
        eos, pad_token_id = self._sampling(do_sample, temperature, top_p, seed, eos_token_id, pad_token_id)
        self._warn_beyond_positions(int(mask.sum(axis=1).max()) + max_new_tokens, "prompt + max_new_tokens")
        t = ids.shape[1]
        width = bucket_length(t)
        ids_p = np.pad(ids, ((0, 0), (width - t, 0)), constant_values=pad_token_id)
        mask_p = np.pad(mask, ((0, 0), (width - t, 0)))
        start = time.perf_counter()
        logits, cache = self._run_prefill(ids_p, mask_p, width + max_new_tokens, method.reads_transposed_keys,
                                          method.stateful)
        if return_stats:
            jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - start
        new, stats = self._decode(logits, cache, max_new_tokens, method, do_sample, temperature, top_p, seed,
                                  eos, pad_token_id, mask.sum(axis=1), return_stats)
        out = np.concatenate([ids, new], axis=1).astype(np.int32)
        if not return_stats:
            return out
        return out, dataclasses.replace(stats, prefill_s=prefill_s)

    def decode(self, logits, state: tuple, max_new_tokens: int = 32, method=sq.Dense(),
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               eos_token_id=None, pad_token_id: Optional[int] = None, return_stats: bool = False):
        """generate's decode loop from a prefill's (logits, state): int32 [B, max_new_tokens], the new
        tokens only (pad after a row's eos). The state is not consumed, so one prefill serves several
        methods: prefill with max_len >= the longest prompt + max_new_tokens - 1, transposed_keys=True
        for SparQ and h2o=True for H2O (the others ignore both) to serve all:

            logits, state = lm.prefill(ids, mask, max_len=ids.shape[1] + 64, transposed_keys=True, h2o=True)
            dense = lm.decode(logits, state, 64)
            sparq = lm.decode(logits, state, 64, method=sq.SparQ(16, 256))

        Arguments as generate's; return_stats: also a GenerateStats (prefill_s 0).
        """
        _check_method(method)
        max_new_tokens = _check_new_tokens(max_new_tokens)
        self._check_state(state)
        first = state[0]
        logits = jnp.asarray(logits)
        if logits.shape != (first.batch, self.config.vocab_size):
            raise ValueError(f"logits must be [B={first.batch}, vocab_size={self.config.vocab_size}] as prefill "
                             f"returns them, got {logits.shape}")
        lengths = np.asarray(first.lengths)
        if int(lengths.max()) + max_new_tokens - 1 > first.max_len:
            raise ValueError(f"the state holds max_len={first.max_len} positions, too few for "
                             f"max_new_tokens={max_new_tokens} after a prompt of {int(lengths.max())} tokens "
                             f"(needs {int(lengths.max()) + max_new_tokens - 1}); prefill with a larger max_len")
        if method.reads_transposed_keys and first.kt is None:
            raise ValueError(f"{method!r} reads the transposed keys: prefill with transposed_keys=True")
        if method.stateful and first.h2o_scores is None:
            raise ValueError(f"{method!r} keeps state in the cache: prefill with h2o=True")
        eos, pad_token_id = self._sampling(do_sample, temperature, top_p, seed, eos_token_id, pad_token_id)
        cache = jax.tree.map(jnp.copy, state)    # the loop donates its cache; the caller keeps theirs
        new, stats = self._decode(logits.astype(jnp.float32), cache, max_new_tokens, method, do_sample,
                                  temperature, top_p, seed, eos, pad_token_id, lengths, return_stats)
        return (new, stats) if return_stats else new

    def _decode(self, logits, cache, max_new_tokens, method, do_sample, temperature, top_p, seed, eos,
                pad_token_id, prompt_lengths, return_stats):
        start = time.perf_counter()
        new, steps, _ = decode_loop_jit(self._graphdef, self.params, logits, cache, jax.random.key(int(seed)),
                                        jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(eos, jnp.int32),
                                        jnp.int32(pad_token_id), method=method,
                                        max_new_tokens=max_new_tokens, do_sample=do_sample, mesh=self.mesh)
        new = self._on_host(new)
        if not return_stats:
            return new, None
        decode_s = time.perf_counter() - start
        steps = int(steps)
        return new, GenerateStats(
            prefill_s=0.0, decode_s=decode_s, decode_steps=steps, prompt_lengths=np.asarray(prompt_lengths),
            transfer_ratio=transfer_ratio(method, prompt_lengths, steps, self.config.head_dim,
                                          self.config.sliding_window))

    def _sampling(self, do_sample, temperature, top_p, seed, eos_token_id, pad_token_id):
        """Check generate's sampling arguments -> (eos ids int64 [E], pad id)."""
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
        if do_sample:
            check_number("temperature", temperature, 0.0)
            check_number("top_p", top_p, 0.0, 1.0)
        check_int("seed", seed, None)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        eos = np.atleast_1d(np.asarray(eos, dtype=np.int64)).reshape(-1)
        self._check_ids(eos, "eos_token_id")
        if pad_token_id is None:
            pad_token_id = self.pad_token_id if self.pad_token_id is not None else (int(eos[0]) if eos.size else 0)
        self._check_ids(np.asarray([pad_token_id]), "pad_token_id")
        return eos, int(pad_token_id)

    def _check_state(self, state) -> None:
        if (not isinstance(state, tuple) or len(state) != self.config.num_hidden_layers
                or not all(isinstance(c, sq.KVCache) for c in state)):
            raise ValueError("state must be the tuple of per-layer KVCaches that prefill returns")

    # -----------------------------------------------------------------------------------------
    def _batch(self, input_ids, attention_mask):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer array [B, T] with T >= 1, got {ids.dtype} {ids.shape}")
        self._check_ids(ids, "input_ids")
        if attention_mask is None:
            mask = np.ones_like(ids, dtype=np.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {ids.shape}, got {mask.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
            if not mask.any(axis=1).all():
                raise ValueError(f"every row needs at least one token with attention_mask 1; rows "
                                 f"{np.flatnonzero(~mask.any(axis=1)).tolist()} have none")
        if self.mesh is not None and ids.shape[0] % self.mesh.shape[DATA]:
            raise ValueError(f"the batch ({ids.shape[0]} rows) must be a multiple of the mesh's 'data' axis "
                             f"size ({self.mesh.shape[DATA]})")
        return ids.astype(np.int32), mask.astype(np.int32)

    def _place(self, *arrays: np.ndarray) -> tuple:
        """Host arrays [B, ...] (the same on every host) onto the devices, rows split over the mesh's
        "data" axis; each host sends only the rows its own devices hold."""
        if self.mesh is None:
            return arrays
        rows = [NamedSharding(self.mesh, P(DATA, *(None,) * (a.ndim - 1))) for a in arrays]
        return tuple(jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                     for a, sharding in zip(arrays, rows))

    def _on_host(self, x: jax.Array) -> np.ndarray:
        """x as numpy on every host: with a mesh its rows may lie on several hosts' devices."""
        if self.mesh is not None:
            x = jax.jit(lambda a: a, out_shardings=NamedSharding(self.mesh, P()))(x)
        return np.asarray(x)

    def _check_ids(self, ids: np.ndarray, name: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"{name} must lie in [0, vocab_size={self.config.vocab_size}), got values "
                             f"from {ids.min()} to {ids.max()}")


def _check_new_tokens(max_new_tokens) -> int:
    return check_int("max_new_tokens", max_new_tokens)


def _check_method(method) -> None:
    sq.check_method(method)
