"""NVIDIA kvpress's own presses on our RULER samples: the peer side of the SparQ comparison.

Runs in its own virtual environment (scripts/peers/requirements.txt pins kvpress, transformers,
torch and gguf; kvpress needs transformers < 5.3, so it is never a dependency of sparq-jax):

    python3.11 -m venv venv-kvpress && venv-kvpress/bin/pip install -r scripts/peers/requirements.txt
    venv-kvpress/bin/python scripts/peers/kvpress_ruler.py --samples ruler_samples_4k.jsonl --out runs/kvpress

Input: a JSONL of RULER samples as our harness exports them (models/evaluation/ruler.py
export_jsonl), one per line with the fields task, seed, length, context, question, answer_prefix,
answers (a list of strings) and optionally id and max_new_tokens. The prompt is context + question +
answer_prefix. The context is prefilled (and compressed by the press); question + answer_prefix go
through decode steps after it, which is kvpress's question-agnostic setting (the presses never see
the question) and our harness's too.

--prompt raw (default) feeds kvpress's pipeline (its _forward: prefill with the press, then its
greedy generate_answer) the very tokens our harness uses: no chat template, as our RULER runs and
lm-eval's RULER without --apply_chat_template; the whole prompt tokenized in one piece, its last
len(tokens(question + answer_prefix)) tokens decoded. That makes dense vs dense a like-for-like
check. --prompt chat uses the pipeline's own preprocess instead: the chat template around
context + question, the answer prefix after the generation prompt, context and question tokenized
apart.

Model: the GGUF file of our model cache, loaded by transformers (gguf dequantizes it), fp32, CPU.
Decoding is greedy (the pipeline's own generate_answer), max_new_tokens from the sample or
lm-eval's RULER task configs (niah 128, vt 30, cwe 120), stopping at the generation config's eos.

Methods: no press (dense) and SnapKV, ExpectedAttention, StreamingLLM, Knorm and TOVA at each
--ratios compression_ratio (0.875 keeps 1/8 of the context's keys and values).

Sharing the prefill (the default, --mode shared). A kvpress prefill press compresses a layer's
cache in a forward hook *after* that layer's attention has run on the full context, so the
context's hidden states, and so every layer's full keys and values, are the same with and without
a press; only the kept subset differs. One prefill therefore serves every press: a hook hands each
layer's full keys/values to each press's own `compress` and keeps each result, and each method
then decodes from its own cache. Dense decodes with the pipeline's `generate_answer`; the presses
of one compression ratio keep the same number of positions per layer, so they decode as one batch
(one row per press) with a batched transcription of `generate_answer` (Peer.generate_batch: the
same positions, greedy steps and eos rule), which shares each step's weight reads among the five
presses; --no-batch decodes each press alone, --check-unbatched N records the lone decode's answer
too on the first N samples. --mode pipeline instead
calls the pipeline once per method (one prefill each); --verify N also runs the pipeline on the
first N samples and records whether it gives the same answer (it should, bit for bit).

CPU time: `cpu_s` of a run is the shared prefill's CPU seconds + the press's compress + its decode
(process CPU time, all threads); a batched decode's CPU time is split evenly among its rows
(`decode_batch` says how many).

Output (resumable): --out/results.jsonl, one record per (sample, method, ratio), appended and
flushed as each finishes; a rerun skips what is there. Scores use RULER's string match
(lm-eval's ruler/common_utils.py: postprocess_pred then string_match_all), transcribed below;
scripts/peers/table.py rescores with lm-eval's own function and checks they agree.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import time

PRESSES = ("SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress", "KnormPress", "TOVAPress")
RATIOS = (0.875, 0.75)
# lm-eval 0.4.13 tasks/ruler/*.yaml generation_kwargs.max_gen_toks (niah_* inherit niah_single_1's)
MAX_NEW_TOKENS = {"vt": 30, "cwe": 120, "fwe": 50}
NIAH_MAX_NEW_TOKENS = 128
FIELDS = ("task", "seed", "length", "context", "question", "answer_prefix", "answers")
MODEL = "qwen2.5-coder-0.5b-instruct"


# --- RULER's string match: a transcription of lm-eval 0.4.13 lm_eval/tasks/ruler/common_utils.py
# (postprocess_pred and string_match_all, which process_results applies to every task run here).
def postprocess_pred(prediction: list[str]) -> list[str]:
    res = []
    for predict_str in prediction:
        predict_str = predict_str.strip()
        np_pattern = re.compile(r"[\x00-\x1f]")
        predict_str = np_pattern.sub("\n", predict_str).strip()
        res.append(predict_str)
    return res


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    return sum(sum(1.0 if r.lower() in pred.lower() else 0.0 for r in ref) / len(ref)
               for pred, ref in zip(preds, refs)) / len(preds)


def ruler_score(answer: str, answers: list[str]) -> float:
    return string_match_all(postprocess_pred([answer]), [list(answers)])


# --- samples and results files
def sample_key(s: dict) -> str:
    return str(s["id"]) if s.get("id") is not None else f"{s['task']}-{s['length']}-{s['seed']}"


def max_new_tokens(s: dict) -> int:
    if s.get("max_new_tokens") is not None:
        return int(s["max_new_tokens"])
    if s["task"] in MAX_NEW_TOKENS:
        return MAX_NEW_TOKENS[s["task"]]
    if s["task"].startswith("niah_"):
        return NIAH_MAX_NEW_TOKENS
    raise ValueError(f"sample {sample_key(s)}: task {s['task']!r} has no max_new_tokens field and no "
                     f"RULER default (known: niah_*, {', '.join(MAX_NEW_TOKENS)})")


def load_samples(path: str) -> list[dict]:
    """The samples of a JSONL file, each checked for the fields above (a clear error otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--samples {path!r}: no such file")
    samples = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--samples {path!r} line {i}: not JSON ({e})") from None
            missing = [k for k in FIELDS if k not in s]
            if missing:
                raise ValueError(f"--samples {path!r} line {i}: missing field(s) {missing}; expected {list(FIELDS)}")
            if not isinstance(s["answers"], list) or not s["answers"] or not all(isinstance(a, str) for a in s["answers"]):
                raise ValueError(f"--samples {path!r} line {i}: answers must be a non-empty list of strings, "
                                 f"got {s['answers']!r}")
            for k in ("context", "question", "answer_prefix", "task"):
                if not isinstance(s[k], str):
                    raise ValueError(f"--samples {path!r} line {i}: {k} must be a string, got {type(s[k]).__name__}")
            max_new_tokens(s)
            samples.append(s)
    keys = [sample_key(s) for s in samples]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"--samples {path!r}: duplicate sample keys {dup[:5]} (give each sample an id)")
    return samples


def select(samples: list[dict], tasks, limit) -> list[dict]:
    """The first `limit` samples of each task, interleaved task by task (0th of each, then 1st...), so
    that a run cut short still covers every task."""
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        if tasks is None or s["task"] in tasks:
            by_task.setdefault(s["task"], []).append(s)
    if tasks is not None:
        absent = [t for t in tasks if t not in by_task]
        if absent:
            raise ValueError(f"--tasks {absent}: no such task in the samples (have {sorted({s['task'] for s in samples})})")
    lists = [v[:limit] if limit else v for v in by_task.values()]
    return [l[i] for i in range(max(map(len, lists), default=0)) for l in lists if i < len(l)]


def context_sha(s: dict) -> str:
    text = json.dumps([s[k] for k in FIELDS], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_results(path: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["key"], r["method"], r["compression_ratio"])] = r
    return done


def methods(presses, ratios) -> list[tuple[str, float]]:
    return [("dense", 0.0)] + [(p, r) for r in ratios for p in presses]


def raw_split(tokenizer, s: dict) -> tuple[list[int], list[int]]:
    """(context ids, question ids) of --prompt raw: our harness's tokens (models/evaluation/ruler.py
    prefill: the tokenizer's prefix + the ids of the whole prompt, no special tokens), of which the
    last len(ids(question + answer_prefix)) are the question's, decoded after the prefill."""
    enc = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    full = list(tokenizer("")["input_ids"]) + enc(s["context"] + s["question"] + s["answer_prefix"])
    k = len(enc(s["question"] + s["answer_prefix"]))
    if not 0 < k < len(full):
        raise ValueError(f"sample {sample_key(s)}: {k} question tokens of a {len(full)}-token prompt")
    return full[:-k], full[-k:]


def default_gguf() -> str:
    cache = os.environ.get("SPARQ_JAX_CACHE", os.path.expanduser("~/.cache/sparq_jax"))
    found = sorted(glob.glob(os.path.join(cache, "models", MODEL, "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no {MODEL} GGUF under {cache}/models/{MODEL}; fetch it with "
                                f"python -c \"import models; models.from_pretrained('{MODEL}')\" or pass --gguf")
    return found[0]


# --- the model side (torch, transformers, kvpress imported only here)
class Peer:
    def __init__(self, gguf_path: str, threads: int):
        import torch
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
        self.torch = torch
        folder, name = os.path.split(os.path.abspath(gguf_path))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.eval()
        self.pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
        self.model, self.tok = model, tok

    def press(self, name: str, ratio: float):
        import kvpress
        return None if name == "dense" else getattr(kvpress, name)(compression_ratio=ratio)

    def inputs(self, s: dict, prompt: str) -> dict:
        """{"context_ids", "questions_ids"} as the pipeline's _forward takes them. prompt "chat": the
        pipeline's own preprocess (chat template around context + question, the answer prefix after
        the generation prompt). prompt "raw": the very tokens of our harness (models/evaluation/
        ruler.py prefill): the tokenizer's prefix + the ids of context + question + answer_prefix in
        one piece, of which the last len(ids(question + answer_prefix)) go through decode steps."""
        torch = self.torch
        if prompt == "chat":
            pre, _, _ = self.pipe._sanitize_parameters(question=s["question"], answer_prefix=s["answer_prefix"])
            return self.pipe.preprocess(s["context"], **pre)
        context_ids, question_ids = raw_split(self.tok, s)
        return {"context_ids": torch.tensor([context_ids]), "questions_ids": [torch.tensor([question_ids])]}

    def run_pipeline(self, s: dict, name: str, ratio: float, prompt: str) -> tuple[str, float]:
        """One method through the pipeline itself (its __call__ for "chat", its _forward on our
        harness's tokens for "raw"): (answer, CPU seconds)."""
        t = time.process_time()
        with self.torch.inference_mode():
            if prompt == "chat":
                answer = self.pipe(s["context"], question=s["question"], answer_prefix=s["answer_prefix"],
                                   press=self.press(name, ratio), max_new_tokens=max_new_tokens(s))["answer"]
            else:
                (answer,) = self.pipe._forward(self.inputs(s, prompt), max_new_tokens=max_new_tokens(s),
                                               press=self.press(name, ratio))
        return answer, time.process_time() - t

    def run_shared(self, s: dict, todo: list[tuple[str, float]], prompt: str, batch: bool = True,
                   check: bool = False) -> dict:
        """Every method of `todo` from one prefill: {(name, ratio): record fields}."""
        import copy
        from transformers import DynamicCache
        from kvpress.presses.base_press import BasePress, is_prefilling
        from kvpress.utils import extract_keys_and_values

        torch = self.torch
        presses = {(n, r): self.press(n, r) for n, r in todo if n != "dense"}
        kept: dict = {m: {} for m in presses}
        compress_cpu = {m: 0.0 for m in presses}

        class Fanout(BasePress):
            """Hands each layer's full prefill keys/values to every press's own compress."""
            def post_init_from_model(self, model):
                for p in presses.values():
                    p.post_init_from_model(model)

            def forward_hook(self, module, input, kwargs, output):
                hidden_states = kwargs["hidden_states"]
                if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
                    return output
                keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
                for m, p in presses.items():
                    t = time.process_time()
                    kept[m][module.layer_idx] = p.compress(module, hidden_states, keys, values, output[1], kwargs)
                    compress_cpu[m] += time.process_time() - t
                return output

        inp = self.inputs(s, prompt)
        ctx, (qids,) = inp["context_ids"], inp["questions_ids"]
        n_ctx = ctx.shape[1]
        ids_sha = hashlib.sha256(json.dumps(ctx[0].tolist() + qids[0].tolist()).encode()).hexdigest()[:16]
        out = {}
        with torch.inference_mode():
            t = time.process_time()
            cache = DynamicCache()
            with Fanout()(self.model):
                self.model.model(input_ids=ctx, past_key_values=cache)
            prefill_cpu = time.process_time() - t - sum(compress_cpu.values())

            def cache_of(group):
                """A copy of the prefill cache holding the kept keys/values of `group`'s methods, one
                batch row each (all of one compression ratio keep the same number per layer)."""
                c = copy.deepcopy(cache)
                if group[0] in presses:
                    for i in range(len(c.layers)):
                        ks, vs = zip(*(kept[m][i] for m in group))
                        if len({k.shape for k in ks}) != 1:
                            raise RuntimeError(f"layer {i}: presses {group} kept different lengths "
                                               f"{[k.shape for k in ks]}; run with --no-batch")
                        c.layers[i].keys, c.layers[i].values = torch.cat(ks), torch.cat(vs)
                return c

            groups: dict = {}  # batched: the presses of one ratio together; dense (and --no-batch) alone
            for m in todo:
                groups.setdefault(("ratio", m[1]) if batch and m in presses else ("alone", m), []).append(m)
            for group in groups.values():
                c = cache_of(group)
                n_kept = c.get_seq_length(0)
                t = time.process_time()
                if len(group) == 1:
                    answers = [self.pipe.generate_answer(question_ids=qids, cache=c, context_length=n_ctx,
                                                         max_new_tokens=max_new_tokens(s))]
                else:
                    answers = self.generate_batch(qids, c, n_ctx, max_new_tokens(s))
                decode_cpu = (time.process_time() - t) / len(group)
                for m, answer in zip(group, answers):
                    comp = compress_cpu.get(m, 0.0)
                    out[m] = dict(answer=answer, ids_sha=ids_sha, n_context_tokens=n_ctx,
                                  n_question_tokens=qids.shape[1], n_kept=n_kept, decode_batch=len(group),
                                  prefill_cpu_s=round(prefill_cpu, 3), compress_cpu_s=round(comp, 3),
                                  decode_cpu_s=round(decode_cpu, 3), cpu_s=round(prefill_cpu + comp + decode_cpu, 3))
            for m in todo:
                if check and out[m]["decode_batch"] > 1:
                    out[m]["unbatched_answer"] = self.pipe.generate_answer(
                        question_ids=qids, cache=cache_of([m]), context_length=n_ctx,
                        max_new_tokens=max_new_tokens(s))
        return out

    def generate_batch(self, question_ids, cache, context_length: int, max_new_tokens: int) -> list[str]:
        """The pipeline's generate_answer (kvpress 0.5.5 pipeline.py) over a batch of caches of one
        length, one row per press: the question in one forward at positions context_length + i, then
        greedy steps. As there, the first token never stops a row, a later eos does (and is kept,
        then dropped by decode's skip_special_tokens); a row that has stopped is cut there while the
        others go on. The rows share each step's weight reads, so B presses decode for about the
        cost of one."""
        torch = self.torch
        b = cache.layers[0].keys.shape[0]
        q = question_ids.expand(b, -1)
        pos = torch.arange(context_length, context_length + q.shape[1]).unsqueeze(0).expand(b, -1)
        outputs = self.model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
        pos = pos[:, -1:] + 1
        generated = [outputs.logits[:, -1].argmax(-1)]
        stop = self.model.generation_config.eos_token_id
        stop = torch.tensor(stop if isinstance(stop, list) else [stop])
        done = torch.zeros(b, dtype=torch.bool)
        for i in range(max_new_tokens - 1):
            outputs = self.model(input_ids=generated[-1].unsqueeze(1), past_key_values=cache, position_ids=pos + i)
            generated.append(outputs.logits[:, -1].argmax(-1))
            done |= torch.isin(generated[-1], stop)
            if bool(done.all()):
                break
        answers, stop_ids = [], set(stop.tolist())
        for row in torch.stack(generated, 1).tolist():
            cut = next((j + 1 for j in range(1, len(row)) if row[j] in stop_ids), len(row))
            answers.append(str(self.tok.decode(torch.tensor(row[:cut]), skip_special_tokens=True)))
        return answers


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("kvpress", "transformers", "torch", "gguf")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", required=True, help="JSONL of RULER samples (our harness's export)")
    ap.add_argument("--out", required=True, help="folder for results.jsonl (resumable)")
    ap.add_argument("--gguf", default=None, help=f"the model's GGUF file (default: our cache's {MODEL})")
    ap.add_argument("--tasks", nargs="+", default=None, help="tasks to run (default: all in the file)")
    ap.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    ap.add_argument("--presses", nargs="*", default=list(PRESSES), help="kvpress press classes")
    ap.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS), help="compression ratios")
    ap.add_argument("--no-dense", action="store_true", help="skip the no-press run")
    ap.add_argument("--mode", choices=("shared", "pipeline"), default="shared")
    ap.add_argument("--prompt", choices=("raw", "chat"), default="raw",
                    help="raw: our harness's tokens (no chat template, as its RULER runs); chat: kvpress's own "
                         "chat-template preprocessing")
    ap.add_argument("--verify", type=int, default=0,
                    help="also run the pipeline per method on the first N samples and record its answer")
    ap.add_argument("--no-batch", action="store_true",
                    help="--mode shared: decode each press alone (default: the presses of one ratio as one batch)")
    ap.add_argument("--check-unbatched", type=int, default=0, metavar="N",
                    help="--mode shared: on the first N samples also decode each batched press alone and record "
                         "that answer (unbatched_answer)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)

    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit {args.limit}: expected a positive number of samples per task")
    for name in ("verify", "check_unbatched"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a number of samples >= 0")
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: expected >= 1")
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        ap.error(f"--ratios {bad}: a compression ratio is the fraction removed, expected 0 < ratio < 1")
    import importlib.util
    if importlib.util.find_spec("kvpress") is None:
        sys.exit("kvpress is not installed here: run this script with the peer venv "
                 "(pip install -r scripts/peers/requirements.txt)")
    import kvpress
    unknown = [p for p in args.presses if not hasattr(kvpress, p)]
    if unknown:
        ap.error(f"--presses {unknown}: not kvpress presses (e.g. {', '.join(PRESSES)})")
    try:
        samples = select(load_samples(args.samples), args.tasks, args.limit)
        gguf_path = args.gguf or default_gguf()
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if not os.path.isfile(gguf_path):
        ap.error(f"--gguf {gguf_path!r}: no such file")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = read_results(path)
    all_methods = methods(args.presses, args.ratios)[1 if args.no_dense else 0:]
    todo_of = {sample_key(s): [m for m in all_methods if (sample_key(s), *m) not in done] for s in samples}
    n_todo = sum(map(len, todo_of.values()))
    print(f"{len(samples)} samples, {len(all_methods)} methods, {n_todo} runs to do ({len(done)} in {path})",
          flush=True)
    if not n_todo:
        return
    for s in samples:  # the file must still hold the same samples as the results already written
        for m in all_methods:
            r = done.get((sample_key(s), *m))
            if r is not None and r["sample_sha"] != context_sha(s):
                sys.exit(f"{path}: sample {sample_key(s)} differs from the one in --samples; use a new --out")
            if r is not None and r["prompt"] != args.prompt:
                sys.exit(f"{path} holds --prompt {r['prompt']} runs, not {args.prompt}; use a new --out")

    peer = Peer(gguf_path, args.threads)
    meta = dict(versions(), gguf_file=os.path.basename(gguf_path), threads=args.threads, mode=args.mode, prompt=args.prompt,
                eos_token_id=peer.model.generation_config.eos_token_id)
    print(json.dumps(meta), flush=True)
    with open(path, "a") as f:
        for i, s in enumerate(samples):
            key, todo = sample_key(s), todo_of[sample_key(s)]
            if not todo:
                continue
            t0 = time.time()
            if args.mode == "shared":
                res = peer.run_shared(s, todo, args.prompt, batch=not args.no_batch, check=i < args.check_unbatched)
            else:
                res = {}
                for m in todo:
                    answer, cpu = peer.run_pipeline(s, *m, args.prompt)
                    res[m] = dict(answer=answer, cpu_s=round(cpu, 3))
            if i < args.verify:
                for m in todo:
                    res[m]["pipeline_answer"], res[m]["pipeline_cpu_s"] = peer.run_pipeline(s, *m, args.prompt)
            for (name, ratio), r in res.items():
                rec = dict(key=key, task=s["task"], seed=s["seed"], length=s["length"], method=name,
                           compression_ratio=ratio, score=ruler_score(r["answer"], s["answers"]),
                           answers=s["answers"], sample_sha=context_sha(s), max_new_tokens=max_new_tokens(s),
                           **r, **meta)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            dense = res.get(("dense", 0.0))
            print(f"[{i + 1}/{len(samples)}] {key} {len(todo)} runs {time.time() - t0:.0f}s wall"
                  + (f" dense={dense['answer']!r}" if dense else ""), flush=True)


if __name__ == "__main__":
    main()
