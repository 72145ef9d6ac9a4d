"""Generate with dense attention and with SparQ side by side, and measure what each reads.

    python scripts/generate.py                       # default model, long passkey prompts, dense vs SparQ 1/8
    python scripts/generate.py --model DIR --prompt "Once upon a time" --method dense,sparq,h2o

The default model is the small trained model that ships with the package (models.BUNDLED); until it
exists, a small random-initialised Llama built and saved by this project's own code (its text is
noise, but speed and transfers are real). Prints each method's text, its decode tokens/s, and the
transfer ratio measured over the run: the sum over decode steps, layers and rows of
method.transfers(length, D) / Dense().transfers(length, D) (PAPER.md, "Data transfer model").
tokens/s is decode throughput: rows x decode steps / decode seconds (the prefill is timed apart).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from fractions import Fraction

import numpy as np
from tqdm.auto import tqdm

METHOD_NAMES = ("dense", "sparq", "h2o", "streaming", "flexgen")
DTYPES = ("float32", "bfloat16", "float16")
# The random stand-in model: shaped like the bundled one is meant to be (GQA, head_dim 64, bytes).
RANDOM_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
RANDOM_MODEL_VERSION = "random-llama-v1"
PROMPT_TOKENS = 3000      # default prompts' length, capped by the model's context
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def parse_args(argv=None) -> argparse.Namespace:
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or Hugging Face repo id (default: the bundled model, "
                                   "else a small random Llama cached under ~/.cache/sparq-jax)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; default: passkey "
                                                      "prompts of a few thousand tokens)")
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

    root = os.path.join(os.path.expanduser("~"), ".cache", "sparq-jax")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        root = os.path.join(tempfile.gettempdir(), "sparq-jax")
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
        raise SystemExit(f"error: --method {name} at --compression {ratio:g}: {err}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import models

    bar = tqdm(total=1 + 2 * len(args.method), desc="loading model", leave=False)
    path = args.model
    random_weights = path is None and not os.path.exists(os.path.join(models.BUNDLED, "config.json"))
    if path is None:
        path = random_model_path() if random_weights else models.BUNDLED
    try:
        lm = models.from_pretrained(path, dtype=args.dtype)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: --model {path}: {err}")
    if lm.tokenizer is None:
        raise SystemExit(f"error: --model {path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    bar.update()
    config = lm.config
    prompts, keys = args.prompt, None
    if prompts is None:
        budget = min(PROMPT_TOKENS, config.max_position_embeddings - args.max_new_tokens)
        prompts, keys = passkey_prompts(lm.tokenizer, budget, args.seed)
    batch = lm.tokenizer(prompts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(axis=1)
    if lengths.max() + args.max_new_tokens > config.max_position_embeddings:
        print(f"note: prompt ({lengths.max()} tokens) + --max-new-tokens exceeds the model's "
              f"max_position_embeddings={config.max_position_embeddings}", file=sys.stderr)

    from sparq_jax.tasks import score_passkey

    results = {}
    for name in args.method:
        method = make_method(name, args.compression, config.head_dim, int(lengths.max()),
                             grouped=config.num_key_value_heads < config.num_attention_heads)
        bar.set_description(f"compiling {name}")
        lm.generate(ids, mask, max_new_tokens=args.max_new_tokens, method=method)
        bar.update()
        bar.set_description(f"running {name}")
        out, stats = lm.generate(ids, mask, max_new_tokens=args.max_new_tokens, method=method, return_stats=True)
        bar.update()
        texts = lm.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        steps = max(stats.decode_steps, 1)
        results[name] = {
            "method": repr(method),
            "text": texts,
            "tokens_per_s": len(prompts) * steps / stats.decode_s,
            "prefill_s": stats.prefill_s,
            "transfer_ratio": stats.transfer_ratio,
        }
    bar.close()

    print(f"model: {path} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}), {args.dtype}")
    if random_weights:
        print("note: the bundled model is not there yet, so this is a random-initialised Llama: its text is "
              "noise, its speed and transfers are real")
    print(f"batch: {len(prompts)} prompts of {', '.join(str(int(n)) for n in lengths)} tokens, "
          f"{args.max_new_tokens} new tokens each")
    for i, prompt in enumerate(prompts):
        shown = prompt if len(prompt) < 160 else f"{prompt[:70]} ... {prompt[-70:]}"
        print(f"\n[prompt {i}] {shown!r}" + (f" (hidden key: {keys[i]})" if keys else ""))
        for name, r in results.items():
            verdict = ""
            if keys:   # the prompt ends at "is": the answer comes after a space
                verdict = "  found" if score_passkey(r["text"][i].lstrip(), keys[i]) else "  missed"
            print(f"  {name:>9}: {r['text'][i]!r}{verdict}")
    print(f"\n{'method':<10} {'transfer ratio':>15} {'decode tokens/s':>16} {'prefill s':>10}  budget")
    for name, r in results.items():
        print(f"{name:<10} {r['transfer_ratio']:>15.4f} {r['tokens_per_s']:>16.1f} {r['prefill_s']:>10.2f}  {r['method']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "prompt_tokens": [int(n) for n in lengths], "pass_keys": keys,
                       "max_new_tokens": args.max_new_tokens, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
