"""pallas_kernels: SparQ's two kernels per backend against plain jnp transcriptions, in interpret
mode on CPU (Triton: interpret=True; TPU: pltpu.InterpretParams, which simulates the DMAs), then
end to end: every backend of sparq_jax.backends (its kernels interpreted) against
sparq_jax.sparq.sparq_reference. Kernel-level cases fix the indices, so nothing depends on ties.
Parameter combinations are chosen pairwise, not as a full product.

Compiled tests (names contain "compiled") run only on a GPU or TPU backend and skip elsewhere:
    PYTHONPATH=. python -m pytest tests/test_kernels.py -k compiled -v
"""
import dataclasses
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import UnsupportedShapeError, sparq_gpu, sparq_tpu
from sparq_jax import backends, topk
from sparq_jax.attention import candidate_mask
from sparq_jax.sparq import query_components, sparq, sparq_reference

BACKENDS = {"gpu": sparq_gpu, "tpu": sparq_tpu}
# step 1's S block per backend: a power of two for Triton, a multiple of 128 lanes for Mosaic
BLOCK_S = {"gpu": 64, "tpu": 128}
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}

_TRITON, _NO_TRITON = pallas_kernels.gpu_kernels_available()
needs_triton = pytest.mark.skipif(not _TRITON, reason=_NO_TRITON or "-")
BACKEND_PARAMS = [pytest.param("gpu", marks=needs_triton), "tpu"]
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu" or not _TRITON,
                            reason="needs a GPU backend and the Pallas Triton backend (compiled Triton)")
on_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU backend (compiled Mosaic)")


# --------------------------------------------------------------------------------------------
# References: plain jnp, fp32 (HIGHEST precision, so the CPU's dot is exact fp32)

def ref_approx_logits(q1, k, i1):
    """q1 [B, Hkv, G, r], K [B, Hkv, S, D], i1 [B, Hkv, r] -> [B, Hkv, G, S]."""
    cols = jnp.take_along_axis(k.astype(jnp.float32), i1[:, :, None, :], axis=3)  # [B, Hkv, S, r]
    return jnp.einsum("bhgr,bhsr->bhgs", q1.astype(jnp.float32), cols, precision="highest")


def ref_gather_attend(q, k, v, i2, valid, alpha, v_bar):
    """Gather, masked fp32 softmax, weighted sum, reallocation -> [B, Hkv, G, D]."""
    kg = jnp.take_along_axis(k.astype(jnp.float32), i2[..., None], axis=2)  # [B, Hkv, K, D]
    vg = jnp.take_along_axis(v.astype(jnp.float32), i2[..., None], axis=2)
    # invalid rows may hold anything (NaN here): zero them before the weighted sum
    vg = jnp.where(valid[..., None], vg, 0.0)
    s = jnp.einsum("bhgd,bhkd->bhgk", q.astype(jnp.float32), jnp.where(valid[..., None], kg, 0.0),
                   precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(valid[:, :, None, :], s, -jnp.inf), axis=-1)
    y = jnp.einsum("bhgk,bhkd->bhgd", p, vg, precision="highest")
    a = alpha[..., None]
    return a * y + (1 - a) * v_bar[:, :, None, :]


def assert_close(out, ref, dtype):
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out)), "kernel output holds NaN or inf"
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), rtol=TOL[dtype], atol=TOL[dtype])


# --------------------------------------------------------------------------------------------
# Inputs

def step1_inputs(seed, B, Hkv, G, r, S, D, dtype):
    rng = np.random.default_rng(seed)
    q1 = jnp.asarray(rng.standard_normal((B, Hkv, G, r)), dtype)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    i1 = np.stack([[rng.choice(D, r, replace=False) for _ in range(Hkv)] for _ in range(B)])
    return q1, k, jnp.asarray(i1, jnp.int32)


def step2_inputs(seed, B, Hkv, G, S, D, K, dtype, n_valid, alpha_one, slots=None):
    """n_valid[b][h] valid entries per row, scattered over the K slots (or at slots[(b, h)]).
    Invalid slots point at rows filled with NaN, so a kernel that reads them unmasked fails."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hkv, G, D))
    k = rng.standard_normal((B, Hkv, S, D))
    v = rng.standard_normal((B, Hkv, S, D))
    i2 = np.zeros((B, Hkv, K), np.int32)
    valid = np.zeros((B, Hkv, K), bool)
    for b in range(B):
        for h in range(Hkv):
            n = n_valid[b][h]
            assert 1 <= n <= min(K, S - 1)
            rows = rng.permutation(S)
            good, bad = rows[:n], rows[n:]
            picked = rng.permutation(K)[:n] if slots is None or (b, h) not in slots else slots[(b, h)]
            valid[b, h, picked] = True
            i2[b, h] = rng.choice(bad, K)
            i2[b, h, picked] = good
            k[b, h, bad] = np.nan
            v[b, h, bad] = np.nan
    alpha = np.ones((B, Hkv, G)) if alpha_one else rng.uniform(0.3, 1.0, (B, Hkv, G))
    v_bar = rng.standard_normal((B, Hkv, D))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(i2),
            jnp.asarray(valid), jnp.asarray(alpha, jnp.float32), jnp.asarray(v_bar, jnp.float32))


# --------------------------------------------------------------------------------------------
# Step 1 in interpret mode

STEP1_CASES = [
    # (B, Hkv, G, r, S, D, transposed, dtype): S mostly not a multiple of the block
    (2, 2, 1, 8, 200, 64, True, jnp.float32),
    (1, 2, 4, 16, 256, 64, False, jnp.bfloat16),
    (2, 1, 8, 8, 130, 32, True, jnp.bfloat16),
    (2, 2, 4, 5, 77, 48, True, jnp.float32),     # S below one block; r and D not powers of two
    (1, 2, 1, 8, 200, 64, False, jnp.float32),
    (2, 1, 8, 4, 150, 32, False, jnp.float32),
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", STEP1_CASES, ids=lambda c: f"G{c[2]}-S{c[4]}-{'kt' if c[6] else 'k'}-{jnp.dtype(c[7]).name}")
def test_approx_logits_interpret(backend, case):
    B, Hkv, G, r, S, D, transposed, dtype = case
    q1, k, i1 = step1_inputs(0, B, Hkv, G, r, S, D, dtype)
    keys = jnp.swapaxes(k, 2, 3) if transposed else k
    out = BACKENDS[backend].approx_logits(q1, keys, i1, transposed=transposed, block_s=BLOCK_S[backend],
                                          interpret=True)
    assert out.shape == (B, Hkv, G, S) and out.dtype == jnp.float32
    assert_close(out, ref_approx_logits(q1, k, i1), dtype)


# --------------------------------------------------------------------------------------------
# Steps 2 + 3 in interpret mode

STEP2_CASES = [
    # (B, Hkv, G, S, D, K, dtype, n_valid per (row, head), alpha == 1)
    (2, 2, 1, 200, 64, 40, jnp.float32, [[40, 17], [3, 29]], False),   # ragged
    (1, 2, 4, 128, 64, 64, jnp.bfloat16, [[64, 64]], True),            # all valid, no reallocation
    (2, 1, 8, 96, 32, 48, jnp.float32, [[1], [20]], False),           # K far above the valid count
    (2, 2, 4, 64, 48, 20, jnp.float32, [[20, 5], [11, 20]], True),     # D not a power of two
    (1, 1, 8, 256, 64, 100, jnp.bfloat16, [[60]], False),             # K over one GPU block
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", STEP2_CASES, ids=lambda c: f"G{c[2]}-K{c[5]}-{jnp.dtype(c[6]).name}-alpha{'1' if c[8] else 'x'}")
def test_gather_attend_interpret(backend, case):
    B, Hkv, G, S, D, K, dtype, n_valid, alpha_one = case
    args = step2_inputs(1, B, Hkv, G, S, D, K, dtype, n_valid, alpha_one)
    out = BACKENDS[backend].gather_attend(*args, interpret=True)
    assert out.shape == (B, Hkv, G, D) and out.dtype == jnp.float32
    assert_close(out, ref_gather_attend(*args), dtype)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret mode on an accelerator: XLA's excess-precision rewrite drops the bf16 "
                           "rounding that the hi + lo split relies on (compiled: test_compiled_gpu_fp32_*)")
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fp32_queries_against_bf16_cache_keep_fp32_accuracy(backend):
    """sq.attend passes fp32 queries with a bf16 cache: the products must not round the queries (or
    the softmax weights) to bf16, so the result matches the fp32 reference to the fp32 tolerance."""
    mod = BACKENDS[backend]
    # the noise makes the fp32 queries unrepresentable in bf16, so rounding them would show
    q1, k, i1 = step1_inputs(8, 1, 2, 4, 16, 130, 64, jnp.bfloat16)
    q1 = q1.astype(jnp.float32) + jnp.asarray(np.random.default_rng(9).uniform(-1e-2, 1e-2, q1.shape), jnp.float32)
    out = mod.approx_logits(q1, jnp.swapaxes(k, 2, 3), i1, block_s=BLOCK_S[backend], interpret=True)
    assert_close(out, ref_approx_logits(q1, k, i1), jnp.float32)
    q, k, v, *rest = step2_inputs(10, 1, 2, 4, 96, 64, 40, jnp.bfloat16, [[40, 13]], False)
    q = q.astype(jnp.float32) + jnp.asarray(np.random.default_rng(11).uniform(-1e-2, 1e-2, q.shape), jnp.float32)
    args = (q, k, v, *rest)
    assert_close(mod.gather_attend(*args, interpret=True), ref_gather_attend(*args), jnp.float32)


@needs_triton
@pytest.mark.parametrize("G, num_splits", [(1, 3), (4, 2)])
def test_gpu_gather_attend_split_k_interpret(G, num_splits):
    """K split across programs and combined in XLA, including splits with no valid entry."""
    # 70 slots in chunks of 16 -> 5 chunks; row (0, 0) has its only valid entries in the first
    args = step2_inputs(2, 2, 1, G, 128, 32, 70, jnp.float32, [[3], [50]], False, slots={(0, 0): [0, 5, 9]})
    out = sparq_gpu._gather_attend(*args, block_k=16, num_splits=num_splits, interpret=True)
    assert_close(out, ref_gather_attend(*args), jnp.float32)


# --------------------------------------------------------------------------------------------
# Step 1 fused with the scores between the steps (GPU kernel), against the XLA path

def s_hat_from_partials(z, m, l):
    """NumPy: s_hat = exp(z - M) / L, M and L combined from approx_scores' per-block max and sum of exp."""
    z, m, l = (np.asarray(x, np.float64) for x in (z, m, l))
    top = np.max(m, axis=-1, keepdims=True)
    return np.exp(z - top) / np.sum(l * np.exp(m - top), axis=-1, keepdims=True)


def _scores(backend, q, keys, lengths, window, method, transposed, interpret=False):
    """A backend's scores part: (score [B, Hkv, S], its aux), the mask as attend builds it."""
    import sparq_jax as sq

    k = jnp.swapaxes(keys, 2, 3) if transposed else keys
    cache = sq.KVCache.from_kv(k, k, lengths, transposed_keys=transposed)
    mask = candidate_mask(lengths, cache.max_len, window)
    return backends.get(backend, interpret).scores(q, cache, mask, method=method, window=window)


SCORES_CASES = [
    # (B, Hkv, G, D, S, lengths, window, transposed, dtype, SparQ kwargs): S mostly not a multiple of 64
    (2, 2, 1, 64, 200, [200, 57], None, True, jnp.float32, dict(rank=8, top_k=32, local_window=4)),
    (2, 2, 4, 48, 150, [150, 9], None, False, jnp.float32, dict(rank=5, top_k=16, group_scores="logits")),
    (1, 2, 8, 32, 130, [130], 40, True, jnp.bfloat16, dict(rank=4, top_k=16, local_window=8)),
    (2, 1, 3, 64, 77, [77, 30], 20, True, jnp.bfloat16,
     dict(rank=64, top_k=8, local_window=2, group_scores="logits")),                  # r = D
]


@needs_triton
@pytest.mark.parametrize("case", SCORES_CASES,
                         ids=lambda c: f"G{c[2]}-D{c[3]}-S{c[4]}-w{c[6]}-{'kt' if c[7] else 'k'}-"
                                       f"{jnp.dtype(c[8]).name}-{c[9].get('group_scores', 'softmax')}")
def test_fused_scores_match_xla(case):
    """sparq_gpu.approx_scores (component choice, temperature, scaled logits, per-block softmax partials,
    the "logits" score) through the pallas_gpu backend's scores against the XLA backend's s_hat and score."""
    _check_fused_scores(case, interpret=True)


def _check_fused_scores(case, interpret):
    import sparq_jax as sq

    B, Hkv, G, D, S, lengths, window, transposed, dtype, kwargs = case
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((B, Hkv, G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    keys = jnp.swapaxes(k, 2, 3) if transposed else k
    lengths = jnp.asarray(lengths, jnp.int32)
    method = sq.SparQ(**kwargs)
    mask = candidate_mask(lengths, S, window)
    score, (z, m, l, _) = _scores("pallas_gpu", q, keys, lengths, window, method, transposed, interpret)
    with jax.default_matmul_precision("highest"):  # fp32 products on a GPU too (not tf32)
        want_score, want_s_hat = _scores("xla", q, keys, lengths, window, method, transposed)
    s_hat = np.where(np.asarray(mask)[:, None, None, :], s_hat_from_partials(z, m, l), 0)
    np.testing.assert_allclose(s_hat, np.asarray(want_s_hat), rtol=TOL[dtype], atol=TOL[dtype] / S)
    score, want_score = np.asarray(score), np.asarray(want_score)
    np.testing.assert_array_equal(np.isposinf(score), np.isposinf(want_score))
    np.testing.assert_array_equal(np.isneginf(score), np.isneginf(want_score))
    finite = np.isfinite(want_score)
    np.testing.assert_allclose(score[finite], want_score[finite], rtol=TOL[dtype], atol=TOL[dtype] / S)


@needs_triton
def test_approx_scores_component_choice_ties_and_zero_queries():
    """The r components: |q| summed over the group, ties to the lower component as lax.top_k; a query
    of zeros keeps the temperature sqrt(D) (uniform s_hat), as in the XLA path."""
    import sparq_jax as sq

    B, Hkv, G, D, S = 2, 1, 2, 16, 40
    rng = np.random.default_rng(6)
    q = rng.uniform(-1, 1, (B, Hkv, G, D)).astype(np.float32)
    q[0, 0, :, [12, 1, 5]] = 10.0          # the three largest
    q[0, 0, :, 9] = q[0, 0, :, 3] = [4.0, -2.0]   # then a tie that the cut at r = 4 falls inside
    q[1] = 0.0
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.float32)
    keys = jnp.swapaxes(k, 2, 3)
    lengths = jnp.asarray([S, S], jnp.int32)
    method = sq.SparQ(rank=4, top_k=8)
    i1, _ = query_components(jnp.asarray(q), 4)
    assert 3 in np.asarray(i1)[0, 0] and 9 not in np.asarray(i1)[0, 0]
    bounds = jnp.stack([jnp.zeros_like(lengths), lengths, lengths - 1], axis=-1)
    z, m, l, score = sparq_gpu.approx_scores(jnp.asarray(q), keys, bounds, rank=4, block_s=16, interpret=True)
    assert score is None and z.shape == (B, Hkv, G, S) and m.shape == l.shape == (B, Hkv, G, 3)
    _, want_s_hat = _scores("xla", jnp.asarray(q), keys, lengths, None, method, True)
    s_hat = s_hat_from_partials(z, m, l)
    np.testing.assert_allclose(s_hat, np.asarray(want_s_hat), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(z)[1], 0.0)
    np.testing.assert_allclose(s_hat[1], 1 / S, rtol=1e-6)


SCORED_CASES = [
    # (B, Hkv, G, S, D, K, lengths, window, reallocate, num_splits, dtype)
    (2, 2, 1, 200, 64, 40, [200, 57], None, True, None, jnp.float32),
    (2, 1, 4, 150, 48, 70, [150, 30], 40, True, 3, jnp.float32),    # split K; a row with K above its candidates
    (1, 2, 8, 96, 32, 20, [96], None, False, 2, jnp.bfloat16),
    (2, 2, 3, 64, 32, 16, [64, 9], 5, True, None, jnp.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("case", SCORED_CASES, ids=lambda c: f"G{c[2]}-K{c[5]}-w{c[7]}-r{int(c[8])}-p{c[9]}-{jnp.dtype(c[10]).name}")
def test_gather_attend_scored_interpret(case):
    """Steps 2 + 3 with alpha and the valid positions found in the kernel, against gather_attend's
    reference given the valid positions and alpha computed in NumPy from the same z, m, l."""
    _check_gather_attend_scored(case, interpret=True)


def _check_gather_attend_scored(case, interpret):
    B, Hkv, G, S, D, K, lengths, window, reallocate, num_splits, dtype = case
    rng = np.random.default_rng(13)
    q = jnp.asarray(rng.standard_normal((B, Hkv, G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    lengths = np.asarray(lengths)
    first = np.zeros_like(lengths) if window is None else np.maximum(lengths - window, 0)
    bounds = jnp.asarray(np.stack([first, lengths, lengths - 1], -1), jnp.int32)
    z, m, l, _ = sparq_gpu.approx_scores(q, jnp.swapaxes(k, 2, 3), bounds, rank=4, block_s=32, interpret=interpret)
    # K positions per row: the row's candidates first (at least one), then any others
    i2 = np.stack([[rng.permutation(np.r_[rng.permutation(np.arange(f, n)), rng.permutation(
        np.r_[np.arange(0, f), np.arange(n, S)])][:K]) for _ in range(Hkv)] for f, n in zip(first, lengths)])
    valid = (i2 >= first[:, None, None]) & (i2 < lengths[:, None, None])
    s_hat = s_hat_from_partials(z, m, l)
    alpha = (np.sum(np.where(valid[:, :, None, :], np.take_along_axis(s_hat, i2[:, :, None, :], -1), 0), -1)
             if reallocate else np.ones((B, Hkv, G)))
    v_bar = jnp.asarray(rng.standard_normal((B, Hkv, D)), jnp.float32)
    i2 = jnp.asarray(i2, jnp.int32)
    out = sparq_gpu._gather_attend_scored(q, k, v, i2, z, m, l, bounds, v_bar, reallocate=reallocate, block_k=16,
                                          num_splits=num_splits, interpret=interpret)
    want = ref_gather_attend(q, k, v, i2, jnp.asarray(valid), jnp.asarray(alpha, jnp.float32), v_bar)
    assert out.shape == (B, Hkv, G, D) and out.dtype == jnp.float32
    assert_close(out, want, jnp.float32)


# --------------------------------------------------------------------------------------------
# Top-k between the steps (GPU kernel)

def ref_top_k_positions(x, k):
    """NumPy: the k largest of each row, ties to the lowest positions, in increasing position order."""
    x = np.asarray(x, np.float32)
    return np.sort(np.argsort(-x, axis=-1, kind="stable")[..., :k], axis=-1)


def top_k_scores(seed, shape, ties):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if ties:  # many equal values, forced (+inf) and excluded (-inf) positions, signed zeros
        x = np.round(x * 2) / 2
        x[..., :3] = np.inf
        x[..., -5:] = -np.inf
        x[..., 7] = -0.0
    return x


TOP_K_CASES = [
    # (shape, k, block, ties): block < S visits the row in chunks
    ((3, 200), 17, None, False),
    ((2, 2, 1000), 100, 64, False),
    ((4, 64), 64, None, True),          # k = S
    ((2, 300), 40, 32, True),           # ties straddle chunks
    ((1, 12), 1, None, True),
    ((2, 77), 30, 16, True),
]


@needs_triton
@pytest.mark.parametrize("case", TOP_K_CASES, ids=lambda c: f"S{c[0][-1]}-k{c[1]}-b{c[2]}-{'ties' if c[3] else 'spread'}")
def test_top_k_positions_interpret(case):
    shape, k, block, ties = case
    x = top_k_scores(0, shape, ties)
    for early_exit in (True, False):
        got = sparq_gpu.top_k_positions(jnp.asarray(x), k, block=block, interpret=True, early_exit=early_exit)
        assert got.shape == (*shape[:-1], k) and got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, k))


SPLIT_TOP_K_CASES = [
    # (shape, k, splits, block, ties): pieces of cdiv(S, splits), the last one padded
    ((3, 200), 17, 4, None, False),
    ((2, 301), 40, 3, 32, True),        # ties straddle pieces and chunks
    ((2, 64), 64, 4, None, True),       # k = S: every piece keeps all of itself
    ((1, 100), 90, 8, None, True),      # k above a piece (13)
    ((2, 2, 90), 5, 2, None, True),
]


@needs_triton
@pytest.mark.parametrize("case", SPLIT_TOP_K_CASES, ids=lambda c: f"S{c[0][-1]}-k{c[1]}-p{c[2]}-{'ties' if c[4] else 'spread'}")
def test_top_k_positions_split_interpret(case):
    """Each row spread over several programs (a local top-k per piece, then an exact merge)."""
    shape, k, splits, block, ties = case
    x = top_k_scores(3, shape, ties)
    got = sparq_gpu.top_k_positions(jnp.asarray(x), k, splits=splits, block=block, interpret=True)
    assert got.shape == (*shape[:-1], k) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, k))


def test_top_k_splits_only_few_long_rows():
    from pallas_kernels.sparq_gpu import _top_k_splits

    assert _top_k_splits(8, 32768, 2048) == 4        # B=1, 8 KV heads: pieces of 8192 fit in registers
    assert _top_k_splits(64, 32768, 2048) == 4
    assert _top_k_splits(512, 4096, 128) == 1        # the paper's shape: many short rows
    assert _top_k_splits(8, 32768, 16384) == 1       # the candidates would outnumber the row


@needs_triton
def test_top_k_positions_signed_zeros_tie():
    # the k-th largest is zero: -0.0 and +0.0 are equal, so the lowest positions win (as in NumPy)
    x = np.array([[-0.0, 1.0, 0.0, -0.0, 0.0, -1.0, 2.0, -0.0]], np.float32)
    for k in (3, 4, 5):
        want = ref_top_k_positions(x, k)
        np.testing.assert_array_equal(np.asarray(sparq_gpu.top_k_positions(jnp.asarray(x), k, interpret=True)), want)
        np.testing.assert_array_equal(np.asarray(topk.top_k_positions(jnp.asarray(x), k)), want)


# --------------------------------------------------------------------------------------------
# End to end: every backend against sparq_reference (Algorithm 1 verbatim)

E2E_CASES = [
    # (B, Hq, Hkv, S, D, lengths, transposed_keys, dtype, method kwargs, window)
    (2, 2, 2, 200, 64, [200, 57], True, jnp.float32, dict(rank=8, top_k=32, local_window=4), None),
    (2, 8, 2, 128, 32, [100, 30], False, jnp.bfloat16,
     dict(rank=8, top_k=64, local_window=8, reallocate_mean=False), None),          # top_k > a row's length
    (2, 8, 1, 256, 64, [150, 256], True, jnp.float32, dict(rank=16, top_k=48), 100),  # sliding window
    (2, 6, 2, 96, 32, [96, 41], True, jnp.float32,
     dict(rank=6, top_k=16, local_window=4, group_scores="logits"), None),          # the authors' GQA ranking
]


@pytest.fixture(scope="module")
def sq():
    try:
        import sparq_jax
    except ImportError as e:  # the core package is written alongside these kernels
        pytest.skip(f"sparq_jax does not import yet: {e}")
    return sparq_jax


E2E_IDS = ["G1-kt-f32", "G4-k-bf16", "G8-window-f32", "G3-logits-f32"]


def _attend_inputs(sq, case):
    B, Hq, Hkv, S, D, lengths, transposed, dtype, kwargs, window = case
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), dtype)
    cache = sq.KVCache.from_kv(k, v, jnp.asarray(lengths, jnp.int32), transposed_keys=transposed)
    return q, cache, sq.SparQ(**kwargs)


def _reference(q, cache, method, window):
    """sparq_reference's output for q [B, Hq, D] in q's dtype, as attend returns it."""
    b, hq, d = q.shape
    qg = q.reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, d)
    with jax.default_matmul_precision("highest"):  # fp32 products on a GPU too (not tf32)
        out = sparq_reference(qg, cache, candidate_mask(cache.lengths, cache.max_len, window), method, window)
    return out.reshape(b, hq, d).astype(q.dtype)


def _check_against_reference(sq, case, backend, interpret):
    """attend with impl=backend (the attend-reachable ones), else sparq with that backend directly."""
    B, Hq, Hkv, S, D, lengths, transposed, dtype, kwargs, window = case
    q, cache, method = _attend_inputs(sq, case)
    if backend in ("pallas_gpu", "pallas_tpu"):
        got, _ = sq.attend(q, cache, method, window=window, impl=backend, interpret=interpret)
    else:
        qg = q.reshape(B, Hkv, Hq // Hkv, D)
        mask = candidate_mask(cache.lengths, S, window)
        got = sparq(qg, cache, mask, method, window, backends.get(backend, interpret)).reshape(B, Hq, D).astype(dtype)
    assert got.shape == (B, Hq, D) and got.dtype == dtype
    assert_close(got, _reference(q, cache, method, window), dtype)


@pytest.mark.parametrize("impl", [pytest.param("pallas_gpu", marks=needs_triton), "pallas_tpu"])
@pytest.mark.parametrize("case", E2E_CASES, ids=E2E_IDS)
def test_attend_sparq_matches_reference(sq, impl, case):
    _check_against_reference(sq, case, impl, interpret=True)


@needs_triton
@pytest.mark.parametrize("case", [E2E_CASES[0], E2E_CASES[1]], ids=E2E_IDS[:2])
def test_unfused_gpu_backend_matches_reference(sq, case):
    """The benchmark-only backend of sparq_gpu's separate step-1 and step-2 kernels."""
    _check_against_reference(sq, case, "pallas_gpu_unfused", interpret=True)


@needs_triton
def test_gpu_top_k_is_the_documented_order():
    """The pallas_gpu backend's top-k selects as every other backend's (sparq_jax.topk)."""
    x = top_k_scores(4, (2, 3, 150), ties=True)
    got = backends.get("pallas_gpu", True).top_k(jnp.asarray(x), 20)
    np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, 20))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(backends.get("xla_cpu").top_k(jnp.asarray(x), 20)))


def _failing_gpu_setup(sq, monkeypatch, seed):
    """attend as on a GPU whose Triton backend imports; inputs of a shape no other test uses (so no
    jit cache answers for the kernels) -> (q, cache, method, the reference output)."""
    from sparq_jax import attention

    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(pallas_kernels, "gpu_kernels_available", lambda: (True, ""))
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 40 + seed, 16)), jnp.float32) for _ in range(2))
    cache = sq.KVCache.from_kv(k, v, jnp.asarray([30 + seed], jnp.int32))
    q = jnp.asarray(rng.standard_normal((1, 4, 16)), jnp.float32)
    method = sq.SparQ(4, 8, 2)
    return q, cache, method, _reference(q, cache, method, None)


def _compile_warnings(record):
    return [str(w.message) for w in record if "failed to compile" in str(w.message)]


def test_auto_falls_back_to_xla_when_a_gpu_kernel_fails(sq, monkeypatch):
    """impl="auto" on a GPU: a kernel that fails for any reason (here: a forced error in the fused
    scores kernel) costs one warning naming the error, and XLA runs; impl="pallas_gpu" raises it."""
    q, cache, method, want = _failing_gpu_setup(sq, monkeypatch, seed=1)

    def broken(*args, **kwargs):
        raise RuntimeError("forced kernel failure")

    monkeypatch.setattr(sparq_gpu, "approx_scores", broken)
    with pytest.warns(UserWarning) as record:
        got, _ = sq.attend(q, cache, method)
    (message,) = _compile_warnings(record)
    assert "pallas_gpu" in message and "RuntimeError: forced kernel failure" in message
    assert_close(got, want, jnp.float32)
    with warnings.catch_warnings(record=True) as again:      # known to fail: no second compile, no second warning
        warnings.simplefilter("always")
        assert_close(sq.attend(q, cache, method)[0], want, jnp.float32)
    assert not _compile_warnings(again)
    with pytest.raises(RuntimeError, match="forced kernel failure"):
        sq.attend(q, cache, method, impl="pallas_gpu")


def test_auto_falls_back_under_jit_when_the_gpu_kernels_do_not_lower(sq, monkeypatch):
    """The real kernels, compiled (not interpreted) for a platform that cannot lower them (the CPU
    here), inside an outer jit, where the failure would surface only when the caller's program
    lowers: attend finds it first, warns once and runs XLA."""
    q, cache, method, want = _failing_gpu_setup(sq, monkeypatch, seed=2)
    with pytest.warns(UserWarning) as record:
        got = jax.jit(lambda q, c: sq.attend(q, c, method)[0])(q, cache)
    assert len(_compile_warnings(record)) == 1
    assert_close(got, want, jnp.float32)


def test_group_scores_case_tells_the_rankings_apart(sq):
    """The kernels rank the score that sparq.approx_scores builds, so they follow group_scores
    as XLA does; the "logits" case above checks that only if its inputs select other positions
    under "softmax"."""
    case = E2E_CASES[E2E_IDS.index("G3-logits-f32")]
    q, cache, method = _attend_inputs(sq, case)
    logits, _ = sq.attend(q, cache, method, impl="xla")
    softmax, _ = sq.attend(q, cache, dataclasses.replace(method, group_scores="softmax"), impl="xla")
    assert np.abs(np.asarray(logits) - np.asarray(softmax)).max() > 1e-3


# --------------------------------------------------------------------------------------------
# Lowering for the real backends (runs on CPU: catches what the interpreters accept but Triton or
# Mosaic would not, such as non-power-of-two Triton tensors or misaligned TPU blocks)

def _shape(*s, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(s, dtype)


def _lower(fn, platform, *args):
    if platform != "cuda":
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    # From jax 0.12 the Triton lowering asks which GPU it compiles for (its compute capability); on a
    # host without one, an abstract mesh names the target: an H100.
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("backend, platform", [pytest.param("gpu", "cuda", marks=needs_triton), ("tpu", "tpu")])
@pytest.mark.parametrize("G", [1, 4])
def test_kernels_lower(backend, platform, G):
    mod = BACKENDS[backend]
    B, Hkv, r, S, D, K = 2, 2, 16, 1000, 128, 40
    for transposed in (True, False):
        keys = _shape(B, Hkv, D, S) if transposed else _shape(B, Hkv, S, D)
        text = _lower(lambda q1, keys, i1: mod.approx_logits(q1, keys, i1, transposed=transposed), platform,
                      _shape(B, Hkv, G, r, dtype=jnp.float32), keys, _shape(B, Hkv, r, dtype=jnp.int32))
        assert "custom_call" in text
    step2 = (_shape(B, Hkv, G, D, dtype=jnp.float32), _shape(B, Hkv, S, D), _shape(B, Hkv, S, D),
             _shape(B, Hkv, K, dtype=jnp.int32), _shape(B, Hkv, K, dtype=jnp.bool_),
             _shape(B, Hkv, G, dtype=jnp.float32), _shape(B, Hkv, D, dtype=jnp.float32))
    assert "custom_call" in _lower(mod.gather_attend, platform, *step2)
    if backend == "gpu":  # the split-K variant and the top-k (one block, and in chunks)
        split = lambda *a: sparq_gpu._gather_attend(*a, block_k=16, num_splits=2, interpret=False)  # noqa: E731
        assert "custom_call" in _lower(split, platform, *step2)
        for block, splits in ((None, 1), (256, 1), (None, 4)):
            text = _lower(lambda x: sparq_gpu.top_k_positions(x, K, block=block, splits=splits), platform,
                          _shape(B, Hkv, S, dtype=jnp.float32))
            assert text.count("custom_call") == (1 if splits == 1 else 2)
        for transposed in (True, False):
            keys = _shape(B, Hkv, D, S) if transposed else _shape(B, Hkv, S, D)
            for group_scores in ("softmax", "logits"):
                fused = lambda q, keys, bounds: sparq_gpu.approx_scores(  # noqa: E731
                    q, keys, bounds, rank=r, transposed=transposed, group_scores=group_scores)
                text = _lower(fused, platform, _shape(B, Hkv, G, D, dtype=jnp.float32), keys,
                              _shape(B, 3, dtype=jnp.int32))
                assert "custom_call" in text
        n_blocks = 4
        scored = (_shape(B, Hkv, G, D, dtype=jnp.float32), _shape(B, Hkv, S, D), _shape(B, Hkv, S, D),
                  _shape(B, Hkv, K, dtype=jnp.int32), _shape(B, Hkv, G, S, dtype=jnp.float32),
                  _shape(B, Hkv, G, n_blocks, dtype=jnp.float32), _shape(B, Hkv, G, n_blocks, dtype=jnp.float32),
                  _shape(B, 3, dtype=jnp.int32), _shape(B, Hkv, D, dtype=jnp.float32))
        for num_splits in (1, 2):
            fn = lambda *a: sparq_gpu._gather_attend_scored(  # noqa: E731
                *a, reallocate=True, block_k=16, num_splits=num_splits, interpret=False)
            assert "custom_call" in _lower(fn, platform, *scored)


# --------------------------------------------------------------------------------------------
# Bad input, unsupported shapes, a missing Triton backend

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bad_arguments_name_the_argument(backend):
    mod = BACKENDS[backend]
    q1, k, i1 = _shape(1, 2, 4, 8), _shape(1, 2, 64, 32), _shape(1, 2, 8, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"i1 has shape \(1, 2, 7\)"):
        jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c, transposed=False), q1, k, _shape(1, 2, 7, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"keys has shape \(1, 3, 64, 32\)"):
        jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c), q1, _shape(1, 3, 64, 32), i1)
    with pytest.raises(ValueError, match="q1 .* r <= D=32"):
        jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c, transposed=False),
                       _shape(1, 2, 4, 40), k, _shape(1, 2, 40, dtype=jnp.int32))
    with pytest.raises(ValueError, match="interpret='yes'"):
        jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c, interpret="yes"), q1, _shape(1, 2, 32, 64), i1)
    with pytest.raises(ValueError, match="block_s=100"):
        jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c, block_s=100), q1, _shape(1, 2, 32, 64), i1)
    q, kv = _shape(1, 2, 4, 32), _shape(1, 2, 64, 32)
    i2, valid = _shape(1, 2, 16, dtype=jnp.int32), _shape(1, 2, 16, dtype=jnp.bool_)
    alpha, v_bar = _shape(1, 2, 4, dtype=jnp.float32), _shape(1, 2, 32, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"valid has shape \(1, 2, 16\) and dtype int32"):
        jax.eval_shape(mod.gather_attend, q, kv, kv, i2, i2, alpha, v_bar)
    with pytest.raises(ValueError, match=r"v_bar has shape \(1, 2, 16\)"):
        jax.eval_shape(mod.gather_attend, q, kv, kv, i2, valid, alpha, _shape(1, 2, 16, dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"\bv has shape \(1, 2, 63, 32\)"):
        jax.eval_shape(mod.gather_attend, q, kv, _shape(1, 2, 63, 32), i2, valid, alpha, v_bar)
    if backend == "gpu":
        score = _shape(2, 50, dtype=jnp.float32)
        with pytest.raises(ValueError, match=r"k=51; expected an int in \[1, S=50\]"):
            jax.eval_shape(lambda x: sparq_gpu.top_k_positions(x, 51), score)
        with pytest.raises(ValueError, match="block=48"):
            jax.eval_shape(lambda x: sparq_gpu.top_k_positions(x, 5, block=48), score)
        with pytest.raises(ValueError, match=r"splits=0; expected an int in \[1, S=50\]"):
            jax.eval_shape(lambda x: sparq_gpu.top_k_positions(x, 5, splits=0), score)
        with pytest.raises(ValueError, match=r"score has shape \(2, 50\) and dtype int32"):
            jax.eval_shape(lambda x: sparq_gpu.top_k_positions(x, 5), _shape(2, 50, dtype=jnp.int32))
        q, keys, bounds = _shape(1, 2, 4, 32, dtype=jnp.float32), _shape(1, 2, 32, 64), _shape(1, 3, dtype=jnp.int32)
        fused = lambda rank=4, **kw: lambda a, b, c: sparq_gpu.approx_scores(a, b, c, rank=rank, **kw)  # noqa: E731
        with pytest.raises(ValueError, match=r"rank=33; expected an int in \[1, D=32\]"):
            jax.eval_shape(fused(33), q, keys, bounds)
        with pytest.raises(ValueError, match=r"bounds has shape \(2, 3\)"):
            jax.eval_shape(fused(), q, keys, _shape(2, 3, dtype=jnp.int32))
        with pytest.raises(ValueError, match="group_scores='max'"):
            jax.eval_shape(fused(group_scores="max"), q, keys, bounds)
        with pytest.raises(ValueError, match=r"keys has shape \(1, 2, 64, 32\)"):
            jax.eval_shape(fused(), q, _shape(1, 2, 64, 32), bounds)   # K^T [D=32, S] expected


@needs_triton
def test_unsupported_shapes_raise_unsupported_shape_error():
    # a Triton tile over 2**20 elements: [pad(r) = 16, block_s = 2**17]
    with pytest.raises(UnsupportedShapeError, match=r"keys tile \(16, 131072\)"):
        jax.eval_shape(lambda a, b, c: sparq_gpu.approx_logits(a, b, c, block_s=2**17), _shape(1, 1, 1, 16),
                       _shape(1, 1, 64, 2**17), _shape(1, 1, 16, dtype=jnp.int32))
    # TPU: K = 16384 gathered rows of D = 128 do not fit the VMEM budget
    K = 16384
    with pytest.raises(UnsupportedShapeError, match="VMEM"):
        jax.eval_shape(sparq_tpu.gather_attend, _shape(1, 1, 1, 128), _shape(1, 1, K, 128), _shape(1, 1, K, 128),
                       _shape(1, 1, K, dtype=jnp.int32), _shape(1, 1, K, dtype=jnp.bool_),
                       _shape(1, 1, 1, dtype=jnp.float32), _shape(1, 1, 128, dtype=jnp.float32))
    for mod in (sparq_gpu, sparq_tpu):
        with pytest.raises(UnsupportedShapeError, match="q1 has dtype float8_e4m3fn"):
            jax.eval_shape(lambda a, b, c: mod.approx_logits(a, b, c), _shape(1, 1, 1, 8, dtype=jnp.float8_e4m3fn),
                           _shape(1, 1, 32, 64), _shape(1, 1, 8, dtype=jnp.int32))


def test_missing_triton_backend_raises_a_clear_error(monkeypatch):
    ok, reason = pallas_kernels.gpu_kernels_available()
    assert ok == (reason == ""), (ok, reason)
    if ok:  # simulate a jax without it
        reason = "no Triton backend in this jax"
        monkeypatch.setattr(sparq_gpu, "_AVAILABLE", False)
        monkeypatch.setattr(sparq_gpu, "_UNAVAILABLE_REASON", reason)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        # a shape not traced before, so jit's cache cannot answer for the kernel
        sparq_gpu.approx_logits(jnp.ones((1, 1, 1, 3)), jnp.ones((1, 1, 8, 24)), jnp.zeros((1, 1, 3), jnp.int32),
                                interpret=True)


# --------------------------------------------------------------------------------------------
# Compiled (GPU / TPU only): the interpret cases again, then the paper's shape

COMPILED_SHAPES = [
    # (B, Hkv, G, r, S, D, K, dtype)
    (2, 2, 4, 16, 1000, 64, 40, jnp.float32),
    (4, 8, 1, 32, 4096, 128, 128, jnp.bfloat16),   # the paper's Table 4 shape, fewer rows
    (2, 2, 8, 16, 8192, 128, 1024, jnp.bfloat16),  # long context, few programs: split K
]


def _compiled_check(mod, case, block_s):
    B, Hkv, G, r, S, D, K, dtype = case
    for transposed in (True, False):
        q1, k, i1 = step1_inputs(4, B, Hkv, G, r, S, D, dtype)
        keys = jnp.swapaxes(k, 2, 3) if transposed else k
        out = mod.approx_logits(q1, keys, i1, transposed=transposed, block_s=block_s)
        assert_close(out, ref_approx_logits(q1, k, i1), dtype)
    rng = np.random.default_rng(5)
    n_valid = [[int(rng.integers(1, K + 1)) for _ in range(Hkv)] for _ in range(B)]
    args = step2_inputs(6, B, Hkv, G, S, D, K, dtype, n_valid, alpha_one=False)
    assert_close(mod.gather_attend(*args), ref_gather_attend(*args), dtype)


@on_gpu
@pytest.mark.parametrize("case", COMPILED_SHAPES)
def test_compiled_gpu(case):
    _compiled_check(sparq_gpu, case, block_s=None)


@on_gpu
@pytest.mark.parametrize("shape, k, ties", [((64, 4096), 128, False), ((8, 32768), 2048, False),
                                            ((4, 8192), 1000, True), ((3, 40000), 5000, True)])
def test_compiled_gpu_top_k(shape, k, ties):
    x = top_k_scores(12, shape, ties)
    for early_exit, splits in ((True, None), (False, None), (True, 1), (True, 4)):
        got = sparq_gpu.top_k_positions(jnp.asarray(x), k, early_exit=early_exit, splits=splits)
        np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, k))


@on_gpu
def test_compiled_gpu_fp32_queries_against_bf16_cache():
    """The fp32 query's hi + lo split must survive compilation (see _matmul)."""
    q1, k, i1 = step1_inputs(8, 2, 2, 4, 16, 1000, 128, jnp.bfloat16)
    q1 = q1.astype(jnp.float32) + jnp.asarray(np.random.default_rng(9).uniform(-1e-2, 1e-2, q1.shape), jnp.float32)
    assert_close(sparq_gpu.approx_logits(q1, jnp.swapaxes(k, 2, 3), i1), ref_approx_logits(q1, k, i1), jnp.float32)
    q, k, v, *rest = step2_inputs(10, 2, 2, 4, 500, 128, 200, jnp.bfloat16, [[200, 13], [77, 150]], False)
    q = q.astype(jnp.float32) + jnp.asarray(np.random.default_rng(11).uniform(-1e-2, 1e-2, q.shape), jnp.float32)
    args = (q, k, v, *rest)
    assert_close(sparq_gpu.gather_attend(*args), ref_gather_attend(*args), jnp.float32)


@on_gpu
@pytest.mark.parametrize("case", SCORES_CASES)
def test_compiled_gpu_fused_scores(case):
    _check_fused_scores(case, interpret=False)


@on_gpu
@pytest.mark.parametrize("case", SCORED_CASES)
def test_compiled_gpu_gather_attend_scored(case):
    _check_gather_attend_scored(case, interpret=False)


@on_gpu
def test_compiled_gpu_split_k():
    args = step2_inputs(7, 2, 1, 4, 512, 64, 300, jnp.bfloat16, [[3], [290]], False)
    assert_close(sparq_gpu._gather_attend(*args, block_k=32, num_splits=4, interpret=False),
                 ref_gather_attend(*args), jnp.bfloat16)


@on_gpu
@pytest.mark.parametrize("case", E2E_CASES, ids=E2E_IDS)
def test_compiled_gpu_attend_matches_reference(sq, case):
    _check_against_reference(sq, case, "pallas_gpu", interpret=False)


@on_tpu
@pytest.mark.parametrize("case", COMPILED_SHAPES)
def test_compiled_tpu(case):
    _compiled_check(sparq_tpu, case, block_s=None)
