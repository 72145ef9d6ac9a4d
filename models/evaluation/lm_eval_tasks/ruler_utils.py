"""Documents of the sparq_ruler tasks: RULER's, built by models.evaluation.ruler (lm-eval's own generators,
offline) in the fields lm-eval's ruler tasks use (input, outputs, gen_prefix, max_length), so that the
prompt lm-eval builds - input, a space, gen_prefix - is the harness' (RulerSample.prompt).

Metadata (lm-eval's --metadata, plus the model's arguments): max_seq_lengths (default [4096]);
num_samples per length (default ruler.DEFAULT_N; scripts/evaluate.py lm-eval sets it from --limit);
seed (default 42); tokenizer= or pretrained= (anything models.hf.open_checkpoint takes: a known name, a
.gguf, a checkpoint folder), whose tokenizer counts the lengths and whose context bounds them. The
documents of several lengths are interleaved (sample 0 of each length, then sample 1, ...), so that
lm-eval's --limit takes from every length. Scoring: lm-eval's common_utils (string_match_all).
"""
from __future__ import annotations

import functools
import os

import datasets
from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results  # noqa: F401  (the yaml's)

from models.evaluation import ruler


@functools.lru_cache(maxsize=4)
def _checkpoint(name: str):
    """(tokenizer, max_position_embeddings) of a checkpoint (anything hf.open_checkpoint takes)."""
    from models import hf
    checkpoint = hf.open_checkpoint(name)
    tokenizer = checkpoint.tokenizer()
    if tokenizer is None:
        raise ValueError(f"{name!r} has no tokenizer to count RULER's lengths with")
    return tokenizer, checkpoint.config.max_position_embeddings


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    """tokenizer=: a folder of tokenizer files only (no model), or a checkpoint's."""
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(name)
    return _checkpoint(name)[0]


def settings(metadata: dict) -> tuple:
    """(tokenizer, max_context or None, lengths, num_samples, seed) from the metadata, checked: the
    tokenizer is tokenizer='s, else pretrained='s; the context bound is pretrained='s."""
    name, model = metadata.get("tokenizer"), metadata.get("pretrained")
    if not any(isinstance(x, str) and x for x in (name, model)):
        raise ValueError("the sparq_ruler tasks count lengths in the model's tokenizer: give pretrained= in "
                         "model_args or tokenizer= in --metadata")
    lengths = metadata.get("max_seq_lengths", [4096])
    if not isinstance(lengths, list) or not lengths or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in lengths):
        raise ValueError(f"metadata max_seq_lengths must be a list of integers, got {lengths!r}")
    tokenizer = _tokenizer(name) if name else _checkpoint(model)[0]
    context = _checkpoint(model)[1] if model else None
    return tokenizer, context, lengths, int(metadata.get("num_samples", ruler.DEFAULT_N)), \
        int(metadata.get("seed", ruler.SEED))


def check(tasks, metadata: dict) -> None:
    """Every (task, length) checked (ruler.check_length) before any model work."""
    tokenizer, context, lengths, _, _ = settings(metadata)
    for task in tasks:
        for length in lengths:
            ruler.check_length(tokenizer, task, length, context)


def documents(task: str, metadata: dict) -> dict:
    tokenizer, context, lengths, n, seed = settings(metadata)
    per_length = [ruler.build_samples(tokenizer, task, n, length, seed, max_context=context) for length in lengths]
    docs = [{"id": s.id, "index": s.index, "input": s.context + s.question, "outputs": list(s.answers),
             "gen_prefix": s.answer_prefix.lstrip(" "), "max_length": s.length}
            for i in range(n) for samples in per_length for s in samples[i:i + 1]]
    return {"test": datasets.Dataset.from_list(docs)}


def _task(name: str):
    def build(**metadata):
        return documents(name, metadata)
    build.__name__ = name
    return build


niah_single_1, niah_single_2, niah_single_3 = (_task(f"niah_single_{i}") for i in (1, 2, 3))
niah_multikey_1, niah_multikey_2, niah_multikey_3 = (_task(f"niah_multikey_{i}") for i in (1, 2, 3))
niah_multivalue, niah_multiquery = _task("niah_multivalue"), _task("niah_multiquery")
vt, cwe, fwe = _task("vt"), _task("cwe"), _task("fwe")
