"""scripts/train_tiny.py: its data stream, probes and differentiable forward, and a two-step run."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import train_tiny as tt  # noqa: E402

import models  # noqa: E402
from models import llama  # noqa: E402
from models.tokenizer import BOS_ID  # noqa: E402

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


def _tiny_model():
    args = tt.parse_args(["--seq-len", "256", "--hidden", "64", "--intermediate", "96", "--heads", "4",
                          "--kv-heads", "2", "--head-dim", "16", "--layers", "2"])
    return models.init_model(tt.make_config(args), seed=1, std=0.1)


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
    tt.main(["--data", str(data), "--out", str(out), "--steps", "2", "--batch", "2", "--seq-len", "256",
             "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
             "--layers", "1", "--probe-every", "1", "--mix", "text=1,copy=1"])
    lm = models.from_pretrained(str(out))
    assert lm.config.max_position_embeddings == 256 and lm.config.num_hidden_layers == 1
    summary = json.loads((tmp_path / "model.ckpt.summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["probes"]) == 2
    assert {"fresh", "repeat", "recall", "passkey_first_digit", "passkey_other_digits"} <= set(summary["probes"][0])
    assert sorted(os.listdir(out / "heldout")) == sorted(f"{w}.txt" for w in tt.HELDOUT)


def test_bad_mix_is_rejected(capsys):
    with pytest.raises(SystemExit):
        tt.parse_args(["--mix", "copy=1,bogus=2"])
    assert "bogus" in capsys.readouterr().err
