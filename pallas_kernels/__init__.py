"""Pallas kernels for SparQ's two memory-bound steps; arrays in, arrays out.

Each backend module exposes the same two functions (the wrappers own grid and BlockSpecs):

  approx_logits(q1, keys, i1, *, transposed=True, block_s=None, interpret=False)
      step 1: q[i1] . K[:, i1]^T for every position, fp32 [B, Hkv, G, S]
  gather_attend(q, k, v, i2, valid, alpha, v_bar, *, interpret=False)
      steps 2 + 3: exact attention over the rows i2, then mean-value reallocation, fp32 [B, Hkv, G, D]

sparq_gpu adds the selection between the steps (on a GPU, lax.top_k and the CPU path's counting
passes were the slowest part of SparQ):

  top_k_positions(score, k, *, block=None, interpret=False, early_exit=True, splits=None)
      the k largest of each row [..., S] (ties: lowest positions), in increasing position order, int32;
      few long rows are spread over several programs (a local top-k per piece, then an exact merge)
  approx_scores(q, keys, bounds, *, rank, transposed=True, group_scores="softmax", block_s=None,
                interpret=False)
      step 1 fused with what lies between the steps: the r components and the temperature chosen in
      the kernel, the scaled approximate logits, per-block softmax partials (max, sum of exp) and, for
      group_scores="logits", the score the top-k ranks
  gather_attend_scored(q, k, v, i2, z, m, l, bounds, v_bar, *, reallocate=True, interpret=False)
      steps 2 + 3 after those two, with the valid positions and step 3's alpha found in the kernel

sq.attend(impl="pallas_gpu") runs approx_scores, top_k_positions and gather_attend_scored: three
kernels per layer (with XLA between them only the group sum of s_hat under group_scores="softmax",
v_bar, and the combination of split partials); sparq_gpu's approx_logits and gather_attend serve the
benchmark-only backend "pallas_gpu_unfused", sparq_tpu's the "pallas_tpu" one (sparq_jax.backends).

  sparq_gpu   Pallas Triton backend (in-kernel gathers by index vector); interpret=True runs on CPU
  sparq_tpu   Pallas Mosaic TPU backend (scalar-prefetched indices, per-row DMA from HBM);
              interpret=True simulates DMA and semaphores on CPU

Kernels know nothing of caches or models; sparq_jax imports this package, never the reverse.
"""

import functools

__all__ = ["UnsupportedShapeError", "gpu_kernels_available", "order_key"]


class UnsupportedShapeError(ValueError):
    """A kernel was given a shape it cannot take (raised at trace time; the message says why)."""


@functools.cache
def gpu_kernels_available() -> tuple[bool, str]:
    """Whether the Pallas Triton backend imports in this jax: (available, reason when not).

    The Triton backend is deprecated from jax 0.11 and may disappear; sparq_gpu still imports
    without it and its functions then raise RuntimeError with this reason.
    """
    try:
        from jax.experimental.pallas import triton as plgpu
        from jax._src.pallas.triton import pallas_call_registration  # noqa: F401

        for name in ("CompilerParams", "load", "store"):
            getattr(plgpu, name)
    except Exception as e:  # ImportError, or whatever a half-removed module raises on import
        import jax

        return False, (f"the Pallas Triton backend does not import in jax {jax.__version__}: "
                       f"{type(e).__name__}: {e}")
    return True, ""


def order_key(x):
    """fp32 array -> int32 keys in the order of the floats' values (-0.0 equal to +0.0; NaN not
    allowed): the top-k selections compare these, in XLA (sparq_jax.topk) and in a kernel."""
    import jax
    import jax.numpy as jnp

    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


# Argument checks shared by both backends. They run at trace time on static shapes and dtypes.

def _is_float(x) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(x.dtype, jnp.floating)


def _is_int(x) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(x.dtype, jnp.integer)


def _expect(ok: bool, name: str, x, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} has shape {tuple(x.shape)} and dtype {x.dtype}; expected {expected}")


def _check_approx_logits(q1, keys, i1, transposed) -> tuple[int, int, int, int, int, int]:
    """Checks step 1's arguments; returns (B, Hkv, G, r, S, D)."""
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed={transposed!r}; expected a bool")
    _expect(q1.ndim == 4 and _is_float(q1), "q1", q1, "a float array [B, Hkv, G, r]")
    layout = "K^T [B, Hkv, D, S]" if transposed else "K [B, Hkv, S, D]"
    _expect(keys.ndim == 4 and _is_float(keys), "keys", keys, f"a float array {layout}")
    B, Hkv, G, r = q1.shape
    if transposed:
        B_, Hkv_, D, S = keys.shape
    else:
        B_, Hkv_, S, D = keys.shape
    _expect((B_, Hkv_) == (B, Hkv), "keys", keys,
            f"{layout} with B={B}, Hkv={Hkv} as in q1 {tuple(q1.shape)} (transposed={transposed})")
    _expect(S >= 1 and D >= 1, "keys", keys, f"{layout} with S >= 1 and D >= 1")
    _expect(G >= 1 and 1 <= r <= D, "q1", q1, f"[B, Hkv, G, r] with G >= 1 and 1 <= r <= D={D}")
    _expect(i1.shape == (B, Hkv, r) and _is_int(i1), "i1", i1, f"int32 [B, Hkv, r] = {(B, Hkv, r)}")
    return B, Hkv, G, r, S, D


def _check_gather_attend(q, k, v, i2, valid, alpha, v_bar) -> tuple[int, int, int, int, int, int]:
    """Checks step 2's arguments; returns (B, Hkv, G, S, D, K)."""
    import jax.numpy as jnp

    _expect(q.ndim == 4 and _is_float(q), "q", q, "a float array [B, Hkv, G, D]")
    B, Hkv, G, D = q.shape
    _expect(k.ndim == 4 and _is_float(k) and k.shape[:2] == (B, Hkv) and k.shape[3] == D, "k", k,
            f"a float array [B, Hkv, S, D] with B={B}, Hkv={Hkv}, D={D} as in q")
    S = k.shape[2]
    _expect(S >= 1, "k", k, "[B, Hkv, S, D] with S >= 1")
    _expect(v.shape == k.shape and _is_float(v), "v", v, f"a float array of k's shape {tuple(k.shape)}")
    _expect(i2.ndim == 3 and i2.shape[:2] == (B, Hkv) and i2.shape[2] >= 1 and _is_int(i2), "i2", i2,
            f"int32 [B, Hkv, K] with B={B}, Hkv={Hkv}, K >= 1")
    K = i2.shape[2]
    _expect(valid.shape == (B, Hkv, K) and valid.dtype == jnp.bool_, "valid", valid,
            f"bool [B, Hkv, K] = {(B, Hkv, K)}")
    _expect(alpha.shape == (B, Hkv, G) and _is_float(alpha), "alpha", alpha,
            f"float32 [B, Hkv, G] = {(B, Hkv, G)}")
    _expect(v_bar.shape == (B, Hkv, D) and _is_float(v_bar), "v_bar", v_bar,
            f"float32 [B, Hkv, D] = {(B, Hkv, D)}")
    return B, Hkv, G, S, D, K
