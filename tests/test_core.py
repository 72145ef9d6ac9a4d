"""sparq_jax core: the cache, the methods' transfer accounting, and attend() against naive NumPy
transcriptions of the paper (loops over rows and heads, float64, written independently of the
vectorised code)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparq_jax as sq
from sparq_jax.attention import _attend


# --------------------------------------------------------------------------------------------
# Naive references

def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _candidates(length, window):
    lo = 0 if window is None else max(0, length - window)
    return list(range(lo, length))


def np_dense(q, k, v, lengths, window=None, positions=None):
    """Exact attention; `positions(b, h, cand)` may narrow the attended positions."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = np.zeros((B, Hq, D))
    for b in range(B):
        cand = _candidates(int(lengths[b]), window)
        for h in range(Hkv):
            pos = cand if positions is None else positions(b, h, cand)
            for g in range(G):
                qq = q[b, h * G + g].astype(np.float64)
                p = _softmax(k[b, h, pos].astype(np.float64) @ qq / np.sqrt(D))
                out[b, h * G + g] = p @ v[b, h, pos].astype(np.float64)
    return out


def np_sparq(q, k, v, lengths, rank, top_k, local_window=0, reallocate=True, window=None,
             group_scores="softmax"):
    """SparQ as the paper states it, one (row, KV head) at a time. group_scores="logits" ranks as the
    authors' research code does (llm-inference-research, llminference/methods/ann_attention.py,
    AnnAttention.forward): the sum over the group's query heads of each head's temperature-scaled
    approximate logits, instead of the sum of s_hat; alpha still comes from each head's s_hat."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = np.zeros((B, Hq, D))
    for b in range(B):
        cand = _candidates(int(lengths[b]), window)
        n = len(cand)
        for h in range(Hkv):
            Q = q[b, h * G:(h + 1) * G].astype(np.float64)
            Kc = k[b, h, cand].astype(np.float64)
            Vc = v[b, h, cand].astype(np.float64)
            i1 = np.argsort(-np.abs(Q).sum(0), kind="stable")[:rank]
            s_hat, z = [], []
            for g in range(G):
                tau = np.sqrt(D * np.abs(Q[g, i1]).sum() / np.abs(Q[g]).sum())
                z.append(Kc[:, i1] @ Q[g, i1] / tau)
                s_hat.append(_softmax(z[-1]))
            score = np.sum(s_hat if group_scores == "softmax" else z, axis=0)
            score[n - min(n, max(local_window, 1)):] = np.inf
            i2 = np.argsort(-score, kind="stable")[:min(top_k, n)]
            for g in range(G):
                p = _softmax(Kc[i2] @ Q[g] / np.sqrt(D))
                y = p @ Vc[i2]
                if reallocate:
                    alpha = s_hat[g][i2].sum()
                    y = alpha * y + (1 - alpha) * Vc.mean(0)
                out[b, h * G + g] = y
    return out


def np_flexgen(q, k, v, lengths, top_k):
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = np.zeros((B, Hq, D))
    for b in range(B):
        L = int(lengths[b])
        for h in range(Hkv):
            ps = [_softmax(k[b, h, :L].astype(np.float64) @ q[b, h * G + g] / np.sqrt(D)) for g in range(G)]
            keep = np.argsort(-np.sum(ps, axis=0), kind="stable")[:min(top_k, L)]
            for g in range(G):
                w = ps[g][keep] / ps[g][keep].sum()
                out[b, h * G + g] = w @ v[b, h, keep].astype(np.float64)
    return out


class NaiveH2O:
    """H2O step by step with Python sets: alive positions, accumulated attention, evictions."""

    def __init__(self, B, Hkv, top_k, local_window):
        self.top_k, self.local_window = top_k, local_window
        self.alive = [[set() for _ in range(Hkv)] for _ in range(B)]
        self.acc = [[{} for _ in range(Hkv)] for _ in range(B)]
        self.evicted = [[set() for _ in range(Hkv)] for _ in range(B)]

    def step(self, q, k, v, lengths):
        B, Hq, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        out = np.zeros((B, Hq, D))
        for b in range(B):
            L = int(lengths[b])
            for h in range(Hkv):
                alive, acc = self.alive[b][h], self.acc[b][h]
                for pos in range(L):
                    if pos not in self.evicted[b][h] and pos not in alive:
                        alive.add(pos)
                        acc[pos] = 0.0
                if len(alive) > self.top_k:
                    forced = set(range(L - max(self.local_window, 1), L))
                    rest = sorted(alive - forced, key=lambda p: -acc[p])
                    keep = forced | set(rest[:self.top_k - len(forced)])
                    self.evicted[b][h] |= alive - keep
                    alive &= keep
                pos = sorted(alive)
                psum = np.zeros(len(pos))
                for g in range(G):
                    p = _softmax(k[b, h, pos].astype(np.float64) @ q[b, h * G + g] / np.sqrt(D))
                    out[b, h * G + g] = p @ v[b, h, pos].astype(np.float64)
                    psum += p
                for p_, w in zip(pos, psum):
                    acc[p_] += w
        return out


def _data(seed, B, Hq, Hkv, S, D, dtype=np.float32):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    q = (2 * rng.standard_normal((B, Hq, D))).astype(dtype)
    return q, k, v


# --------------------------------------------------------------------------------------------
# SparQ

@pytest.mark.parametrize("reallocate", [True, False])
@pytest.mark.parametrize("transposed", [True, False])
def test_sparq_full_budget_equals_dense(reallocate, transposed):
    q, k, v = _data(0, 2, 8, 2, 48, 32)
    cache = sq.KVCache.from_kv(k, v, [48, 30], max_len=64, transposed_keys=transposed)
    dense, _ = sq.attend(q, cache, sq.Dense(), impl="xla")
    out, _ = sq.attend(q, cache, sq.SparQ(rank=32, top_k=64, reallocate_mean=reallocate), impl="xla")
    np.testing.assert_allclose(out, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "Hq,Hkv,rank,top_k,local_window,reallocate,transposed,window",
    [
        (4, 4, 4, 8, 0, True, True, None),      # MHA
        (8, 2, 8, 12, 3, True, False, None),    # GQA group 4, local window, single copy of K
        (8, 1, 6, 16, 4, False, True, None),    # MQA (group 8), no reallocation
        (8, 2, 5, 10, 2, True, True, 24),       # sliding window
        (4, 1, 16, 100, 0, True, False, None),  # top_k beyond every length: dense
    ],
)
def test_sparq_matches_naive_reference(Hq, Hkv, rank, top_k, local_window, reallocate, transposed, window):
    D, S = 16, 64
    q, k, v = _data(1, 3, Hq, Hkv, S, D)
    lengths = [64, 37, 9]
    cache = sq.KVCache.from_kv(k, v, lengths, max_len=80, transposed_keys=transposed)
    method = sq.SparQ(rank, top_k, local_window, reallocate)
    out, same = sq.attend(q, cache, method, window=window, impl="xla")
    want = np_sparq(q, k, v, lengths, rank, top_k, local_window, reallocate, window)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    assert same is cache


# (Hq, Hkv, rank, top_k, local_window, reallocate, window, group_scores): MHA, GQA with both
# rankings, MQA, a sliding window, top_k beyond every length
REFERENCE_CASES = [
    (4, 4, 4, 8, 0, True, None, "softmax"),
    (8, 2, 8, 12, 3, True, None, "softmax"),
    (8, 2, 5, 10, 2, False, 24, "logits"),
    (6, 2, 6, 16, 4, True, None, "logits"),
    (8, 1, 6, 16, 4, False, None, "softmax"),
    (4, 1, 16, 100, 0, True, 30, "softmax"),
]


def _grouped(case, transposed, dtype=np.float32):
    """(qg [B, Hkv, G, D], cache, mask, method, window, q, k, v, lengths) for a REFERENCE_CASES entry."""
    from sparq_jax.attention import candidate_mask
    Hq, Hkv, rank, top_k, local_window, reallocate, window, group_scores = case
    B, S, D = 3, 64, 16
    q, k, v = _data(40, B, Hq, Hkv, S, D, dtype)
    lengths = [64, 37, 9]
    cache = sq.KVCache.from_kv(k, v, lengths, max_len=80, transposed_keys=transposed)
    method = sq.SparQ(rank, top_k, local_window, reallocate, group_scores=group_scores)
    qg = jnp.asarray(q).reshape(B, Hkv, Hq // Hkv, D)
    return qg, cache, candidate_mask(cache.lengths, cache.max_len, window), method, window, q, k, v, lengths


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-w{c[6]}-{c[7]}-r{int(c[5])}")
def test_sparq_reference_matches_numpy(case):
    """sparq_reference (Algorithm 1 verbatim, what every backend is tested against) against the
    float64 NumPy transcription of the paper, GQA with both group rankings."""
    from sparq_jax.sparq import sparq_reference
    qg, cache, mask, method, window, q, k, v, lengths = _grouped(case, transposed=False)
    got = np.asarray(sparq_reference(qg, cache, mask, method, window)).reshape(q.shape)
    want = np_sparq(q, k, v, lengths, method.rank, method.top_k, method.local_window, method.reallocate_mean, window,
                    group_scores=method.group_scores)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla_cpu", "xla"])
@pytest.mark.parametrize("transposed", [True, False])
def test_xla_backends_match_the_reference(backend, transposed):
    """sparq(...) with each XLA backend (runnable on any platform) against sparq_reference."""
    from sparq_jax import backends
    from sparq_jax.sparq import sparq, sparq_reference
    run = jax.jit(sparq, static_argnames=("method", "window", "backend"))
    for case in REFERENCE_CASES:
        qg, cache, mask, method, window, *_ = _grouped(case, transposed)
        got = run(qg, cache, mask, method=method, window=window, backend=backends.get(backend))
        want = sparq_reference(qg, cache, mask, method, window)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5, err_msg=str(case))


def test_one_top_k_order_everywhere():
    """Every top-k SparQ, H2O and FlexGen can run (each XLA backend's, the counting one, the native
    one): the k largest, ties to the lowest positions, in increasing position order."""
    from sparq_jax import backends, topk
    rng = np.random.default_rng(3)
    score = (rng.integers(-3, 4, size=(2, 3, 200)) / 2).astype(np.float32)     # heavy ties
    score[0, 0, 5:9], score[1, 2, ::3] = np.inf, -np.inf
    want = np.sort(np.argsort(-score, axis=-1, kind="stable")[..., :40], axis=-1)
    fns = {"counting": topk.top_k_positions, "cpu": topk.cpu_top_k, "sorted": topk.sorted_top_k,
           **{name: backends.get(name).top_k for name in ("xla_cpu", "xla", "pallas_tpu")}}
    for name, fn in fns.items():
        np.testing.assert_array_equal(np.asarray(jax.jit(fn, static_argnums=1)(jnp.asarray(score), 40)), want,
                                      err_msg=name)


def test_newest_position_and_local_window_always_selected():
    q, k, v = _data(2, 2, 4, 2, 32, 16)
    lengths = np.array([32, 20])
    # Make the newest key's approximate score tiny: top_k=1 must still pick it.
    for b, L in enumerate(lengths):
        k[b, :, L - 1] = -50 * np.sign(q[b].reshape(2, 2, 16).sum(1))
    cache = sq.KVCache.from_kv(k, v, lengths)
    out, _ = sq.attend(q, cache, sq.SparQ(rank=4, top_k=1, reallocate_mean=False), impl="xla")
    for b, L in enumerate(lengths):
        np.testing.assert_allclose(out[b], np.repeat(v[b, :, L - 1], 2, axis=0), atol=1e-6)
    # top_k == local_window: exactly the last l positions, i.e. dense over them.
    out, _ = sq.attend(q, cache, sq.SparQ(rank=4, top_k=5, local_window=5, reallocate_mean=False), impl="xla")
    want = np_dense(q, k, v, lengths, positions=lambda b, h, cand: cand[-5:])
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize(
    "Hq,Hkv,rank,top_k,local_window,reallocate,transposed,window",
    [
        (6, 2, 5, 10, 3, True, True, None),     # G=3
        (6, 2, 4, 8, 2, False, False, None),    # G=3, no reallocation, single copy of K
        (8, 2, 6, 12, 4, False, True, None),    # G=4
        (8, 2, 5, 10, 2, True, False, 24),      # G=4, sliding window
    ],
)
def test_sparq_group_scores_logits_matches_the_authors_ranking(Hq, Hkv, rank, top_k, local_window, reallocate,
                                                               transposed, window):
    D, S = 16, 64
    q, k, v = _data(21, 3, Hq, Hkv, S, D)
    lengths = [64, 37, 9]
    cache = sq.KVCache.from_kv(k, v, lengths, max_len=80, transposed_keys=transposed)
    method = sq.SparQ(rank, top_k, local_window, reallocate, group_scores="logits")
    out, _ = sq.attend(q, cache, method, window=window, impl="xla")
    want = np_sparq(q, k, v, lengths, rank, top_k, local_window, reallocate, window, group_scores="logits")
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    # These inputs tell the two rankings apart (some (row, KV head) selects other positions).
    other = np_sparq(q, k, v, lengths, rank, top_k, local_window, reallocate, window, group_scores="softmax")
    assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize("local_window, transposed", [(0, True), (3, False)])
def test_sparq_group_scores_agree_with_one_head_per_group(local_window, transposed):
    q, k, v = _data(22, 3, 4, 4, 64, 16)
    cache = sq.KVCache.from_kv(k, v, [64, 37, 9], max_len=80, transposed_keys=transposed)
    outs = [sq.attend(q, cache, sq.SparQ(4, 10, local_window, group_scores=g), impl="xla")[0]
            for g in ("softmax", "logits")]
    np.testing.assert_array_equal(outs[0], outs[1])
    # the same positions, compared directly on the scores that step 2 ranks
    from sparq_jax import backends
    from sparq_jax.attention import candidate_mask
    qf = jnp.asarray(q, jnp.float32).reshape(3, 4, 1, 16)
    mask = candidate_mask(cache.lengths, cache.max_len, None)
    xla = backends.get("xla_cpu")
    chosen = [np.asarray(xla.top_k(xla.scores(qf, cache, mask, method=sq.SparQ(4, 10, local_window, group_scores=g),
                                              window=None)[0], 10))
              for g in ("softmax", "logits")]
    np.testing.assert_array_equal(chosen[0], chosen[1])


def test_sparq_group_scores_differ_on_a_constructed_case():
    """Two query heads share a KV head; rank = D, so tau = sqrt(D) for both. Position 0 has a large
    logit for head 0 and an equally large negative one for head 1 (logit sum 0, s_hat sum ~0.99);
    position 1 is moderate for both (logit sum 1.41, s_hat sum ~0.68). With top_k = 2 (one beside
    the newest position 2), "softmax" picks position 0 and "logits" position 1."""
    q = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)                 # [B=1, Hq=2, D=2]
    k = np.array([[[[8.0, -8.0], [1.0, 1.0], [0.0, 0.0], [9.0, 9.0]]]], np.float32)  # position 3: padding
    v = np.array([[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [5.0, 5.0]]]], np.float32)
    cache = sq.KVCache.from_kv(k, v, [3])
    for group_scores, kept in (("softmax", [0, 2]), ("logits", [1, 2])):
        method = sq.SparQ(rank=2, top_k=2, reallocate_mean=False, group_scores=group_scores)
        out, _ = sq.attend(q, cache, method, impl="xla")
        want = np_dense(q, k, v, [3], positions=lambda b, h, cand: kept)
        np.testing.assert_allclose(out, want, atol=1e-6, err_msg=group_scores)
        np.testing.assert_allclose(out, np_sparq(q, k, v, [3], 2, 2, reallocate=False, group_scores=group_scores),
                                   atol=1e-6, err_msg=group_scores)


def test_sparq_group_scores_option():
    assert sq.SparQ(4, 8).group_scores == "softmax"
    m = sq.SparQ(4, 8, 2, False, "logits")
    assert m.group_scores == "logits" and hash(m) != hash(sq.SparQ(4, 8, 2, False)) and m != sq.SparQ(4, 8, 2, False)
    assert m.transfers(4096, 128) == sq.SparQ(4, 8, 2, False).transfers(4096, 128)
    for bad in ("logit", "SOFTMAX", None, 1):
        with pytest.raises(ValueError, match=r"group_scores must be one of 'softmax', 'logits', got " + repr(bad)):
            sq.SparQ(4, 8, group_scores=bad)
    a = sq.SparQ.for_compression(0.125, 128, 32768, reallocate_mean=False, group_scores="logits")
    assert a == sq.SparQ(16, 2048, 512, False, "logits")
    assert sq.SparQ.for_compression(0.125, 128, 32768).group_scores == "softmax"
    with pytest.raises(ValueError, match="group_scores"):
        sq.SparQ.for_compression(0.125, 128, 32768, group_scores="sum")


def test_padding_never_selected_and_v_bar_ignores_it():
    q, k, v = _data(3, 2, 4, 2, 40, 16)
    lengths = [40, 13]
    cache = sq.KVCache.from_kv(k, v, lengths, max_len=48)
    method = sq.SparQ(rank=4, top_k=6, local_window=1)
    clean, _ = sq.attend(q, cache, method, impl="xla")
    # Garbage that would dominate both steps and the mean, written past each row's length.
    pad = np.arange(48)[None, None, :, None] >= np.array(lengths)[:, None, None, None]
    loud = dataclasses.replace(
        cache,
        k=jnp.where(pad, 1e3, cache.k), kt=jnp.where(np.swapaxes(pad, -1, -2), 1e3, cache.kt),
        v=jnp.where(pad, 1e6, cache.v))
    out, _ = sq.attend(q, loud, method, impl="xla")
    np.testing.assert_allclose(out, clean, atol=1e-6)
    np.testing.assert_allclose(cache.v_sum, np.sum(np.where(pad[:, :, :40], 0, v), axis=2), rtol=1e-5, atol=1e-4)


def test_append_at_ragged_lengths_matches_from_kv():
    _, k, v = _data(4, 2, 2, 2, 20, 8)
    lengths = np.array([12, 5])
    cache = sq.KVCache.from_kv(k[:, :, :12], v[:, :, :12], lengths, max_len=20)
    cache = cache.append(k[:, :, 12:15], v[:, :, 12:15])
    np.testing.assert_array_equal(cache.lengths, [15, 8])
    # Row 1 wrote its three positions right after its own five.
    want_k = np.zeros((2, 2, 20, 8), np.float32)
    want_k[0, :, :12] = k[0, :, :12]
    want_k[0, :, 12:15] = k[0, :, 12:15]
    want_k[1, :, :5] = k[1, :, :5]
    want_k[1, :, 5:8] = k[1, :, 12:15]
    np.testing.assert_array_equal(cache.k, want_k)
    np.testing.assert_array_equal(cache.kt, np.swapaxes(want_k, -1, -2))
    np.testing.assert_allclose(cache.v_sum[1], v[1, :, :5].sum(1) + v[1, :, 12:15].sum(1), rtol=1e-5)
    empty = sq.KVCache.create(2, 2, 20, 8, jnp.float32, transposed_keys=False)
    filled = empty.append(k[:, :, :7], v[:, :, :7])
    assert filled.kt is None
    np.testing.assert_array_equal(filled.k[:, :, :7], k[:, :, :7])
    np.testing.assert_array_equal(filled.lengths, [7, 7])


def test_q_and_cache_dtypes_may_differ():
    q, k, v = _data(5, 1, 4, 2, 32, 16)
    cache = sq.KVCache.from_kv(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), [32])
    out, _ = sq.attend(q, cache, sq.SparQ(16, 32), impl="xla")
    assert out.dtype == jnp.float32
    want = np_dense(q, np.asarray(cache.k, np.float32), np.asarray(cache.v, np.float32), [32])
    np.testing.assert_allclose(out, want, atol=1e-4)


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
def test_dense_on_a_bfloat16_cache_matches_numpy(q_dtype):
    """A bfloat16 cache on CPU runs Dense through sparq_jax.native's kernel (elsewhere XLA's dot):
    the reference is NumPy in float64 on the same bfloat16-rounded q, k, v, ragged lengths included;
    the tolerance is the output's rounding to q's dtype (fp32: the fp32 softmax's few ulps)."""
    q, k, v = _data(12, 2, 6, 3, 300, 64)
    cache = sq.KVCache.from_kv(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), [300, 123])
    qj = jnp.asarray(q, q_dtype)
    out, _ = sq.attend(qj, cache, sq.Dense(), impl="xla")
    assert out.dtype == q_dtype
    want = np_dense(np.asarray(qj, np.float32), np.asarray(cache.k, np.float32), np.asarray(cache.v, np.float32),
                    [300, 123])
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=1e-5 if q_dtype == jnp.float32 else 2e-3,
                               rtol=0 if q_dtype == jnp.float32 else 8e-3)


def test_sliding_window_dense_and_sparq():
    q, k, v = _data(6, 2, 4, 2, 50, 16)
    lengths = [50, 30]
    cache = sq.KVCache.from_kv(k, v, lengths)
    out, _ = sq.attend(q, cache, sq.Dense(), window=16, impl="xla")
    np.testing.assert_allclose(out, np_dense(q, k, v, lengths, window=16), atol=1e-5)
    # top_k >= window: SparQ inside a window is dense inside it, reallocation included.
    out, _ = sq.attend(q, cache, sq.SparQ(16, 16), window=16, impl="xla")
    np.testing.assert_allclose(out, np_dense(q, k, v, lengths, window=16), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Baselines

def test_h2o_matches_naive_and_never_returns_evicted():
    B, Hq, Hkv, S, D = 2, 4, 2, 40, 8
    q_all, k, v = _data(7, B, Hq, Hkv, S, D)
    rng = np.random.default_rng(8)
    lengths = np.array([20, 11])
    top_k, local = 8, 2
    cache = sq.KVCache.from_kv(k[:, :, :20], v[:, :, :20], lengths, max_len=S,
                               h2o_scores=np.zeros((B, Hkv, 20), np.float32))
    naive = NaiveH2O(B, Hkv, top_k, local)
    method = sq.H2O(top_k, local)
    ever_evicted = np.zeros((B, Hkv, S), bool)
    for step in range(6):
        q = (2 * rng.standard_normal((B, Hq, D))).astype(np.float32)
        new = np.stack([k[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
        new_v = np.stack([v[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
        cache = cache.append(new, new_v)
        lengths = lengths + 1
        full_k = np.asarray(cache.k)
        full_v = np.asarray(cache.v)
        out, cache = sq.attend(q, cache, method, impl="xla")
        want = naive.step(q, full_k, full_v, lengths)
        np.testing.assert_allclose(out, want, atol=1e-5, err_msg=f"step {step}")
        evicted = np.isneginf(np.asarray(cache.h2o_scores))
        assert np.all(evicted[ever_evicted]), "an evicted position came back"
        ever_evicted = evicted
        for b in range(B):
            for h in range(Hkv):
                assert set(np.flatnonzero(evicted[b, h])) == naive.evicted[b][h]
    assert ever_evicted.any()


def test_streaming_attends_exactly_sink_and_window():
    q, k, v = _data(9, 3, 4, 2, 64, 16)
    lengths = [64, 20, 5]
    cache = sq.KVCache.from_kv(k, v, lengths)
    out, _ = sq.attend(q, cache, sq.Streaming(sink=4, window=6), impl="xla")
    want = np_dense(q, k, v, lengths,
                    positions=lambda b, h, cand: sorted(set(cand[:4]) | set(cand[-6:])))
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_flexgen_matches_naive():
    q, k, v = _data(10, 2, 8, 2, 48, 16)
    lengths = [48, 7]
    cache = sq.KVCache.from_kv(k, v, lengths)
    out, _ = sq.attend(q, cache, sq.FlexGen(10), impl="xla")
    np.testing.assert_allclose(out, np_flexgen(q, k, v, lengths, 10), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Numerics, compilation, composition

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_long_sequence_stays_finite(dtype):
    S, D = 65536, 32
    rng = np.random.default_rng(11)
    # Values whose running sum overflows fp16 (65504) many times over.
    k = jnp.asarray(rng.standard_normal((1, 1, S, D)), dtype)
    v = jnp.asarray(100 + rng.standard_normal((1, 1, S, D)), dtype)
    q = jnp.asarray(4 * rng.standard_normal((1, 4, D)), dtype)
    cache = sq.KVCache.from_kv(k, v, [S])
    assert cache.v_sum.dtype == jnp.float32
    np.testing.assert_allclose(cache.v_sum[0, 0], np.asarray(v[0, 0], np.float64).sum(0), rtol=1e-4)
    for method in (sq.Dense(), sq.SparQ.for_compression(1 / 8, D, S)):
        out, _ = sq.attend(q, cache, method, impl="xla")
        assert out.dtype == dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert 90 < float(np.asarray(out, np.float32).mean()) < 110


def test_compiles_once_per_shape_not_per_length():
    q, k, v = _data(12, 2, 4, 2, 32, 16)
    method = sq.SparQ(4, 6, 1)
    before = _attend._cache_size()
    for lengths in ([32, 3], [10, 11], [1, 32]):
        sq.attend(q, sq.KVCache.from_kv(k, v, lengths), method, impl="xla")
    assert _attend._cache_size() == before + 1


def test_jit_and_vmap_compose():
    L = 3
    q, k, v = _data(13, 2, 8, 2, 32, 16)
    method = sq.SparQ(4, 8, 2)
    caches = [sq.KVCache.from_kv(k * (i + 1), v - i, [32, 17]) for i in range(L)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *caches)
    qs = jnp.stack([q * (i + 1) for i in range(L)])
    run = jax.jit(jax.vmap(lambda qq, c: sq.attend(qq, c, method, impl="xla")[0]))
    got = run(qs, stacked)
    for i in range(L):
        want, _ = sq.attend(qs[i], caches[i], method, impl="xla")
        np.testing.assert_allclose(got[i], want, atol=1e-5)

    @jax.jit
    def decode_step(qq, c, k_new, v_new):
        c = c.append(k_new, v_new)
        return sq.attend(qq, c, method, impl="xla")

    cache = sq.KVCache.from_kv(k[:, :, :20], v[:, :, :20], [20, 9], max_len=32)
    out, cache = decode_step(q, cache, k[:, :, 20:21], v[:, :, 20:21])
    assert np.asarray(cache.lengths).tolist() == [21, 10]
    pad_k = np.zeros((2, 2, 21, 16), np.float32)
    pad_v = np.zeros((2, 2, 21, 16), np.float32)
    for b, (old, sl) in enumerate(((20, slice(0, 21)), (9, None))):
        pad_k[b, :, :old], pad_v[b, :, :old] = k[b, :, :old], v[b, :, :old]
        pad_k[b, :, old], pad_v[b, :, old] = k[b, :, 20], v[b, :, 20]
    np.testing.assert_allclose(out, np_sparq(q, pad_k, pad_v, [21, 10], 4, 8, 2), atol=2e-5)


# --------------------------------------------------------------------------------------------
# Bad input

def test_bad_method_arguments_raise():
    for make in (lambda: sq.SparQ(0, 8), lambda: sq.SparQ(4, 0), lambda: sq.SparQ(4, 8, -1),
                 lambda: sq.SparQ(4, 8, 9), lambda: sq.H2O(8, 9), lambda: sq.H2O(0, 0),
                 lambda: sq.Streaming(-1, 4), lambda: sq.Streaming(4, -1), lambda: sq.Streaming(0, 0),
                 lambda: sq.FlexGen(0), lambda: sq.SparQ(2.5, 8)):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(ValueError, match="local_window"):
        sq.SparQ(4, 8, 9)
    with pytest.raises(ValueError, match="1/2"):
        sq.FlexGen.for_compression(0.25, 128, 4096)
    with pytest.raises(ValueError, match="ratio"):
        sq.SparQ.for_compression(1.5, 128, 4096)


def test_bad_attend_and_cache_input_raise():
    q, k, v = _data(14, 2, 6, 2, 16, 8)
    cache = sq.KVCache.from_kv(k, v, [16, 4])
    with pytest.raises(ValueError, match="rank"):
        sq.attend(q, cache, sq.SparQ(9, 4))
    with pytest.raises(ValueError, match="Hq=5"):
        sq.attend(q[:, :5], cache, sq.Dense())
    with pytest.raises(ValueError, match="D=8"):
        sq.attend(q[..., :4], cache, sq.Dense())
    with pytest.raises(ValueError, match="B=2"):
        sq.attend(q[:1], cache, sq.Dense())
    with pytest.raises(ValueError, match="max_len=16"):
        cache.append(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="max_len=16"):
        cache.append(jnp.zeros((2, 2, 17, 8)), jnp.zeros((2, 2, 17, 8)))
    with pytest.raises(ValueError, match="h2o"):
        sq.attend(q, cache, sq.H2O(4, 1))
    with pytest.raises(ValueError, match="impl"):
        sq.attend(q, cache, sq.Dense(), impl="cuda")
    with pytest.raises(ValueError, match="window"):
        sq.attend(q, cache, sq.Dense(), window=0)
    with pytest.raises(ValueError, match="lengths"):
        sq.KVCache.from_kv(k, v, [17, 4])
    with pytest.raises(ValueError, match="max_len"):
        sq.KVCache.from_kv(k, v, [16, 4], max_len=8)
    with pytest.raises(ValueError, match="dtype"):
        sq.KVCache.create(1, 1, 8, 8, jnp.int32)
    with pytest.raises(ValueError, match="at least one position"):
        sq.attend(q, sq.KVCache.from_kv(k, v, [16, 0]), sq.Dense())


# --------------------------------------------------------------------------------------------
# Transfer accounting

def test_transfers_follow_the_paper():
    S, D = 4096, 128
    dense = 2 * S * D + 2 * D
    assert sq.Dense().transfers(S, D) == dense
    assert sq.SparQ(32, 128).transfers(S, D) == S * 32 + 2 * 128 * D + 4 * D == 164_352
    assert round(sq.SparQ(32, 128).transfers(S, D) / dense, 3) == 0.157
    assert sq.H2O(128, 32).transfers(S, D) == 2 * 128 * D + 2 * D + 2 * S
    assert sq.Streaming(16, 112).transfers(S, D) == 2 * 128 * D + 2 * D
    assert sq.FlexGen(128).transfers(S, D) == S * D + 128 * D + 2 * D
    # Budgets beyond the sequence count what exists.
    assert sq.SparQ(8, 500).transfers(100, D) == 100 * 8 + 2 * 100 * D + 4 * D
    assert sq.H2O(500, 10).transfers(100, D) == 2 * 100 * D + 2 * D + 200


@pytest.mark.parametrize("S,D", [(32768, 128), (4096, 128), (2048, 64), (300, 64)])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125, 0.0625])
def test_for_compression_lands_at_most_one_percent_above(S, D, ratio):
    dense = sq.Dense().transfers(S, D)
    for cls in (sq.SparQ, sq.H2O, sq.Streaming):
        try:
            m = cls.for_compression(ratio, D, S)
        except ValueError:
            assert cls is not sq.SparQ or S < 1000  # only tiny shapes may be out of reach
            continue
        got = m.transfers(S, D) / dense
        assert got <= ratio * 1.01, (m, got)
        assert got >= ratio * 0.9, (m, got)
    m = sq.SparQ.for_compression(ratio, D, S)
    recipe = sq.SparQ(max(1, round(ratio * D)), max(1, int(ratio * S / 2)))
    if recipe.transfers(S, D) / dense <= ratio * 1.01:
        assert (m.rank, m.top_k) == (recipe.rank, recipe.top_k)  # the paper's recipe where it fits
    else:
        assert m.rank <= recipe.rank and m.top_k < recipe.top_k
    assert m.local_window == m.top_k // 4
    f = sq.FlexGen.for_compression(0.75, D, S)
    assert 0.74 <= f.transfers(S, D) / dense <= 0.75 * 1.01
    assert sq.SparQ.for_compression("1/8", 128, 32768) == sq.SparQ(16, 2048, 512)
    assert sq.SparQ.for_compression(0.125, 128, 32768, reallocate_mean=False).reallocate_mean is False


@pytest.mark.parametrize("S,k", [(37, 5), (64, 64), (1000, 63), (4096, 256), (9000, 700)])
def test_top_k_positions_is_lax_top_k_as_a_set(S, k):
    from sparq_jax.topk import top_k_positions
    rng = np.random.default_rng(S)
    # Heavy ties (few distinct values), -inf and +inf entries, negative and positive zeros.
    score = rng.integers(-3, 4, size=(3, 2, S)).astype(np.float32) / 2
    score[0, 0, ::7] = -np.inf
    score[1, 1, :S // 2] = -np.inf
    score[2, 0, 5:9] = np.inf
    score[2, 1, ::3] = -0.0
    got = np.asarray(top_k_positions(jnp.asarray(score), k))
    _, want = jax.lax.top_k(jnp.asarray(score), k)
    np.testing.assert_array_equal(got, np.sort(np.asarray(want), axis=-1))


@pytest.mark.parametrize("k", [1, 100, 2048, 8191, 16384])
def test_top_k_positions_long_rows(k):
    """Rows of 2**14 with continuous values (the search stops early, at a count of exactly k),
    periodic outliers, and a row of one value (the search runs to the last bit, ties resolved by
    position) all give lax.top_k's set."""
    from sparq_jax.topk import top_k_positions
    rng = np.random.default_rng(k)
    S = 2**14
    score = rng.random((4, S)).astype(np.float32) ** 4
    score[1, ::32] = 10.0
    score[2, ::32] = -1.0
    score[3] = 0.5                                # all tied
    got = np.asarray(top_k_positions(jnp.asarray(score), k))
    _, want = jax.lax.top_k(jnp.asarray(score), k)
    np.testing.assert_array_equal(got, np.sort(np.asarray(want), axis=-1))


@pytest.mark.parametrize("transposed", [True, False])
def test_step1_is_the_partial_dot_product(transposed):
    from sparq_jax import xla_ops
    rng = np.random.default_rng(15)
    k = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    q1 = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    i1 = np.stack([np.stack([rng.permutation(8)[:5] for _ in range(3)]) for _ in range(2)]).astype(np.int32)
    keys = np.swapaxes(k, -1, -2) if transposed else k
    want = np.einsum("bhgr,bhsr->bhgs", q1, np.take_along_axis(k, i1[:, :, None, :], axis=3))
    for cpu in (True, False):
        got = xla_ops.approx_logits_xla(jnp.asarray(q1), jnp.asarray(keys), jnp.asarray(i1), transposed=transposed,
                                        cpu=cpu)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", [sq.Dense(), sq.SparQ(4, 16, 4)], ids=["dense", "sparq"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_updates_the_cache_in_place(batch, method, dtype):
    """append + attend in one donated program must not copy the cache (XLA:CPU did, for a
    dynamic_update_slice whose buffer a dot also reads): a copy costs more than SparQ saves.
    A bfloat16 cache must not be widened to fp32 either (XLA:CPU wraps a bfloat16 scatter or
    dynamic-update-slice in a convert of the whole buffer to fp32 and back, every step)."""
    import re
    S, H, D = 512, 2, 16
    k = jnp.zeros((batch, H, S, D), dtype)
    cache = sq.KVCache.from_kv(k, k, jnp.full((batch,), 100), transposed_keys=method.reads_transposed_keys)
    q = jnp.ones((batch, 4, D))
    new = jnp.ones((batch, H, 1, D), dtype)

    def step(cache, q):
        cache = cache.append(new, new)
        return cache, sq.attend(q, cache, method, impl="xla")[0]

    hlo = jax.jit(step, donate_argnums=0).lower(cache, q).compile().as_text()
    name = "bf16" if dtype == jnp.bfloat16 else "f32"
    buffers = rf"(\d+,)*({S},{D}|{D},{S})\]\{{[0-9,]+\}}"
    copies = re.findall(rf"{name}\[{buffers} copy\(", hlo)
    assert not copies, f"{len(copies)} copies of cache buffers in the decode step ({name})"
    if dtype != jnp.float32:
        widened = re.findall(rf"= f32\[{buffers} ", hlo)
        assert not widened, f"{len(widened)} fp32 buffers of the cache's shape in the bfloat16 decode step"


@pytest.mark.parametrize("W", [1, 31, 33, 1024, 2049, 5000])
def test_first_at_least_is_searchsorted(W):
    """The two-level search top_k_positions compacts with, against NumPy's searchsorted (side
    'left'), including row lengths that need padding and more than 64 blocks of 32."""
    from sparq_jax.topk import _first_at_least
    rng = np.random.default_rng(W)
    ends = np.cumsum(rng.integers(0, 4, (3, W)), axis=-1).astype(np.int32)
    ends[:, -1] = ends[:, -1].max()                     # every wanted value is reached in every row
    want = np.arange(0, ends[0, -1] + 1, dtype=np.int32)
    got = np.asarray(_first_at_least(jnp.asarray(ends), jnp.asarray(want)))
    np.testing.assert_array_equal(got, np.stack([np.searchsorted(e, want, side="left") for e in ends]))


@pytest.mark.parametrize("G, dtype", [(1, jnp.float32), (4, jnp.bfloat16)])
def test_step1_off_cpu_branch_matches_numpy(G, dtype):
    """approx_logits_xla runs a different formulation off the CPU (one gather of the r rows of K^T);
    both forms, called directly here, against a NumPy transcription of q[i1] . K[:, i1]^T."""
    from sparq_jax.xla_ops import approx_logits_kt_cpu, approx_logits_kt_gather
    rng = np.random.default_rng(G)
    B, H, r, D, S = 2, 3, 5, 16, 70
    q1 = rng.standard_normal((B, H, G, r)).astype(np.float32)
    k = np.asarray(jnp.asarray(rng.standard_normal((B, H, S, D)), dtype).astype(jnp.float32))
    i1 = np.stack([[rng.choice(D, r, replace=False) for _ in range(H)] for _ in range(B)]).astype(np.int32)
    want = np.einsum("bhgr,bhsr->bhgs", q1, np.take_along_axis(k, i1[:, :, None, :], axis=3))
    kt = jnp.swapaxes(jnp.asarray(k, dtype), 2, 3)
    for fn in (approx_logits_kt_cpu, approx_logits_kt_gather):
        got = np.asarray(fn(jnp.asarray(q1), kt, jnp.asarray(i1)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sparq_transfers_reject_rank_above_head_dim():
    """Issue 17 item 5: rank was counted as head_dim silently."""
    with pytest.raises(ValueError, match=r"rank must be <= head_dim=64, got rank=1000"):
        sq.SparQ(rank=1000, top_k=10).transfers(512, 64)
    assert sq.SparQ(rank=64, top_k=10).transfers(512, 64) == 512 * 64 + 2 * 10 * 64 + 4 * 64


def test_overflow_inside_jit_is_caught_eagerly():
    """Issue 17 item 4: an append past max_len inside jit drops its writes; the lengths still count
    them, so the overflow is reported by the next eager attend or append, and by overflowed()."""
    q, k, v = _data(30, 2, 4, 2, 8, 16)
    cache = sq.KVCache.from_kv(k, v, [8, 6], max_len=9)
    grow = jax.jit(lambda c, x: c.append(x, x))
    new = jnp.ones((2, 2, 1, 16), jnp.float32)
    once = grow(cache, new)                         # row 0 reaches max_len: fine
    assert not bool(once.overflowed())
    sq.attend(q, once, sq.Dense())
    twice = grow(once, new)                         # row 0 goes past it inside jit
    assert bool(twice.overflowed()) and np.asarray(twice.lengths).tolist() == [10, 8]
    with pytest.raises(ValueError, match=r"the cache overflowed: lengths \[10, 8\] exceed max_len=9"):
        sq.attend(q, twice, sq.SparQ(4, 4))
    with pytest.raises(ValueError, match="the cache overflowed earlier"):
        twice.append(new, new)
    with pytest.raises(ValueError, match="exceeds max_len=9"):   # eager appends were always checked
        once.append(new, new)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the message is about running the kernels off their device")
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_impl_off_its_device_says_what_to_do(impl):
    """Issue 17 item 3: a raw 'Only interpret mode is supported on CPU backend' traceback before."""
    q, k, v = _data(31, 1, 4, 2, 32, 16)
    cache = sq.KVCache.from_kv(k, v, [32])
    with pytest.raises(ValueError, match=rf"impl='{impl}' compiles its kernels for a [GT]PU, and the default "
                                         r"backend is 'cpu'.*interpret=True.*impl='xla'"):
        sq.attend(q, cache, sq.SparQ(4, 8), impl=impl)
    sq.attend(q, cache, sq.SparQ(4, 8), impl=impl, interpret=True)      # the interpreter still runs


# --------------------------------------------------------------------------------------------
# The XLA flag the package sets on a CUDA backend (sparq_jax/xla_flags.py)

def test_command_buffer_flag_is_added_once_and_never_over_the_users():
    from sparq_jax import xla_flags as xf

    want = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    assert xf.with_command_buffer_flag(None) == want
    assert xf.with_command_buffer_flag("--xla_dump_to=/tmp/d") == "--xla_dump_to=/tmp/d " + want
    for users in ("--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer=FUSION",
                  "--xla_dump_to=/tmp/d --xla_gpu_enable_command_buffer=-WHILE", want):
        assert xf.with_command_buffer_flag(users) is None, users
    # a different flag that shares the prefix is not the user's setting
    other = "--xla_gpu_enable_command_buffer_va_remapping=true"
    assert xf.with_command_buffer_flag(other) == other + " " + want

    assert not xf.may_use_cuda({}, plugin_installed=False)
    assert xf.may_use_cuda({}, plugin_installed=True)
    assert xf.may_use_cuda({"JAX_PLATFORMS": "cuda,cpu"}, plugin_installed=True)
    assert not xf.may_use_cuda({"JAX_PLATFORMS": "cpu"}, plugin_installed=True)


def test_command_buffer_flag_configure_only_before_a_cuda_backend(monkeypatch):
    from sparq_jax import xla_flags as xf

    monkeypatch.setattr(xf, "_cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(xf, "_backends_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert xf.configure(env) and env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d " + xf.FLAG + "=" + xf.VALUE
    assert not xf.configure(env)                                    # set once
    users = {"XLA_FLAGS": xf.FLAG + "=FUSION"}
    assert not xf.configure(users) and users["XLA_FLAGS"] == xf.FLAG + "=FUSION"
    assert not xf.configure({"JAX_PLATFORMS": "cpu"})
    monkeypatch.setattr(xf, "_backends_started", lambda: True)     # XLA has read its flags already
    late = {}
    assert not xf.configure(late) and late == {}


def test_command_buffer_flag_is_one_this_xla_knows():
    """An unknown flag in XLA_FLAGS aborts the process (as jax issue 27988's
    --legacy_command_buffer_custom_call_targets does in jax >= 0.10.2)."""
    import subprocess
    import sys

    from sparq_jax import xla_flags as xf

    env = {**__import__("os").environ, "XLA_FLAGS": xf.with_command_buffer_flag(None), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "3.0", run.stderr[-2000:]


def test_method_from_name_is_the_one_vocabulary():
    """Every name builds its class's for_compression budget; the GQA rule and errors name the fix."""
    D, S = 64, 4096
    assert sq.method_from_name("dense", 0.125, D, S) == sq.Dense()
    plain = sq.SparQ.for_compression(1 / 8, D, S)
    assert sq.method_from_name("sparq", "1/8", D, S, grouped=True) == dataclasses.replace(plain, reallocate_mean=False)
    assert sq.method_from_name("sparq", 1 / 8, D, S, grouped=False) == plain
    assert sq.method_from_name("sparq-mean", 1 / 8, D, S) == plain
    logits = sq.method_from_name("sparq-logits", 1 / 8, D, S)
    assert (logits.reallocate_mean, logits.group_scores) == (False, "logits")
    assert sq.method_from_name("h2o", 1 / 8, D, S) == sq.H2O.for_compression(1 / 8, D, S)
    assert sq.method_from_name("streaming", 1 / 8, D, S) == sq.Streaming.for_compression(1 / 8, D, S)
    assert sq.method_from_name("flexgen", 3 / 4, D, S) == sq.FlexGen.for_compression(3 / 4, D, S)
    with pytest.raises(ValueError, match="unknown method 'magic'; choose from dense, sparq"):
        sq.method_from_name("magic", 1 / 8, D, S)
    with pytest.raises(ValueError, match="flexgen at compression 0.125: .*larger compression"):
        sq.method_from_name("flexgen", 1 / 8, D, S)


def test_unknown_method_object_is_a_type_error():
    class NotAMethod:
        stateful = False
        reads_transposed_keys = False

    cache = sq.KVCache.from_kv(np.zeros((1, 1, 8, 4), np.float32), np.zeros((1, 1, 8, 4), np.float32), [8])
    with pytest.raises(TypeError, match="Dense, SparQ, H2O, Streaming, FlexGen"):
        sq.attend(np.zeros((1, 1, 4), np.float32), cache, NotAMethod())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_16bit_append_writes_only_the_new_positions(dtype, t, jit):
    """A 16-bit append (on CPU sparq_jax.native's in-place write) changes exactly positions
    lengths[b] .. lengths[b] + t - 1 of each row in K, K^T and V, bit for bit the fp32 append's values
    rounded to the dtype (and a NumPy reference), drops what falls past max_len inside jit (the
    length still grows: overflowed()), keeps v_sum in fp32, and leaves the input cache as it was."""
    rng = np.random.default_rng(22 + t)
    b, h, s, d = 3, 2, 9, 8
    k, v = (rng.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(2))
    k_new, v_new = (rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(2))
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype), np.float32)
    lengths = np.array([0, 4, s - t + jit])             # under jit row 2 overflows by one position
    cache = sq.KVCache.from_kv(jnp.asarray(k, dtype), jnp.asarray(v, dtype), lengths)
    before = [np.asarray(x, np.float32).copy() for x in (cache.k, cache.kt, cache.v)]
    append = (lambda c, kn, vn: c.append(kn, vn))
    out = (jax.jit(append) if jit else append)(cache, jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype))
    # NumPy: the rounded cache with each row's new positions written where they fit.
    want_k, want_v = rounded(np.asarray(cache.k, np.float32)), rounded(np.asarray(cache.v, np.float32))
    for row, length in enumerate(lengths):
        fit = min(t, s - length)
        want_k[row, :, length:length + fit] = rounded(k_new[row, :, :fit])
        want_v[row, :, length:length + fit] = rounded(v_new[row, :, :fit])
    np.testing.assert_array_equal(np.asarray(out.k, np.float32), want_k)
    np.testing.assert_array_equal(np.asarray(out.kt, np.float32), want_k.swapaxes(2, 3))
    np.testing.assert_array_equal(np.asarray(out.v, np.float32), want_v)
    # The fp32 path (XLA's scatter) on the same rounded values, rounded back: the same bits.
    wide = sq.KVCache.from_kv(np.asarray(cache.k, np.float32), np.asarray(cache.v, np.float32), lengths)
    wide = (jax.jit(append) if jit else append)(wide, rounded(k_new), rounded(v_new))
    for got, ref in ((out.k, wide.k), (out.kt, wide.kt), (out.v, wide.v)):
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), rounded(ref))
    assert out.v_sum.dtype == jnp.float32
    np.testing.assert_allclose(out.v_sum, wide.v_sum, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.lengths, lengths + t)
    assert bool(out.overflowed()) == jit
    for x, was in zip((cache.k, cache.kt, cache.v), before):   # not donated: the input is untouched
        np.testing.assert_array_equal(np.asarray(x, np.float32), was)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_append_one_position_writes_it_and_drops_overflow(dtype):
    """16-bit caches append through sparq_jax.native's in-place write on CPU (not XLA:CPU's widening
    scatter): the written values land at each row's length, in K, K^T and V, and a row already full keeps its
    contents (the write is dropped, the length still grows), as the scatter path does."""
    rng = np.random.default_rng(21)
    k, v = (rng.standard_normal((2, 3, 6, 4)).astype(np.float32) for _ in range(2))
    lengths = np.array([3, 6])
    cache = sq.KVCache.from_kv(jnp.asarray(k, dtype), jnp.asarray(v, dtype), lengths)
    k_new, v_new = (rng.standard_normal((2, 3, 1, 4)).astype(np.float32) for _ in range(2))
    out = jax.jit(lambda c: c.append(jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype)))(cache)
    want_k = np.asarray(cache.k, np.float32).copy()
    want_v = np.asarray(cache.v, np.float32).copy()
    want_k[0, :, 3] = np.asarray(jnp.asarray(k_new[0, :, 0], dtype), np.float32)
    want_v[0, :, 3] = np.asarray(jnp.asarray(v_new[0, :, 0], dtype), np.float32)
    np.testing.assert_array_equal(np.asarray(out.k, np.float32), want_k)
    np.testing.assert_array_equal(np.asarray(out.kt, np.float32), want_k.swapaxes(2, 3))
    np.testing.assert_array_equal(np.asarray(out.v, np.float32), want_v)
    np.testing.assert_array_equal(np.asarray(out.lengths), [4, 7])
    assert out.k.dtype == dtype
