"""models.training (scripts/train_tiny.py's library): its data stream, probes and differentiable
forward, its options' checks, a two-step run, and the script's command line."""
import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import llama
from models import training as tt
from models.evaluation.tasks import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.\n" * 400)


def test_copy_documents_hold_each_piece_twice():
    stream = tt.Stream(TEXT, 512, seed=0, mix={"copy": 1.0})
    for seed in range(20):
        pieces = stream._copy_pieces(np.random.default_rng(seed))      # the draws copy() starts with
        doc = stream.copy(np.random.default_rng(seed), 400)
        assert len(doc) == 400
        for piece in pieces:
            assert 8 <= len(piece) <= 32 and doc.count(piece) == 2, (piece, doc)


def test_stream_is_a_function_of_seed_and_step():
    mix = {"text": 0.2, "passkey": 0.2, "kv": 0.2, "repeat": 0.1, "induct": 0.1, "copy": 0.2}
    a = tt.Stream(TEXT, 256, seed=3, mix=mix).batch(7, 2)
    b = tt.Stream(TEXT, 256, seed=3, mix=mix).batch(7, 2)
    c = tt.Stream(TEXT, 256, seed=3, mix=mix).batch(8, 2)
    assert a.shape == (2, 257) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_probe_masks_select_the_copied_and_answer_tokens():
    rows, mask = tt.recall_probe(n=3, piece=10, gap=50)
    assert rows.shape == (3, 1 + 10 + 50 + 10) and mask.sum() == 3 * 9
    for row, m in zip(rows, mask):
        targets = row[1:][m]
        assert np.array_equal(targets, row[2:11])          # the piece after its first character
    rows, mask = tt.passkey_probe(tt.Stream(TEXT, 1024, seed=0), n=2, length=600)
    for row, m in zip(rows, mask):
        text = bytes(row[1:].astype(np.uint8)).decode()
        assert text.endswith(".") and bytes(row[1:][m].astype(np.uint8)).decode() == text[-6:-1]
        assert text[-6:-1] in text[:-6]                       # the needle holds the key


def test_passkey_documents_use_the_evaluation_prompt():
    """Training's passkey documents are worded as the evaluation task's (models.evaluation.tasks), so that
    what the model learns is what the task asks."""
    stream = tt.Stream(TEXT, 1024, seed=0, mix={"passkey": 1.0})
    for seed in range(6):
        doc = stream.passkey(np.random.default_rng(seed), 700)
        key = doc[-6:-1]
        assert doc.startswith(PASSKEY_INTRO) and doc.endswith(f" {PASSKEY_QUESTION}{key}.") and key.isdigit()
        assert f" The pass key is {key}. Remember it. {key} is the pass key. " in doc
        assert PASSKEY_FILLER in doc or "Caesar" in doc                  # filler: the task's, or Shakespeare


def _tiny_model():
    options = tt.TrainOptions(seq_len=256, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, layers=2)
    return models.init_model(tt.make_config(options), seed=1, std=0.1)


def test_differentiable_logits_equal_blockwise_logits():
    """training's attention (one [T, T] block, chunk=None) is the inference forward's, padding and all."""
    model = _tiny_model()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 256, (2, 40)), jnp.int32)
    mask = np.ones((2, 40), np.int32)
    mask[1, :9] = 0
    ref = llama.logits(model, ids, mask, chunk=8)
    ours = llama.logits(model, ids, mask, chunk=None)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(ref)[valid], atol=2e-5, rtol=2e-5)


def test_gradient_through_logits_equals_finite_difference():
    model = _tiny_model()
    rows = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 25)), jnp.int32)
    grads = nnx.jit(nnx.grad(tt.loss_fn))(model, rows)
    graphdef, params = nnx.split(model)
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), params)
    slope = sum(jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(direction)))

    @jax.jit
    def loss_at(t):
        moved = jax.tree.map(lambda x, u: x + t * u, params, direction)
        return tt.loss_fn(nnx.merge(graphdef, moved), rows)

    eps = 1e-3                                      # of a unit-normal direction: second order ~1e-4
    fd = (float(loss_at(eps)) - float(loss_at(-eps))) / (2 * eps)
    assert abs(float(slope)) > 1e-2                 # the check is not vacuous
    np.testing.assert_allclose(fd, float(slope), rtol=1e-2)


def test_two_step_run_writes_a_loadable_checkpoint(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    for name in (*tt.HELDOUT, "hamlet", "macbeth"):
        (data / f"{name}_gut.txt").write_text(TEXT.replace("Caesar", name))
    out = tmp_path / "model"
    summary = tt.train(tt.TrainOptions(data=str(data), out=str(out), steps=2, batch=2, seq_len=256, hidden=32,
                                       intermediate=64, heads=2, kv_heads=1, head_dim=16, layers=1, probe_every=1,
                                       mix=tt.parse_mix("text=1,copy=1")), command="train it")
    lm = models.from_pretrained(str(out))
    assert lm.config.max_position_embeddings == 256 and lm.config.num_hidden_layers == 1
    written = json.loads((tmp_path / "model.ckpt.summary.json").read_text())
    assert len(written.pop("losses")) == 2 and written == summary
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 2 * 256 and summary["command"] == "train it"
    assert [p["step"] for p in summary["probes"]] == [1, 2]
    assert {"fresh", "repeat", "recall", "passkey_first_digit", "passkey_other_digits"} <= set(summary["probes"][0])
    assert sorted(os.listdir(out / "heldout")) == sorted(f"{w}.txt" for w in tt.HELDOUT)


def test_bad_options_name_the_flag(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="bogus"):
        tt.parse_mix("copy=1,bogus=2")
    assert tt.parse_mix("text=1,copy=0.5") == {"text": 1.0, "copy": 0.5}
    assert tt.TrainOptions(seq_len=512).row_len == 512
    for bad, message in [({"heads": 3, "kv_heads": 2}, "--heads 3 must be a multiple of --kv-heads 2"),
                         ({"head_dim": 15}, "--head-dim must be even"),
                         ({"row_len": 128}, "--row-len must be >= 256"),
                         ({"row_len": 512, "seq_len": 256}, "--row-len 512 must be <= --seq-len 256"),
                         ({"data": str(tmp_path / "none")}, "is not a folder"),
                         ({"out": str(tmp_path / "m"), "resume": True}, "--resume: no checkpoint at")]:
        with pytest.raises(ValueError, match=message):
            tt.TrainOptions(**bad)


def test_command_line_rejects_a_bad_mix():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tiny.py"), "--mix", "copy=1,bogus=2"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "bogus" in run.stderr and "usage: train_tiny.py" in run.stderr
