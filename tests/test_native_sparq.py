"""The cpu_fused backend (sparq_jax.native.sparq_fused: all of SparQ's Algorithm 1 in one XLA:CPU
custom call) against sparq_reference, the float64 NumPy transcription of the paper (test_core.np_sparq)
and the XLA:CPU backend's chosen positions; and that attend takes it on CPU when the library builds."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparq_jax as sq
from sparq_jax import attention, backends, native, stages
from sparq_jax.attention import candidate_mask
from sparq_jax.sparq import sparq, sparq_reference
from test_core import np_sparq

has_compiler = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not has_compiler or jax.default_backend() != "cpu",
                                reason="the native kernel needs a C++ compiler and runs on the CPU backend")

_run = jax.jit(sparq, static_argnames=("method", "window", "backend"))
_reference = jax.jit(sparq_reference, static_argnames=("method", "window"))


@functools.partial(jax.jit, static_argnames=("method", "window", "backend"))
def _positions(qg, cache, mask, method, window, backend):
    """i2 as sparq() gets it from a backend: its scores part, then its top_k part."""
    score, _ = backend.scores(qg, cache, mask, method=method, window=window)
    return backend.top_k(score, min(method.top_k, cache.max_len))

# (Hq, Hkv, S, D, lengths, SparQ kwargs, window): MHA, GQA G = 3, 4, 8, both group rankings, sliding
# windows, ragged rows (one of length 1), k near S and past a row's length, D not a multiple of 16.
CASES = [
    (4, 4, 80, 16, [80, 37, 1], dict(rank=4, top_k=8), None),
    (9, 3, 300, 64, [300, 123, 7], dict(rank=8, top_k=32, local_window=8), None),
    (9, 3, 300, 64, [290, 200, 64], dict(rank=8, top_k=32, local_window=8, group_scores="logits",
                                         reallocate_mean=False), None),
    (8, 2, 96, 32, [96, 41, 5], dict(rank=6, top_k=16, local_window=4, group_scores="logits"), None),
    (8, 2, 128, 24, [128, 100, 30], dict(rank=5, top_k=20, local_window=2), 40),
    (8, 1, 64, 16, [64, 37, 9], dict(rank=6, top_k=16, local_window=4, reallocate_mean=False), None),
    (8, 1, 256, 64, [256, 150, 90], dict(rank=16, top_k=48), 100),
    (4, 2, 50, 16, [50, 49, 3], dict(rank=16, top_k=49, local_window=1), None),      # k = S - 1
    (6, 2, 40, 8, [40, 17, 2], dict(rank=3, top_k=40, group_scores="logits"), 30),  # k = S
]
IDS = ["mha", "g3", "g3-logits", "g4-logits", "g4-window", "g8", "g8-window", "k=S-1", "k=S-window"]


def _inputs(case, dtype, transposed, seed=0):
    hq, hkv, s, d, lengths, kwargs, window = case
    rng = np.random.default_rng(seed)
    b = len(lengths)
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    cache = sq.KVCache.from_kv(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths, jnp.int32),
                               transposed_keys=transposed)
    return q, cache, sq.SparQ(**kwargs), window


def _grouped(q, cache):
    b, hq, d = q.shape
    return jnp.asarray(q).reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, d)


# every case in fp32, those with a bfloat16 cache as well
PARAMS = [pytest.param(case, jnp.float32, id=f"{name}-f32") for case, name in zip(CASES, IDS)] + [
    pytest.param(CASES[i], jnp.bfloat16, id=f"{IDS[i]}-bf16") for i in (1, 3, 5, 8)]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_fused_matches_the_reference_numpy_and_xla_cpu(case, dtype):
    transposed = case not in (CASES[5], CASES[8])  # these read K itself (no K^T)
    q, cache, method, window = _inputs(case, dtype, transposed)
    qg, mask = _grouped(q, cache), candidate_mask(cache.lengths, cache.max_len, window)
    got = np.asarray(_run(qg, cache, mask, method=method, window=window, backend=backends.get("cpu_fused")))
    want = np.asarray(_reference(qg, cache, mask, method=method, window=window))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # The paper in float64 on the cache's values (bfloat16-rounded where the cache is bfloat16).
    k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (cache.k, cache.v))
    paper = np_sparq(q, k64, v64, np.asarray(cache.lengths), method.rank, method.top_k, method.local_window,
                     method.reallocate_mean, window, group_scores=method.group_scores)
    np.testing.assert_allclose(got.reshape(q.shape), paper, atol=2e-5, rtol=1e-5)
    # The same positions as the XLA:CPU backend, in the same (increasing) order.
    if dtype == jnp.bfloat16:
        return  # (the outputs above cover it; the fp32 cases compare the positions)
    np.testing.assert_array_equal(_positions(qg, cache, mask, method, window, backends.get("cpu_fused")),
                                  _positions(qg, cache, mask, method, window, backends.get("xla_cpu")))


def test_ties_go_to_the_lowest_positions():
    """Keys repeated in runs of 4 positions tie exactly in step 1; the k-th place falls inside a run."""
    rng = np.random.default_rng(5)
    b, hkv, g, s, d = 2, 2, 3, 96, 16
    base = rng.standard_normal((b, hkv, s // 4, d)).astype(np.float32)
    k = np.repeat(base, 4, axis=2)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    q = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
    cache = sq.KVCache.from_kv(jnp.asarray(k), jnp.asarray(v), jnp.asarray([96, 70], jnp.int32))
    for method in (sq.SparQ(rank=4, top_k=18, local_window=1), sq.SparQ(rank=4, top_k=18, group_scores="logits")):
        qg, mask = _grouped(q, cache), candidate_mask(cache.lengths, s, None)
        out = _run(qg, cache, mask, method=method, window=None, backend=backends.get("cpu_fused"))
        i2 = np.asarray(_positions(qg, cache, mask, method, None, backends.get("cpu_fused")))
        np.testing.assert_array_equal(i2, _positions(qg, cache, mask, method, None, backends.get("xla_cpu")))
        # The runs split by the k-th place keep their first positions: some run is cut short.
        assert any(len(set(row.tolist()) & set(range(4 * (p // 4), 4 * (p // 4) + 4))) not in (0, 4)
                   for row in i2.reshape(-1, i2.shape[-1]) for p in row)
        if method.group_scores == "softmax":  # (one reference compile is enough here)
            np.testing.assert_allclose(out, _reference(qg, cache, mask, method=method, window=None), atol=2e-6,
                                       rtol=1e-5)


@pytest.mark.parametrize("group_scores", ["softmax", "logits"])
def test_an_arbitrary_mask(group_scores):
    """sparq() with a mask that is not a span (holes inside it): the kernel reads the mask itself.
    (sparq()'s v_bar is the cache's running mean, not the mask's: reallocation is compared with the
    XLA:CPU backend, which shares it, and the rest with sparq_reference.)"""
    rng = np.random.default_rng(7)
    q, cache, _, _ = _inputs(CASES[1], jnp.float32, True, seed=2)
    mask = jnp.asarray(rng.random((3, 300)) < 0.6) & candidate_mask(cache.lengths, 300, None)
    mask = mask.at[:, 0].set(True)
    qg = _grouped(q, cache)
    for reallocate, want in ((False, _reference), (True, functools.partial(_run, backend=backends.get("xla_cpu")))):
        method = sq.SparQ(rank=8, top_k=40, local_window=5, group_scores=group_scores, reallocate_mean=reallocate)
        got = _run(qg, cache, mask, method=method, window=None, backend=backends.get("cpu_fused"))
        np.testing.assert_allclose(got, want(qg, cache, mask, method=method, window=None), atol=2e-6, rtol=1e-5)


def _lowered(q, cache, method, **kwargs):
    return jax.jit(lambda q, c: sq.attend(q, c, method, **kwargs)[0]).lower(q, cache).as_text()


def test_attend_takes_the_native_kernel_on_cpu(monkeypatch):
    q, cache, method, _ = _inputs(CASES[1], jnp.float32, True)
    assert native.available() == (True, "")
    assert "sparq_jax_sparq_fused" in _lowered(q, cache, method)
    assert "sparq_jax_sparq_fused" in _lowered(q, cache, method, impl="cpu_fused")
    assert "sparq_jax_sparq_fused" not in _lowered(q, cache, method, impl="xla")
    out, _ = sq.attend(q, cache, method)
    xla, _ = sq.attend(q, cache, method, impl="xla")
    np.testing.assert_allclose(out, xla, atol=2e-6, rtol=1e-5)
    # Without the library (or with a cache dtype it does not read) auto keeps XLA:CPU.
    f16 = sq.KVCache.from_kv(cache.k.astype(jnp.float16), cache.v.astype(jnp.float16), cache.lengths)
    assert attention._resolve_backend("auto", method, False, q, f16)[0].name == "xla_cpu"
    monkeypatch.setattr(native, "available", lambda: (False, "disabled for this test"))
    assert attention._resolve_backend("auto", method, False, q, cache)[0].name == "xla_cpu"
    assert "sparq_jax_sparq_fused" not in _lowered(q, cache, sq.SparQ(rank=8, top_k=33))


def test_recorded_parts():
    """record=True: the native call is the "scores" part (its score: the chosen positions), the
    other parts pass its results on; the output is the unrecorded one."""
    q, cache, method, _ = _inputs(CASES[3], jnp.float32, True)
    out, parts = stages.run(q, cache, method, backend="cpu_fused")
    assert list(parts) == ["scores", "top-k", "v_bar", "steps 2+3"]
    i2, fused_out = parts["scores"].out
    np.testing.assert_array_equal(parts["top-k"].out, i2)
    np.testing.assert_array_equal(parts["steps 2+3"].out, fused_out)
    np.testing.assert_array_equal(out, sq.attend(q, cache, method, impl="cpu_fused")[0])


def test_bad_arguments_are_refused_naming_them():
    q, cache, method, _ = _inputs(CASES[1], jnp.float32, True)
    with pytest.raises(ValueError, match="cpu_fused.*SparQ only"):
        sq.attend(q, cache, sq.Dense(), impl="cpu_fused")
    f16 = sq.KVCache.from_kv(cache.k.astype(jnp.float16), cache.v.astype(jnp.float16), cache.lengths)
    with pytest.raises(ValueError, match="cpu_fused.*float16"):
        sq.attend(q, f16, method, impl="cpu_fused")
    qg, mask, zeros = _grouped(q, cache), candidate_mask(cache.lengths, 300, None), jnp.zeros((3, 3, 64))
    with pytest.raises(ValueError, match="keys"):
        native.sparq_fused(qg, cache.k, cache.k, cache.v, mask, cache.lengths, zeros, rank=8, top_k=8,
                           local_window=0, group_scores="softmax", reallocate=False, transposed=True)
    with pytest.raises(ValueError, match="top_k"):
        native.sparq_fused(qg, cache.kt, cache.k, cache.v, mask, cache.lengths, zeros, rank=8, top_k=301,
                           local_window=0, group_scores="softmax", reallocate=False, transposed=True)
    with pytest.raises(ValueError, match="group_scores"):
        native.sparq_fused(qg, cache.kt, cache.k, cache.v, mask, cache.lengths, zeros, rank=8, top_k=8,
                           local_window=0, group_scores="sum", reallocate=False, transposed=True)


def test_the_package_ships_every_file_the_build_reads():
    """The library is compiled from the installed files: each source and included file must match the
    package data of sparq_jax.native (pyproject.toml), or a wheel install would build nothing."""
    import fnmatch
    import os
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["sparq_jax.native"]
    for path in native._SOURCES + native._HEADERS:
        assert os.path.exists(path) and any(fnmatch.fnmatch(os.path.basename(path), p) for p in patterns), path
