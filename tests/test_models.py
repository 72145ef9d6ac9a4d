"""models/: Llama and Mistral against transformers' PyTorch implementation (logits, greedy generate,
attention probabilities), checkpoint loading and its errors, the decode path, and scripts/generate.py.

The references are tiny random checkpoints that transformers writes into a temporary folder once
per session (tests/model_fixtures.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import sparq_jax as sq
from models import hf, llama, lm as lm_module
from model_fixtures import CASES, VOCAB, build_checkpoint, left_padded_batch, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [20, 13, 5]      # a left-padded batch; longer than Mistral's window of 7


def stacked(state):
    """prefill's tuple of per-layer caches as one cache with a leading layer axis, for inspection."""
    return jax.tree.map(lambda *layers: jnp.stack(layers), *state)


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Full-precision fp32 matmuls where the backend would otherwise use TF32 (GPUs), as torch on CPU."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, dtype="float32", **save_kwargs) -> (folder, transformers reference model),
    each written once per session."""
    built = {}

    def get(name, dtype="float32", **save_kwargs):
        key = (name, dtype, tuple(sorted(save_kwargs.items())))
        if key not in built:
            folder = str(tmp_path_factory.mktemp(f"{name}_{dtype}"))
            built[key] = folder, build_checkpoint(folder, name, dtype=dtype, **save_kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint):
    """loaded(name) -> (our LanguageModel, transformers reference), fp32, once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            folder, ref = checkpoint(name)
            cache[name] = models.from_pretrained(folder), ref
        return cache[name]

    return get


def _masked_max_error(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


# ---------------------------------------------------------------------------------------------
# Parity with transformers

@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(loaded, checkpoint, name):
    lm, ref = loaded(name)
    if CASES[name][2]:  # the case is meant to exercise the transformers-4 config format
        with open(os.path.join(checkpoint(name)[0], "config.json")) as f:
            d = json.load(f)
        assert "rope_scaling" in d and "rope_parameters" not in d
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    err = _masked_max_error(lm.logits(ids, mask), torch_logits(ref, ids, mask), mask)
    print(f"{name}: max |logit error| {err:.2e}")
    assert err < 1e-4


def test_bf16_checkpoint(checkpoint):
    folder, ref = checkpoint("llama_gqa_llama3", dtype="bfloat16")
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16"
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    expected = torch_logits(ref, ids, mask)
    # Read as fp32, the bf16 weights are exact: fp32 parity holds.
    assert _masked_max_error(models.from_pretrained(folder).logits(ids, mask), expected, mask) < 1e-4
    # Computed in bf16: no further from fp32 than transformers' own bf16 model (with some slack).
    ours = models.from_pretrained(folder, dtype="bfloat16")
    assert ours.model.layers[0].attn.q.dtype == jnp.bfloat16
    ref16 = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
    theirs_error = _masked_max_error(torch_logits(ref16, ids, mask), expected, mask)
    ours_error = _masked_max_error(ours.logits(ids, mask), expected, mask)
    print(f"bf16: ours {ours_error:.3f}, transformers {theirs_error:.3f}")
    assert ours_error <= 2 * theirs_error


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bf16_gemm_matches_numpy(transpose_w):
    """Many rows (prefill) with bfloat16 weights on a CPU with AVX512-BF16 run sparq_jax.native's
    GEMM: x rounded to bfloat16, products summed in fp32. Against NumPy in float64 on the same
    rounded x and the weights, with K odd, N not a multiple of the 64-column tiles and rows not a
    multiple of the 6-row tiles nor of the 96-row pieces; the tolerance is fp32 summation's."""
    from models import llama

    if not (llama._cpu_has_bf16_dot() and sq.native.available()[0]):
        pytest.skip("no AVX512-BF16 or no native library: matmul widens the weights instead")
    rng = np.random.default_rng(5)
    for lead, k, n in [((2, 101), 577, 131), ((197,), 64, 64), ((65,), 3, 1)]:
        x = rng.standard_normal((*lead, k)).astype(np.float32)
        w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)), jnp.bfloat16)
        got = np.asarray(jax.jit(lambda x, w: llama.matmul(x, w, transpose_w=transpose_w))(x, w))
        assert got.dtype == np.float32 and got.shape == (*lead, n)
        xr = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
        wf = np.asarray(w, np.float64)
        wf = wf.T if transpose_w else wf
        want = xr @ wf
        bound = np.abs(xr) @ np.abs(wf) * k * np.finfo(np.float32).eps
        assert np.all(np.abs(got - want) <= bound), (lead, k, n)


def test_bf16_prefill_of_many_rows(checkpoint):
    """A bfloat16 prompt of more rows than the decode kernel's (the GEMM on AVX512-BF16 CPUs, else
    XLA's fp32 dot on widened weights) is no further from transformers' fp32 logits than
    transformers' own bfloat16 model, with test_bf16_checkpoint's slack."""
    folder, ref = checkpoint("llama_gqa_llama3", dtype="bfloat16")
    ids = np.random.default_rng(4).integers(1, ref.config.vocab_size, (2, 90))
    mask = np.ones_like(ids)
    expected = torch_logits(ref, ids, mask)
    ref16 = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
    theirs_error = np.abs(torch_logits(ref16, ids, mask) - expected).max()
    ours_error = np.abs(np.asarray(models.from_pretrained(folder, dtype="bfloat16").logits(ids, mask)) - expected).max()
    print(f"bf16 prefill of {ids.size} rows: ours {ours_error:.3f}, transformers {theirs_error:.3f}")
    assert ours_error <= 2 * theirs_error


def test_bf16_decode_step(checkpoint):
    """Decode steps of a bfloat16 model (on CPU: sparq_jax.native's bfloat16 kernels for the
    projections, the head and Dense on the bfloat16 cache) are no further from transformers' fp32
    logits than transformers' own bfloat16 model, with the slack test_bf16_checkpoint allows."""
    folder, ref = checkpoint("llama_gqa_llama3", dtype="bfloat16")
    rng = np.random.default_rng(3)
    ids = rng.integers(1, ref.config.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    expected = torch_logits(ref, ids, mask)[:, -3:]
    ref16 = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
    theirs_error = np.abs(torch_logits(ref16, ids, mask)[:, -3:] - expected).max()
    ours = models.from_pretrained(folder, dtype="bfloat16")
    logits, state = ours.prefill(ids[:, :-2], max_len=12)
    steps = [np.asarray(logits)]
    for t in (10, 11):
        logits, state = ours.decode_step(ids[:, t], state, sq.Dense())
        steps.append(np.asarray(logits))
    ours_error = np.abs(np.stack(steps, axis=1) - expected).max()
    print(f"bf16 decode: ours {ours_error:.3f}, transformers {theirs_error:.3f}")
    assert ours_error <= 2 * theirs_error


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "mistral_window"])
def test_greedy_generate_matches_transformers(loaded, name):
    lm, ref = loaded(name)
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    n = 32
    ours = lm.generate(ids, mask, max_new_tokens=n, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences.numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()                    # [B, steps, V]
    t = ids.shape[1]
    assert ours.shape == (len(LENGTHS), t + n)
    np.testing.assert_array_equal(ours[:, :t], ids)
    for b in range(len(LENGTHS)):
        top2 = np.sort(logits[b], axis=-1)[:, -2:]
        ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < 1e-3)
        # Compare up to (and including) the first near tie: its token may flip with float order.
        upto = min(ties[0] + 1 if ties.size else n, theirs.shape[1] - t)
        assert upto >= 24, f"row {b}: a near tie at step {upto}; pick another seed for this test"
        np.testing.assert_array_equal(ours[b, t:t + upto], theirs[b, t:t + upto], err_msg=f"row {b}")


def test_prefill_h2o_scores_match_transformers_attention(checkpoint):
    """H2O's seed: column sums of the dense prompt attention over valid queries and each KV group."""
    folder, _ = checkpoint("llama_gqa_llama3")
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    lm = models.from_pretrained(folder)
    ids, mask = left_padded_batch(LENGTHS, seed=3)
    with torch.no_grad():
        mask_t = torch.tensor(mask)
        attn = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask_t,
                   position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0), output_attentions=True).attentions
    cache = stacked(lm.prefill(ids, mask, h2o=True)[1])
    cfg = lm.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, probs in enumerate(attn):
        p = probs.numpy() * mask[:, None, :, None]                             # valid queries only
        cols = p.sum(axis=2).reshape(len(LENGTHS), cfg.num_key_value_heads, g, -1).sum(axis=2)
        for b, n in enumerate(LENGTHS):
            np.testing.assert_allclose(np.asarray(cache.h2o_scores[layer, b, :, :n]), cols[b, :, -n:],
                                       atol=1e-4, rtol=1e-5)
            assert not np.asarray(cache.h2o_scores[layer, b, :, n:]).any()


# ---------------------------------------------------------------------------------------------
# The decode path

@pytest.mark.parametrize("name", ["llama_gqa_llama3", "mistral_window"])
def test_teacher_forced_decode_equals_logits(loaded, name):
    lm, _ = loaded(name)
    ids, mask = left_padded_batch([30, 23, 15], seed=4)
    full = np.asarray(lm.logits(ids, mask))
    start = 18
    logits, state = lm.prefill(ids[:, :start], mask[:, :start], max_len=ids.shape[1])
    np.testing.assert_allclose(np.asarray(logits), full[:, start - 1], atol=1e-4)
    for j in range(start, ids.shape[1]):
        logits, state = lm.decode_step(ids[:, j], state)
        np.testing.assert_allclose(np.asarray(logits), full[:, j], atol=1e-4, err_msg=f"position {j}")
    with pytest.raises(ValueError, match="cache is full"):
        lm.decode_step(ids[:, -1], state)


def test_decode_step_donates_the_state(loaded):
    """decode_step reuses the state's buffers (a copy of every cache per token would cost more than
    SparQ saves)."""
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=4)
    _, state = lm.prefill(ids, mask, transposed_keys=True)
    _, new = lm.decode_step(ids[:, -1], state, method=sq.SparQ(rank=4, top_k=8))
    assert all(c.k.is_deleted() and c.kt.is_deleted() and c.v.is_deleted() for c in state)
    assert not any(c.k.is_deleted() for c in new)


def test_prefill_in_blocks_equals_one_block(loaded):
    lm, _ = loaded("mistral_window")
    ids, mask = left_padded_batch(LENGTHS, seed=5)
    kwargs = dict(keep_kv=True, column_sums=True)
    one, kv_one, sums_one = llama.forward_prompt(lm.model, ids, mask, **kwargs)
    many, kv_many, sums_many = llama.forward_prompt(lm.model, ids, mask, chunk=6, **kwargs)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(many)[valid], np.asarray(one)[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack([v for _, v in kv_many]), np.stack([v for _, v in kv_one]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sums_many), np.asarray(sums_one), rtol=1e-5, atol=1e-5)


def test_prefill_chunk_by_chunk_reports_progress(loaded, monkeypatch):
    """lm.prefill runs chunk by chunk from Python, calling progress after each chunk, and gives one
    jitted prefill's logits and caches (H2O's scores included) whatever the chunking."""
    lm, _ = loaded("mistral_window")
    ids, mask = left_padded_batch(LENGTHS, seed=5)
    whole_logits, whole = llama.prefill(lm.model, ids, mask, max_len=30, transposed_keys=True, h2o=True)
    monkeypatch.setattr(llama, "PREFILL_CHUNK", 4)        # attention blocks of 4 queries
    monkeypatch.setattr(llama, "PREFILL_STEP", 24)        # 3 rows: 3 chunks of 8 positions over the 20 (+4 padding)
    calls = []
    logits, state = lm.prefill(ids, mask, max_len=30, transposed_keys=True, h2o=True,
                               progress=lambda done, total: calls.append((done, total)))
    b = len(LENGTHS)
    assert calls == [(b * 8, b * 20), (b * 16, b * 20), (b * 20, b * 20)]
    # fp32 rounding: the blocks and chunks only reorder sums (as test_prefill_in_blocks_equals_one_block)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(whole_logits), rtol=1e-5, atol=1e-5)
    for ours, one in zip(state, whole):
        for field in ("k", "kt", "v", "h2o_scores", "lengths"):
            np.testing.assert_allclose(np.asarray(getattr(ours, field)), np.asarray(getattr(one, field)),
                                       rtol=1e-5, atol=1e-5, err_msg=field)
    lm.prefill(ids, mask, progress=True)                  # a tqdm bar
    with pytest.raises(ValueError, match="progress must be"):
        lm.prefill(ids, mask, progress="yes")


def test_prefill_logits_and_decode_run_one_forward(loaded, monkeypatch):
    """prefill, logits, decode_step and the differentiable path all go through Llama.__call__."""
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=5)
    calls = []
    forward = llama.Llama.__call__

    def counted(self, input_ids, *args, **kwargs):
        calls.append(input_ids.shape)
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(llama.Llama, "__call__", counted)
    full = llama.logits(lm.model, ids, mask)
    llama.logits(lm.model, ids, mask, chunk=None)
    logits, state = llama.prefill(lm.model, ids[:, :-1], mask[:, :-1], max_len=ids.shape[1], transposed_keys=True,
                                  h2o=False)
    step, _ = llama.decode_step(lm.model, ids[:, -1], state, method=sq.Dense())
    assert calls == [ids.shape, ids.shape, (3, ids.shape[1] - 1), (3, 1)]
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, -1]), atol=1e-4)


def test_split_merge_round_trip(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    graphdef, state = nnx.split(lm.model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    assert type(copy) is llama.Llama and copy.config == lm.config and len(copy.layers) == lm.config.num_hidden_layers
    assert copy.layers[1].attn.q[...] is not lm.model.layers[1].attn.q[...]
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    np.testing.assert_array_equal(np.asarray(models.LanguageModel(copy).logits(ids, mask)),
                                  np.asarray(lm.logits(ids, mask)))
    # lm.params is the model's state: the same arrays, no copy
    assert all(a is b for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(nnx.state(lm.model))))


def test_prefill_cache_is_left_aligned(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=6)
    cache = stacked(lm.prefill(ids, mask, max_len=40, transposed_keys=True)[1])
    assert cache.k.shape == (lm.config.num_hidden_layers, 3, lm.config.num_key_value_heads, 40, lm.config.head_dim)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.tile(LENGTHS, (lm.config.num_hidden_layers, 1)))
    np.testing.assert_array_equal(np.asarray(cache.kt), np.swapaxes(np.asarray(cache.k), -1, -2))
    for b, n in enumerate(LENGTHS):
        alone = stacked(lm.prefill(ids[b:b + 1, -n:], max_len=40)[1])
        # fp32 rounding: layer 0's K, before any attention, already differs by 1.4e-6 between the batched
        # [3, 20] and the lone [1, n] products (the GEMM's blocking follows the shape); each layer
        # amplifies it ~3x, to 1.1e-5 (former attention blocks) or 1.3e-5 (attend_blocks) at layer 2.
        np.testing.assert_allclose(np.asarray(cache.k[:, b]), np.asarray(alone.k[:, 0]), rtol=1e-5, atol=3e-5)
        assert not np.asarray(cache.v[:, b, :, n:]).any()
    # K^T only where the method reads it, unless overridden.
    assert all(c.kt is None for c in lm.prefill(ids, mask)[1])
    assert all(c.kt is None for c in lm.prefill(ids, mask, transposed_keys=False)[1])


@pytest.fixture(scope="module")
def dense_tokens(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    return ids, mask, lm.generate(ids, mask, max_new_tokens=24, eos_token_id=[])


@pytest.mark.parametrize("kind", ["sparq", "h2o", "streaming", "flexgen"])
def test_full_budget_generates_dense_tokens(loaded, dense_tokens, kind):
    """With a budget covering every position, each method is exact attention: Dense's tokens."""
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask, dense = dense_tokens
    everything = max(LENGTHS) + 24
    method = {"sparq": sq.SparQ(rank=lm.config.head_dim, top_k=everything),
              "h2o": sq.H2O(top_k=everything, local_window=4),
              "streaming": sq.Streaming(sink=4, window=everything),
              "flexgen": sq.FlexGen(top_k=everything)}[kind]
    np.testing.assert_array_equal(lm.generate(ids, mask, max_new_tokens=24, method=method, eos_token_id=[]), dense)


def test_padded_row_equals_row_alone(loaded):
    lm, _ = loaded("mistral_window")
    ids, mask = left_padded_batch(LENGTHS, seed=7)
    batch = lm.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    batch_logits, _ = lm.prefill(ids, mask)
    for b, n in enumerate(LENGTHS):
        alone = lm.generate(ids[b:b + 1, -n:], max_new_tokens=16, eos_token_id=[])
        np.testing.assert_array_equal(alone[0, n:], batch[b, ids.shape[1]:])
        alone_logits, _ = lm.prefill(ids[b:b + 1, -n:])
        np.testing.assert_allclose(np.asarray(alone_logits[0]), np.asarray(batch_logits[b]), atol=1e-5)


def test_generate_eos_and_pad(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    free = lm.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    t = ids.shape[1]
    # Make the token each row emits at step 3 an eos (one of a list): the row continues with pad.
    eos = [int(free[0, t + 3]), int(free[1, t + 3])]
    out = lm.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=5)
    assert out.shape == free.shape
    for b in range(len(LENGTHS)):
        hits = np.flatnonzero(np.isin(free[b, t:], eos))
        stop = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(out[b, t:t + stop], free[b, t:t + stop])
        assert (out[b, t + stop:] == 5).all()


def test_sampling_is_seeded(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[])
    a = lm.generate(ids, mask, seed=11, **kwargs)
    np.testing.assert_array_equal(lm.generate(ids, mask, seed=11, **kwargs), a)
    assert (lm.generate(ids, mask, seed=12, **kwargs) != a).any()
    assert (a != lm.generate(ids, mask, max_new_tokens=12, eos_token_id=[])).any()


def test_sample_logits_follows_transformers_warpers():
    """Temperature then top-p as transformers' warpers: only their kept tokens, at their odds."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(1, 12)).astype(np.float32) * 2
    scores = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, torch.tensor(logits)))
    probs = torch.softmax(scores, -1).numpy()[0]
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: lm_module.sample_logits(jnp.asarray(logits), k, 0.7, 0.8))(keys))[:, 0]
    freq = np.bincount(draws, minlength=12) / draws.size
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(probs))
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_decode_loop_compiles_once_per_bucket(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    method = sq.SparQ(rank=8, top_k=6, local_window=2)
    rng = np.random.default_rng(8)

    def run(t):
        lm.generate(rng.integers(3, VOCAB, (2, t)), max_new_tokens=5, method=method)
        return lm_module.decode_loop_jit._cache_size()

    before = lm_module.decode_loop_jit._cache_size()
    assert lm_module.bucket_length(17) == lm_module.bucket_length(19) != lm_module.bucket_length(21)
    assert run(17) == before + 1
    assert run(19) == before + 1       # same bucket: no new compile
    assert run(21) == before + 2       # next bucket
    lm.generate(rng.integers(3, VOCAB, (2, 19)), max_new_tokens=5, method=sq.Dense())
    assert lm_module.decode_loop_jit._cache_size() == before + 3   # another method


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_copies_no_cache_and_no_weight(dtype):
    """The compiled decode loop updates the donated caches in place and reads every weight where it
    lies (a per-step copy of a cache or a weight costs more than SparQ saves); a bfloat16 cache is
    never widened to fp32 whole (XLA:CPU's bfloat16 scatter did that every step)."""
    import re

    config = models.ModelConfig(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=256)
    lm = models.LanguageModel(models.init_model(config, dtype=jnp.dtype(dtype)))
    name = "bf16" if dtype == "bfloat16" else "f32"
    logits, state = lm.prefill(np.ones((1, 100), np.int32), max_len=120, transposed_keys=True)
    weights = {",".join(map(str, x.shape)) for x in jax.tree.leaves(lm.params) if x.ndim > 1}
    for method in [sq.Dense(), sq.SparQ(rank=2, top_k=16)]:
        hlo = lm_module.decode_loop_jit.lower(
            lm._graphdef, lm.params, logits, state, jax.random.key(0), jnp.float32(1), jnp.float32(1),
            jnp.zeros((0,), jnp.int32), jnp.int32(0), method=method, max_new_tokens=8, do_sample=False,
        ).compile().as_text()
        assert not re.findall(rf"{name}\[1,2,(120,8|8,120)\]\{{[0-9,]+\}} copy\(", hlo), method
        assert not re.findall(r"= f32\[(1,)?2,(120,8|8,120)\]\{[0-9,]+\} ", hlo) or name == "f32", method
        for shape in weights:
            assert not re.findall(rf"{name}\[{shape}\]\{{[0-9,]+\}} (copy|transpose)\(", hlo), (method, shape)


def test_generate_validates_arguments(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch([4, 3])
    for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"),
                          (dict(do_sample=True, temperature=0.0), "temperature"),
                          (dict(do_sample=True, top_p=1.5), "top_p"),
                          (dict(eos_token_id=VOCAB), "eos_token_id"),
                          (dict(attention_mask=mask[:, 1:]), "attention_mask"),
                          (dict(attention_mask=np.zeros_like(mask)), "at least one token")]:
        kwargs.setdefault("attention_mask", mask)
        with pytest.raises(ValueError, match=match):
            lm.generate(ids, **kwargs)
    with pytest.raises(TypeError, match="one of Dense, SparQ, H2O, Streaming, FlexGen .*method_from_name"):
        lm.generate(ids, mask, method="sparq")
    with pytest.raises(ValueError, match="input_ids"):
        lm.generate(ids + VOCAB)
    with pytest.raises(ValueError, match="max_len"):
        lm.prefill(ids, max_len=2)


def test_decode_from_one_prefill_equals_generate(loaded):
    """One prefill (K^T kept, H2O seeded) serves every method: decode's tokens equal generate's,
    and the state is left as it was, so the next method starts from the same prompt."""
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    n = 10
    logits, state = lm.prefill(ids, mask, max_len=ids.shape[1] + n - 1, h2o=True,
                               transposed_keys=True)
    before = jax.tree.map(np.asarray, state)
    for method in [sq.Dense(), sq.SparQ(rank=4, top_k=8, local_window=2), sq.H2O(top_k=8, local_window=2),
                   sq.Streaming(sink=2, window=6), sq.FlexGen(top_k=8)]:
        new, stats = lm.decode(logits, state, n, method=method, eos_token_id=[], return_stats=True)
        want = lm.generate(ids, mask, max_new_tokens=n, method=method, eos_token_id=[])
        np.testing.assert_array_equal(new, want[:, ids.shape[1]:], err_msg=repr(method))
        assert stats.decode_steps == n - 1 and stats.prefill_s == 0
        np.testing.assert_array_equal(stats.prompt_lengths, LENGTHS)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)


def test_generate_stats_transfer_ratio(loaded):
    """The measured ratio: a hand count over the run's rows and steps of the method's Eq. 11 reads."""
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    d = lm.config.head_dim
    method = sq.SparQ(rank=4, top_k=8, local_window=2)
    _, stats = lm.generate(ids, mask, max_new_tokens=6, method=method, eos_token_id=[], return_stats=True)
    assert stats.decode_steps == 5 and stats.prefill_s > 0 and stats.decode_s > 0
    lengths = [n + step for n in LENGTHS for step in range(1, 6)]
    want = (sum(s * 4 + 2 * min(8, s) * d + 4 * d for s in lengths)
            / sum(2 * s * d + 2 * d for s in lengths))
    assert stats.transfer_ratio == pytest.approx(want, rel=1e-12)
    _, dense = lm.generate(ids, mask, max_new_tokens=6, eos_token_id=[], return_stats=True)
    assert dense.transfer_ratio == 1.0
    # a sliding window caps the length each step reads
    assert lm_module.transfer_ratio(sq.Streaming(1, 2), [5], 3, d, window=4) == pytest.approx(
        3 * (2 * 3 * d + 2 * d) / (3 * (2 * 4 * d + 2 * d)))


def test_decode_validates_state(loaded):
    lm, _ = loaded("llama_gqa_llama3")
    ids, mask = left_padded_batch(LENGTHS, seed=2)
    logits, state = lm.prefill(ids, mask, max_len=ids.shape[1] + 3)
    with pytest.raises(ValueError, match=r"max_len=23 positions, too few for max_new_tokens=5"):
        lm.decode(logits, state, 5)
    with pytest.raises(ValueError, match="transposed_keys=True"):
        lm.decode(logits, state, 2, method=sq.SparQ(rank=4, top_k=8))
    with pytest.raises(ValueError, match="keeps state in the cache"):
        lm.decode(logits, state, 2, method=sq.H2O(top_k=8, local_window=2))
    with pytest.raises(ValueError, match=r"logits must be \[B=3, vocab_size="):
        lm.decode(logits[:2], state, 2)
    with pytest.raises(ValueError, match="state must be"):
        lm.decode(logits, state[:1], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.decode(logits, state, 0)


# ---------------------------------------------------------------------------------------------
# Loading

def test_config_formats_agree():
    v5 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert models.ModelConfig.from_dict(v4) == models.ModelConfig.from_dict(v5)
    config = models.ModelConfig.from_dict(v5)
    assert config.num_key_value_heads == 2 and config.head_dim == 4 and config.sliding_window is None
    assert models.ModelConfig.from_dict(config.to_dict()) == config


def test_sharded_checkpoint_loads(checkpoint, loaded):
    folder, ref = checkpoint("llama_gqa_llama3", max_shard_size="40KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2
    lm = models.from_pretrained(folder)
    single, _ = loaded("llama_gqa_llama3")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lm.params, single.params)
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    assert _masked_max_error(lm.logits(ids, mask), torch_logits(ref, ids, mask), mask) < 1e-4


def test_save_pretrained_round_trip_through_transformers(tmp_path):
    config = models.ModelConfig(model_type="llama", vocab_size=models.tokenizer.VOCAB_SIZE, hidden_size=32,
                                intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                bos_token_id=256, eos_token_id=(257,), pad_token_id=258)
    model = models.init_model(config, seed=1, std=0.3)
    models.save_pretrained(model, str(tmp_path))
    models.byte_tokenizer().save_pretrained(str(tmp_path))
    lm = models.from_pretrained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lm.params,
                 nnx.state(model))
    assert lm.config == config
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "héllo, wörld\n"
    batch = tok([text, "ab"], padding=True, return_tensors="np")
    assert list(batch["input_ids"][0]) == [256, *text.encode()]
    assert list(batch["input_ids"][1][-3:]) == [256, 97, 98] and batch["attention_mask"][1][0] == 0
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == text
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert _masked_max_error(lm.logits(ids, mask), torch_logits(ref, ids, mask), mask) < 1e-4


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return str(dst)


def _edit_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(folder, edit):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)


BAD_CHECKPOINTS = {
    "no folder": (lambda f: f + "/does-not-exist", "no such checkpoint folder"),
    "no config": (lambda f: (os.remove(f + "/config.json"), f)[1], "no config.json"),
    "model_type": (lambda f: (_edit_config(f, lambda d: d.update(model_type="gpt2")), f)[1],
                   r"'gpt2' is not supported.*llama, mistral"),
    "missing": (lambda f: (_edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), f)[1],
                r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    "unexpected": (lambda f: (_edit_tensors(f, lambda t: t.update(extra=np.zeros(3, np.float32))), f)[1],
                   "unexpected tensors: extra"),
    "misshaped": (lambda f: (_edit_tensors(f, lambda t: t.update(
        {"model.norm.weight": np.zeros(65, np.float32)})), f)[1], r"misshaped tensors: model\.norm\.weight is \[65\]"),
    "int tensor": (lambda f: (_edit_tensors(f, lambda t: t.update(
        {"model.norm.weight": np.zeros(64, np.int32)})), f)[1], r"not a float type.*model\.norm\.weight \(I32\)"),
    "pickle only": (lambda f: (os.remove(f + "/model.safetensors"),
                               open(f + "/pytorch_model.bin", "wb").close(), f)[2],
                    r"(?s)pickled PyTorch weights.*runs.*code.*save_pretrained"),
    "shard gone": (lambda f: f, "names shard"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_before_reading_weights(checkpoint, tmp_path, monkeypatch, case):
    if case == "shard gone":
        source, _ = checkpoint("llama_gqa_llama3", max_shard_size="40KB")
        folder = _copy(source, tmp_path / "ckpt")
        os.remove(os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]))
    else:
        folder = BAD_CHECKPOINTS[case][0](_copy(checkpoint("llama_gqa_llama3")[0], tmp_path / "ckpt"))

    def no_reads(entry):
        raise AssertionError(f"read tensor data of {entry.path} before finding the problem")

    monkeypatch.setattr(hf._Entry, "read", no_reads)
    with pytest.raises(ValueError, match=BAD_CHECKPOINTS[case][1]):
        models.from_pretrained(folder)


def test_generation_defaults_from_generation_config(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_gqa_llama3")[0], tmp_path / "ckpt")
    lm = models.from_pretrained(folder)
    assert lm.eos_token_id == (2,) and lm.pad_token_id == 0 and lm.tokenizer is None
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7], "pad_token_id": 3}, f)
    lm = models.from_pretrained(folder)
    assert lm.eos_token_id == (2, 7) and lm.pad_token_id == 3
    ids = np.full((1, 4), 9, np.int32)
    free = lm.generate(ids, max_new_tokens=6, eos_token_id=[])[0, 4:]
    stop = next((i for i, x in enumerate(free) if x in (2, 7)), None)
    out = lm.generate(ids, max_new_tokens=6)[0, 4:]          # eos and pad from generation_config.json
    if stop is not None:
        assert (out[stop + 1:] == 3).all() and (out[:stop + 1] == free[:stop + 1]).all()
    else:
        assert (out == free).all()


def test_bad_load_arguments(checkpoint, monkeypatch):
    folder, _ = checkpoint("llama_gqa_llama3")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        models.from_pretrained(folder, dtype="int8")
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes \('data', 'model'\)"):
        models.from_pretrained(folder, mesh=object())
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"(?s)sparq-jax-tests/no-such-model.*local folder.*from_pretrained\('DIR'\)"):
        models.from_pretrained("sparq-jax-tests/no-such-model")


PEAK_MEMORY = textwrap.dedent("""
    import json, os, sys
    import jax, models
    from flax import nnx
    from models import hf

    def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss survives exec from pytest)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

    folder = sys.argv[1]
    config = models.ModelConfig.from_json(os.path.join(folder, "config.json"))
    jax.block_until_ready(jax.numpy.zeros(4) + 1)   # start the runtime before the baseline
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
        f.write("5")
    base = status("VmRSS")
    model = hf.load_weights(folder, config)
    jax.block_until_ready(nnx.state(model))
    print(json.dumps({"grown": status("VmHWM") - base, "held": status("VmRSS") - base}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_sharded_load_peak_host_memory(tmp_path):
    """Loading tensor by tensor holds about one copy of the weights (on CPU the device is the host)."""
    from safetensors.numpy import save_file

    # ~450 MiB, so that fixed costs (compiling the per-shape updates: ~30 MiB) weigh little.
    config = models.ModelConfig(model_type="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                head_dim=128, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    layout = hf._layout(config)
    weight_map = {name: f"model-{(slot.layer or 0) % 3 + 1:05d}-of-00003.safetensors" for name, slot in layout.items()}
    size = 0
    for shard in sorted(set(weight_map.values())):
        tensors = {name: rng.standard_normal(layout[name].hf_shape, np.float32)
                   for name, s in weight_map.items() if s == shard}
        size += sum(x.nbytes for x in tensors.values())
        save_file(tensors, str(tmp_path / shard))
        del tensors
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config.to_dict(), f)
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    grown, held = measured["grown"], measured["held"]
    print(f"loading {size / 2**20:.0f} MiB sharded: peak host memory {grown / size:.2f}x the checkpoint, "
          f"{held / size:.2f}x held after")
    assert held > 0.9 * size    # the measurement sees the weights themselves
    assert grown < 1.5 * size


# ---------------------------------------------------------------------------------------------
# scripts/generate.py

def _generate(*argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "generate.py"), *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("argv, message", [
    (["--method", "dense,magic"], "unknown method 'magic'"),
    (["--compression", "3/2"], "must be in (0, 1]"),
    (["--max-new-tokens", "0"], "must be a positive integer, got 0"),
    (["--json", "/no/such/folder/out.json"], "does not exist"),
])
def test_generate_script_rejects_bad_flags(argv, message):
    run = _generate(*argv)
    assert run.returncode == 2 and message in run.stderr.replace("\n", " "), run.stderr


@pytest.fixture(scope="module")
def tiny_chatless(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("generate") / "model")
    config = models.ModelConfig(model_type="llama", vocab_size=models.tokenizer.VOCAB_SIZE, hidden_size=32,
                                intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    models.save_pretrained(models.init_model(config, seed=0), folder)
    models.byte_tokenizer().save_pretrained(folder)
    return folder


def test_compare_methods(tiny_chatless):
    """The main job's library call: one prefill, each method's texts, tokens/s and measured transfers;
    every budget checked before any work."""
    lm = models.from_pretrained(tiny_chatless)
    prompts = ["Once upon a time", "To be"]
    run = models.evaluation.compare_methods(lm, prompts, ["dense", "flexgen", "sparq"], compression=3 / 4,
                                            max_new_tokens=4, keys=["xx", "yy"], progress=False)
    assert list(run.runs) == ["dense", "flexgen", "sparq"] and run.prompt_tokens == [17, 6]   # <s> + bytes
    ids = lm.tokenizer(prompts, padding=True, return_tensors="np")
    want = lm.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=4)[:, -4:]
    assert run.runs["dense"].text == lm.tokenizer.batch_decode(want, skip_special_tokens=True)
    for name, r in run.runs.items():
        assert len(r.text) == 2 and r.tokens_per_s > 0 and r.correct == [False, False]
        assert (r.transfer_ratio == 1.0) == (name == "dense") and 0 < r.transfer_ratio <= 1
    table = run.table().splitlines()
    assert [line.split()[0] for line in table[1:]] == ["dense", "flexgen", "sparq"]
    assert table[1].split()[3] == "1.00x" and table[1].split()[4] == "0/2"
    assert run.to_json("m")["results"]["sparq"]["transfer_ratio"] == r.transfer_ratio
    with pytest.raises(ValueError, match="flexgen at compression 0.125: .*never goes below 1/2"):
        models.evaluation.compare_methods(lm, ["To be"], ["flexgen"], compression=1 / 8, progress=False)
    # sparq cannot fit 1/8 of a 6-token prompt: raised before dense, listed first, runs
    with pytest.raises(ValueError, match="sparq at compression 0.125: .*Use a longer prompt or a larger compression"):
        models.evaluation.compare_methods(lm, ["To be"], ["dense", "sparq"], progress=False)


def test_generate_script_runs(tiny_chatless, tmp_path):
    out = str(tmp_path / "out.json")
    run = _generate("--model", tiny_chatless, "--prompt", "Once upon a time", "--prompt", "To be",
                    "--method", "dense,flexgen", "--method", "sparq", "--compression", "3/4",
                    "--max-new-tokens", "4", "--json", out)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out) as f:
        results = json.load(f)["results"]
    assert list(results) == ["dense", "flexgen", "sparq"]
    assert "transfer ratio" in run.stdout and "Once upon a time" in run.stdout
    for name, r in results.items():
        assert len(r["text"]) == 2 and r["tokens_per_s"] > 0
        assert (r["transfer_ratio"] == 1.0) == (name == "dense") and 0 < r["transfer_ratio"] <= 1
    short = _generate("--model", tiny_chatless, "--prompt", "To be", "--method", "dense,sparq")
    assert short.returncode == 2 and "Use a longer prompt or a larger compression" in short.stderr
    assert "decode tokens/s" not in short.stdout


@pytest.mark.skipif(not os.path.exists(os.path.join(models.BUNDLED, "model.safetensors")),
                    reason="models/bundled has no trained checkpoint")
def test_generate_script_bundled_table():
    """The main job on the bundled model: pass-key prompts, one prefill, the table parsed."""
    run = _generate("--model", "bundled", "--max-new-tokens", "8", "--batch", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    lines = out[out.index("method      transfer ratio"):].strip().splitlines()[1:]
    rows = {cells[0]: cells for cells in (line.split() for line in lines)}
    assert list(rows) == ["dense", "sparq"]
    assert float(rows["dense"][1]) == 1.0 and 0.11 < float(rows["sparq"][1]) <= 0.125 * 1.01
    assert float(rows["dense"][2]) > 0 and rows["dense"][3] == "1.00x" and rows["sparq"][3].endswith("x")
    for name, cells in rows.items():   # the right/total column counts the per-prompt verdicts above it
        answers = [line.strip() for line in out.splitlines() if line.strip().startswith(f"{name}: ")]
        assert len(answers) == 3 and cells[4] == f"{sum(a.endswith('  right') for a in answers)}/3"
    assert "prompts of" in out and "one prefill for all methods" in out


def test_bundled_model_loads_without_torch():
    """Issue 17 item 6: a byte tokenizer does not need transformers' AutoTokenizer, which imports torch."""
    code = ("import sys, models; lm = models.from_pretrained('bundled'); "
            "assert lm.tokenizer('ab')['input_ids'][-2:] == [97, 98]; "
            "assert lm.tokenizer.padding_side == 'left'; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
