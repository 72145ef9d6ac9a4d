"""The native CPU top-k (sparq_jax.native, an XLA FFI custom call) against NumPy and the XLA top-k."""
import hashlib
import os
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparq_jax import attention, native, topk

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
        monkeypatch.setattr(topk, "_native_warned", False)
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


MATMUL_CASES = [  # (T, T of w, M, K, N, transpose_w)
    (1, 1, 1, 576, 1536, False),   # a decode projection
    (1, 1, 3, 40, 1000, True),     # a tied head, K and N not multiples of 16
    (3, 3, 3, 64, 700, True),      # attention logits: q against each (row, head)'s keys
    (3, 3, 3, 700, 64, False),     # attention output: p against each (row, head)'s values
    (2, 1, 11, 33, 530, False),    # more rows than the kernel keeps in registers, one shared w
    (2, 2, 9, 19, 35, True),
]


@needs_native
@pytest.mark.parametrize("case", MATMUL_CASES, ids=str)
def test_native_matmul_bf16_matches_numpy(case):
    t, tw, m, k, n, nt = case
    rng = np.random.default_rng(sum(case[:5]))
    x = rng.standard_normal((t, m, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((tw, n, k) if nt else (tw, k, n)), jnp.bfloat16)
    got = np.asarray(jax.jit(lambda x, w: native.matmul_bf16(x, w, transpose_w=nt))(x, w))
    wf = np.asarray(w.astype(jnp.float32), np.float64)
    want = np.matmul(x.astype(np.float64), wf.swapaxes(1, 2) if nt else wf)
    # fp32 accumulation of k products: error below k * eps32 of the sum of |terms|
    bound = np.matmul(np.abs(x.astype(np.float64)), np.abs(wf.swapaxes(1, 2) if nt else wf))
    assert got.shape == (t, m, n) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= k * 2.0 ** -23 * bound + 1e-30)


@needs_native
def test_native_matmul_bf16_rejects_bad_arguments():
    x = jnp.zeros((1, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="x must be float32 and w bfloat16, got x float32, w float32"):
        native.matmul_bf16(x, jnp.zeros((1, 8, 4), jnp.float32))
    with pytest.raises(ValueError, match="does not fit x"):
        native.matmul_bf16(x, jnp.zeros((1, 7, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="does not fit x"):
        native.matmul_bf16(jnp.zeros((3, 2, 8), jnp.float32), jnp.zeros((2, 8, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="rank 3"):
        native.matmul_bf16(x[0], jnp.zeros((8, 4), jnp.bfloat16))


def test_the_cached_library_is_named_by_source_and_compiler_and_checked_before_loading(monkeypatch, tmp_path):
    # A stand-in compiler (no real build): `--version` prints a version, `-o FILE` writes a library.
    calls, version = [], {"text": "c++ 1.0"}

    def fake_run(cmd, **kwargs):
        if cmd[1] == "--version":
            return subprocess.CompletedProcess(cmd, 0, version["text"], "")
        calls.append(cmd)
        with open(cmd[cmd.index("-o") + 1], "wb") as f:
            f.write(b"library built from " + version["text"].encode())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("CXX", "c++")
    monkeypatch.setenv("SPARQ_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.subprocess, "run", fake_run)
    first = native._build()
    assert len(calls) == 1 and open(first + ".sha256").read().strip() == hashlib.sha256(open(first, "rb").read()).hexdigest()
    assert native._build() == first and len(calls) == 1                 # cached, checked, not rebuilt
    with open(first, "ab") as f:                                           # replaced by someone else
        f.write(b"\x90 injected")
    assert native._build() == first and len(calls) == 2                  # rebuilt, not loaded
    assert open(first, "rb").read() == b"library built from c++ 1.0"
    os.remove(first + ".sha256")                                           # no record: rebuilt
    assert native._build() == first and len(calls) == 3
    version["text"] = "c++ 2.0"                                            # another compiler: another name
    second = native._build()
    assert second != first and len(calls) == 4
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        os.path.basename(p) for p in (first, first + ".sha256", second, second + ".sha256"))
