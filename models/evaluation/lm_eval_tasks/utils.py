"""Documents of the shipped lm-eval tasks, built at load time from what the package holds (no network):

- sparq_passkey (generate_until): the Landmark / Quest pass-key prompt of models.evaluation.tasks - a 5-digit
  key hidden at a random depth of repeated filler, then the question; 2k-4k tokens for a BPE tokenizer
  like SmolLM2's (PASSKEY_REPEATS filler sentences, ~24 tokens each). Score: exact match of the key
  at the start of the generation (tasks.score_passkey).
- sparq_plays_next_line (multiple_choice, loglikelihood): a passage of a held-out play
  (models/bundled/heldout) up to the end of a line; which of 4 lines comes next - the true one or 3
  other lines of the same play, drawn at random.

lm-eval calls the custom_dataset functions with the run's metadata (model_args included); they take
no model argument, so every backend sees the same documents.
"""
from __future__ import annotations

import os
import re

import datasets
import numpy as np

from models.evaluation import tasks

N_DOCS = 100
SEED = 1234
# Filler sentences per prompt: with SmolLM2's tokenizer (24.1 tokens per sentence, 67 for the rest)
# 84 -> 2,091 tokens and 162 -> 3,970.
PASSKEY_REPEATS = (84, 162)
PLAY_CONTEXT_LINES = 12      # lines of the play before the one asked about
MIN_LINE_CHARS = 20


def passkey_docs(**_metadata) -> dict:
    """N_DOCS pass-key documents {"context", "question", "answer", "depth", "repeats"}: lengths drawn
    from PASSKEY_REPEATS, the key's depth uniform in [0, 1] and its value from the same seeded stream."""
    rng = np.random.default_rng(SEED)
    docs = []
    for _ in range(N_DOCS):
        repeats = int(rng.integers(PASSKEY_REPEATS[0], PASSKEY_REPEATS[1] + 1))
        depth = float(rng.uniform())
        key = str(int(rng.integers(10 ** (tasks.PASSKEY_DIGITS - 1), 10 ** tasks.PASSKEY_DIGITS)))
        before = int(round(depth * repeats))
        context = (tasks.PASSKEY_INTRO + tasks.PASSKEY_FILLER * before + tasks.passkey_needle(key)
                   + tasks.PASSKEY_FILLER * (repeats - before))
        docs.append({"context": context, "question": tasks.PASSKEY_QUESTION, "answer": key, "depth": depth,
                     "repeats": repeats})
    return {"test": datasets.Dataset.from_list(docs)}


def passkey_results(doc: dict, results: list[str]) -> dict:
    """exact_match: the generation (leading spaces dropped) starts with exactly the key."""
    return {"exact_match": tasks.score_passkey(results[0].lstrip(), doc["answer"])}


def _heldout_folder() -> str:
    from models.evaluation.prompts import HELDOUT
    return HELDOUT


_SPEAKER = re.compile(r"^[A-Z][A-Z .'-]+\.$")


def _is_spoken(line: str) -> bool:
    """A line of speech: not blank, not a speaker's name ("MIRANDA."), a stage direction ("[Exit]"),
    or a heading ("SCENE 2", "ACT I")."""
    s = line.strip()
    return (len(s) >= MIN_LINE_CHARS and not _SPEAKER.match(s) and not s.startswith("[")
            and not s.upper() == s)


def next_line_docs(**_metadata) -> dict:
    """N_DOCS documents {"context", "choices", "label", "play"}: for a random line of speech of a
    random held-out play (one with PLAY_CONTEXT_LINES lines before it, the line before it also
    speech, so the passage ends mid-speech), the passage of those lines; choices: that line and 3
    distinct other lines of speech of the same play of about its length, in random order."""
    folder = _heldout_folder()
    rng = np.random.default_rng(SEED)
    plays = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                lines = [line.rstrip() for line in f.read().split("\n")]
            plays[name[:-4]] = lines
    if not plays:
        raise ValueError(f"{folder!r} has no *.txt plays for sparq_plays_next_line")
    docs = []
    names = sorted(plays)
    while len(docs) < N_DOCS:
        play = names[int(rng.integers(len(names)))]
        lines = plays[play]
        spoken = [i for i, line in enumerate(lines) if _is_spoken(line)]
        i = spoken[int(rng.integers(len(spoken)))]
        if i < PLAY_CONTEXT_LINES or not _is_spoken(lines[i - 1]):
            continue
        answer = lines[i].strip()
        # Distractors of about the answer's length (within 25%), so that a line's length says nothing:
        # with any other line, plain acc rewarded short lines (SmolLM2: acc 0.45, acc_norm 0.57).
        alike = [j for j in spoken if abs(len(lines[j].strip()) - len(answer)) <= 0.25 * len(answer)
                 and lines[j].strip() != answer]
        if len({lines[j].strip() for j in alike}) < 3:
            continue
        others = []
        while len(others) < 3:
            other = lines[alike[int(rng.integers(len(alike)))]].strip()
            if other not in others:
                others.append(other)
        label = int(rng.integers(4))
        choices = others[:label] + [answer] + others[label:]
        context = "\n".join(lines[i - PLAY_CONTEXT_LINES:i])
        docs.append({"context": context, "choices": choices, "label": label, "play": play})
    return {"test": datasets.Dataset.from_list(docs)}
