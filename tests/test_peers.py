"""Opt-in (SPARQ_JAX_PEERS=1): the RULER JSONL export is what the kvpress peer script
(scripts/peers/kvpress_ruler.py) reads. No kvpress or torch here: the script's sample reader, its
token split and its transcription of RULER's string match are plain Python, checked against our
harness's own export, tokens and lm-eval's metric."""
import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("SPARQ_JAX_PEERS") != "1",
                                reason="opt-in: SPARQ_JAX_PEERS=1 (the kvpress peer's JSONL format)")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "peers", "kvpress_ruler.py")
TASKS = ("niah_single_2",)      # one task keeps it short; max_new_tokens is checked for every task


def _peer():
    spec = importlib.util.spec_from_file_location("kvpress_ruler", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ruler = pytest.importorskip("models.evaluation.ruler")
    from models.tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    length = max(ruler.min_length(tok, t) for t in TASKS) + 256
    path = str(tmp_path_factory.mktemp("peers") / "samples.jsonl")
    assert ruler.export_jsonl(path, tok, list(TASKS), n=2, length=length) == 2 * len(TASKS)
    samples = [s for t in TASKS for s in ruler.build_samples(tok, t, 2, length)]
    return ruler, tok, path, samples


def test_peer_reads_the_export(exported):
    ruler, tok, path, samples = exported
    peer = _peer()
    rows = peer.load_samples(path)
    assert [r["id"] for r in rows] == [s.id for s in samples]
    for row, s in zip(rows, samples):
        assert row["context"] + row["question"] + row["answer_prefix"] == s.prompt
        assert row["answers"] == list(s.answers) and row["task"] == s.task and row["length"] == s.length
        # the peer's fallback max_new_tokens (lm-eval's yaml) is the harness's
        assert peer.max_new_tokens({k: v for k, v in row.items() if k != "max_new_tokens"}) == row["max_new_tokens"]
    assert [r["id"] for r in peer.select(rows, None, 1)] == [samples[0].id]
    # the peer's fallback for every RULER task (lm-eval's yaml files) is the harness's table
    for task, n in ruler.MAX_NEW_TOKENS.items():
        assert peer.max_new_tokens({"task": task}) == n


def test_peer_raw_tokens_are_the_harness_tokens(exported):
    _, tok, path, samples = exported
    from models.evaluation import prompts
    peer = _peer()
    for row, s in zip(peer.load_samples(path), samples):
        context_ids, question_ids = peer.raw_split(tok, row)
        assert context_ids + question_ids == prompts.prefix(tok) + prompts.encode(tok, s.prompt)
        assert len(question_ids) == len(prompts.encode(tok, s.question + s.answer_prefix))


def test_peer_string_match_is_rulers(exported):
    ruler, _, _, samples = exported
    peer = _peer()
    for s in samples:
        a = list(s.answers)
        for generated in (" ".join(a), a[0], "\x02" + a[-1].upper() + "\n", "no answer", ""):
            assert peer.ruler_score(generated, a) == ruler.score(generated, a)


def test_peer_rejects_a_bad_row(exported, tmp_path):
    _, _, path, _ = exported
    peer = _peer()
    row = json.loads(open(path).readline())
    del row["answer_prefix"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="answer_prefix"):
        peer.load_samples(str(bad))
