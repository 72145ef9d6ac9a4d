"""Text for evaluation and the main job: the held-out plays, token <-> text helpers, task samples of a
given length in the model's own tokens, and the main job's chat prompts with a hidden fact.

The task builders themselves (models.evaluation.tasks) work in characters and know no tokenizer; this module
converts token lengths to characters with the tokenizer's characters per token on the task's text.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from . import ruler, tasks

from ..hf import BUNDLED

HELDOUT = os.path.join(BUNDLED, "heldout")
TASKS = ("passkey", "multikey", "repetition", "bpc", "needle", "code")
# needle and code put what must be retrieved at least this many tokens before the question (at most
# half the context): outside any attention sink and recent window, so only retrieval finds it.
FAR_TOKENS = 2048
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MULTIKEY_KEYS = 3          # keys hidden per multi-key prompt (with 4 at ~3.7k tokens SmolLM2-135M found 4 of 8)
# The people the main job's prompts' facts are about (one per prompt, in order).
FACT_NAMES = ("Prospero", "Viola", "Brutus", "Miranda", "Olivia", "Cassius", "Ariel", "Malvolio")
FACT_ROOM = 80             # tokens of a fact prompt besides its passage (fact, question, chat template)
FACT_PASSAGE = 64          # the shortest passage a fact prompt hides its fact in


def heldout_text(folder: str = HELDOUT) -> str:
    """The public-domain held-out texts (models/bundled/heldout/*.txt by default), joined."""
    paths = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not paths:
        raise ValueError(f"{folder!r} has no *.txt texts for the repetition and bpc tasks")
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def encode(tokenizer, text: str) -> list[int]:
    """text's token ids with the model's own tokenizer, no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before a text (<s> for the bundled model, nothing for SmolLM2)."""
    return list(tokenizer("")["input_ids"])


def chars_per_token(tokenizer, text: str) -> float:
    return len(text) / max(1, len(encode(tokenizer, text)))


def build_samples(tokenizer, task: str, n: int, context_length: int, seed: int, heldout: str | None = None):
    """n samples of `task` (one of TASKS) of about context_length tokens: lengths are set in characters,
    from the tokenizer's characters per token on the task's own text. repetition and bpc cut their
    samples from `heldout` (default: heldout_text()); needle hides its number in the Paul Graham
    essays at NEEDLE_DEPTHS in turn, code copies from Python's standard-library sources (data.py),
    both from at least min(FAR_TOKENS, context_length // 2) tokens before the question."""
    if task in ruler.TASKS:      # RULER's own generators; context_length is its max_seq_length
        return ruler.build_samples(tokenizer, task, n, context_length, seed)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS + ruler.TASKS)}")
    if task in ("needle", "code"):
        from . import data

        haystack = data.essays_text() if task == "needle" else data.code_text()
        per_token = chars_per_token(tokenizer, haystack[:20000])
        chars, gap = int(context_length * per_token), int(min(FAR_TOKENS, context_length // 2) * per_token)
        if task == "needle":
            return tasks.needle_samples(haystack, n, chars, seed, NEEDLE_DEPTHS, min_gap=gap)
        return tasks.repetition_samples(haystack, n, chars, seed, min_gap=gap, lines=True)
    if task in ("passkey", "multikey"):
        chars = int(context_length * chars_per_token(tokenizer, tasks.PASSKEY_FILLER * 8))
        if task == "passkey":
            return tasks.passkey_samples(n, chars, seed)
        return tasks.multikey_samples(n, chars, seed, keys=MULTIKEY_KEYS)
    heldout = heldout_text() if heldout is None else heldout
    chars = int(context_length * chars_per_token(tokenizer, heldout[:20000]))
    if task == "repetition":
        return tasks.repetition_samples(heldout, n, chars, seed)
    return tasks.bpc_windows(heldout, n, chars, seed)


def passkey_prompts(tokenizer, n_tokens: int, seed: int, depths=(0.25, 0.5, 0.75)) -> tuple[list[str], list[str]]:
    """Prompts of about n_tokens tokens for a model with no chat template: a 5-digit pass key buried at
    each of `depths` in filler text (models.evaluation.tasks' passkey wording), ending in the question. Returns
    (prompts, keys)."""
    rng = np.random.default_rng(seed)
    question = "\n" + tasks.PASSKEY_QUESTION.rstrip()
    per_filler = len(encode(tokenizer, tasks.PASSKEY_FILLER))
    fixed = len(tokenizer(tasks.PASSKEY_INTRO + question + tasks.passkey_needle("00000"))["input_ids"])
    if n_tokens < fixed + per_filler:
        raise ValueError(f"pass-key prompts of {n_tokens} tokens leave no room for filler around the key: they "
                         f"need at least {fixed + per_filler} tokens with this tokenizer")
    repeats = (n_tokens - fixed) // per_filler
    prompts, keys = [], []
    for depth in depths:
        key = str(int(rng.integers(10000, 100000)))
        before = round(repeats * depth)
        prompts.append(tasks.PASSKEY_INTRO + tasks.PASSKEY_FILLER * before + tasks.passkey_needle(key)
                       + tasks.PASSKEY_FILLER * (repeats - before) + question)
        keys.append(key)
    return prompts, keys


def fact_prompts(tokenizer, n: int, n_tokens: int, seed: int, heldout: str | None = None) -> tuple[list[str], list[str]]:
    """n chat prompts of about n_tokens tokens: a passage of the held-out plays with one sentence
    added at depth (i + 1) / (n + 1) - "<name>'s pass key is <5 digits>." - and a question about it;
    the assistant's turn starts with "<name>'s pass key is" so a small model answers in the format
    scored. Returns (prompts, keys)."""
    rng = np.random.default_rng(seed)
    text = heldout_text() if heldout is None else heldout
    per_char = len(encode(tokenizer, text[:20000])) / 20000
    if n_tokens < FACT_ROOM + FACT_PASSAGE:
        raise ValueError(f"fact prompts of {n_tokens} tokens leave no room for a passage around the fact: they "
                         f"need at least {FACT_ROOM + FACT_PASSAGE} tokens")
    prompts, keys = [], []
    for i in range(n):
        name = FACT_NAMES[i % len(FACT_NAMES)]
        key = str(int(rng.integers(10000, 100000)))
        fact = f"{name}'s pass key is {key}. Remember it: {name}'s pass key is {key}."
        chars = int((n_tokens - FACT_ROOM) / per_char)
        start = int(rng.integers(0, len(text) - chars))
        passage = text[start:start + chars]
        at = passage.rfind("\n", 0, int(len(passage) * (i + 1) / (n + 1))) + 1
        passage = passage[:at] + fact + "\n" + passage[at:]
        question = f"What is {name}'s pass key? Answer with the number only."
        messages = [{"role": "user", "content": f"{passage}\n\n{question}"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt + f"{name}'s pass key is")
        keys.append(key)
    return prompts, keys
