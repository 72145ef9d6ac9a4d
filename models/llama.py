"""Llama and Mistral (= Llama + sliding window) as Flax NNX modules: one forward, weights once.

Llama holds the embedding, an nnx.List of DecoderLayers (input norm, Attention, post-attention norm,
MLP) and the final norm; each weight is an nnx.Param of its own layer, the only copy. Llama.__call__
is the one forward pass. Prefill, logits, decode and training all run it and differ only in the
attention they hand it, a function (layer index, q, k, v) -> (output, what the caller keeps):
  - prompt_attention: dense causal attention over a padded prompt, in blocks (prefill, logits) or
    as one differentiable [T, T] block (chunk=None: training);
  - decode_step: append the token's k, v to that layer's sq.KVCache and sq.attend with a method.
The KV cache is not model state: it is an explicit tuple of per-layer sq.KVCaches that jitted loops
carry and donate. Jitted callers pass (graphdef, state) from nnx.split and merge at trace time.

Shapes: B batch, T tokens, H hidden, Hq / Hkv query / KV heads, D head dim, I MLP width, V vocab,
L layers, S cache positions. Softmax, RMSNorm and RoPE run in fp32 whatever the weights' dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import sparq_jax as sq
from sparq_jax import cache as sq_cache, sharding
from sparq_jax.sharding import DATA, MODEL

from .config import ModelConfig, RopeParameters

_F32 = jnp.float32
# Queries per block of the chunked prefill: scores are [B, Hq, chunk, T], never [B, Hq, T, T].
PREFILL_CHUNK = 512

# Where each per-layer weight lives in a DecoderLayer (keys of weight_shapes without "layers.").
_LAYER_PARAMS = {
    "input_norm": ("input_norm",), "post_norm": ("post_norm",),
    **{f: ("attn", f) for f in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")},
    **{f: ("mlp", f) for f in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")},
}


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight, as the config implies: keys "embed", "norm", "lm_head" and
    "layers.<field>" (one layer's; param_path says where each lives); absent biases / a tied head
    are left out.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {
        "embed": (v, h), "norm": (h,),
        "layers.input_norm": (h,), "layers.q": (h, hq, d), "layers.k": (h, hkv, d),
        "layers.v": (h, hkv, d), "layers.o": (hq, d, h), "layers.post_norm": (h,),
        "layers.gate": (h, i), "layers.up": (h, i), "layers.down": (i, h),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (h, v)
    if config.attention_bias:
        shapes.update({"layers.q_bias": (hq, d), "layers.k_bias": (hkv, d), "layers.v_bias": (hkv, d),
                       "layers.o_bias": (h,)})
    if config.mlp_bias:
        shapes.update({"layers.gate_bias": (i,), "layers.up_bias": (i,), "layers.down_bias": (h,)})
    return shapes


def weight_specs(config: ModelConfig, model: int) -> dict[str, P]:
    """PartitionSpecs (Megatron-style tensor parallelism over a "model" axis of this size) for each
    key of weight_shapes.

    q, k, v, gate and up are split by output (heads, MLP width) and o, down by input, so each layer
    needs one all-reduce after attention and one after the MLP. The embedding and the lm head are
    split over the vocabulary (else the hidden size, else kept whole); norms and the biases added
    after an all-reduce are replicated. Every device of the "data" axis holds the same weights.
    Raises ValueError when the query heads or the MLP width do not split evenly, or when the KV
    heads are neither a multiple nor a divisor of model (kv_replicas: pass the replicated config).
    """
    h, v = config.hidden_size, config.vocab_size
    for name in ("num_attention_heads", "intermediate_size"):
        if getattr(config, name) % model:
            raise ValueError(f"{name}={getattr(config, name)} must be a multiple of the mesh's 'model' "
                             f"axis size ({model})")
    if sharding.kv_replicas(config.num_key_value_heads, model) != 1:
        raise ValueError(f"num_key_value_heads={config.num_key_value_heads} must be a multiple of the mesh's "
                         f"'model' axis size ({model}): replicate the KV heads first")
    heads_in = P(None, MODEL, None)                     # [H, heads, D]
    if v % model == 0:
        embed, head = P(MODEL, None), P(None, MODEL)
    elif h % model == 0:
        embed, head = P(None, MODEL), P(MODEL, None)
    else:
        embed, head = P(), P()
    specs = {
        "embed": embed, "norm": P(), "lm_head": head,
        "layers.input_norm": P(), "layers.q": heads_in, "layers.k": heads_in, "layers.v": heads_in,
        "layers.o": P(MODEL, None, None), "layers.post_norm": P(),
        "layers.gate": P(None, MODEL), "layers.up": P(None, MODEL), "layers.down": P(MODEL, None),
        "layers.q_bias": P(MODEL, None), "layers.k_bias": P(MODEL, None), "layers.v_bias": P(MODEL, None),
        "layers.o_bias": P(), "layers.gate_bias": P(MODEL), "layers.up_bias": P(MODEL), "layers.down_bias": P(),
    }
    return {name: specs[name] for name in weight_shapes(config)}


def param_path(field: str, layer: Optional[int] = None) -> tuple:
    """The nnx state path of a weight_shapes key: ("embed",), or for "layers.q" in layer 3
    ("layers", 3, "attn", "q")."""
    if not field.startswith("layers."):
        return (field,)
    return ("layers", layer, *_LAYER_PARAMS[field.split(".", 1)[1]])


def _normal(rngs: nnx.Rngs, shape, dtype, std: float) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, _F32)).astype(dtype))


def _bias(x: jax.Array, b: Optional[nnx.Param]) -> jax.Array:
    return x if b is None else x + b[...]


# Up to this many rows (tokens) a bfloat16 product on CPU runs as sparq_jax.native's kernel, which
# reads the weights once at memory speed (decode); XLA:CPU's bfloat16 dot is ~6x slower there.
_NATIVE_ROWS = 64


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    """Whether this CPU has AVX512-BF16 (vdpbf16ps), which sparq_jax.native's bfloat16 GEMM needs
    (read from /proc/cpuinfo; False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512_bf16", "avx512bw", "avx512vl"))


def _gemm_applies(w: jax.Array) -> bool:
    """Whether a product of many rows with bfloat16 w runs as sparq_jax.native's GEMM."""
    return sq.native.bf16_matmul_applies(w) and _cpu_has_bf16_dot()


def _gemm_bf16(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
    """fp32 x [T, M, K] times bfloat16 w [T or 1, K, N] (transpose_w: [T or 1, N, K]) -> fp32
    [T, M, N]: sparq_jax.native's AVX512-BF16 GEMM (x rounded to bfloat16, as a bfloat16 model's
    activations are in transformers; products summed in fp32)."""
    n = w.shape[1] if transpose_w else w.shape[2]
    call = jax.ffi.ffi_call("sparq_jax_gemm_bf16", jax.ShapeDtypeStruct(x.shape[:2] + (n,), _F32))
    return call(x, w, threads=np.int64(sq.native._threads()), transposed=np.int64(transpose_w))


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, out_dtype=None,
           native: bool = True) -> jax.Array:
    """x [..., K] @ w [K, N] (transpose_w: w [N, K], used as w^T) -> [..., N] in out_dtype (default
    x's dtype), accumulated in fp32.

    bfloat16 weights on CPU do not go through XLA's bfloat16 dot (~6x slower than fp32 per weight):
    few rows (decode) run sparq_jax.native's kernel; many rows (prefill) its AVX512-BF16 GEMM where
    the CPU has one (x rounded to bfloat16, as transformers' bfloat16 model rounds its activations),
    else widen the weights to fp32 first, a cost small beside the product. native=False (a device mesh: the
    partitioner cannot split a custom call) keeps XLA's dot.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0] if transpose_w else w.shape[1]
    if native and sq.native.bf16_matmul_applies(w):
        rows = math.prod(lead)
        if rows <= _NATIVE_ROWS or _gemm_applies(w):
            x3 = x.reshape(1, rows, k).astype(_F32)
            y = (sq.native.matmul_bf16(x3, w[None], transpose_w=transpose_w) if rows <= _NATIVE_ROWS
                 else _gemm_bf16(x3, w[None], transpose_w))
            return y.reshape(*lead, n).astype(out_dtype)
        x, w = x.astype(_F32), w.astype(_F32)
    spec = "...k,nk->...n" if transpose_w else "...k,kn->...n"
    return jnp.einsum(spec, x, w, preferred_element_type=_F32).astype(out_dtype)


class Attention(nnx.Module):
    """Projections input-major (x @ W), split per head: q [H, Hq, D], k, v [H, Hkv, D], o [Hq, D, H];
    biases (None unless config.attention_bias) q [Hq, D], k, v [Hkv, D], o [H]."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        h, hq, hkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q = _normal(rngs, (h, hq, d), dtype, std)
        self.k = _normal(rngs, (h, hkv, d), dtype, std)
        self.v = _normal(rngs, (h, hkv, d), dtype, std)
        self.o = _normal(rngs, (hq, d, h), dtype, std)
        bias = config.attention_bias
        self.q_bias = nnx.Param(jnp.zeros((hq, d), dtype)) if bias else None
        self.k_bias = nnx.Param(jnp.zeros((hkv, d), dtype)) if bias else None
        self.v_bias = nnx.Param(jnp.zeros((hkv, d), dtype)) if bias else None
        self.o_bias = nnx.Param(jnp.zeros((h,), dtype)) if bias else None

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, attention: Callable, native: bool = True):
        """h [B, T, H] (normed) -> ([B, T, H], what attention returned beside its output).
        attention(q [B, T, Hq, D], k, v [B, T, Hkv, D]) -> (out [B, T, Hq, D], kept); q, k after RoPE.
        native: see matmul."""
        def project(w, b):                                  # [H, heads, D] as one [H, heads*D] product
            w = w[...]
            return _bias(matmul(h, w.reshape(w.shape[0], -1), native=native).reshape(*h.shape[:-1], *w.shape[1:]), b)

        q, k, v = project(self.q, self.q_bias), project(self.k, self.k_bias), project(self.v, self.v_bias)
        out, kept = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        # One [Hq*D, H] matrix product: with the heads contracted as two axes, XLA:CPU transposed the
        # whole o weight every decode step rather than the small activation.
        o = self.o[...]
        o = o.reshape(-1, o.shape[-1])
        return _bias(matmul(out.reshape(*out.shape[:-2], o.shape[0]), o, native=native), self.o_bias), kept


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(h)) * up(h)); gate, up [H, I], down [I, H], biases if config.mlp_bias."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        h, i = config.hidden_size, config.intermediate_size
        self.gate = _normal(rngs, (h, i), dtype, std)
        self.up = _normal(rngs, (h, i), dtype, std)
        self.down = _normal(rngs, (i, h), dtype, std)
        bias = config.mlp_bias
        self.gate_bias = nnx.Param(jnp.zeros((i,), dtype)) if bias else None
        self.up_bias = nnx.Param(jnp.zeros((i,), dtype)) if bias else None
        self.down_bias = nnx.Param(jnp.zeros((h,), dtype)) if bias else None

    def __call__(self, h: jax.Array, native: bool = True) -> jax.Array:
        gate = _bias(matmul(h, self.gate[...], native=native), self.gate_bias)
        up = _bias(matmul(h, self.up[...], native=native), self.up_bias)
        return _bias(matmul(jax.nn.silu(gate) * up, self.down[...], native=native), self.down_bias)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.eps = config.rms_norm_eps
        self.input_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.attn = Attention(config, dtype=dtype, rngs=rngs, std=std)
        self.post_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.mlp = MLP(config, dtype=dtype, rngs=rngs, std=std)

    def __call__(self, x, cos, sin, attention: Callable, native: bool = True):
        out, kept = self.attn(rms_norm(x, self.input_norm[...], self.eps), cos, sin, attention, native)
        x = x + out
        return x + self.mlp(rms_norm(x, self.post_norm[...], self.eps), native), kept


class Llama(nnx.Module):
    """A Llama / Mistral decoder: embed [V, H], layers, norm [H], lm_head [H, V] (None when tied to
    embed). Random weights as transformers initialises them: N(0, std) matrices, unit norms, zero
    biases; from_pretrained builds it abstractly (nnx.eval_shape) and fills in a checkpoint's."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, std: float = 0.02):
        self.config = config
        self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dtype, std)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs, std=std)
                                for _ in range(config.num_hidden_layers)])
        self.norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.lm_head = (None if config.tie_word_embeddings
                        else _normal(rngs, (config.hidden_size, config.vocab_size), dtype, std))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, attention: Callable, mesh=None):
        """The forward pass: input_ids, positions [B, T] -> (hidden states [B, T, H] after the final
        norm, a tuple with what attention(layer, q, k, v) kept in each layer).

        mesh: weights placed by weight_specs; activations are pinned to rows over "data" and the
        partitioner splits the rest from the weights.
        """
        cos, sin = rope_tables(self.config, positions)                          # [B, T, D/2]
        x = _rows(self.embed[...][input_ids], mesh)
        kept = []
        for i, layer in enumerate(self.layers):
            x, k = layer(x, cos, sin, functools.partial(attention, i), native=mesh is None)
            kept.append(k)
        return rms_norm(x, self.norm[...], self.config.rms_norm_eps), tuple(kept)

    def head(self, x: jax.Array, native: bool = True) -> jax.Array:
        """x [..., H] -> fp32 logits [..., V]. native: see matmul (False under a device mesh)."""
        if self.lm_head is None:
            return matmul(x, self.embed[...], transpose_w=True, out_dtype=_F32, native=native)
        return matmul(x, self.lm_head[...], out_dtype=_F32, native=native)


def init_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> Llama:
    """A Llama of random weights (see Llama), seeded."""
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed), std=std)


# ---------------------------------------------------------------------------------------------
# Building blocks

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., H] normalised in fp32, returned in x's dtype."""
    x32 = x.astype(_F32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(_F32) * y).astype(x.dtype)


def rope_inv_freq(rope: RopeParameters, head_dim: int, max_position_embeddings: int,
                  seq_len: Optional[jax.Array] = None) -> tuple[jax.Array, float]:
    """(inverse frequencies fp32 [D/2], attention scaling) for a RoPE variant, as transformers
    computes them (modeling_rope_utils). seq_len (traced scalar) is only read by "dynamic": the NTK
    base grows once the sequence outgrows max_position_embeddings."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    base = rope.rope_theta
    if rope.rope_type == "dynamic":
        if seq_len is None:
            raise ValueError("dynamic RoPE needs seq_len")
        seq = jnp.maximum(seq_len, max_position_embeddings).astype(_F32)
        grown = base * ((rope.factor * seq / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (grown ** jnp.asarray(exponents)), 1.0
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope)
    elif rope.rope_type == "yarn":
        inv_freq, scaling = _yarn_inv_freq(rope, dim, max_position_embeddings)
    return jnp.asarray(inv_freq, _F32), scaling


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeParameters) -> np.ndarray:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(rope: RopeParameters, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, scale attention."""
    base, factor = rope.rope_theta, rope.factor
    original = rope.original_max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    scaling = rope.attention_factor
    if scaling is None:
        if rope.mscale and rope.mscale_all_dim:
            scaling = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            scaling = get_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(scaling)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin fp32 [..., D/2] at integer positions [...]. Dynamic RoPE reads the longest sequence
    in the call (transformers: max(position_ids) + 1)."""
    seq_len = jnp.max(positions) + 1 if config.rope_parameters.rope_type == "dynamic" else None
    inv_freq, scaling = rope_inv_freq(config.rope_parameters, config.head_dim,
                                      config.max_position_embeddings, seq_len)
    angles = positions.astype(_F32)[..., None] * inv_freq
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, D] rotated (half-split layout, as transformers) by cos, sin [..., D/2]."""
    x32 = x.astype(_F32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The forward pass's attentions

def causal_attention(q, k, v, valid, positions, window: Optional[int], chunk: int = PREFILL_CHUNK,
                     column_sums: bool = False, native: bool = True):
    """Dense causal attention over a padded prompt, in [chunk x chunk] blocks with an online softmax.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; valid [B, T] bool (the attention mask); positions [B, T]
    int32 (each token's position among its row's valid tokens). Query t sees key s when s is valid,
    s <= t and, with a sliding window, positions[t] - positions[s] < window. Query block i visits key
    blocks 0..i only, so memory is O(B Hq chunk^2) and the upper triangle is never computed.
    Returns out [B, T, Hq, D] in q's dtype (zero for a query that sees no key: padding) and, if
    column_sums, fp32 [B, Hkv, T]: the attention probabilities each key receives, summed over the
    valid queries and each KV group's query heads (H2O's prefill state; a second pass over the
    blocks, once the softmax normalisers are known). native: see attend_blocks.
    """
    b, t, hq, d = q.shape
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t

    def padded(x, fill=0):
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)

    valid, positions = padded(valid, False), padded(positions)
    kb, vb = (padded(x).swapaxes(1, 2) for x in (k, v))                       # [B, Hkv, n*c, D]
    sums = jnp.zeros((b, k.shape[2], n * c), _F32) if column_sums else None
    out, sums = attend_blocks(padded(q), kb, vb, valid, positions, positions, valid, window, 0, c, sums,
                              native=native)
    return out[:, :t], (sums[:, :, :t] if column_sums else None)


def attend_blocks(q, kb, vb, key_valid, key_positions, query_positions, query_valid, window: Optional[int],
                  first, c: int, sums=None, native: bool = True):
    """causal_attention's blocks for the queries q [B, nq*c, Hq, D] that sit at key blocks
    first..first+nq-1 (first: a traced int allowed) of the keys kb, vb [B, Hkv, nk*c, D] (entries past
    the queries' own block are never read). key_valid, key_positions [B, nk*c]; query_positions,
    query_valid [B, nq*c] (positions: the sliding window; query_valid: the column sums).

    Layout for XLA:CPU: each KV head's G query heads and c queries form one [G*c, D] operand, so a
    block is two plain batched matrix products ([G*c, D] x [D, c] and [G*c, c] x [c, D]) with no
    transposes; a key's padding is one added 0 / -inf bias, and the causal mask is added on the
    diagonal block only (the blocks left of it are wholly visible). Measured on SmolLM2's shapes at
    4k: 1.75x the speed of the former [B, c, Hkv, G, D] blocks (docs/performance.md).
    Returns (out [B, nq*c, Hq, D] in q's dtype, sums [B, Hkv, nk*c] fp32 or None): sums, if given,
    gets each key's attention probabilities added, summed over the valid queries and each group.
    bfloat16 keys and values on a CPU with AVX512-BF16 (native, no device mesh): both products run as
    sparq_jax.native's GEMM (the queries are bfloat16 values already, so the logits are exact sums of
    exact products; the probabilities are rounded to bfloat16 for the second product, as in
    transformers' bfloat16 attention); XLA:CPU's bfloat16 dot is ~10x slower than its fp32 one.
    """
    out_dtype = q.dtype
    if native and sums is None and sq.native.flash_applies(q, kb):
        # The same attention in one native call (sparq_jax/native/flash_cpu.cc): each key block's
        # logits stay in cache instead of XLA's separate passes over them (docs/performance.md).
        out = sq.native.flash_attention(q, kb, vb, key_valid, key_positions, query_positions, first * c, window)
        return out.astype(out_dtype), None
    b, tq, hq, d = q.shape
    hkv = kb.shape[1]
    g, nq, nk = hq // hkv, tq // c, kb.shape[2] // c
    scale = 1.0 / math.sqrt(d)
    # [B, Hkv, nq, G*c, D], rows (g, query); fp32 whatever the weights (XLA:CPU's bf16 dots are slow)
    qb = q.astype(_F32).reshape(b, nq, c, hkv, g, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, hkv, nq, g * c, d)
    kb, vb = kb.reshape(b, hkv, nk, c, d), vb.reshape(b, hkv, nk, c, d)
    bias = jnp.where(key_valid, 0.0, -jnp.inf).astype(_F32).reshape(b, 1, nk, 1, c)
    causal = jnp.tile(jnp.where(jnp.arange(c)[None, :] <= jnp.arange(c)[:, None], 0.0, -jnp.inf), (g, 1))
    kpos = key_positions.reshape(b, nk, c)
    qpos = jnp.tile(query_positions.reshape(b, nq, 1, c), (1, 1, g, 1)).reshape(b, nq, g * c)
    gemm = native and kb.dtype == jnp.bfloat16 and vb.dtype == jnp.bfloat16 and _gemm_applies(kb)

    def product(x, w, transpose_w):
        """x [B, Hkv, M, K] fp32 times the block w [B, Hkv, c, D] (transpose_w: w^T) -> fp32."""
        if gemm:
            y = _gemm_bf16(x.reshape(b * hkv, *x.shape[2:]), w.reshape(b * hkv, c, d), transpose_w)
            return y.reshape(b, hkv, *y.shape[1:])
        spec = "bhqd,bhkd->bhqk" if transpose_w else "bhqk,bhkd->bhqd"
        return jnp.einsum(spec, x, w.astype(_F32), preferred_element_type=_F32)

    def logits(qi, s, j, diag):
        """[B, Hkv, G*c, c] fp32 logits of query block s (qi) against key block j, -inf where masked."""
        x = product(qi, lax.dynamic_index_in_dim(kb, j, 2, keepdims=False), True) * scale
        x = x + lax.dynamic_index_in_dim(bias, j, 2, keepdims=False)
        if diag:
            x = x + causal
        if window is not None:
            near = (lax.dynamic_index_in_dim(qpos, s, 1, keepdims=False)[:, :, None]
                    - lax.dynamic_index_in_dim(kpos, j, 1, keepdims=False)[:, None, :]) < window
            x = jnp.where(near[:, None], x, -jnp.inf)
        return x

    def query_block(sums, s):
        i = first + s                                   # the query block's own key block
        qi = lax.dynamic_index_in_dim(qb, s, 2, keepdims=False)

        def accumulate(j, carry, diag=False):
            m, l, acc = carry
            x = logits(qi, s, j, diag)
            m_new = jnp.maximum(m, jnp.max(x, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # no key seen yet: avoid inf - inf
            p = jnp.exp(x - m_safe[..., None])
            rescale = jnp.exp(m - m_safe)
            pv = product(p, lax.dynamic_index_in_dim(vb, j, 2, keepdims=False), False)
            return m_new, l * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

        init = (jnp.full((b, hkv, g * c), -jnp.inf, _F32), jnp.zeros((b, hkv, g * c), _F32),
                jnp.zeros((b, hkv, g * c, d), _F32))
        m, l, acc = accumulate(i, lax.fori_loop(0, i, accumulate, init), diag=True)
        norm = jnp.where(l > 0, l, 1.0)
        out = acc / norm[..., None]
        if sums is not None:
            m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
            qv = jnp.tile(lax.dynamic_index_in_dim(query_valid.reshape(b, nq, c), s, 1, keepdims=False), (1, g))
            weight = qv.astype(_F32)[:, None, :] / norm                               # [B, Hkv, G*c]

            def add_columns(j, sums, diag=False):
                cols = jnp.einsum("bhqk,bhq->bhk", jnp.exp(logits(qi, s, j, diag) - m_safe[..., None]), weight)
                return lax.dynamic_update_slice_in_dim(
                    sums, lax.dynamic_slice_in_dim(sums, j * c, c, axis=2) + cols, j * c, axis=2)

            sums = add_columns(i, lax.fori_loop(0, i, add_columns, sums), diag=True)
        return sums, out.astype(out_dtype)

    sums, out = lax.scan(query_block, sums, jnp.arange(nq))                 # out [nq, B, Hkv, G*c, D]
    out = out.reshape(nq, b, hkv, g, c, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, tq, hq, d)
    return out, sums


def _rows(x: jax.Array, mesh) -> jax.Array:
    """x [B, ...] pinned to batch-over-"data" (the embedding lookup from a vocabulary-split table
    would otherwise leave the partitioner to guess)."""
    if mesh is None:
        return x
    return lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA, *(None,) * (x.ndim - 1))))


def dense_causal_attention(q, k, v, valid, positions, window: Optional[int]):
    """causal_attention's result from one [T, T] block of scores: O(B Hq T^2) memory, but
    differentiable in reverse mode (causal_attention's block loops have data-dependent bounds).
    Arguments and output as causal_attention's (out only)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(b, t, hkv, hq // hkv, d), k,
                        preferred_element_type=_F32) / math.sqrt(d)
    index = jnp.arange(t)
    mask = valid[:, None, :] & (index[None, None, :] <= index[None, :, None])        # [B, Tq, Tk]
    if window is not None:
        mask &= (positions[:, :, None] - positions[:, None, :]) < window
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0)))
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=_F32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def prompt_positions(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(valid bool [B, T], position ids int32 [B, T]): cumsum(mask) - 1, as transformers' generate."""
    valid = attention_mask.astype(bool)
    return valid, jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


def forward_prompt(model: Llama, input_ids, attention_mask, *, keep_kv: bool = False, column_sums: bool = False,
                   chunk: Optional[int] = PREFILL_CHUNK, mesh=None):
    """The forward pass over a padded prompt with dense causal attention.

    input_ids, attention_mask [B, T] (any padding). Returns hidden states [B, T, H] after the final
    norm and, per layer (tuples of L), if keep_kv: (k, v) [B, T, Hkv, D] after RoPE; if column_sums:
    H2O's prefill scores [B, Hkv, T]. chunk: queries per block of causal_attention, or None for
    dense_causal_attention (differentiable; no column_sums).
    """
    if chunk is None and column_sums:
        raise ValueError("column_sums needs the blockwise attention (chunk=None computes none)")
    valid, positions = prompt_positions(attention_mask)
    window = model.config.sliding_window

    def attention(layer, q, k, v):
        if chunk is None:
            out, sums = dense_causal_attention(q, k, v, valid, positions, window), None
        else:
            out, sums = causal_attention(q, k, v, valid, positions, window, chunk, column_sums, native=mesh is None)
        return out, ((k, v) if keep_kv else None, sums)

    x, kept = model(input_ids, positions, attention, mesh=mesh)
    kv = tuple(kv for kv, _ in kept) if keep_kv else None
    return x, kv, (tuple(sums for _, sums in kept) if column_sums else None)


def logits(model: Llama, input_ids, attention_mask, *, chunk: Optional[int] = PREFILL_CHUNK, mesh=None) -> jax.Array:
    """fp32 logits [B, T, V] of every position (chunk=None: differentiable, see forward_prompt)."""
    x, _, _ = forward_prompt(model, input_ids, attention_mask, chunk=chunk, mesh=mesh)
    return model.head(x, native=mesh is None)


def prefill(model: Llama, input_ids, attention_mask, *, max_len: int, transposed_keys: bool, h2o: bool,
            chunk: int = PREFILL_CHUNK, mesh=None):
    """Dense prefill that fills one KVCache per layer, each row left-aligned.

    Returns fp32 logits [B, V] of each row's last valid token and the caches: a tuple of L KVCaches
    ([B, Hkv, max_len, D] fields, lengths [B] = each row's number of valid tokens). h2o: seed H2O's
    scores. mesh: the caches come out split as sharding.cache_specs.
    """
    valid = attention_mask.astype(bool)
    x, kv, sums = forward_prompt(model, input_ids, attention_mask, keep_kv=True, column_sums=h2o, chunk=chunk,
                                 mesh=mesh)
    t = input_ids.shape[1]
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    last = jnp.max(jnp.where(valid, jnp.arange(t)[None, :], 0), axis=1)
    out = model.head(x[jnp.arange(x.shape[0]), last], native=mesh is None)
    # Valid tokens first, in order: row b's prompt lands at cache positions [0, lengths[b]).
    order = jnp.argsort(~valid, axis=1, stable=True)                            # [B, T]

    def left_aligned(x):                                                         # [B, T, Hkv, D] -> [B, Hkv, T, D]
        return jnp.take_along_axis(x, order[:, :, None, None], axis=1).transpose(0, 2, 1, 3)

    caches = tuple(
        sq.KVCache.from_kv(left_aligned(k), left_aligned(v), lengths, max_len=max_len,
                           transposed_keys=transposed_keys,
                           h2o_scores=jnp.take_along_axis(sums[i], order[:, None, :], axis=2) if h2o else None)
        for i, (k, v) in enumerate(kv))
    if mesh is not None:
        caches = tuple(sharding.constrain_cache(c, mesh) for c in caches)
    return out, caches


# Prompt tokens (rows x positions) per prefill_chunk call, at least one block of positions: the
# prefill runs chunk by chunk from Python so that it can report progress (lm.prefill's progress),
# every few seconds on CPU. The cost against one jitted call over the whole prompt: docs/performance.md.
PREFILL_STEP = 2048


def prefill_carry(model: Llama, batch: int, width: int, *, h2o: bool):
    """prefill_chunk's carry before the first chunk, for a prompt padded to width positions: per
    layer zeroed (k, v) [B, Hkv, width, D] (RoPE'd keys, in the weights' dtype), H2O's column sums
    [B, Hkv, width] fp32 (None without h2o), and the last valid token's hidden state [B, H]."""
    c = model.config
    dtype = model.embed[...].dtype
    kv = tuple((jnp.zeros((batch, c.num_key_value_heads, width, c.head_dim), dtype),) * 2
               for _ in range(c.num_hidden_layers))
    sums = (tuple(jnp.zeros((batch, c.num_key_value_heads, width), _F32) for _ in range(c.num_hidden_layers))
            if h2o else None)
    return kv, sums, jnp.zeros((batch, c.hidden_size), dtype)


def prefill_chunk(model: Llama, carry, input_ids, attention_mask, start, *, block: int = PREFILL_CHUNK):
    """One chunk of a prefill run from Python: the queries at positions [start, start + C) of the
    prompt, input_ids [B, C], through every layer, their keys and values written into the carry.

    carry: prefill_carry's (kv, sums, last hidden state); attention_mask [B, width] is the whole
    (padded) prompt's; start (traced int32) a multiple of block, C too. Attention runs in blocks of
    block queries (attend_blocks); key blocks past the chunk are never read. Returns the new carry.
    """
    kv, sums, last_hidden = carry
    b, cn = input_ids.shape
    valid, positions = prompt_positions(attention_mask)
    window = model.config.sliding_window
    q_valid = lax.dynamic_slice_in_dim(valid, start, cn, axis=1)
    q_positions = lax.dynamic_slice_in_dim(positions, start, cn, axis=1)

    def write(buf, x):                                      # x [B, C, Hkv, D] at positions start..
        x = x.swapaxes(1, 2).astype(buf.dtype)
        if sq_cache.native_write_applies(buf):              # a 16-bit buffer that XLA:CPU would widen whole
            return sq_cache.write_rows(buf, jnp.full((b,), start, jnp.int32), x, transposed=False)
        return lax.dynamic_update_slice_in_dim(buf, x, start, axis=2)

    def attention(layer, q, k, v):
        k_all, v_all = (write(buf, x) for buf, x in zip(kv[layer], (k, v)))
        out, new_sums = attend_blocks(q, k_all, v_all, valid, positions, q_positions, q_valid, window,
                                      start // block, block, None if sums is None else sums[layer])
        return out, ((k_all, v_all), new_sums)

    x, kept = model(input_ids, q_positions, attention)
    last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[1])[None, :], 0), axis=1) - start     # [B]
    here = (last >= 0) & (last < cn)
    last_hidden = jnp.where(here[:, None], x[jnp.arange(b), jnp.clip(last, 0, cn - 1)], last_hidden)
    return (tuple(kv for kv, _ in kept), None if sums is None else tuple(s for _, s in kept), last_hidden)


def prefill_finish(model: Llama, carry, attention_mask, *, max_len: int, transposed_keys: bool):
    """prefill's result from the last prefill_chunk's carry: fp32 logits [B, V] of each row's last
    valid token and one KVCache per layer, each row left-aligned (as prefill). attention_mask [B, T]:
    the prompt without the chunks' right padding."""
    kv, sums, last_hidden = carry
    valid = attention_mask.astype(bool)
    t = valid.shape[1]
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    order = jnp.argsort(~valid, axis=1, stable=True)                            # valid tokens first

    def left_aligned(x):                                                         # [B, Hkv, width, ...]
        index = order.reshape(order.shape[0], 1, t, *(1,) * (x.ndim - 3))
        return jnp.take_along_axis(x[:, :, :t], index, axis=2)

    caches = tuple(
        sq.KVCache.from_kv(left_aligned(k), left_aligned(v), lengths, max_len=max_len, transposed_keys=transposed_keys,
                           h2o_scores=None if sums is None else left_aligned(sums[i]))
        for i, (k, v) in enumerate(kv))
    return model.head(last_hidden), caches


def decode_step(model: Llama, tokens: jax.Array, cache: tuple, *, method, mesh=None):
    """tokens [B] (each row's newest token) -> fp32 logits [B, V] of the next token, and the caches.

    cache: prefill's tuple of per-layer KVCaches. Each layer appends the token's k, v at its row's
    length, then attends with `method`. mesh: caches placed by sharding.cache_specs; each layer's
    append and attention run per shard (sharding.append_and_attend), and the caches keep their sharding.
    """
    def attention(layer, q, k, v):                          # q [B, 1, Hq, D]; k, v [B, 1, Hkv, D]
        out, new = sharding.append_and_attend(q[:, 0], k.swapaxes(1, 2), v.swapaxes(1, 2), cache[layer], method,
                                              mesh=mesh, window=model.config.sliding_window)
        return out[:, None], new

    x, new_cache = model(tokens[:, None], cache[0].lengths[:, None], attention, mesh=mesh)
    return model.head(x[:, 0], native=mesh is None), new_cache
