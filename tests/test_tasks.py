"""The evaluation tasks and harness, on the bundled model (CPU, well under two minutes in all)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import models
import sparq_jax as sq
from models import evaluation
from models.evaluation import harness
from models.evaluation import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_BUNDLED = os.path.exists(os.path.join(models.BUNDLED, "model.safetensors"))
needs_bundled = pytest.mark.skipif(not HAVE_BUNDLED, reason="models/bundled has no trained checkpoint")


@pytest.fixture(scope="module")
def lm():
    return models.from_pretrained(models.BUNDLED)


# ---------------------------------------------------------------------------------------------
# Builders and scorers (no model)

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


def test_passkey_builder_deterministic_and_well_formed():
    a = tasks.passkey_samples(6, 1000, seed=3)
    assert a == tasks.passkey_samples(6, 1000, seed=3)
    assert [s.answer for s in a] != [s.answer for s in tasks.passkey_samples(6, 1000, seed=4)]
    for s in a:
        total = len(s.context) + len(s.question) + len(s.answer)
        assert 1000 - len(tasks.PASSKEY_FILLER) < total <= 1000
        assert len(s.answer) == 5 and s.answer.isdigit() and s.answer[0] != "0"
        assert s.context.count(s.answer) == 2 and s.answer not in s.question
    depths = [s.context.index(s.answer) for s in a]
    assert depths == sorted(depths) and depths[0] < depths[-1]


def test_repetition_builder_deterministic_and_copies_from_context():
    a = tasks.repetition_samples(TEXT, 5, 900, seed=1)
    assert a == tasks.repetition_samples(TEXT, 5, 900, seed=1)
    assert a != tasks.repetition_samples(TEXT, 5, 900, seed=2)
    for s in a:
        context, span = s.prompt.rsplit("\n", 1)[0], s.prompt[-tasks.REPETITION_SPAN:]
        assert len(s.prompt) + len(s.target) == 900 and len(s.target) == tasks.REPETITION_CONTINUATION
        assert span + s.target in context


def test_multikey_builder_deterministic_and_well_formed():
    a = tasks.multikey_samples(6, 3000, seed=5, keys=4)
    assert a == tasks.multikey_samples(6, 3000, seed=5, keys=4)
    assert [s.answer for s in a] != [s.answer for s in tasks.multikey_samples(6, 3000, seed=6, keys=4)]
    for s in a:
        assert 3000 - 2 * len(tasks.PASSKEY_FILLER) < len(s.context) + len(s.question) + len(s.answer) <= 3000
        lines = [x for x in s.context.split(". ") if x.startswith("The pass key of the ")]
        pairs = dict(line[len("The pass key of the "):].split(" is ") for line in lines)
        assert len(pairs) == 4 and len(set(pairs.values())) == 4
        assert all(v.isdigit() and len(v) == 5 and v[0] != "0" for v in pairs.values())
        asked = s.question.split("pass key of the ")[1].split("?")[0]
        assert pairs[asked] == s.answer and s.answer not in s.question
        assert s.context.index(f"The pass key of the {asked} is") == round(s.depth * len(s.context))
    # the asked key moves around: not always the first or the last line
    assert len({round(s.depth, 1) for s in tasks.multikey_samples(12, 3000, seed=1)}) > 3


def test_bpc_windows_deterministic():
    a = tasks.bpc_windows(TEXT, 4, 300, seed=0)
    assert a == tasks.bpc_windows(TEXT, 4, 300, seed=0)
    assert a != tasks.bpc_windows(TEXT, 4, 300, seed=1)
    assert all(len(w) == 300 and w in TEXT for w in a)


def test_scorers():
    assert tasks.score_passkey("53821.", "53821") == 1.0
    assert tasks.score_passkey("5382", "53821") == 0.0
    assert tasks.score_passkey("53812", "53821") == 0.0
    assert tasks.score_repetition("abcxe", "abcde") == 3
    assert tasks.score_repetition("abcde", "abcde") == 5
    assert tasks.score_repetition("xbcde", "abcde") == 0
    assert tasks.bits_per_char(10 * np.log(2), 5) == pytest.approx(2.0)


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.passkey_samples(0, 1000, 0), "n must be"),
    (lambda: tasks.passkey_samples(2, 100, 0), "length=100"),
    (lambda: tasks.repetition_samples(TEXT, 2, 500, 0), "length=500"),
    (lambda: tasks.bpc_windows("short", 2, 300, 0), "needs at least 300"),
    (lambda: tasks.passkey_samples(2, 1000, "0"), "seed must be"),
    (lambda: tasks.multikey_samples(2, 600, 0, keys=4), "length=600 is too short for 4 keys"),
    (lambda: tasks.multikey_samples(2, 9000, 0, keys=17), "keys must be <= 16"),
])
def test_builders_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_repetition_divergence_rule():
    """Decoding goes on while the text so far agrees with the target and is shorter than it."""
    assert evaluation.still_matching("To be", "To be, or not")
    assert evaluation.still_matching("", "To be")
    assert not evaluation.still_matching("To bx", "To be, or not")
    assert not evaluation.still_matching("To be, or not", "To be, or not")     # all matched: done
    assert not evaluation.still_matching("To be, or not!", "To be, or not")


def test_transfer_meter():
    method = sq.SparQ(rank=8, top_k=32)
    meter = models.TransferMeter(method, 64)
    meter.step(np.array([100, 200]))
    want = (method.transfers(100, 64) + method.transfers(200, 64)) / (
        sq.Dense().transfers(100, 64) + sq.Dense().transfers(200, 64))
    assert meter.ratio == pytest.approx(want)
    windowed = models.TransferMeter(method, 64, window=150)     # a sliding window caps what is read
    windowed.step(np.array([100, 200]))
    assert windowed.method_total == method.transfers(100, 64) + method.transfers(150, 64)
    # lm's transfer_ratio is the same meter over the steps of a decode loop
    assert models.lm.transfer_ratio(method, [100, 200], 1, 64) == pytest.approx(
        (method.transfers(101, 64) + method.transfers(201, 64)) / (
            sq.Dense().transfers(101, 64) + sq.Dense().transfers(201, 64)))


# ---------------------------------------------------------------------------------------------
# The bundled model

@needs_bundled
def test_bundled_passkey_dense_and_sparq(lm):
    samples = tasks.passkey_samples(8, 1023, seed=0)   # 1k context with <s>
    prefilled = harness.prefill_passkey(lm, samples)
    d = lm.config.head_dim
    dense, _ = harness.run_passkey(lm, samples, lambda s: sq.Dense(), prefilled)
    sparq, meter = harness.run_passkey(lm, samples, lambda s: sq.method_from_name("sparq", 0.25, d, s), prefilled)
    assert dense.mean() >= 0.9, dense
    assert abs(sparq.sum() - dense.sum()) <= 1, (sparq, dense)
    assert meter.ratio <= 0.25 * 1.05   # sized at the full prompt; the first steps see a shorter cache


@needs_bundled
def test_bundled_logits_match_transformers(lm):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.BUNDLED)
    ids = tokenizer(["O, wonder! How many goodly creatures are there here!"], return_tensors="np")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(models.BUNDLED, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    got = np.asarray(lm.logits(ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@needs_bundled
def test_evaluate_api_rows_and_resume(lm, tmp_path, monkeypatch):
    """The Python API: rows per (task, method, ratio), saved as they come, resumed without rerunning."""
    out = tmp_path / "r.json"
    header = {"model": "bundled", "context_length": 800, "seed": 0}
    store = evaluation.ResultsFile(str(out), header)
    rows = evaluation.evaluate(lm, ["passkey", "repetition", "bpc"], ["dense", "sparq", "flexgen"], [1 / 4], limit=2,
                               context_length=800, bpc_tokens=64, progress=False, on_result=store.add)
    data = json.loads(out.read_text())
    assert {k: data[k] for k in header} == header and data["results"] == rows
    # flexgen cannot reach 1/4, so it is skipped: dense + sparq for each of three tasks
    assert [(r["task"], r["method"]) for r in rows] == [
        (t, m) for t in ("passkey", "repetition", "bpc") for m in ("dense", "sparq")]
    for r in rows:
        assert set(r) == {"task", "method", "compression", "transfer_ratio", "score", "n"}
        assert r["n"] == 2
        assert r["compression"] == (1.0 if r["method"] == "dense" else 0.25)
        # Budgets are sized at one length while the cache grows over the decode steps, so the measured
        # ratio drifts a little from the target; dense is exact.
        assert 0.9 * r["compression"] <= r["transfer_ratio"] <= 1.05 * r["compression"]
        if r["method"] == "dense":
            assert r["transfer_ratio"] == 1.0
    passkey = {r["method"]: r["score"] for r in rows if r["task"] == "passkey"}
    assert passkey["dense"] == 1.0 and passkey["sparq"] == 1.0     # 1/4 on this model: see the model card
    plot = tmp_path / "r.png"
    evaluation.plot(rows, str(plot), "test")
    assert plot.stat().st_size > 0
    # Resumable: the same settings keep every cell and run none of them...
    again = evaluation.ResultsFile(str(out), header)
    assert again.rows == rows and ("bpc", "sparq", 0.25) in again.done
    monkeypatch.setattr(harness, "RUNNERS", {})          # a cell that ran would fail with KeyError
    assert evaluation.evaluate(lm, ["passkey", "repetition", "bpc"], ["dense", "sparq"], [1 / 4], limit=2,
                               context_length=800, progress=False, done=again.done) == []
    # ...and other settings refuse the file instead of mixing runs.
    with pytest.raises(ValueError, match="holds a run with other settings"):
        evaluation.ResultsFile(str(out), {**header, "context_length": 700})
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        evaluation.evaluate(lm, ["passkey"], ["magic"], [1 / 4], limit=1, context_length=800)


def _script(name, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@needs_bundled
def test_evaluate_script_writes_json_and_table(tmp_path):
    out = tmp_path / "r.json"
    run = _script("evaluate.py", "--tasks", "passkey", "--methods", "dense,sparq", "--compression", "1/4",
                  "--limit", "2", "--context-length", "600", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    table = run.stdout.splitlines()
    assert table[0].split() == ["task", "method", "compression", "transfer", "score", "n"]
    assert [line.split()[:2] for line in table[1:3]] == [["passkey", "dense"], ["passkey", "sparq"]]
    assert [float(line.split()[4]) for line in table[1:3]] == [r["score"] for r in rows]
    again = _script("evaluate.py", "--tasks", "passkey", "--limit", "2", "--context-length", "700", "--json", str(out))
    assert again.returncode != 0 and "holds a run with other settings" in again.stderr


@pytest.mark.parametrize("argv, message", [(["--compression", "2"], "must be in (0, 1]"),
                                           (["--methods", "magic"], "unknown method 'magic'"),
                                           (["--tasks", "qa"], "unknown task 'qa'"),
                                           (["--limit", "0"], "must be a positive integer, got 0")])
def test_evaluate_rejects_bad_flags(argv, message):
    run = _script("evaluate.py", *argv)
    assert run.returncode == 2 and message in run.stderr, run.stderr


@needs_bundled
def test_bpc_scores_the_requested_tail(lm):
    windows = tasks.bpc_windows(evaluation.heldout_text(), 2, 300, seed=0)
    p = harness.prefill_bpc(lm, windows, scored=16)
    assert p.forced.shape == (2, 17)                   # 16 scored tokens, fed from the one before them
    assert p.info["chars"] == [16, 16]                 # byte-level: a token is a character
    assert harness.prefill_bpc(lm, windows, scored=1000).forced.shape == (2, 151)   # at most half (301 // 2)


def test_needle_builder_depths_gap_and_answer():
    haystack = "".join(f"Sentence number {i} says nothing at all. " for i in range(3000))
    samples = tasks.needle_samples(haystack, 10, 6000, seed=1, min_gap=2000)
    assert samples == tasks.needle_samples(haystack, 10, 6000, seed=1, min_gap=2000)
    for i, s in enumerate(samples):
        assert len(s.answer) == 7 and s.answer.isdigit() and s.context.count(s.answer) == 1
        assert 6000 - 2 <= len(s.context) + len(s.question) + len(s.answer) <= 6000
        at = s.context.index(" The special magic number is ")
        assert len(s.context) - at >= 2000                      # far from the question, whatever the depth
        haystack_part = len(s.context) - len(" The special magic number is 1234567. ") + 1   # one space dropped
        want = [0.0, 0.25, 0.5, 0.75, 1.0][i % 5] * (haystack_part - 2000)
        assert 0 <= want - at < 45 and s.depth == pytest.approx(at / len(s.context))
        assert s.question == tasks.NEEDLE_QUESTION
        assert "  " not in s.context                              # inserted at a sentence end, spaces kept single
    with pytest.raises(ValueError, match="min_gap=5900"):
        tasks.needle_samples(haystack, 1, 6000, seed=0, min_gap=5900)
    with pytest.raises(ValueError, match="depths must be fractions"):
        tasks.needle_samples(haystack, 1, 6000, seed=0, depths=[1.5])


def test_repetition_min_gap_copies_from_far_back():
    for s in tasks.repetition_samples(TEXT, 20, 3000, seed=0, span=64, continuation=64, min_gap=1500):
        ctx, span = s.prompt[:-65], s.prompt[-64:]
        # the copied span (and its continuation) end at least min_gap before the context's end
        assert len(ctx) - (ctx.index(span + s.target) + 128) >= 1500


@needs_bundled
def test_needle_and_code_tasks_through_the_harness(lm):
    """needle: by-depth scores whose mean is the row's score; code: copies whole lines from far back."""
    (needle,) = evaluation.evaluate(lm, ["needle"], ["dense"], limit=5, context_length=700, progress=False)
    assert (needle["task"], needle["n"]) == ("needle", 5)
    assert list(needle["by_depth"]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert np.mean(list(needle["by_depth"].values())) == pytest.approx(needle["score"])
    # code runs through repetition's runner; its samples (longer than this model's context) are checked here
    samples = evaluation.build_samples(lm.tokenizer, "code", 5, 2000, 0)
    for s in samples:
        assert s.prompt.endswith("\n") and s.target and not s.target.startswith("\n" * 3)  # whole lines copied
        tail = s.prompt[-60:] + s.target[:20]                        # the copy's end and what follows it
        source = s.prompt.index(tail)
        # copied from at least min(FAR_TOKENS, 2000 // 2) tokens (= bytes here) before the context's end
        assert source + 60 <= len(s.prompt) - 1000
