"""SparQ steps 1 and 2 as Pallas Triton (GPU) kernels.

Both kernels gather inside the program with index vectors (a Triton load takes a tensor of
pointers), so only the picked rows of K^T, K and V leave HBM. Triton tensors must have a power-of-two
number of elements, so every tile is padded to a power of two and masked; masked lanes issue no
memory transaction. tl.dot needs every dimension >= 16, so the group of query heads is padded to 16
unless it is a single head, which takes a broadcast multiply and a sum instead. Products run on
tensor cores with fp32 accumulation; an fp32 operand against 16-bit K or V is split in two 16-bit
halves (see _matmul), so fp32 queries and softmax weights keep near-fp32 accuracy.

The Triton backend is deprecated from jax 0.11 (it warns at lowering) and may be removed: this module
imports without it, and its functions then raise RuntimeError (see gpu_kernels_available()).
On CPU the kernels run with interpret=True.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import UnsupportedShapeError, _check_approx_logits, _check_gather_attend, gpu_kernels_available, order_key

_AVAILABLE, _UNAVAILABLE_REASON = gpu_kernels_available()
if _AVAILABLE:
    from jax.experimental.pallas import triton as plgpu

_MAX_TILE = 1 << 20  # Triton's limit on the elements of one tensor (TRITON_MAX_TENSOR_NUMEL)
_MIN_DOT = 16  # tl.dot needs M, N and K >= 16
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_NUM_WARPS = 4
_NUM_STAGES = 2
# Step 2 splits K across programs until there are about this many (flash-decoding): an H100 has
# 132 SMs, and B * Hkv alone is small for long contexts at small batch.
_TARGET_PROGRAMS = 512

__all__ = ["approx_logits", "approx_scores", "top_k_positions", "gather_attend", "gather_attend_scored"]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _require_triton() -> None:
    if not _AVAILABLE:
        raise RuntimeError(f"pallas_kernels.sparq_gpu cannot run: {_UNAVAILABLE_REASON}")


def _check_dtypes(fn: str, **arrays) -> None:
    for name, x in arrays.items():
        if x.dtype not in _DTYPES:
            raise UnsupportedShapeError(
                f"{fn}: {name} has dtype {x.dtype}; the Triton kernels take float32, bfloat16 or float16")


def _check_tiles(fn: str, **tiles: tuple[int, ...]) -> None:
    for name, shape in tiles.items():
        if math.prod(shape) > _MAX_TILE:
            raise UnsupportedShapeError(
                f"{fn}: the padded {name} tile {shape} has more than {_MAX_TILE} elements, "
                "Triton's limit for one tensor")


def _check_interpret(interpret) -> None:
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r}; expected a bool")


def _params():
    # Passing Triton's CompilerParams is what selects the Triton backend: without it, jax >= 0.10
    # may lower a GPU pallas_call with Mosaic GPU.
    return plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)


def _mma(a, b, contract):
    # HIGHEST keeps fp32 operands in IEEE fp32 (Triton's default would be tf32); 16-bit operands
    # multiply exactly into the fp32 accumulator either way.
    return lax.dot_general(a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _matmul(a, b, contract):
    """fp32 product of a [M, C] and b (contracting `contract`), for M >= 16.

    An fp32 operand against a 16-bit one is split as hi + lo, both in the 16-bit dtype: two tensor-core
    products carry about 16 bits of its mantissa (relative error ~2**-17), where one fp32 product
    would run on the CUDA cores, as slow as the memory traffic this kernel exists to cut.
    """
    low = (jnp.bfloat16, jnp.float16)
    if a.dtype == b.dtype:
        return _mma(a, b, contract)
    if a.dtype == jnp.float32 and b.dtype in low:
        hi = a.astype(b.dtype)
        return _mma(hi, b, contract) + _mma((a - hi.astype(jnp.float32)).astype(b.dtype), b, contract)
    if b.dtype == jnp.float32 and a.dtype in low:
        hi = b.astype(a.dtype)
        return _mma(a, hi, contract) + _mma(a, (b - hi.astype(jnp.float32)).astype(a.dtype), contract)
    return _mma(a.astype(jnp.float32), b.astype(jnp.float32), contract)


def _dot(a, b):
    """a [M, C] @ b [C, N] -> fp32 [M, N]."""
    if a.shape[0] == 1:  # tl.dot needs M >= 16: a broadcast multiply and a column sum instead
        return jnp.sum(a.astype(jnp.float32).reshape(-1, 1) * b.astype(jnp.float32), axis=0, keepdims=True)
    return _matmul(a, b, ((1,), (0,)))


def _dot_nt(a, b):
    """a [M, C] @ b[N, C]^T -> fp32 [M, N]."""
    if a.shape[0] == 1:
        return jnp.sum(b.astype(jnp.float32) * a.astype(jnp.float32), axis=1).reshape(1, -1)
    return _matmul(a, b, ((1,), (1,)))


# ---------------------------------------------------------------------------------------------
# Step 1: approximate logits from the r picked components.

def _approx_logits_kernel(q1_ref, keys_ref, i1_ref, out_ref, *, transposed, G, r, S, g_pad, r_pad,
                          block_s):
    """One program: one (batch row, KV head, S block).

    Refs: q1 [G, r]; keys K^T [D, S] (transposed) or K [S, D]; i1 [r]; out fp32 [G, S].
    """
    j = jnp.arange(r_pad)
    j_ok = j < r
    g = jnp.arange(g_pad)
    g_ok = g < G
    s = pl.program_id(2) * block_s + jnp.arange(block_s)
    s_ok = s < S
    rows = plgpu.load(i1_ref.at[j], mask=j_ok, other=0)
    mask = j_ok[:, None] & s_ok[None, :]
    if transposed:
        # each picked row of K^T is S-contiguous: coalesced reads
        k1 = plgpu.load(keys_ref.at[rows[:, None], s[None, :]], mask=mask, other=0)
    else:
        # single-copy mode: r elements of each D-long row, strided by D
        k1 = plgpu.load(keys_ref.at[s[None, :], rows[:, None]], mask=mask, other=0)
    q1 = plgpu.load(q1_ref.at[g[:, None], j[None, :]], mask=g_ok[:, None] & j_ok[None, :], other=0)
    plgpu.store(out_ref.at[g[:, None], s[None, :]], _dot(q1, k1), mask=g_ok[:, None] & s_ok[None, :])


def _block_s(block_s, S: int) -> int:
    if block_s is None:
        return max(_MIN_DOT, min(256, _pow2(S)))
    if not isinstance(block_s, int) or block_s < _MIN_DOT or block_s & (block_s - 1):
        raise ValueError(f"block_s={block_s!r}; expected a power of two >= {_MIN_DOT} (or None)")
    return block_s


@functools.partial(jax.jit, static_argnames=("transposed", "block_s", "interpret"))
def approx_logits(q1, keys, i1, *, transposed=True, block_s=None, interpret=False):
    """SparQ step 1: raw approximate logits from the r picked components of each query.

    Args:
      q1: [B, Hkv, G, r], any float dtype: each query head's components at i1.
      keys: K^T [B, Hkv, D, S] if transposed (reads r S-contiguous rows), else K [B, Hkv, S, D]
        (strided reads: the single-copy mode).
      i1: int32 [B, Hkv, r], component indices in [0, D), shared by the group.
      block_s: positions per program (a power of two >= 16; default min(256, S rounded up)).
      interpret: run in the Pallas interpreter (CPU).

    Returns:
      fp32 [B, Hkv, G, S]: sum_j q1[..., j] * K[b, h, s, i1[b, h, j]]. The caller applies the
      temperature, masking and softmax.

    Grid (B, Hkv, cdiv(S, block_s)); each program reads a [pad(r), block_s] tile of K^T.
    """
    _require_triton()
    _check_interpret(interpret)
    B, Hkv, G, r, S, D = _check_approx_logits(q1, keys, i1, transposed)
    _check_dtypes("approx_logits", q1=q1, keys=keys)
    block_s = _block_s(block_s, S)
    g_pad = 1 if G == 1 else max(_MIN_DOT, _pow2(G))
    r_pad = max(_MIN_DOT, _pow2(r))
    _check_tiles("approx_logits", keys=(r_pad, block_s), q1=(g_pad, r_pad), logits=(g_pad, block_s))
    kernel = functools.partial(_approx_logits_kernel, transposed=transposed, G=G, r=r, S=S,
                               g_pad=g_pad, r_pad=r_pad, block_s=block_s)
    whole = lambda b, h, s: (b, h, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(B, Hkv, pl.cdiv(S, block_s)),
        in_specs=[
            pl.BlockSpec((None, None, G, r), whole),
            pl.BlockSpec((None, None, *keys.shape[2:]), whole),
            pl.BlockSpec((None, None, r), lambda b, h, s: (b, h, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, G, S), whole),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, S), jnp.float32),
        compiler_params=_params(),
        interpret=interpret,
        name="sparq_approx_logits",
    )(q1, keys, i1.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Step 1 fused with what lies between the steps: the component choice, the temperature, per-block
# softmax partials and (group_scores="logits") the score the top-k ranks.

def _approx_scores_kernel(q_ref, keys_ref, bounds_ref, z_ref, m_ref, l_ref, *score_ref, transposed, G, D, r,
                          S, g_pad, d_pad, r_pad, block_s):
    """One program: one (batch row, KV head, S block).

    Refs: q [G, D] (the full queries of the group); keys K^T [D, S] or K [S, D]; bounds int32 [4]
    (first candidate, the row's length, first always-kept position, unused). Outputs: z fp32 [G, S]
    (approximate logits / tau); m, l fp32 [G, n_blocks] (this block's max of z over its candidates,
    -inf if none, and sum of exp(z - m) there); score fp32 [S] when group_scores="logits".
    """
    g = jnp.arange(g_pad)
    g_ok = g < G
    d = jnp.arange(d_pad)
    d_ok = d < D
    q = plgpu.load(q_ref.at[g[:, None], d[None, :]], mask=g_ok[:, None] & d_ok[None, :], other=0).astype(jnp.float32)
    # i1: the r largest |q| summed over the group, ties to the lower component (as lax.top_k); the
    # padding ranks last. rank[c] = components before c in that order.
    a = jnp.where(d_ok, jnp.sum(jnp.abs(q), axis=0), -1.0)
    before = (a[:, None] > a[None, :]) | ((a[:, None] == a[None, :]) & (d[:, None] < d[None, :]))
    rank = jnp.sum(jnp.where(before, 1, 0), axis=0)                                    # [d_pad]
    j = jnp.arange(r_pad)
    pick = (rank[None, :] == j[:, None]) & (j < r)[:, None]                            # [r_pad, d_pad]
    rows = jnp.sum(jnp.where(pick, d[None, :], 0), axis=1)                             # i1 [r_pad]
    q1 = _dot_nt(q, jnp.where(pick, 1.0, 0.0))                                          # [g_pad, r_pad], exact
    # Eq. 9's temperature (a query of zeros keeps sqrt(D), as sparq_jax.sparq.approx_scores does)
    l1_full = jnp.sum(jnp.abs(q), axis=1)
    l1_part = jnp.sum(jnp.abs(q1), axis=1)
    tau = jnp.sqrt(D * jnp.where(l1_full > 0, l1_part / jnp.where(l1_full > 0, l1_full, 1.0), 1.0))

    block = pl.program_id(2)
    s = block * block_s + jnp.arange(block_s)
    s_ok = s < S
    mask = (j < r)[:, None] & s_ok[None, :]
    if transposed:
        k1 = plgpu.load(keys_ref.at[rows[:, None], s[None, :]], mask=mask, other=0)
    else:
        k1 = plgpu.load(keys_ref.at[s[None, :], rows[:, None]], mask=mask, other=0)
    z = _dot(q1, k1) / tau[:, None]                                                     # [g_pad, block_s]
    plgpu.store(z_ref.at[g[:, None], s[None, :]], z, mask=g_ok[:, None] & s_ok[None, :])

    bounds = plgpu.load(bounds_ref.at[jnp.arange(4)])
    first, length, kept = (jnp.sum(jnp.where(jnp.arange(4) == i, bounds, 0)) for i in range(3))
    cand = s_ok & (s >= first) & (s < length)
    zc = jnp.where(cand[None, :], z, -jnp.inf)
    m = jnp.max(zc, axis=1)
    l = jnp.sum(jnp.exp(zc - jnp.where(m == -jnp.inf, 0.0, m)[:, None]), axis=1)
    col = block + 0 * g
    plgpu.store(m_ref.at[g, col], m, mask=g_ok)
    plgpu.store(l_ref.at[g, col], l, mask=g_ok)
    if score_ref:
        score = jnp.sum(jnp.where(g_ok[:, None], z, 0.0), axis=0)
        score = jnp.where(cand, jnp.where(s >= kept, jnp.inf, score), -jnp.inf)
        plgpu.store(score_ref[0].at[s], score, mask=s_ok)


@functools.partial(jax.jit, static_argnames=("rank", "transposed", "group_scores", "block_s", "interpret"))
def approx_scores(q, keys, bounds, *, rank, transposed=True, group_scores="softmax", block_s=None,
                  interpret=False):
    """SparQ step 1 and the scores between the steps in one kernel: the r components (from |q| summed
    over the group), the temperature, the scaled approximate logits, per-block softmax partials and,
    for group_scores="logits", the score the top-k ranks.

    Args:
      q: [B, Hkv, G, D], the full queries of each group (any float dtype; compared and multiplied in fp32).
      keys: K^T [B, Hkv, D, S] if transposed, else K [B, Hkv, S, D].
      bounds: int32 [B, 3]: per row the first candidate position, the row's length (candidates are
        [first, length)), and the first always-kept position (the local window and the newest).
      rank: r, 1 <= r <= D.
      group_scores: "softmax" or "logits" (see sparq_jax.SparQ).
      block_s: positions per program (a power of two >= 16; default min(256, S rounded up)).
      interpret: run in the Pallas interpreter (CPU).

    Returns (z, m, l, score):
      z fp32 [B, Hkv, G, S]: q[i1] . K[:, i1] / tau (sparq_jax.sparq.approx_scores' z), every position;
      m, l fp32 [B, Hkv, G, n_blocks]: each block's max of z over its candidates (-inf if none) and
        sum of exp(z - m) there, so that s_hat = exp(z - M) / L with M = max(m), L = sum(l * exp(m - M));
      score fp32 [B, Hkv, S] for "logits": the group sum of z, +inf from the always-kept position on,
        -inf outside the candidates; None for "softmax" (its score needs M and L first).

    Grid (B, Hkv, cdiv(S, block_s)); each program picks the components from q (a [D, D] comparison)
    and reads a [pad(r), block_s] tile of K^T.
    """
    _require_triton()
    _check_interpret(interpret)
    if group_scores not in ("softmax", "logits"):
        raise ValueError(f"group_scores={group_scores!r}; expected 'softmax' or 'logits'")
    if q.ndim != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [B, Hkv, G, D]")
    B, Hkv, G, D = q.shape
    if not isinstance(rank, int) or not 1 <= rank <= D:
        raise ValueError(f"rank={rank!r}; expected an int in [1, D={D}]")
    # step 1's checks, on the shapes of q1 and i1 this kernel builds inside
    _check_approx_logits(jax.ShapeDtypeStruct((B, Hkv, G, rank), q.dtype), keys,
                         jax.ShapeDtypeStruct((B, Hkv, rank), jnp.int32), transposed)
    S, keys_d = (keys.shape[3], keys.shape[2]) if transposed else (keys.shape[2], keys.shape[3])
    if keys_d != D:
        layout = "K^T [B, Hkv, D, S]" if transposed else "K [B, Hkv, S, D]"
        raise ValueError(f"keys has shape {tuple(keys.shape)}; expected {layout} with D={D} as in q {tuple(q.shape)}")
    if bounds.shape != (B, 3) or not jnp.issubdtype(bounds.dtype, jnp.integer):
        raise ValueError(f"bounds has shape {tuple(bounds.shape)} and dtype {bounds.dtype}; expected int32 [B={B}, 3]")
    _check_dtypes("approx_scores", q=q, keys=keys)
    block_s = _block_s(block_s, S)
    g_pad = 1 if G == 1 else max(_MIN_DOT, _pow2(G))
    d_pad = max(_MIN_DOT, _pow2(D))
    r_pad = max(_MIN_DOT, _pow2(rank))
    _check_tiles("approx_scores", keys=(r_pad, block_s), q=(g_pad, d_pad), ranks=(d_pad, d_pad),
                 logits=(g_pad, block_s))
    n_blocks = pl.cdiv(S, block_s)
    logits_mode = group_scores == "logits"
    kernel = functools.partial(_approx_scores_kernel, transposed=transposed, G=G, D=D, r=rank, S=S,
                               g_pad=g_pad, d_pad=d_pad, r_pad=r_pad, block_s=block_s)
    whole = lambda b, h, s: (b, h, 0, 0)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, G, S), whole), pl.BlockSpec((None, None, G, n_blocks), whole),
                 pl.BlockSpec((None, None, G, n_blocks), whole)]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, G, S), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, G, n_blocks), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, G, n_blocks), jnp.float32)]
    if logits_mode:
        out_specs.append(pl.BlockSpec((None, None, S), lambda b, h, s: (b, h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, S), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=(B, Hkv, n_blocks),
        in_specs=[
            pl.BlockSpec((None, None, G, D), whole),
            pl.BlockSpec((None, None, *keys.shape[2:]), whole),
            pl.BlockSpec((None, 4), lambda b, h, s: (b, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="sparq_approx_scores",
    )(q, keys, jnp.pad(bounds.astype(jnp.int32), ((0, 0), (0, 1))))
    return (*outs, None) if not logits_mode else tuple(outs)


# ---------------------------------------------------------------------------------------------
# Between the steps: the positions of the k largest scores of each row.

_INT_MIN = -(1 << 31)
_TOPK_BLOCK = 8192  # positions a top-k program holds at once; longer rows are visited in chunks


def _top_k_kernel(score_ref, *refs, S, k, block, n_chunks, early_exit, pieces):
    """One program: one row. score [S] fp32 -> out int32 [k], the positions of the k largest scores
    (ties: lowest positions first) in increasing order.

    With `pieces` (_split_top_k's first pass) the row is piece program_id % pieces of a longer row:
    out holds positions in that row, and a second output the scores kept. With a positions input
    (its second pass, refs = (positions [S], out)) out holds positions[kept] instead.

    Scores map to order-preserving int32 keys. A threshold is built bit by bit from the top (counting
    passes: keep a bit if at least k keys reach the candidate; at most 32, and with early_exit
    stopping at a count of exactly k), then one pass keeps the keys above it and the first
    k - count(above) keys equal to it, and writes each kept position at its rank among the kept
    (a prefix sum).
    """
    if pieces:
        out_ref, values_ref = refs
        offset = (pl.program_id(0) % pieces) * S
    elif len(refs) == 2:
        positions_ref, out_ref = refs
    else:
        (out_ref,) = refs
    lane = jnp.arange(block)

    def chunk(c):
        pos = c * block + lane
        ok = pos < S
        return order_key(plgpu.load(score_ref.at[pos], mask=ok, other=0.0)), pos, ok

    if n_chunks == 1:
        resident = chunk(0)  # the whole row stays in registers for all passes
        get = lambda c: resident  # noqa: E731
    else:
        get = chunk

    def count_at_least(t):
        def add(c, acc):
            key, _, ok = get(c)
            return acc + jnp.where(ok & (key >= t), 1, 0)
        return jnp.sum(lax.fori_loop(0, n_chunks, add, jnp.zeros((block,), jnp.int32)))

    def bit(state):
        # t holds the answer's bits found so far in the unsigned image (key ^ INT_MIN). Once exactly
        # k keys reach a candidate, it is a valid threshold: {key >= it} are the k largest, and the
        # search stops (for spread-out values after about log2(S) + a few of the 32 passes).
        i, t, _ = state
        cand = t | lax.shift_left(jnp.int32(1), 31 - i)
        c = count_at_least(cand ^ _INT_MIN)
        return i + 1, jnp.where(c >= k, cand, t), (c == k) & early_exit

    _, t, _ = lax.while_loop(lambda state: (state[0] < 32) & ~state[2], bit,
                             (jnp.int32(0), jnp.int32(0), jnp.bool_(False)))
    kth = t ^ _INT_MIN
    room = k - count_at_least(kth + 1)  # ties to keep; kth + 1 cannot overflow for a float's key

    def compact(c, carry):
        kept_before, ties_before = carry
        key, pos, ok = get(c)
        tie = jnp.where(ok & (key == kth), 1, 0)
        keep = ok & ((key > kth) | ((tie == 1) & (ties_before + jnp.cumsum(tie) - tie < room)))
        kept = jnp.where(keep, 1, 0)
        # lanes not kept point past the end, each at its own slot: the store skips them (masked), and
        # the interpreter, which writes every lane, then drops them instead of overwriting slot 0
        dest = jnp.where(keep, kept_before + jnp.cumsum(kept) - kept, k + lane)
        if pieces:
            plgpu.store(out_ref.at[dest], pos + offset, mask=keep)
            plgpu.store(values_ref.at[dest], plgpu.load(score_ref.at[pos], mask=ok, other=0.0), mask=keep)
        elif len(refs) == 2:
            plgpu.store(out_ref.at[dest], plgpu.load(positions_ref.at[pos], mask=ok, other=0), mask=keep)
        else:
            plgpu.store(out_ref.at[dest], pos, mask=keep)
        return kept_before + jnp.sum(kept), ties_before + jnp.sum(tie)

    lax.fori_loop(0, n_chunks, compact, (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("k", "block", "interpret", "early_exit", "splits"))
def top_k_positions(score, k, *, block=None, interpret=False, early_exit=True, splits=None):
    """The positions of the k largest entries of each row of score [..., S] (ties: lowest positions
    first), in increasing position order: sparq_jax.topk.top_k_positions as one program per row.

    Args:
      score: float [..., S] (compared as fp32; NaN is not allowed).
      k: 1 <= k <= S.
      block: positions held at once (a power of two >= 16; default min(S rounded up, 8192)).
      interpret: run in the Pallas interpreter (CPU).
      early_exit: stop the threshold search at a count of exactly k (False: always 32 passes; the
        same result, kept for benchmarks).
      splits: spread each row over this many programs (see _split_top_k); None chooses (_top_k_splits),
        1 is one program per row.

    Returns int32 [..., k].
    """
    _require_triton()
    _check_interpret(interpret)
    if not isinstance(early_exit, bool):
        raise ValueError(f"early_exit={early_exit!r}; expected a bool")
    if score.ndim < 1 or not jnp.issubdtype(score.dtype, jnp.floating):
        raise ValueError(f"score has shape {tuple(score.shape)} and dtype {score.dtype}; expected a float array [..., S]")
    *lead, S = score.shape
    if not isinstance(k, int) or not 1 <= k <= S:
        raise ValueError(f"k={k!r}; expected an int in [1, S={S}]")
    rows = math.prod(lead)
    if splits is None:
        splits = _top_k_splits(rows, S, k)
    elif not isinstance(splits, int) or not 1 <= splits <= S:
        raise ValueError(f"splits={splits!r}; expected an int in [1, S={S}] (or None)")
    if block is not None and (not isinstance(block, int) or block < _MIN_DOT or block & (block - 1)):
        raise ValueError(f"block={block!r}; expected a power of two >= {_MIN_DOT} (or None)")
    score = score.astype(jnp.float32).reshape(rows, S)
    if splits > 1:
        out = _split_top_k(score, k, splits, block=block, interpret=interpret, early_exit=early_exit)
    else:
        out = _top_k_call(score, k, block=block, interpret=interpret, early_exit=early_exit)
    return out.reshape(*lead, k)


def _top_k_call(score, k, *, block, interpret, early_exit, pieces=0, positions=None):
    """The top-k kernel over score fp32 [rows, S], one program per row: out int32 [rows, k], and
    with `pieces` also the kept scores fp32 [rows, k] (see _top_k_kernel)."""
    rows, S = score.shape
    if block is None:
        block = max(_MIN_DOT, min(_TOPK_BLOCK, _pow2(S)))
    kernel = functools.partial(_top_k_kernel, S=S, k=k, block=block, n_chunks=pl.cdiv(S, block),
                               early_exit=early_exit, pieces=pieces)
    row = pl.BlockSpec((None, S), lambda i: (i, 0))
    out = pl.BlockSpec((None, k), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct((rows, k), jnp.int32)
    return pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[row] if positions is None else [row, row],
        out_specs=[out, out] if pieces else out,
        out_shape=[out_shape, jax.ShapeDtypeStruct((rows, k), jnp.float32)] if pieces else out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=8 if block >= 4096 else 4, num_stages=1),
        interpret=interpret,
        name="sparq_top_k",
    )(score, *(() if positions is None else (positions,)))


def _top_k_splits(rows: int, S: int, k: int) -> int:
    """How many programs share a row of the top-k: with few rows (B * Hkv under the SMs of a GPU) and
    rows longer than one resident block, split each into pieces that fit in registers, as long as
    the candidates they keep (splits * min(k, piece)) are fewer than the row."""
    splits = 1
    while (rows * splits < _TARGET_PROGRAMS // 2 and pl.cdiv(S, splits) > _TOPK_BLOCK
           and 2 * splits * min(k, pl.cdiv(S, 2 * splits)) < S):
        splits *= 2
    return splits


def _split_top_k(score, k, splits, *, block, interpret, early_exit):
    """score fp32 [rows, S] -> the k largest of each row (ties: lowest positions), increasing, int32
    [rows, k], with each row spread over `splits` programs.

    Pass 1 takes the k' = min(k, piece) largest of each of the row's `splits` pieces (one program each);
    pass 2 takes the k largest of their k' * splits candidates, one program per row. Exact: an entry
    among the row's k largest has fewer than k entries before it in (value desc, position asc)
    order, so fewer than k' in its piece. The candidates come out of pass 1 piece by piece in
    increasing position order, so pass 2's ties (lowest candidate first) are the row's ties.
    """
    rows, S = score.shape
    piece = pl.cdiv(S, splits)
    # -inf padding sorts after every entry of the row, -inf entries included (higher positions)
    padded = jnp.pad(score, ((0, 0), (0, piece * splits - S)), constant_values=-jnp.inf)
    kk = min(k, piece)
    # pass 1 writes positions in the whole row and the kept scores; pass 2 writes positions[chosen]
    positions, values = _top_k_call(padded.reshape(rows * splits, piece), kk, block=block, interpret=interpret,
                                    early_exit=early_exit, pieces=splits)
    return _top_k_call(values.reshape(rows, splits * kk), k, block=block, interpret=interpret,
                       early_exit=early_exit, positions=positions.reshape(rows, splits * kk))


# ---------------------------------------------------------------------------------------------
# Steps 2 + 3: exact attention over the gathered rows, then mean-value reallocation.

def _gather_attend_kernel(q_ref, k_ref, v_ref, idx_ref, *refs, G, D, K, g_pad, d_pad, block_k, chunks_per_split,
                          finalize, scored, n_blocks, reallocate):
    """One program: one (batch row, KV head, split of the K picked rows), all G query heads.

    Refs: q [G, D]; k, v [S, D]; idx int32 [K]; then either alpha fp32 [G] (idx -1 where not valid),
    or, when scored, approx_scores' z fp32 [G, S] and partials m, l fp32 [G, n_blocks] and bounds
    int32 [4] (valid: first <= idx < length; alpha = s_hat summed over the valid rows, or 1 without
    reallocation); then v_bar fp32 [D]. Outputs: out fp32 [G, D] when finalize, else this split's
    unnormalised partials o fp32 [g_pad, d_pad], m, l fp32 [g_pad] (running max and sum of the
    softmax) and, when scored, its share of alpha fp32 [g_pad].
    """
    if scored:
        z_ref, pm_ref, pl_ref, bounds_ref, v_bar_ref, *out_refs = refs
    else:
        alpha_ref, v_bar_ref, *out_refs = refs
    g = jnp.arange(g_pad)
    g_ok = g < G
    d = jnp.arange(d_pad)
    gd_ok = g_ok[:, None] & (d < D)[None, :]
    q = plgpu.load(q_ref.at[g[:, None], d[None, :]], mask=gd_ok, other=0)
    scale = 1.0 / math.sqrt(D)
    first = pl.program_id(2) * chunks_per_split
    if scored:
        bounds = plgpu.load(bounds_ref.at[jnp.arange(4)])
        lo, hi = (jnp.sum(jnp.where(jnp.arange(4) == i, bounds, 0)) for i in range(2))
        # s_hat = exp(z - top) / total, from approx_scores' per-block partials
        blk = jnp.arange(_pow2(n_blocks))
        part_ok = g_ok[:, None] & (blk < n_blocks)[None, :]
        pm = plgpu.load(pm_ref.at[g[:, None], blk[None, :]], mask=part_ok, other=-jnp.inf)
        pls = plgpu.load(pl_ref.at[g[:, None], blk[None, :]], mask=part_ok, other=0.0)
        top = jnp.max(pm, axis=1)
        top = jnp.where(top == -jnp.inf, 0.0, top)  # padded heads
        total = jnp.sum(pls * jnp.exp(pm - top[:, None]), axis=1)
        total = jnp.where(total > 0, total, 1.0)

    def body(c, carry):
        m, l, acc, covered = carry
        kk = (first + c) * block_k + jnp.arange(block_k)
        rows = plgpu.load(idx_ref.at[kk], mask=kk < K, other=-1)
        ok = (kk < K) & (rows >= lo) & (rows < hi) if scored else rows >= 0
        kd_ok = ok[:, None] & (d < D)[None, :]
        k = plgpu.load(k_ref.at[rows[:, None], d[None, :]], mask=kd_ok, other=0)
        s = jnp.where(ok[None, :], _dot_nt(q, k) * scale, -jnp.inf)  # [g_pad, block_k]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # a chunk with no valid row leaves m at -inf; shifting by 0 then keeps exp() finite
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        correction = jnp.exp(m - m_shift)
        p = jnp.exp(s - m_shift[:, None])
        v = plgpu.load(v_ref.at[rows[:, None], d[None, :]], mask=kd_ok, other=0)
        if scored:
            zr = plgpu.load(z_ref.at[g[:, None], rows[None, :]], mask=g_ok[:, None] & ok[None, :], other=-jnp.inf)
            covered = covered + jnp.sum(jnp.exp(zr - top[:, None]), axis=1) / total
        return m_new, correction * l + jnp.sum(p, axis=1), correction[:, None] * acc + _dot(p, v), covered

    init = (jnp.full((g_pad,), -jnp.inf, jnp.float32), jnp.zeros((g_pad,), jnp.float32),
            jnp.zeros((g_pad, d_pad), jnp.float32), jnp.zeros((g_pad,), jnp.float32))
    m, l, acc, covered = lax.fori_loop(0, chunks_per_split, body, init)
    if finalize:
        (out_ref,) = out_refs
        if scored:
            alpha = covered if reallocate else jnp.ones((g_pad,), jnp.float32)
        else:
            alpha = plgpu.load(alpha_ref.at[g], mask=g_ok, other=1.0)
        v_bar = plgpu.load(v_bar_ref.at[d], mask=d < D, other=0.0)
        y = acc / l[:, None]
        out = alpha[:, None] * y + (1.0 - alpha)[:, None] * v_bar[None, :]
        plgpu.store(out_ref.at[g[:, None], d[None, :]], out, mask=gd_ok)
    else:
        o_ref, m_ref, l_ref, *alpha_out = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l
        if scored:
            alpha_out[0][...] = covered


def _splits(B: int, Hkv: int, n_chunks: int, num_splits) -> int:
    if num_splits is None:
        num_splits = 1
        while num_splits * 2 <= n_chunks and B * Hkv * num_splits < _TARGET_PROGRAMS:
            num_splits *= 2
    elif not isinstance(num_splits, int) or not 1 <= num_splits <= n_chunks:
        raise ValueError(f"num_splits={num_splits!r}; expected an int in [1, {n_chunks}] "
                         f"(the number of block_k chunks of the K picked rows)")
    return num_splits


def _step2_call(q, k, v, idx, middle, middle_specs, v_bar, *, K, block_k, num_splits, interpret, scored,
                n_blocks=0, reallocate=True):
    """The pallas_call of steps 2 + 3 (grid, BlockSpecs, splits) -> out fp32 [B, Hkv, G, D], or the
    splits' partials (o, m, l[, alpha]) when K is split across programs."""
    B, Hkv, G, D = q.shape
    S = k.shape[2]
    if block_k is None:
        block_k = max(_MIN_DOT, min(64, _pow2(K)))
    elif not isinstance(block_k, int) or block_k < _MIN_DOT or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k!r}; expected a power of two >= {_MIN_DOT} (or None)")
    n_chunks = pl.cdiv(K, block_k)
    num_splits = _splits(B, Hkv, n_chunks, num_splits)
    chunks_per_split = pl.cdiv(n_chunks, num_splits)
    num_splits = pl.cdiv(n_chunks, chunks_per_split)  # no split left without a chunk
    g_pad = 1 if G == 1 else max(_MIN_DOT, _pow2(G))
    d_pad = max(_MIN_DOT, _pow2(D))
    _check_tiles("gather_attend", q=(g_pad, d_pad), kv=(block_k, d_pad), logits=(g_pad, block_k),
                 partials=(g_pad, _pow2(max(n_blocks, 1))))
    finalize = num_splits == 1
    kernel = functools.partial(_gather_attend_kernel, G=G, D=D, K=K, g_pad=g_pad, d_pad=d_pad,
                               block_k=block_k, chunks_per_split=chunks_per_split, finalize=finalize,
                               scored=scored, n_blocks=n_blocks, reallocate=reallocate)
    whole = lambda b, h, c: (b, h, 0, 0)  # noqa: E731
    row = lambda b, h, c: (b, h, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, G, D), whole),
        pl.BlockSpec((None, None, S, D), whole),
        pl.BlockSpec((None, None, S, D), whole),
        pl.BlockSpec((None, None, K), row),
        *middle_specs,
        pl.BlockSpec((None, None, D), row),
    ]
    if finalize:
        out_specs = pl.BlockSpec((None, None, G, D), whole)
        out_shape = jax.ShapeDtypeStruct((B, Hkv, G, D), jnp.float32)
    else:
        per_split = pl.BlockSpec((None, None, None, g_pad), lambda b, h, c: (b, h, c, 0))
        out_specs = [pl.BlockSpec((None, None, None, g_pad, d_pad), lambda b, h, c: (b, h, c, 0, 0)),
                     per_split, per_split] + [per_split] * scored
        out_shape = [jax.ShapeDtypeStruct((B, Hkv, num_splits, g_pad, d_pad), jnp.float32)] + \
            [jax.ShapeDtypeStruct((B, Hkv, num_splits, g_pad), jnp.float32)] * (3 if scored else 2)
    return pl.pallas_call(
        kernel,
        grid=(B, Hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="sparq_gather_attend",
    )(q, k, v, idx, *middle, v_bar.astype(jnp.float32))


def _combine_splits(o, m, l, alpha, v_bar, G, D):
    """Combine the splits' partial softmaxes (flash-decoding), then reallocate; a split without a
    valid row has m = -inf and weight 0, and every row has at least one valid entry somewhere."""
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_max)
    y = jnp.sum(w[..., None] * o, axis=2) / jnp.sum(w * l, axis=2)[..., None]
    y = y[:, :, :G, :D]
    return alpha[..., None] * y + (1.0 - alpha[..., None]) * v_bar.astype(jnp.float32)[:, :, None, :]


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "interpret"))
def _gather_attend(q, k, v, i2, valid, alpha, v_bar, *, block_k, num_splits, interpret):
    _require_triton()
    _check_interpret(interpret)
    B, Hkv, G, S, D, K = _check_gather_attend(q, k, v, i2, valid, alpha, v_bar)
    _check_dtypes("gather_attend", q=q, k=k, v=v)
    # one int32 array carries both the positions and the mask: the kernel reads -1 as "not valid"
    idx = jnp.where(valid, i2.astype(jnp.int32), -1)
    alpha = alpha.astype(jnp.float32)
    outs = _step2_call(q, k, v, idx, [alpha], [pl.BlockSpec((None, None, G), lambda b, h, c: (b, h, 0))], v_bar,
                       K=K, block_k=block_k, num_splits=num_splits, interpret=interpret, scored=False)
    if not isinstance(outs, (list, tuple)):
        return outs
    return _combine_splits(*outs, alpha, v_bar, G, D)


@functools.partial(jax.jit, static_argnames=("reallocate", "block_k", "num_splits", "interpret"))
def _gather_attend_scored(q, k, v, i2, z, m, l, bounds, v_bar, *, reallocate, block_k, num_splits, interpret):
    _require_triton()
    _check_interpret(interpret)
    if not isinstance(reallocate, bool):
        raise ValueError(f"reallocate={reallocate!r}; expected a bool")
    B, Hkv, G, D = q.shape
    K = i2.shape[-1]
    # the checks of gather_attend, with valid and alpha stood in by their shapes
    _check_gather_attend(q, k, v, i2, jax.ShapeDtypeStruct((B, Hkv, K), jnp.bool_),
                         jax.ShapeDtypeStruct((B, Hkv, G), jnp.float32), v_bar)
    _check_dtypes("gather_attend_scored", q=q, k=k, v=v)
    S = k.shape[2]
    if z.shape != (B, Hkv, G, S) or z.dtype != jnp.float32:
        raise ValueError(f"z has shape {tuple(z.shape)} and dtype {z.dtype}; expected fp32 [B, Hkv, G, S] = "
                         f"{(B, Hkv, G, S)} (approx_scores' z)")
    if m.ndim != 4 or m.shape[:3] != (B, Hkv, G) or l.shape != m.shape:
        raise ValueError(f"m, l have shapes {tuple(m.shape)}, {tuple(l.shape)}; expected fp32 [B, Hkv, G, n_blocks] "
                         f"with B, Hkv, G = {(B, Hkv, G)} (approx_scores' partials)")
    if bounds.shape != (B, 3) or not jnp.issubdtype(bounds.dtype, jnp.integer):
        raise ValueError(f"bounds has shape {tuple(bounds.shape)} and dtype {bounds.dtype}; expected int32 [B={B}, 3]")
    n_blocks = m.shape[3]
    whole = lambda b, h, c: (b, h, 0, 0)  # noqa: E731
    middle = [z, m.astype(jnp.float32), l.astype(jnp.float32), jnp.pad(bounds.astype(jnp.int32), ((0, 0), (0, 1)))]
    specs = [pl.BlockSpec((None, None, G, S), whole), pl.BlockSpec((None, None, G, n_blocks), whole),
             pl.BlockSpec((None, None, G, n_blocks), whole), pl.BlockSpec((None, 4), lambda b, h, c: (b, 0))]
    outs = _step2_call(q, k, v, i2.astype(jnp.int32), middle, specs, v_bar, K=K, block_k=block_k,
                       num_splits=num_splits, interpret=interpret, scored=True, n_blocks=n_blocks,
                       reallocate=reallocate)
    if not isinstance(outs, (list, tuple)):
        return outs
    o, pm, pls, covered = outs
    alpha = jnp.sum(covered, axis=2)[:, :, :G] if reallocate else jnp.ones((B, Hkv, G), jnp.float32)
    return _combine_splits(o, pm, pls, alpha, v_bar, G, D)


def gather_attend_scored(q, k, v, i2, z, m, l, bounds, v_bar, *, reallocate=True, interpret=False):
    """SparQ steps 2 + 3 after approx_scores and top_k_positions, with step 3's alpha and the valid
    positions found in the kernel: gather_attend(q, k, v, i2, valid, alpha, v_bar) with
    valid = first <= i2 < length (bounds) and alpha = the sum over the valid i2 of
    s_hat = exp(z - M) / L (M, L from the partials m, l), or 1 when not reallocate.

    Args:
      q, k, v, i2, v_bar: as gather_attend's.
      z, m, l: approx_scores' outputs (fp32 [B, Hkv, G, S], [B, Hkv, G, n_blocks] twice).
      bounds: int32 [B, 3], as approx_scores' (the third column is not read).
      reallocate: mean-value reallocation (step 3); False: alpha = 1.
      interpret: run in the Pallas interpreter (CPU).

    Returns fp32 [B, Hkv, G, D]. Each row must have at least one valid position among i2.
    """
    return _gather_attend_scored(q, k, v, i2, z, m, l, bounds, v_bar, reallocate=reallocate, block_k=None,
                                 num_splits=None, interpret=interpret)


def gather_attend(q, k, v, i2, valid, alpha, v_bar, *, interpret=False):
    """SparQ steps 2 + 3, fused: exact attention over the picked rows, then reallocation.

    Args:
      q: [B, Hkv, G, D], the full queries of each group.
      k, v: [B, Hkv, S, D].
      i2: int32 [B, Hkv, K], positions picked for the group (shared by its G query heads).
      valid: bool [B, Hkv, K]; False entries are ignored (padding, positions past the row's
        length). Each row must have at least one True entry.
      alpha: fp32 [B, Hkv, G], the approximate attention mass the picked rows cover (1 = no
        reallocation).
      v_bar: fp32 [B, Hkv, D], the mean of V over the valid positions.
      interpret: run in the Pallas interpreter (CPU).

    Returns:
      fp32 [B, Hkv, G, D]: alpha * softmax(q . K[i2]^T / sqrt(D)) . V[i2] + (1 - alpha) * v_bar,
      the softmax over the valid entries only.

    Grid (B, Hkv, splits): each program gathers its share of the K rows of K and V once, in chunks
    of block_k, for all G query heads, with an online fp32 softmax. K is split across programs only
    when B * Hkv alone gives few programs; the splits' partials are then combined in XLA.
    """
    return _gather_attend(q, k, v, i2, valid, alpha, v_bar, block_k=None, num_splits=None,
                          interpret=interpret)
