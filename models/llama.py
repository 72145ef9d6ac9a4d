"""Llama and Mistral (= Llama + sliding window) as pure functions of (weights, tokens, cache).

Weights are pytrees of arrays with the layers stacked on a leading axis, and every layer loop is a
lax.scan, so compile time does not grow with depth. Nothing lives in object state: the config is a
static (hashable) argument, the KV cache a sparq_jax.KVCache stacked over layers.

Shapes: B batch, T tokens, H hidden, Hq / Hkv query / KV heads, D head dim, I MLP width, V vocab,
L layers, S cache positions. Softmax, RMSNorm and RoPE run in fp32 whatever the weights' dtype.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import sparq_jax as sq
from sparq_jax import sharding
from sparq_jax.sharding import DATA, MODEL

from .config import ModelConfig, RopeParameters

_F32 = jnp.float32
# Queries per block of the chunked prefill: scores are [B, Hq, chunk, T], never [B, Hq, T, T].
PREFILL_CHUNK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights, every field stacked on a leading layer axis L.

    Projections are stored input-major (x @ W), split per head. Biases are None unless the config's
    attention_bias / mlp_bias says otherwise.
    """

    input_norm: jax.Array                 # [L, H]
    q: jax.Array                          # [L, H, Hq, D]
    k: jax.Array                          # [L, H, Hkv, D]
    v: jax.Array                          # [L, H, Hkv, D]
    o: jax.Array                          # [L, Hq, D, H]
    post_norm: jax.Array                  # [L, H]
    gate: jax.Array                       # [L, H, I]
    up: jax.Array                         # [L, H, I]
    down: jax.Array                       # [L, I, H]
    q_bias: Optional[jax.Array] = None    # [L, Hq, D]
    k_bias: Optional[jax.Array] = None    # [L, Hkv, D]
    v_bias: Optional[jax.Array] = None    # [L, Hkv, D]
    o_bias: Optional[jax.Array] = None    # [L, H]
    gate_bias: Optional[jax.Array] = None  # [L, I]
    up_bias: Optional[jax.Array] = None   # [L, I]
    down_bias: Optional[jax.Array] = None  # [L, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: jax.Array                      # [V, H]
    layers: LayerWeights
    norm: jax.Array                       # [H]
    lm_head: Optional[jax.Array] = None   # [H, V]; None when tied to embed


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every field of Weights (layer fields without their L axis), as the config implies.

    Keys are "embed", "norm", "lm_head" and "layers.<field>"; absent biases / a tied head are left out.
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


def weights_from_flat(flat: dict[str, jax.Array]) -> Weights:
    """Weights from {"embed": ..., "layers.q": [L, ...], ...} as keyed by weight_shapes."""
    layers = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    return Weights(embed=flat["embed"], layers=LayerWeights(**layers), norm=flat["norm"],
                   lm_head=flat.get("lm_head"))


def weight_specs(config: ModelConfig, model: int) -> dict[str, P]:
    """PartitionSpecs (Megatron-style tensor parallelism over a "model" axis of this size) for each
    key of weight_shapes, layer fields without their L axis.

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


def weight_shardings(config: ModelConfig, mesh, per_layer: bool = False) -> Weights:
    """NamedShardings of Weights on mesh: layer fields stacked on L, or per_layer as unstack_layers
    lays them out."""
    flat = {}
    for name, spec in weight_specs(config, mesh.shape[MODEL]).items():
        if name.startswith("layers.") and not per_layer:
            spec = P(None, *spec)
        flat[name] = NamedSharding(mesh, spec)
    weights = weights_from_flat(flat)
    if per_layer:
        weights = dataclasses.replace(weights, layers=(weights.layers,) * config.num_hidden_layers)
    return weights


def init_weights(config: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> Weights:
    """Random weights as transformers initialises them: N(0, std) matrices, unit norms, zero biases."""
    key = jax.random.key(seed)
    flat = {}
    for n, (name, shape) in enumerate(weight_shapes(config).items()):
        full = shape if not name.startswith("layers.") else (config.num_hidden_layers, *shape)
        if name.endswith("norm"):
            flat[name] = jnp.ones(full, dtype)
        elif name.endswith("_bias"):
            flat[name] = jnp.zeros(full, dtype)
        else:
            flat[name] = (std * jax.random.normal(jax.random.fold_in(key, n), full, _F32)).astype(dtype)
    return weights_from_flat(flat)


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


def _bias(x, b):
    return x if b is None else x + b


def _qkv(w: LayerWeights, h: jax.Array):
    """h [..., H] -> q [..., Hq, D], k and v [..., Hkv, D]."""
    q = _bias(jnp.einsum("...h,hnd->...nd", h, w.q), w.q_bias)
    k = _bias(jnp.einsum("...h,hnd->...nd", h, w.k), w.k_bias)
    v = _bias(jnp.einsum("...h,hnd->...nd", h, w.v), w.v_bias)
    return q, k, v


def _out_proj(w: LayerWeights, attn: jax.Array) -> jax.Array:
    """attn [..., Hq, D] -> [..., H]. One [Hq*D, H] matrix product: with the heads contracted as two
    axes, XLA:CPU transposed the whole o weight every decode step rather than the small activation."""
    o = w.o.reshape(-1, w.o.shape[-1])
    return _bias(attn.reshape(*attn.shape[:-2], o.shape[0]) @ o, w.o_bias)


def _mlp(w: LayerWeights, h: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(h)) * up(h))."""
    gate = _bias(jnp.einsum("...h,hi->...i", h, w.gate), w.gate_bias)
    up = _bias(jnp.einsum("...h,hi->...i", h, w.up), w.up_bias)
    return _bias(jnp.einsum("...i,ih->...h", jax.nn.silu(gate) * up, w.down), w.down_bias)


def _lm_head(weights: Weights, x: jax.Array) -> jax.Array:
    """x [..., H] -> fp32 logits [..., V]."""
    if weights.lm_head is None:
        return jnp.einsum("...h,vh->...v", x, weights.embed, preferred_element_type=_F32)
    return jnp.einsum("...h,hv->...v", x, weights.lm_head, preferred_element_type=_F32)


# ---------------------------------------------------------------------------------------------
# Prefill: dense causal attention over the prompt, in query chunks

def causal_attention(q, k, v, valid, positions, window: Optional[int], chunk: int = PREFILL_CHUNK,
                     column_sums: bool = False):
    """Dense causal attention over a padded prompt, in [chunk x chunk] blocks with an online softmax.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; valid [B, T] bool (the attention mask); positions [B, T]
    int32 (each token's position among its row's valid tokens). Query t sees key s when s is valid,
    s <= t and, with a sliding window, positions[t] - positions[s] < window. Query block i visits key
    blocks 0..i only, so memory is O(B Hq chunk^2) and the upper triangle is never computed.
    Returns out [B, T, Hq, D] in q's dtype (zero for a query that sees no key: padding) and, if
    column_sums, fp32 [B, Hkv, T]: the attention probabilities each key receives, summed over the
    valid queries and each KV group's query heads (H2O's prefill state; a second pass over the
    blocks, once the softmax normalisers are known).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t

    def blocks(x, fill=0):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, n, c, *x.shape[2:])

    qb = blocks(q).reshape(b, n, c, hkv, g, d)
    kb, vb, valid_b, pos_b = blocks(k), blocks(v), blocks(valid, False), blocks(positions)
    scale = 1.0 / math.sqrt(d)
    index = jnp.arange(c)

    def masked_logits(i, j):
        """[B, Hkv, G, C, C] fp32 logits of query block i against key block j, -inf where masked."""
        qi = lax.dynamic_index_in_dim(qb, i, 1, keepdims=False)
        kj = lax.dynamic_index_in_dim(kb, j, 1, keepdims=False)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=_F32) * scale
        mask = lax.dynamic_index_in_dim(valid_b, j, 1, keepdims=False)[:, None, :]        # [B, 1, C]
        mask &= (j * c + index)[None, None, :] <= (i * c + index)[None, :, None]
        if window is not None:
            qp = lax.dynamic_index_in_dim(pos_b, i, 1, keepdims=False)
            kp = lax.dynamic_index_in_dim(pos_b, j, 1, keepdims=False)
            mask &= (qp[:, :, None] - kp[:, None, :]) < window
        return jnp.where(mask[:, None, None], logits, -jnp.inf)

    def query_block(sums, i):
        def accumulate(j, carry):
            m, l, acc = carry
            logits = masked_logits(i, j)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # no key seen yet: avoid inf - inf
            p = jnp.exp(logits - m_safe[..., None])
            rescale = jnp.exp(m - m_safe)
            vj = lax.dynamic_index_in_dim(vb, j, 1, keepdims=False)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vj, preferred_element_type=_F32)
            return m_new, l * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

        init = (jnp.full((b, hkv, g, c), -jnp.inf, _F32), jnp.zeros((b, hkv, g, c), _F32),
                jnp.zeros((b, hkv, g, c, d), _F32))
        m, l, acc = lax.fori_loop(0, i + 1, accumulate, init)
        norm = jnp.where(l > 0, l, 1.0)
        out = acc / norm[..., None]
        if column_sums:
            m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
            weight = lax.dynamic_index_in_dim(valid_b, i, 1, keepdims=False).astype(_F32) # valid queries
            weight = weight[:, None, None, :] / norm

            def add_columns(j, sums):
                p = jnp.exp(masked_logits(i, j) - m_safe[..., None])
                cols = jnp.einsum("bhgqk,bhgq->bhk", p, weight)
                return lax.dynamic_update_slice_in_dim(
                    sums, lax.dynamic_slice_in_dim(sums, j * c, c, axis=2) + cols, j * c, axis=2)

            sums = lax.fori_loop(0, i + 1, add_columns, sums)
        return sums, jnp.moveaxis(out, 3, 1).astype(q.dtype)                # [B, C, Hkv, G, D]

    sums, out = lax.scan(query_block, jnp.zeros((b, hkv, n * c), _F32), jnp.arange(n))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, hq, d)[:, :t]
    return out, (sums[:, :, :t] if column_sums else None)


def _rows(x: jax.Array, mesh) -> jax.Array:
    """x [B, ...] pinned to batch-over-"data" (the embedding lookup from a vocabulary-split table
    would otherwise leave the partitioner to guess)."""
    if mesh is None:
        return x
    return lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA, *(None,) * (x.ndim - 1))))


def forward_prompt(weights: Weights, input_ids, attention_mask, *, config: ModelConfig,
                   keep_kv: bool = False, column_sums: bool = False, chunk: int = PREFILL_CHUNK, mesh=None):
    """Run the layers over a padded prompt.

    input_ids, attention_mask [B, T] (any padding; position ids are cumsum(mask) - 1, as transformers'
    generate). Returns hidden states [B, T, H] after the final norm, and per layer (stacked on L), if
    keep_kv: k, v [L, B, T, Hkv, D] after RoPE; if column_sums: H2O's prefill scores [L, B, Hkv, T].
    mesh: weights placed by weight_shardings; the partitioner splits the rest from them.
    """
    valid = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    cos, sin = rope_tables(config, positions)                                 # [B, T, D/2]
    x = _rows(weights.embed[input_ids], mesh)

    def layer(x, w: LayerWeights):
        h = rms_norm(x, w.input_norm, config.rms_norm_eps)
        q, k, v = _qkv(w, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn, sums = causal_attention(q, k, v, valid, positions, config.sliding_window, chunk, column_sums)
        x = x + _out_proj(w, attn)
        x = x + _mlp(w, rms_norm(x, w.post_norm, config.rms_norm_eps))
        return x, ((k, v) if keep_kv else None, sums)

    x, (kv, sums) = lax.scan(layer, x, weights.layers)
    return rms_norm(x, weights.norm, config.rms_norm_eps), kv, sums


def logits(weights: Weights, input_ids, attention_mask, *, config: ModelConfig, mesh=None) -> jax.Array:
    """fp32 logits [B, T, V] of every position."""
    x, _, _ = forward_prompt(weights, input_ids, attention_mask, config=config, mesh=mesh)
    return _lm_head(weights, x)


def prefill(weights: Weights, input_ids, attention_mask, *, config: ModelConfig, max_len: int,
            transposed_keys: bool, h2o: bool, chunk: int = PREFILL_CHUNK, mesh=None):
    """Dense prefill that fills one KVCache per layer, each row left-aligned.

    Returns fp32 logits [B, V] of each row's last valid token and the caches: a tuple of L KVCaches
    ([B, Hkv, max_len, D] fields, lengths [B] = each row's number of valid tokens). h2o: seed H2O's
    scores. mesh: the caches come out split as sharding.cache_specs.
    """
    valid = attention_mask.astype(bool)
    x, (k, v), sums = forward_prompt(weights, input_ids, attention_mask, config=config, keep_kv=True,
                                     column_sums=h2o, chunk=chunk, mesh=mesh)
    t = input_ids.shape[1]
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    last = jnp.max(jnp.where(valid, jnp.arange(t)[None, :], 0), axis=1)
    out = _lm_head(weights, x[jnp.arange(x.shape[0]), last])
    # Valid tokens first, in order: row b's prompt lands at cache positions [0, lengths[b]).
    order = jnp.argsort(~valid, axis=1, stable=True)                            # [B, T]
    k = jnp.take_along_axis(k, order[None, :, :, None, None], axis=2).transpose(0, 1, 3, 2, 4)
    v = jnp.take_along_axis(v, order[None, :, :, None, None], axis=2).transpose(0, 1, 3, 2, 4)
    if h2o:
        sums = jnp.take_along_axis(sums, order[None, :, None, :], axis=3)

    # One cache per layer, not a stacked one: XLA:CPU copies a layer sliced out of a stacked buffer
    # (for a dot or a gather) on every decode step, which costs more than SparQ saves.
    caches = tuple(
        sq.KVCache.from_kv(k[i], v[i], lengths, max_len=max_len, transposed_keys=transposed_keys,
                           h2o_scores=sums[i] if h2o else None)
        for i in range(config.num_hidden_layers))
    if mesh is not None:
        caches = tuple(sharding.constrain_cache(c, mesh) for c in caches)
    return out, caches


# ---------------------------------------------------------------------------------------------
# Decode: one token per row, attention through sq.attend with any method

def unstack_layers(weights: Weights) -> Weights:
    """The same weights with `layers` as a tuple of per-layer LayerWeights, for decode_step.

    Decoding reads every weight once per token; XLA:CPU would copy a layer sliced out of the stacked
    arrays first (three times the traffic), so decode runs over separate per-layer arrays.
    """
    n = weights.layers.input_norm.shape[0]
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], weights.layers) for i in range(n))
    return dataclasses.replace(weights, layers=layers)


def decode_step(weights: Weights, tokens: jax.Array, cache: tuple, *, config: ModelConfig, method, mesh=None):
    """tokens [B] (each row's newest token) -> fp32 logits [B, V] of the next token, and the caches.

    weights: with per-layer `layers` (unstack_layers); cache: prefill's tuple of per-layer KVCaches.
    Each layer appends the token's k, v at its row's length, then attends with `method`. The layers
    run as a Python loop over separate buffers (see unstack_layers), so compile time grows with depth.
    mesh: weights placed by weight_shardings(per_layer=True), caches by sharding.cache_specs; each
    layer's append and attention run per shard (sharding.append_and_attend), and the caches keep
    their sharding.
    """
    positions = cache[0].lengths                                                 # [B]
    cos, sin = rope_tables(config, positions)                                    # [B, D/2]
    x = _rows(weights.embed[tokens], mesh)
    new_cache = []
    for w, layer_cache in zip(weights.layers, cache):
        h = rms_norm(x, w.input_norm, config.rms_norm_eps)
        q, k, v = _qkv(w, h)                                                     # [B, heads, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, layer_cache = sharding.append_and_attend(q, k[:, :, None], v[:, :, None], layer_cache, method,
                                                      mesh=mesh, window=config.sliding_window)
        new_cache.append(layer_cache)
        x = x + _out_proj(w, out)
        x = x + _mlp(w, rms_norm(x, w.post_norm, config.rms_norm_eps))
    return _lm_head(weights, rms_norm(x, weights.norm, config.rms_norm_eps)), tuple(new_cache)
