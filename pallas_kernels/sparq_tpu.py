"""SparQ steps 1 and 2 as Pallas Mosaic (TPU) kernels.

The pattern of jax's paged_attention kernel: the indices i1 / i2 are scalar-prefetched into SMEM
(PrefetchScalarGridSpec), K^T, K and V stay in HBM (memory_space=ANY), and each program DMAs only
the rows it needs into VMEM scratch, one async copy per row, all in flight before the first wait.

No TPU was at hand when this was written: the kernels are validated in interpret mode only
(interpret=True runs them on CPU under pltpu.InterpretParams, which simulates DMAs and semaphores,
where this jax has it), plus lowering to Mosaic MLIR in the tests; never compiled or timed on a TPU.

Limits of this first version (see the functions for the shapes):
- the prefetched indices live in SMEM, which holds B * Hkv * r (step 1) or B * Hkv * K (step 2)
  int32 values; very large batches may not fit;
- each program waits for all its DMAs before computing; there is no double buffering across
  programs as in paged_attention.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import UnsupportedShapeError, _check_approx_logits, _check_gather_attend

# Names that moved between jax releases: TPUMemorySpace -> MemorySpace, TPUCompilerParams ->
# CompilerParams, pltpu.ANY -> pl.ANY; InterpretParams appeared later.
_MemorySpace = getattr(pltpu, "MemorySpace", None) or getattr(pltpu, "TPUMemorySpace")
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
_ANY = getattr(pl, "ANY", None) or _MemorySpace.ANY
_VMEM = _MemorySpace.VMEM
_InterpretParams = getattr(pltpu, "InterpretParams", None)

_LANES = 128
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# VMEM a program may use: the smallest scoped-VMEM default (16 MiB on v4 / v5e) less headroom.
_VMEM_BUDGET = 12 * 2**20

__all__ = ["approx_logits", "gather_attend"]


def _interpret(interpret):
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r}; expected a bool")
    if interpret and _InterpretParams is not None:
        return _InterpretParams()
    return interpret


def _check_dtypes(fn: str, **arrays) -> None:
    for name, x in arrays.items():
        if x.dtype not in _DTYPES:
            raise UnsupportedShapeError(
                f"{fn}: {name} has dtype {x.dtype}; the TPU kernels take float32, bfloat16 or float16")


def _check_vmem(fn: str, what: str, nbytes: int) -> None:
    if nbytes > _VMEM_BUDGET:
        raise UnsupportedShapeError(
            f"{fn}: {what} needs {nbytes / 2**20:.1f} MiB of VMEM per program, over the "
            f"{_VMEM_BUDGET / 2**20:.0f} MiB this kernel allows itself")


def _params(n_dims: int):
    return _CompilerParams(dimension_semantics=("parallel",) * n_dims)


def _f32_dot(a, b, contract):
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), (contract, ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Step 1: approximate logits from the r picked components.

def _approx_logits_t_kernel(i1_ref, q1_ref, kt_hbm, out_ref, buf, sem, *, Hkv, r, S, block_s):
    """One program: one (batch row, KV head, S block), K stored transposed.

    i1_ref: SMEM int32 [B * Hkv * r] (prefetched); q1_ref: [G, r]; kt_hbm: K^T [B, Hkv, D, S] in
    HBM; out_ref: fp32 [G, block_s]; buf: VMEM [r, block_s]; sem: one DMA semaphore.
    """
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    base = (b * Hkv + h) * r
    start = s * block_s

    def gather(size):
        # r row DMAs of `size` contiguous positions each, all in flight before the first wait
        def copy(j):
            return pltpu.make_async_copy(kt_hbm.at[b, h, pl.ds(i1_ref[base + j], 1), pl.ds(start, size)],
                                         buf.at[pl.ds(j, 1), pl.ds(0, size)], sem)

        def start_one(j, carry):
            copy(j).start()
            return carry

        def wait_one(j, carry):
            copy(j).wait()
            return carry

        lax.fori_loop(0, r, start_one, 0)
        lax.fori_loop(0, r, wait_one, 0)

    last, rem = pl.cdiv(S, block_s) - 1, S % block_s
    if rem == 0:
        gather(block_s)
    else:
        # The last block reads only the rem positions that exist. The rest of buf is stale, but
        # output column t depends on buf column t alone, and columns past S are never written back.
        pl.when(s < last)(lambda: gather(block_s))
        pl.when(s == last)(lambda: gather(rem))
    out_ref[...] = _f32_dot(q1_ref[...], buf[...], ((1,), (0,)))


def _dense_logits_kernel(q_ref, k_ref, out_ref):
    """One program: one (batch row, KV head, S block), K stored once.

    q_ref: fp32 [G, D], q1 scattered to the components i1 (zero elsewhere); k_ref: [block_s, D];
    out_ref: fp32 [G, block_s].
    """
    out_ref[...] = _f32_dot(q_ref[...], k_ref[...], ((1,), (1,)))


def _block_s(block_s, S: int) -> int:
    # The output block's last dimension must be a multiple of 128 lanes or all of S.
    if block_s is None:
        block_s = 512
    elif not isinstance(block_s, int) or block_s < _LANES or block_s % _LANES:
        raise ValueError(f"block_s={block_s!r}; expected a positive multiple of {_LANES} (or None)")
    return S if S <= block_s else block_s


@functools.partial(jax.jit, static_argnames=("transposed", "block_s", "interpret"))
def approx_logits(q1, keys, i1, *, transposed=True, block_s=None, interpret=False):
    """SparQ step 1: raw approximate logits from the r picked components of each query.

    Args:
      q1: [B, Hkv, G, r], any float dtype: each query head's components at i1.
      keys: K^T [B, Hkv, D, S] if transposed, else K [B, Hkv, S, D] (single-copy mode).
      i1: int32 [B, Hkv, r], component indices in [0, D), shared by the group.
      block_s: positions per program, a multiple of 128 (default 512; all of S when S is smaller).
      interpret: simulate on CPU (pltpu.InterpretParams where this jax has it).

    Returns:
      fp32 [B, Hkv, G, S]: sum_j q1[..., j] * K[b, h, s, i1[b, h, j]]; the caller applies the
      temperature, masking and softmax.

    Grid (B, Hkv, cdiv(S, block_s)). Transposed: i1 is scalar-prefetched and each program DMAs the
    r picked rows of K^T, block_s positions each, into VMEM. Single copy: TPU DMAs move whole
    (8, 128) tiles, so reading r scattered components of a row costs about as much as the row;
    this path reads K in [block_s, D] blocks and multiplies by q1 scattered to a dense D-vector.
    """
    interpret = _interpret(interpret)
    B, Hkv, G, r, S, D = _check_approx_logits(q1, keys, i1, transposed)
    _check_dtypes("approx_logits", q1=q1, keys=keys)
    block_s = _block_s(block_s, S)
    n_blocks = pl.cdiv(S, block_s)
    i1 = i1.astype(jnp.int32)
    out_spec = lambda b, h, s, *_: (b, h, 0, s)  # noqa: E731
    out_shape = jax.ShapeDtypeStruct((B, Hkv, G, S), jnp.float32)
    if transposed:
        _check_vmem("approx_logits", f"the gathered rows [{r}, {block_s}]",
                    r * block_s * (keys.dtype.itemsize + 4) + G * block_s * 8)
        kernel = functools.partial(_approx_logits_t_kernel, Hkv=Hkv, r=r, S=S, block_s=block_s)
        return pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=(B, Hkv, n_blocks),
                in_specs=[
                    pl.BlockSpec((None, None, G, r), lambda b, h, s, *_: (b, h, 0, 0)),
                    pl.BlockSpec(memory_space=_ANY),
                ],
                out_specs=pl.BlockSpec((None, None, G, block_s), out_spec),
                scratch_shapes=[_VMEM((r, block_s), keys.dtype), pltpu.SemaphoreType.DMA(())],
            ),
            out_shape=out_shape,
            compiler_params=_params(3),
            interpret=interpret,
            name="sparq_approx_logits",
        )(i1.reshape(-1), q1, keys)
    _check_vmem("approx_logits", f"a K block [{block_s}, {D}]",
                2 * block_s * D * (keys.dtype.itemsize + 4) + G * block_s * 8)
    # scatter-add equals the gathered sum even if i1 repeats an index
    q_dense = jnp.zeros((B, Hkv, G, D), jnp.float32)
    q_dense = q_dense.at[jnp.arange(B)[:, None, None, None], jnp.arange(Hkv)[None, :, None, None],
                         jnp.arange(G)[None, None, :, None], i1[:, :, None, :]].add(q1.astype(jnp.float32))
    return pl.pallas_call(
        _dense_logits_kernel,
        grid=(B, Hkv, n_blocks),
        in_specs=[
            pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block_s, D), lambda b, h, s: (b, h, s, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, G, block_s), out_spec),
        out_shape=out_shape,
        compiler_params=_params(3),
        interpret=interpret,
        name="sparq_approx_logits_single_copy",
    )(q_dense, keys)


# ---------------------------------------------------------------------------------------------
# Steps 2 + 3: exact attention over the gathered rows, then mean-value reallocation.

def _gather_attend_kernel(idx_ref, q_ref, valid_row_ref, valid_col_ref, alpha_ref, v_bar_ref, k_hbm,
                          v_hbm, out_ref, k_buf, v_buf, sems, *, Hkv, K, D):
    """One program: one (batch row, KV head), all G query heads.

    idx_ref: SMEM int32 [B * Hkv * K] (prefetched; -1 where not valid); q_ref: [G, D];
    valid_row_ref: fp32 [1, K] and valid_col_ref: fp32 [K, 1], 1 where valid; alpha_ref: fp32
    [G, 1]; v_bar_ref: fp32 [1, D]; k_hbm, v_hbm: [B, Hkv, S, D] in HBM; out_ref: fp32 [G, D];
    k_buf, v_buf: VMEM [K, D]; sems: two DMA semaphores (K, V).
    """
    b, h = pl.program_id(0), pl.program_id(1)
    base = (b * Hkv + h) * K

    def copy(hbm, buf, sem, i):
        return pltpu.make_async_copy(hbm.at[b, h, pl.ds(idx_ref[base + i], 1)], buf.at[pl.ds(i, 1)], sem)

    def each_valid(fn):
        # rows that are not valid are never read from HBM
        def body(i, carry):
            pl.when(idx_ref[base + i] >= 0)(lambda: fn(i))
            return carry

        lax.fori_loop(0, K, body, 0)

    # all K rows of K, then of V, in flight at once; the softmax runs while V lands
    each_valid(lambda i: copy(k_hbm, k_buf, sems.at[0], i).start())
    each_valid(lambda i: copy(v_hbm, v_buf, sems.at[1], i).start())
    each_valid(lambda i: copy(k_hbm, k_buf, sems.at[0], i).wait())
    s = _f32_dot(q_ref[...], k_buf[...], ((1,), (1,))) * (1.0 / math.sqrt(D))  # [G, K]
    # select, not multiply: rows never copied hold whatever was in VMEM, NaN included
    s = jnp.where(valid_row_ref[...] > 0, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))  # at least one valid entry per row
    l = jnp.sum(p, axis=1, keepdims=True)
    each_valid(lambda i: copy(v_hbm, v_buf, sems.at[1], i).wait())
    v = jnp.where(valid_col_ref[...] > 0, v_buf[...].astype(jnp.float32), 0.0)
    y = _f32_dot(p, v, ((1,), (0,))) / l
    alpha = alpha_ref[...]
    out_ref[...] = alpha * y + (1.0 - alpha) * v_bar_ref[...]


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_attend(q, k, v, i2, valid, alpha, v_bar, *, interpret=False):
    """SparQ steps 2 + 3, fused: exact attention over the picked rows, then reallocation.

    Args:
      q: [B, Hkv, G, D], the full queries of each group.
      k, v: [B, Hkv, S, D].
      i2: int32 [B, Hkv, K], positions picked for the group (shared by its G query heads).
      valid: bool [B, Hkv, K]; False entries are ignored (and not read). Each row must have at
        least one True entry.
      alpha: fp32 [B, Hkv, G] (1 = no reallocation); v_bar: fp32 [B, Hkv, D].
      interpret: simulate on CPU (pltpu.InterpretParams where this jax has it).

    Returns:
      fp32 [B, Hkv, G, D]: alpha * softmax(q . K[i2]^T / sqrt(D)) . V[i2] + (1 - alpha) * v_bar,
      the softmax over the valid entries only.

    Grid (B, Hkv). i2 is scalar-prefetched; each program DMAs its valid rows of K and V from HBM
    into [K, D] VMEM buffers, once for all G query heads, then runs the fp32 softmax and sum.
    """
    interpret = _interpret(interpret)
    B, Hkv, G, S, D, K = _check_gather_attend(q, k, v, i2, valid, alpha, v_bar)
    _check_dtypes("gather_attend", q=q, k=k, v=v)
    _check_vmem("gather_attend", f"the gathered rows of K and V [{K}, {D}]",
                K * D * 2 * (k.dtype.itemsize + 4) + G * K * 8)
    idx = jnp.where(valid, i2.astype(jnp.int32), -1).reshape(-1)
    valid_f = valid.astype(jnp.float32)
    kernel = functools.partial(_gather_attend_kernel, Hkv=Hkv, K=K, D=D)
    block = lambda b, h, *_: (b, h, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Hkv),
            in_specs=[
                pl.BlockSpec((None, None, G, D), block),
                pl.BlockSpec((None, None, 1, K), block),
                pl.BlockSpec((None, None, K, 1), block),
                pl.BlockSpec((None, None, G, 1), block),
                pl.BlockSpec((None, None, 1, D), block),
                pl.BlockSpec(memory_space=_ANY),
                pl.BlockSpec(memory_space=_ANY),
            ],
            out_specs=pl.BlockSpec((None, None, G, D), block),
            scratch_shapes=[_VMEM((K, D), k.dtype), _VMEM((K, D), v.dtype), pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), jnp.float32),
        compiler_params=_params(2),
        interpret=interpret,
        name="sparq_gather_attend",
    )(idx, q, valid_f[:, :, None, :], valid_f[..., None], alpha.astype(jnp.float32)[..., None],
      v_bar.astype(jnp.float32)[:, :, None, :], k, v)
