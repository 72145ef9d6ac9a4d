"""The lm-eval backend (models.evaluation.lm_eval) against lm-eval's own `hf` backend (HFLM, PyTorch) on
a tiny random Llama written by transformers with the byte tokenizer, and the shipped offline tasks.

SPARQ_LMEVAL_SLOW=1 adds the same comparison on SmolLM2-135M-Instruct (a few minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

import models  # noqa: E402
from model_fixtures import BASE  # noqa: E402
from models.evaluation import lm_eval as backend  # noqa: E402
from models.evaluation.lm_eval_tasks import utils as task_utils  # noqa: E402
from models.tokenizer import byte_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LL_REQUESTS = [("Hello there, my friend", " and foe"), ("", "Start of text"), ("To be or not", " to be"),
               ("A", "B"), ("The quick brown fox jumps over", " the lazy dog."), ("x" * 40, "yz"),
               ("Trailing space ", "moves to the continuation")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random Llama (byte vocabulary, GQA 4/2 heads) and the byte tokenizer, saved by transformers."""
    folder = str(tmp_path_factory.mktemp("tiny_lmeval"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257,
                                         "pad_token_id": 258, "max_position_embeddings": 512})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():   # transformers initialises norms to 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tiny_folder):
    """(ours dense, lm-eval's HFLM) on the same folder, max_length 64 so rolling windows are several."""
    from lm_eval.models.huggingface import HFLM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ours = backend.SparqJaxLM(pretrained=tiny_folder, batch_size=8, max_length=64, progress=False)
    ref = HFLM(pretrained=tiny_folder, device="cpu", dtype="float32", batch_size=8, max_length=64)
    return ours, ref


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hf_backend(pair):
    ours, ref = pair
    requests = _requests("loglikelihood", LL_REQUESTS)
    got, want = ours.loglikelihood(requests, disable_tqdm=True), ref.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (lp, greedy), (ref_lp, ref_greedy) in zip(LL_REQUESTS, got, want):
        n = len(ours.tok_encode(continuation, add_special_tokens=False))
        assert abs(lp - ref_lp) <= 1e-3 * n, (context, continuation, lp, ref_lp)
        assert greedy == ref_greedy


def test_loglikelihood_rolling_matches_hf_backend(pair):
    ours, ref = pair
    texts = [("some words of text, " * 9,), ("abc",)]          # 180 bytes: 3 windows of 64 tokens
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    for (text,), a, b in zip(texts, got, want):
        assert abs(a - b) <= 1e-3 * (len(text) + 1)


def test_generate_until_matches_hf_backend(pair):
    ours, ref = pair
    prompts = ["Once upon a time", "Q", "What is the pass key? The pass key is "]
    free = {"until": [], "max_gen_toks": 10, "do_sample": False}
    # a stop string taken from the reference's own free run, so the stop handling is exercised
    first = ref.generate_until(_requests("generate_until", [(p, free) for p in prompts]), disable_tqdm=True)
    assert ours.generate_until(_requests("generate_until", [(p, free) for p in prompts]), disable_tqdm=True) == first
    stop = next(t[3] for t in first if len(t) > 3 and t[3].strip())
    stopped = {"until": [stop], "max_gen_toks": 10, "do_sample": False}
    args = [(p, stopped) for p in prompts]
    want = ref.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert ours.generate_until(_requests("generate_until", args), disable_tqdm=True) == want
    assert any(len(w) < len(f) for w, f in zip(want, first))


def test_sparse_method_runs_and_meters_its_transfers(tiny_folder, pair):
    ours, _ = pair
    sparq = backend.SparqJaxLM(pretrained=ours.lm, method="sparq", compression="1/2", batch_size=4, progress=False)
    requests = _requests("loglikelihood", [("The quick brown fox jumps over the lazy dog " * 2 + "and", " again and again")] * 2)
    got = sparq.loglikelihood(requests, disable_tqdm=True)
    assert all(np.isfinite(lp) for lp, _ in got) and got[0] == got[1]
    kind, ratio, steps = sparq.transfer_ratios[-1]
    assert kind == "loglikelihood" and steps == len(" again and again") and 0.3 < ratio <= 0.55


def test_bad_model_args_fail_before_any_weight_is_read(tiny_folder, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")
    monkeypatch.setattr(models.hf, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="method='magic' is unknown; choose from dense, sparq"):
        backend.SparqJaxLM(pretrained=tiny_folder, method="magic")
    with pytest.raises(ValueError, match="method=sparq needs compression="):
        backend.SparqJaxLM(pretrained=tiny_folder, method="sparq")
    with pytest.raises(ValueError, match="compression must be a number in \\(0, 1\\] such as 0.125 or 1/8, got 'x'"):
        backend.SparqJaxLM(pretrained=tiny_folder, method="sparq", compression="x")
    with pytest.raises(ValueError, match="method=dense reads the whole cache"):
        backend.SparqJaxLM(pretrained=tiny_folder, method="dense", compression="1/8")
    # FlexGen's floor (~1/2) is above 1/8 at any length: refused from the config alone
    with pytest.raises(ValueError, match="method flexgen at compression 0.125"):
        backend.SparqJaxLM(pretrained=tiny_folder, method="flexgen", compression=0.125)
    with pytest.raises(ValueError, match="no such checkpoint folder or file"):
        backend.SparqJaxLM(pretrained=os.path.join(tiny_folder, "missing"))
    with pytest.raises(ValueError, match="batch_size=auto is not supported"):
        backend.SparqJaxLM(pretrained=tiny_folder, batch_size="auto")


def test_a_compression_a_prompt_cannot_reach_fails_before_any_prefill(pair, monkeypatch):
    ours, _ = pair
    sparq = backend.SparqJaxLM(pretrained=ours.lm, method="sparq", compression="1/16", progress=False)
    monkeypatch.setattr(ours.lm, "prefill", lambda *a, **k: pytest.fail("prefill ran"))
    with pytest.raises(ValueError, match=r"of about \d+ tokens: method sparq at compression 0.0625"):
        sparq.loglikelihood(_requests("loglikelihood", [("short", " one")]), disable_tqdm=True)
    with pytest.raises(ValueError, match="decodes greedily"):
        sparq.generate_until(_requests("generate_until", [("x" * 300, {"do_sample": True})]), disable_tqdm=True)


def test_shipped_documents_are_what_they_say():
    passkey = task_utils.passkey_docs()["test"]
    assert len(passkey) == task_utils.N_DOCS
    for doc in passkey:
        assert doc["context"].count(doc["answer"]) == 2 and len(doc["answer"]) == 5   # the needle says it twice
        at = doc["context"].index(doc["answer"]) / len(doc["context"])
        assert abs(at - doc["depth"]) < 0.05
    assert np.ptp([d["depth"] for d in passkey]) > 0.9
    plays = {}
    for name in os.listdir(task_utils._heldout_folder()):       # lines compared without trailing spaces
        with open(os.path.join(task_utils._heldout_folder(), name), encoding="utf-8") as f:
            plays[name[:-4]] = "\n".join(line.rstrip() for line in f.read().split("\n"))
    for doc in task_utils.next_line_docs()["test"]:
        assert len(set(doc["choices"])) == 4
        play = plays[doc["play"]]
        after = play[play.index(doc["context"] + "\n") + len(doc["context"]) + 1:]
        assert after.split("\n")[0].strip() == doc["choices"][doc["label"]]


def test_command_runs_shipped_task_and_writes_json(tiny_folder, tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "lm-eval", "--model",
                          tiny_folder, "--method", "sparq", "--compression", "1/2", "--tasks",
                          "sparq_plays_next_line", "--limit", "2", "--batch-size", "8", "--output", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sparq_plays_next_line" in run.stdout and "acc_norm" in run.stdout
    saved = json.loads(out.read_text())
    acc = saved["results"]["sparq_plays_next_line"]["acc,none"]
    assert acc in (0.0, 0.5, 1.0) and saved["config"]["model_args"]["method"] == "sparq"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "lm-eval", "--model",
                          tiny_folder, "--tasks", "no_such_task"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "unknown lm-eval task(s) no_such_task" in bad.stderr


@pytest.mark.skipif(os.environ.get("SPARQ_LMEVAL_SLOW") != "1", reason="SPARQ_LMEVAL_SLOW=1: SmolLM2 vs HFLM")
def test_smollm2_matches_hf_backend(tmp_path):
    from lm_eval.models.huggingface import HFLM
    lm = models.from_pretrained("smollm2-135m-instruct")
    models.save_pretrained(lm.model, str(tmp_path))
    lm.tokenizer.save_pretrained(str(tmp_path))
    ours = backend.SparqJaxLM(pretrained=lm, batch_size=8, progress=False)
    ref = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=8)
    docs = task_utils.next_line_docs()["test"].select(range(8))
    args = [(d["context"], "\n" + c) for d in docs for c in d["choices"]]
    got = ours.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    want = ref.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    for (_, cont), (a, _), (b, _) in zip(args, got, want):
        assert abs(a - b) <= 1e-3 * len(ours.tok_encode(cont, add_special_tokens=False))
    gen = [(d["context"] + d["question"], {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False})
           for d in task_utils.passkey_docs()["test"].select(range(2))]
    assert (ours.generate_until(_requests("generate_until", gen), disable_tqdm=True)
            == ref.generate_until(_requests("generate_until", gen), disable_tqdm=True))
