"""Prefill's native causal attention (sparq_jax.native.flash_attention, flash_cpu.cc) against a naive
float64 NumPy transcription of the masking rules and against the XLA path it replaces
(models.llama.attend_blocks with native=False); the model-level checks against transformers
(test_models, test_real_model) run through it too."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparq_jax as sq
from models import llama

has_compiler = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not has_compiler or jax.default_backend() != "cpu",
                                reason="the native kernel needs a C++ compiler and runs on the CPU backend")

# fp32 against float64: each output is a softmax-weighted mean of <= S values of size ~1, every sum in
# fp32 (relative rounding ~6e-8 per operation, grown by sums of a few hundred terms): 1e-5 is ~100x
# the rounding and far below any masking or indexing mistake (which moves outputs by ~0.1).
ATOL = 1e-5


def np_causal(q, k, v, key_valid, key_pos, q_pos, start, window):
    """float64: q [B, Tq, Hq, D], k, v [B, Hkv, S, D] -> [B, Tq, Hq, D], one query at a time."""
    b, tq, hq, d = q.shape
    hkv = k.shape[1]
    out = np.zeros((b, tq, hq, d))
    for r in range(b):
        for i in range(tq):
            seen = [s for s in range(min(k.shape[2], start + i + 1)) if key_valid[r, s]
                    and (window is None or q_pos[r, i] - key_pos[r, s] < window)]
            if not seen:
                continue
            for h in range(hq):
                kk, vv = k[r, h // (hq // hkv), seen], v[r, h // (hq // hkv), seen]
                z = kk @ q[r, i, h] / np.sqrt(d)
                p = np.exp(z - z.max())
                out[r, i, h] = p @ vv / p.sum()
    return out


def _inputs(b, tq, hq, hkv, s, d, pad, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    mask = np.ones((b, s), np.int32)
    mask[0, :pad] = 0                                   # left padding on row 0
    valid, pos = (np.asarray(x) for x in llama.prompt_positions(jnp.asarray(mask)))
    return q, k, v, valid, pos


# (B, Tq, Hq, Hkv, S, D, left pad, start, window): a whole prompt (start 0, Tq = S), GQA G = 1, 3, 7,
# D = 16, 64, 96 (not a multiple of 64), 128; chunks of a longer buffer (start > 0); a sliding window;
# Tq not a multiple of the 64-query tile; a padded row whose first queries see no key.
CASES = [
    (2, 100, 4, 4, 100, 16, 30, 0, None),
    (1, 300, 9, 3, 300, 64, 0, 0, None),
    (2, 70, 14, 2, 200, 64, 45, 64, None),
    (2, 130, 6, 2, 400, 96, 17, 200, None),
    (1, 257, 4, 2, 257, 128, 0, 0, None),
    (2, 200, 8, 2, 200, 32, 20, 0, 50),
    (2, 64, 4, 1, 512, 64, 100, 256, 130),
]
IDS = ["mha-pad", "g3", "g7-chunk", "d96-chunk", "d128-odd", "window", "window-chunk"]


def _check(got, q, k, v, valid, pos, q_pos, start, window):
    """got against the float64 transcription on the same (possibly bfloat16) values. With bfloat16 k, v
    the kernel rounds P to bfloat16 for P V (as transformers' bfloat16 attention): each weight moves by
    at most 2^-9 of itself, so each output by at most 2^-9 max|v|, added to fp32's ATOL."""
    want = np_causal(*(np.asarray(x, np.float64) for x in (q, k, v)), valid, pos, q_pos, start, window)
    assert np.isfinite(got).all()
    round_p = jnp.dtype(v.dtype) == jnp.bfloat16
    seen = np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))]
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL + (2.0 ** -9 * np.abs(seen).max() if round_p else 0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flash_matches_float64(case, dtype):
    """Every dtype path: fp32, and bfloat16 q, k, v (AVX512-BF16's products where the CPU has them)."""
    b, tq, hq, hkv, s, d, pad, start, window = case
    q, k, v, valid, pos = _inputs(b, tq, hq, hkv, s, d, pad)
    q_pos = pos[:, start:start + tq]
    # keys past the last query hold garbage that must never be read (a chunk's unwritten buffer)
    last = start + tq
    k[:, :, last:], v[:, :, last:] = np.nan, np.inf
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    got = np.asarray(jax.jit(sq.native.flash_attention, static_argnames="window")(
        q, k, v, valid, pos, q_pos, start, window=window))
    _check(got, q, k[:, :, :last], v[:, :, :last], valid[:, :last], pos[:, :last], q_pos, start, window)
    if pad > start:                                     # row 0's padded queries see nothing: exactly 0
        assert not np.any(got[0, :pad - start])


@pytest.mark.parametrize("dtypes", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_flash_mixed_dtypes(dtypes):
    """bfloat16 q with fp32 k, v and the reverse: widened exactly, fp32 products."""
    q, k, v, valid, pos = _inputs(2, 150, 6, 2, 150, 64, 21, seed=1)
    qd, kd = (jnp.dtype(t) for t in dtypes)
    qj, kj, vj = jnp.asarray(q, qd), jnp.asarray(k, kd), jnp.asarray(v, kd)
    _check(np.asarray(sq.native.flash_attention(qj, kj, vj, valid, pos, pos, 0)), qj, kj, vj, valid, pos, pos, 0, None)


def test_flash_bfloat16_rounds_p_as_transformers():
    """The bfloat16 path's P V: against a float64 transcription that rounds P to bfloat16 too, all but
    the rare weights that sit within fp32 rounding of a bfloat16 rounding boundary agree to fp32's
    tolerance (and without rounding P, far fewer do: the rounding is really there)."""
    import ml_dtypes
    q, k, v, valid, pos = _inputs(1, 200, 4, 2, 200, 64, 0, seed=3)
    qj, kj, vj = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got = np.asarray(sq.native.flash_attention(qj, kj, vj, valid, pos, pos, 0))
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (qj, kj, vj))
    want = np.zeros_like(got, np.float64)
    for i in range(200):
        for h in range(4):
            z = k64[0, h // 2, :i + 1] @ q64[0, i, h] / 8.0
            p = np.exp(z - z.max())
            want[0, i, h] = p.astype(ml_dtypes.bfloat16).astype(np.float64) @ v64[0, h // 2, :i + 1] / p.sum()
    close = np.abs(got - want) <= ATOL
    assert close.mean() > 0.999, close.mean()
    unrounded = np_causal(q64, k64, v64, valid, pos, pos, 0, None)
    assert (np.abs(got - unrounded) <= ATOL).mean() < 0.9


@pytest.mark.parametrize("window", [None, 37])
def test_attend_blocks_native_equals_xla(window):
    """attend_blocks takes the native call on CPU; it agrees with its own XLA blocks (native=False),
    for a whole prompt and for a chunk of a longer buffer (prefill_chunk's call)."""
    b, t, hq, hkv, d, c = 2, 256, 6, 2, 32, 64
    q, k, v, valid, pos = _inputs(b, t, hq, hkv, t, d, 40, seed=2)
    for first, nq in ((0, 4), (2, 1)):
        qs = q[:, first * c:(first + nq) * c]
        qp, qv = pos[:, first * c:(first + nq) * c], valid[:, first * c:(first + nq) * c]
        outs = [np.asarray(llama.attend_blocks(qs, k, v, valid, pos, qp, qv, window, first, c, native=native)[0])
                for native in (True, False)]
        np.testing.assert_allclose(outs[0], outs[1], atol=ATOL, rtol=0)


def test_flash_rejects_bad_shapes():
    q, k, v, valid, pos = _inputs(1, 32, 4, 2, 32, 16, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        sq.native.flash_attention(q[..., :8], k[..., :8], v[..., :8], valid, pos, pos, 0)
    with pytest.raises(ValueError, match=r"Hkv dividing Hq"):
        sq.native.flash_attention(q[:, :, :3], k, v, valid, pos, pos, 0)
    with pytest.raises(ValueError, match="key_valid"):
        sq.native.flash_attention(q, k, v, valid[:, :10], pos, pos, 0)
    with pytest.raises(ValueError, match="window"):
        sq.native.flash_attention(q, k, v, valid, pos, pos, 0, window=0)
    assert not sq.native.flash_applies(q[..., :8], k[..., :8])
