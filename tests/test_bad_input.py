"""Bad input and interrupted runs (issue 31): every mistake is an error naming the value before any
work, and an interrupted evaluation keeps its finished cells.

Each CLI row runs the script as a program (`python scripts/X.py ...`; all rows in one child process, to
pay jax's import once) with the weight loader replaced by a tripwire: the exit status, the message and
that no weights were read are checked. Each API row calls the library with the same tripwire.
"""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

import models
import sparq_jax as sq
from models import evaluation, hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE, GENERATE, BENCHMARK = (os.path.join(REPO, "scripts", f"{n}.py") for n in ("evaluate", "generate", "benchmark"))


@pytest.fixture
def no_weights(monkeypatch):
    """Reading weights fails the test: every check must come first."""
    def tripwire(*args, **kwargs):
        raise AssertionError("model weights were read")
    monkeypatch.setattr(hf, "load_weights", tripwire)


# ---------------------------------------------------------------------------------------------
# The scripts, run as programs: (script, argv, environment, what the message must hold)

def _cli_rows(tmp):
    listed = os.path.join(tmp, "list.json")
    with open(listed, "w") as f:
        json.dump([1, 2], f)
    cache = {"SPARQ_JAX_CACHE": "/proc/sparq-cache"}          # a folder that cannot be created
    return {
        # too short for a task with the bundled tokenizer (pass key: 342 tokens, multi-key: 550)
        "ctx 64": (EVALUATE, ["--methods", "dense", "--context-length", "64"], {}, ["context_length=64", "passkey",
                                                                                    "at least 342 tokens"]),
        "ctx 256": (EVALUATE, ["--methods", "dense", "--context-length", "256"], {}, ["context_length=256",
                                                                                      "at least 342 tokens"]),
        "ctx 400": (EVALUATE, ["--methods", "dense", "--context-length", "400"], {}, ["context_length=400",
                                                                                      "multikey", "at least 550"]),
        "ctx beyond": (EVALUATE, ["--methods", "dense", "--limit", "1", "--context-length", "1024"], {},
                       ["context_length=1024", "max_position_embeddings=1024", "--beyond-positions"]),
        "json folder": (EVALUATE, ["--json", os.path.join(tmp, "missing", "r.json")], {}, ["--json", "missing",
                                                                                            "does not exist"]),
        "plot txt": (EVALUATE, ["--plot", os.path.join(tmp, "p.txt")], {}, ["--plot", "p.txt", ".png"]),
        "plot folder": (EVALUATE, ["--plot", os.path.join(tmp, "missing", "p.png")], {}, ["--plot", "does not exist"]),
        "json list": (EVALUATE, ["--tasks", "passkey", "--methods", "dense", "--limit", "1", "--json", listed], {},
                      ["list.json", "JSON list"]),
        "cache eval": (EVALUATE, ["--model", "smollm2-135m-instruct"], cache, ["/proc/sparq-cache", "SPARQ_JAX_CACHE"]),
        "lm-eval output": (EVALUATE, ["lm-eval", "--tasks", "sparq_passkey", "--output", tmp], {},
                           ["--output", "is a folder"]),
        "generate json": (GENERATE, ["--model", "bundled", "--json", tmp], {}, ["--json", "is a folder"]),
        "budget": (GENERATE, ["--model", "bundled", "--max-new-tokens", "1000"], {},
                   ["24 tokens", "--max-new-tokens 1000", "at least 338"]),
        "prompt tokens": (GENERATE, ["--model", "bundled", "--prompt-tokens", "64"], {}, ["64 tokens", "at least 338"]),
        "batch with prompt": (GENERATE, ["--model", "bundled", "--prompt", "Hi", "--batch", "2"], {},
                              ["--batch", "--prompt"]),
        "generate beyond": (GENERATE, ["--model", "bundled", "--prompt", "Hello", "--max-new-tokens", "1020"], {},
                            ["max_new_tokens=1020", "max_position_embeddings=1024", "--beyond-positions"]),
        "cache generate": (GENERATE, [], cache, ["/proc/sparq-cache", "SPARQ_JAX_CACHE"]),
        "compression 1e-6": (BENCHMARK, ["attention", "--compression", "1e-6"], {}, ["--compression 1e-06"]),
        "compression and rank": (BENCHMARK, ["attention", "--compression", "1/8", "--rank", "8", "--top-k", "64"], {},
                                 ["--compression does not apply with --rank and --top-k"]),
        "benchmark json": (BENCHMARK, ["decode", "--json", os.path.join(tmp, "missing", "b.json")], {},
                           ["--json", "does not exist"]),
    }


# Runs each row's script with runpy in one process; prints {row: [exit status, stderr, weights read]}.
_DRIVER = r"""
import contextlib, io, json, os, runpy, sys
import models.hf
read = []
def tripwire(*args, **kwargs):
    read.append(1)
    raise SystemExit(99)
models.hf.load_weights = tripwire
out = {}
for name, (script, argv, env) in json.loads(sys.argv[1]).items():
    saved = dict(os.environ)
    os.environ.update(env)
    sys.argv, err, read[:] = [script, *argv], io.StringIO(), []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:
        code, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
    os.environ.clear()
    os.environ.update(saved)
    out[name] = [code, err.getvalue(), bool(read)]
print(json.dumps(out))
"""


def test_scripts_refuse_bad_input_before_any_weight_is_read(tmp_path):
    rows = _cli_rows(str(tmp_path))
    listed = (tmp_path / "list.json").read_bytes()
    run = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps({k: v[:3] for k, v in rows.items()})],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (_, _, _, message) in rows.items():
        code, err, read = got[name]
        said = " ".join(err.split())
        assert code == 2 and "error:" in said, (name, code, err[-1500:])
        assert all(m in said for m in message), (name, message, said[-1500:])
        assert "Traceback" not in err and not read, (name, err[-1500:])
    assert "sparq-mean" not in got["compression 1e-6"][1]          # names the flag, not a method never asked for
    assert (tmp_path / "list.json").read_bytes() == listed          # a malformed results file is not overwritten
    assert sorted(os.listdir(tmp_path)) == ["list.json"]            # nothing written anywhere


# ---------------------------------------------------------------------------------------------
# An interrupted evaluation keeps its finished cells, and the same command resumes

def test_interrupted_evaluation_keeps_finished_cells_and_resumes(tmp_path):
    out = str(tmp_path / "results.json")
    command = [sys.executable, EVALUATE, "--model", "bundled", "--tasks", "passkey", "--methods", "dense,sparq",
               "--compression", "1/2", "--limit", "1", "--context-length", "400", "--json", out]
    env = {**os.environ, "PYTHONPATH": REPO}
    # The user's Ctrl-C right after the first cell is stored: the child sends itself SIGINT from the
    # store (polling for the file from here raced the second cell, which now takes well under a second).
    driver = ("import os, runpy, signal, sys\n"
              "from models.evaluation import results\n"
              "real = results.ResultsFile.add\n"
              "def add(self, row):\n"
              "    real(self, row)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "results.ResultsFile.add = add\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    child = subprocess.run([sys.executable, "-c", driver, *command[1:]], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    err = child.stderr
    assert child.returncode == 130, err[-2000:]
    assert "interrupted; the 1 finished cells" in err and "Traceback" not in err, err[-2000:]
    with open(out) as f:
        first = json.load(f)
    assert [(r["task"], r["method"]) for r in first["results"]] == [("passkey", "dense")]
    assert not os.path.exists(out + ".tmp")
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stderr and "1 cells kept" in again.stderr
    assert "1 (sample, method) runs" in again.stderr          # dense is not run again
    with open(out) as f:
        rows = json.load(f)["results"]
    assert rows[0] == first["results"][0]
    assert [r["method"] for r in rows] == ["dense", "sparq"]


def test_an_interrupted_cell_goes_on_from_its_last_stored_batch(tmp_path, monkeypatch):
    """With more samples than the batch, each finished batch of a cell is stored too."""
    lm = models.from_pretrained("bundled")
    prefill, run = evaluation.RUNNERS["passkey"]
    ran = []

    def counted(lm, chunk, method_of, prefilled):
        scores, meter = run(lm, chunk, method_of, prefilled)
        ran.append((chunk[0].answer, scores.tolist()))
        return scores, meter
    monkeypatch.setitem(evaluation.RUNNERS, "passkey", (prefill, counted))
    path, header = str(tmp_path / "r.json"), {"model": "bundled", "context_length": 400, "seed": 0}
    grid = dict(limit=2, batch=1, context_length=400, progress=False)
    store = evaluation.ResultsFile(path, header)

    def stored_then_interrupted(record):
        store.progress(record)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(lm, ["passkey"], ["dense"], on_result=store.add, on_progress=stored_then_interrupted,
                            **grid)
    again = evaluation.ResultsFile(path, header)
    (record,) = again.partial.values()
    assert (record["method"], record["batches"], len(record["scores"])) == ("dense", 1, 1) and again.rows == []
    (row,) = evaluation.evaluate(lm, ["passkey"], ["dense"], partial=again.partial, on_result=again.add,
                                 on_progress=again.progress, **grid)
    assert len(ran) == 2 and ran[0][0] != ran[1][0]           # the first batch was not run again
    assert record["scores"] == ran[0][1] and row["n"] == 2 and row["score"] == np.mean(ran[0][1] + ran[1][1])
    with open(path) as f:
        assert "partial" not in json.load(f) and again.rows == [row]


# ---------------------------------------------------------------------------------------------
# The library

def test_ratios():
    with pytest.raises(ValueError, match=r"compression must be a number in \(0, 1\] .* got '1/0'"):
        sq.method_from_name("sparq", "1/0", 64, 1000)
    assert sq.method_from_name("sparq", np.float32(0.125), 64, 1000) == sq.method_from_name("sparq", 0.125, 64, 1000)
    assert sq.SparQ.for_compression(np.float64(0.25), 64, 1000) == sq.SparQ.for_compression("1/4", 64, 1000)
    for bad in (0, 0.0, -1, 1.5, float("nan"), True, "x"):
        with pytest.raises(ValueError, match=r"compression must be .*got") as err:
            sq.method_from_name("h2o", bad, 64, 1000)
        assert "longer prompt" not in str(err.value)
    # a longer prompt helps only where the method could reach the ratio with one
    with pytest.raises(ValueError, match="streaming at compression 0.125: .*Use a longer prompt"):
        sq.method_from_name("streaming", 1 / 8, 64, 100)
    for name, ratio in (("flexgen", 1 / 8), ("sparq", 1e-4), ("h2o", 1e-3)):
        with pytest.raises(ValueError, match=f"{name} at compression .*Use a larger compression") as err:
            sq.method_from_name(name, ratio, 64, 1000)
        assert "longer prompt" not in str(err.value)


def test_checks_of_the_api(no_weights):
    with pytest.raises(models.CheckpointError, match="path_or_repo_id must be .* got None"):
        models.from_pretrained(None)
    with pytest.raises(ValueError, match=r"lengths must be integers, got \[3.5, 2\]"):
        sq.KVCache.from_kv(np.zeros((2, 1, 4, 8), np.float32), np.zeros((2, 1, 4, 8), np.float32), [3.5, 2])
    for bad, what in (("", "a file path"), ("/no/such/folder/x.json", "does not exist")):
        with pytest.raises(ValueError, match=what):
            evaluation.check_output_path(bad, "out")
    with pytest.raises(ValueError, match=r"'x.txt' must end in an image extension .*\.png"):
        evaluation.plot([], "x.txt", "t")


class _Stop(Exception):
    pass


@pytest.fixture
def bundled(monkeypatch):
    """The bundled model, its first compiled step replaced by a stop: what runs before it is the checks."""
    lm = models.from_pretrained("bundled")

    def stop(*args, **kwargs):
        raise _Stop
    monkeypatch.setattr(models.lm.LanguageModel, "_run_prefill", stop)   # prefill's work, whatever its path
    return lm


def test_sampling_arguments(bundled):
    ids = np.full((1, 4), 65, np.int32)
    with pytest.raises(_Stop):        # NumPy numbers pass the checks
        bundled.generate(ids, max_new_tokens=2, do_sample=True, temperature=np.float32(0.7), top_p=np.float64(0.9))
    for name, value in (("temperature", float("inf")), ("temperature", 0), ("top_p", float("nan")), ("top_p", 2)):
        with pytest.raises(ValueError, match=f"{name} must be a finite number in .*got {value!r}"):
            bundled.generate(ids, max_new_tokens=2, do_sample=True, **{name: value})


def test_past_the_positions_warns_once(bundled):
    ids = np.full((1, 1010), 65, np.int32)
    with pytest.warns(UserWarning, match="prompt \\+ max_new_tokens reaches 1030 positions, past the model's "
                                         "max_position_embeddings=1024"), pytest.raises(_Stop):
        bundled.generate(ids, max_new_tokens=20)
    with warnings.catch_warnings(), pytest.raises(_Stop):
        warnings.simplefilter("error")
        bundled.generate(ids, max_new_tokens=20)                # once per model
    bundled._warned_beyond_positions = False
    with pytest.warns(UserWarning, match="the prompt reaches 1100 positions"), pytest.raises(_Stop):
        bundled.prefill(np.full((1, 1100), 65, np.int32))
    with warnings.catch_warnings(), pytest.raises(_Stop):
        warnings.simplefilter("error")
        bundled.prefill(np.full((1, 1000), 65, np.int32), max_len=1100)   # room is not use: no warning


def _stand_in(name="bundled"):
    checkpoint = hf.open_checkpoint(name)
    return types.SimpleNamespace(config=checkpoint.config, tokenizer=checkpoint.tokenizer())


def test_evaluation_checks_come_before_the_model(no_weights):
    model = _stand_in()
    for ctx, task, least in ((64, "passkey", 342), (256, "passkey", 342), (400, "multikey", 550)):
        with pytest.raises(ValueError, match=f"context_length={ctx} is too short for task {task} .*at least {least} "):
            evaluation.prepare(model, ["passkey", "multikey"], ["dense"], context_length=ctx)
    with pytest.raises(ValueError, match="context_length \\(at least 64 tokens\\) must be an integer >= 64, got 63"):
        evaluation.prepare(model, ["passkey"], ["dense"], context_length=63)
    with pytest.raises(ValueError, match="repetition decodes up to 1029 positions.*max_position_embeddings=1024; "
                                         "use a context length of at most 1019"):
        evaluation.prepare(model, ["repetition"], ["dense"], context_length=1024)
    assert evaluation.prepare(model, ["repetition"], ["dense"], context_length=1024, limit=2,
                              beyond_positions=True).context_length == 1024
    grid = evaluation.prepare(model, ["passkey", "repetition", "bpc"], ["dense", "sparq"], [1 / 8], limit=2)
    assert grid.context_length == 1024 - evaluation.harness.ANSWER_ROOM
    assert max(evaluation.harness.positions_needed(model, t, s, 16) for t, s in grid.samples.items()) <= 1024
    with pytest.raises(ValueError, match="limit must be a positive integer, got 0"):
        evaluation.prepare(model, ["passkey"], ["dense"], limit=0)
    prompts, keys = evaluation.default_prompts(model, 5, 400)          # --batch holds without a chat template
    assert len(prompts) == len(set(keys)) == 5
    with pytest.raises(ValueError, match="pass-key prompts of 64 tokens .* at least 338 tokens"):
        evaluation.default_prompts(model, 3, 64)
    with pytest.raises(ValueError, match=r"the longest prompt \(6 tokens\) \+ max_new_tokens=1020 is past"):
        evaluation.prepare_comparison(model, ["Hello"], ["dense"], max_new_tokens=1020)


MALFORMED = {
    "a list": ("[1, 2]", "holds a JSON list, not an object"),
    "rows without keys": ('{"model": "m", "results": [{"task": "passkey"}]}', "row 0 lacks method, compression"),
    "results not a list": ('{"model": "m", "results": {"a": 1}}', '"results" is a dict, not a list'),
    "not a row": ('{"model": "m", "results": [3]}', "row 0 is a int, not an object"),
    "invalid JSON": ('{"model": ', "invalid JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_results_file_is_named_and_kept(tmp_path, case):
    content, message = MALFORMED[case]
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path} is not a results file of this program: .*{message}"):
        evaluation.ResultsFile(str(path), {"model": "m"})
    assert path.read_text() == content


def test_results_file_that_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match=f"'{tmp_path}' is a folder"):
        evaluation.ResultsFile(str(tmp_path), {"model": "m"})


def test_hub_downloads_ask_for_safetensors_config_and_tokenizer_only(monkeypatch, no_weights):
    asked = {}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked["patterns"] = allow_patterns
        raise OSError("offline")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(models.CheckpointError, match="could not be fetched"):
        models.from_pretrained("someone/some-model")

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in asked["patterns"])
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "x.pkl", "model.ckpt",
                 "tf_model.h5", "flax_model.msgpack", "model.onnx"):
        assert not fetched(name), name
