"""The main job as a function: a batch of prompts prefilled once, then decoded with each method; the
answers, decode tokens/s, speedup over dense and measured transfer ratio of each.

    import models
    lm = models.from_pretrained("smollm2-135m-instruct")
    prompts, keys = models.evaluation.fact_prompts(lm.tokenizer, 4, 2000, seed=0)
    run = models.evaluation.compare_methods(lm, prompts, ["dense", "sparq"], compression=1 / 8, keys=keys)
    print(run.table())
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional, Sequence

import jax
from tqdm.auto import tqdm

import sparq_jax as sq
from . import tasks
from sparq_jax.validation import check_int

from ..lm import LanguageModel, prefill_options


@dataclasses.dataclass
class MethodRun:
    """One method's decode of the batch: its budget, the texts, decode tokens/s (a second, compiled
    run), the measured transfer ratio, and per prompt whether the answer starts with its key."""

    method: object
    text: list[str]
    tokens_per_s: float
    transfer_ratio: float
    correct: Optional[list[bool]] = None


@dataclasses.dataclass
class Comparison:
    prompts: list[str]
    prompt_tokens: list[int]
    keys: Optional[list[str]]
    max_new_tokens: int
    prefill_s: float
    runs: dict[str, MethodRun]

    def table(self) -> str:
        """method, transfer ratio, decode tokens/s, speedup over dense, keys found, budget."""
        dense = self.runs.get("dense")
        lines = [f"{'method':<10} {'transfer ratio':>15} {'decode tokens/s':>16} {'vs dense':>9} {'right':>6}  budget"]
        for name, r in self.runs.items():
            speedup = f"{r.tokens_per_s / dense.tokens_per_s:.2f}x" if dense else "-"
            right = f"{sum(r.correct)}/{len(r.correct)}" if r.correct is not None else "-"
            lines.append(f"{name:<10} {r.transfer_ratio:>15.4f} {r.tokens_per_s:>16.1f} {speedup:>9} {right:>6}  "
                         f"{r.method!r}")
        return "\n".join(lines)

    def to_json(self, model: str) -> dict:
        return {"model": model, "prompt_tokens": self.prompt_tokens, "pass_keys": self.keys,
                "max_new_tokens": self.max_new_tokens, "prefill_s": self.prefill_s,
                "results": {name: {"method": repr(r.method), "text": r.text, "tokens_per_s": r.tokens_per_s,
                                   "transfer_ratio": r.transfer_ratio,
                                   **({"correct": r.correct} if r.correct is not None else {})}
                            for name, r in self.runs.items()}}


def tokenize_prompts(lm: LanguageModel, prompts: Sequence[str], chat: Optional[bool] = None):
    """Left-padded ids, mask [B, T] of the prompts. chat (default: whether the tokenizer has a chat
    template): prompts are complete chat texts that carry their own special tokens; otherwise the
    tokenizer adds its own (<s>)."""
    tok = lm.tokenizer
    chat = bool(tok.chat_template) if chat is None else chat
    batch = tok(list(prompts), padding=True, return_tensors="np", add_special_tokens=not chat)
    return batch["input_ids"], batch["attention_mask"]


def prepare_comparison(model, prompts: Sequence[str], methods: Sequence[str], compression: float = 1 / 8,
                       max_new_tokens: int = 32, keys: Optional[Sequence[str]] = None, chat: Optional[bool] = None,
                       beyond_positions: bool = False):
    """compare_methods' checks, with no model work: `model` needs only .config and .tokenizer (a
    LanguageModel, or models.hf.open_checkpoint's config and tokenizer before any weight is read).
    -> (ids, mask [B, T], {name: method}). ValueError naming the value: no tokenizer, a budget a
    method cannot reach (sized at the shortest prompt), keys not one per prompt, or prompt +
    max_new_tokens past max_position_embeddings unless beyond_positions=True."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.json / tokenizer_config.json, or a vocabulary "
                         "in the .gguf)")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens)
    if not prompts:
        raise ValueError("no prompts given")
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"keys must have one entry per prompt ({len(prompts)}), got {len(keys)}")
    config = model.config
    ids, mask = tokenize_prompts(model, prompts, chat)
    lengths = mask.sum(axis=1)
    if lengths.max() + max_new_tokens > config.max_position_embeddings and not beyond_positions:
        raise ValueError(f"the longest prompt ({lengths.max()} tokens) + max_new_tokens={max_new_tokens} is past the "
                         f"model's max_position_embeddings={config.max_position_embeddings}: use shorter prompts or "
                         f"fewer new tokens, or beyond_positions=True (--beyond-positions) to decode past the "
                         f"positions the model was trained on")
    built = {name: sq.method_from_name(name, compression, config.head_dim, int(lengths.min()), grouped=config.grouped)
             for name in dict.fromkeys(methods)}
    return ids, mask, built


def compare_methods(lm: LanguageModel, prompts: Sequence[str], methods: Sequence[str], compression: float = 1 / 8,
                    max_new_tokens: int = 32, keys: Optional[Sequence[str]] = None, chat: Optional[bool] = None,
                    progress: bool = True, beyond_positions: bool = False) -> Comparison:
    """Prefill `prompts` once (dense) and greedily decode max_new_tokens with each method of `methods`
    (sq.METHOD_NAMES) at transfer ratio `compression`: every check (prepare_comparison: budgets from
    the shortest prompt, positions) runs before any model work, so a method that cannot reach its
    budget raises ValueError first. Each method runs twice from the same prefill, the second timed.
    keys: the answers, scored by sq.tasks.score_passkey on each text."""
    ids, mask, built = prepare_comparison(lm, prompts, methods, compression, max_new_tokens, keys, chat,
                                          beyond_positions)
    lengths = mask.sum(axis=1)

    bar = tqdm(total=1 + 2 * len(built), desc="prefill", leave=False, file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    logits, state = lm.prefill(ids, mask, max_len=ids.shape[1] + max_new_tokens, progress=progress,
                               **prefill_options(built.values()))
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    bar.update()
    runs = {}
    for name, method in built.items():
        bar.set_description(f"compiling {name}")
        lm.decode(logits, state, max_new_tokens, method=method)
        bar.update()
        bar.set_description(f"decoding {name}")
        new, stats = lm.decode(logits, state, max_new_tokens, method=method, return_stats=True)
        bar.update()
        texts = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
        correct = None if keys is None else [bool(tasks.score_passkey(t.lstrip(), k)) for t, k in zip(texts, keys)]
        runs[name] = MethodRun(method, texts, len(prompts) * max(stats.decode_steps, 1) / stats.decode_s,
                               stats.transfer_ratio, correct)
    bar.close()
    return Comparison(list(prompts), [int(n) for n in lengths], None if keys is None else list(keys), max_new_tokens,
                      prefill_s, runs)


def default_prompts(lm: LanguageModel, n: int, n_tokens: int, seed: int = 0):
    """The main job's n prompts of about n_tokens tokens: chat prompts with a hidden fact (fact_prompts)
    when the model has a chat template, else pass-key prompts with the key at depths (i + 1) / (n + 1)
    (passkey_prompts). -> (prompts, keys). lm: needs only .tokenizer."""
    from .prompts import fact_prompts, passkey_prompts

    n = check_int("n", n)
    if lm.tokenizer.chat_template:
        return fact_prompts(lm.tokenizer, n, n_tokens, seed)
    return passkey_prompts(lm.tokenizer, n_tokens, seed, depths=tuple((i + 1) / (n + 1) for i in range(n)))


def chat_prompts(lm: LanguageModel, texts: Sequence[str]) -> list[str]:
    """Each text as one user turn through the model's chat template (unchanged without one)."""
    tok = lm.tokenizer
    if not tok.chat_template:
        return list(texts)
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]
