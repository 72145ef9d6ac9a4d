"""The native CPU top-k (sparq_jax.native, an XLA FFI custom call) against NumPy and the XLA top-k."""
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparq_jax import attention, native

has_compiler = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))
needs_native = pytest.mark.skipif(not has_compiler or jax.default_backend() != "cpu",
                                  reason="the native top-k needs a C++ compiler and runs on the CPU backend")


def ref_top_k_positions(x, k):
    """NumPy: the k largest of each row, ties to the lowest positions, in increasing position order."""
    x = np.asarray(x, np.float32)
    return np.sort(np.argsort(-x, axis=-1, kind="stable")[..., :k], axis=-1)


def scores(seed, shape, kind):
    rng = np.random.default_rng(seed)
    if kind == "softmax":  # what SparQ ranks: small positive values over many octaves, a forced window
        x = np.exp(2 * rng.standard_normal(shape)).astype(np.float32)
        x /= x.sum(-1, keepdims=True)
        x[..., -9:] = np.inf
        return x
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # many equal values, forced (+inf) and excluded (-inf) positions, signed zeros
        x = np.round(x * 2) / 2
        x[..., :3] = np.inf
        x[..., -5:] = -np.inf
        x[..., 7::11] = -0.0
    return x


CASES = [
    ((32, 32768), 2048, "softmax"),
    ((2, 3, 5000), 313, "softmax"),
    ((3, 200), 17, "spread"),
    ((4, 64), 64, "ties"),       # k = S
    ((2, 301), 40, "ties"),      # S not a multiple of 16
    ((1, 12), 1, "ties"),
    ((5, 1), 1, "spread"),
    ((2, 77), 30, "ties"),
]


@needs_native
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0][-1]}-k{c[1]}-{c[2]}")
def test_native_top_k_matches_numpy_and_xla(case):
    shape, k, kind = case
    x = scores(0, shape, kind)
    assert native.available() == (True, "")
    got = np.asarray(jax.jit(lambda x: native.top_k_positions(x, k))(jnp.asarray(x)))
    assert got.shape == (*shape[:-1], k) and got.dtype == np.int32
    np.testing.assert_array_equal(got, ref_top_k_positions(x, k))
    np.testing.assert_array_equal(got, np.asarray(attention.top_k_positions(jnp.asarray(x), k)))


@needs_native
def test_native_top_k_signed_zeros_and_all_equal():
    x = np.array([[-0.0, 1.0, 0.0, -0.0, 0.0, -1.0, 2.0, -0.0]], np.float32)
    for k in (3, 4, 5, 8):
        np.testing.assert_array_equal(np.asarray(native.top_k_positions(jnp.asarray(x), k)), ref_top_k_positions(x, k))
    same = np.full((3, 40), 0.25, np.float32)
    np.testing.assert_array_equal(np.asarray(native.top_k_positions(jnp.asarray(same), 7)), np.tile(np.arange(7), (3, 1)))


@needs_native
def test_native_top_k_under_vmap_and_in_select_top_k():
    x = scores(1, (3, 2, 500), "ties")
    got = jax.vmap(lambda row: native.top_k_positions(row, 50))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, 50))
    # select_top_k on CPU takes the native one; a bf16 score is widened (the order is kept)
    xb = jnp.asarray(x, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(attention.select_top_k(xb, 50)),
                                  ref_top_k_positions(np.asarray(xb.astype(jnp.float32)), 50))


def test_native_top_k_rejects_bad_arguments():
    x = jnp.zeros((2, 10), jnp.float32)
    for k in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\]"):
            native.top_k_positions(x, k)
    with pytest.raises(ValueError, match="score must be float32, got bfloat16"):
        native.top_k_positions(x.astype(jnp.bfloat16), 3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU top-k")
def test_without_the_native_library_the_xla_top_k_is_used(monkeypatch, tmp_path):
    saved = dict(native._state)
    try:
        # a compiler that fails: available() says why, writes nothing, and select_top_k warns once
        # and falls back to the XLA top-k (the same positions)
        monkeypatch.setenv("CXX", "false")
        monkeypatch.setenv("SPARQ_JAX_CACHE", str(tmp_path))
        monkeypatch.setattr(native, "_SOURCES", [str(tmp_path / "edited_top_k.cc")])
        (tmp_path / "edited_top_k.cc").write_text("// not the shipped source: a cache miss\n")
        native._state.clear()
        monkeypatch.setattr(attention, "_native_warned", False)
        ok, reason = native.available()
        assert not ok and "failed" in reason
        assert sorted(os.listdir(tmp_path)) == ["edited_top_k.cc"]
        x = scores(2, (2, 300), "ties")
        with pytest.warns(UserWarning, match="native CPU top-k is unavailable"):
            got = attention.select_top_k(jnp.asarray(x), 40)
        np.testing.assert_array_equal(np.asarray(got), ref_top_k_positions(x, 40))
        with pytest.raises(RuntimeError, match="native top-k is unavailable"):
            native.top_k_positions(jnp.asarray(x), 40)
        # switched off on purpose: no warning
        native._state.clear()
        monkeypatch.setenv("SPARQ_JAX_NATIVE", "0")
        assert native.available() == (False, "disabled by SPARQ_JAX_NATIVE=0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(np.asarray(attention.select_top_k(jnp.asarray(x), 40)),
                                          ref_top_k_positions(x, 40))
    finally:
        native._state.clear()
        native._state.update(saved)
