"""lm-evaluation-harness backend: any lm-eval task on a LanguageModel, decoding with SparQ or a baseline.

    import lm_eval
    from models.evaluation import lm_eval as sparq_lm_eval          # registers the model "sparq-jax"

    results = sparq_lm_eval.run("smollm2-135m-instruct", "sparq", "1/8", ["sparq_passkey"], limit=20)
    # or lm-eval's own API, with the shipped tasks on the include path:
    results = lm_eval.simple_evaluate(
        model="sparq-jax", model_args="pretrained=smollm2-135m-instruct,method=sparq,compression=1/8",
        tasks=["sparq_plays_next_line"], task_manager=sparq_lm_eval.task_manager())

Protocol (the paper's, and models.evaluation.harness'): each request's context is prefilled dense, and
every scored or generated token comes out of a decode step run with the method:
- loglikelihood: the context but its last token is prefilled; its last token, then the continuation's
  tokens but the last, go through decode steps, each step's logits scoring the next token. A one-token
  context (lm-eval's empty context: the prefix token alone) is prefilled, and its logits score the
  first continuation token: there is no cache yet for a method to select from.
- loglikelihood_rolling: lm-eval's rolling windows of max_length tokens, each scored as above, so every
  token of the text goes through a decode step: T sequential steps for a T-token text (each reading
  the cache so far) where a dense forward is one call - about T times the latency of a forward.
- generate_until: the context but its last token is prefilled; the last token goes through a decode
  step, then greedy tokens until every row has met a stop string or eos, or max_gen_toks.
Requests are sorted by length and batched (batch_size rows, one prefill per batch). The method is
sq.method_from_name(method, compression, head_dim, n) per batch, n the batch's mean cache length over
its scored steps (generation: its longest context); a compression a batch cannot reach is a ValueError
before any prefill. Tokenization, truncation and stop handling follow lm-eval's `hf` backend (HFLM),
so with method=dense the two agree (tests/test_lm_eval.py). No forward of its own: only prefill and
decode_step of the LanguageModel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import sparq_jax as sq
from sparq_jax.validation import check_int, parse_ratio

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                      normalize_gen_kwargs, postprocess_generated_text)
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("models.evaluation.lm_eval needs lm-eval: pip install -e \".[eval]\" "
                      "(lm-eval==0.4.13)") from err

from .. import hf
from ..lm import LanguageModel, TransferMeter, prefill_options
from . import harness
from .harness import token_nll
from .results import check_output_path

MODEL_NAME = "sparq-jax"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
SHIPPED_TASKS = ("sparq_passkey", "sparq_plays_next_line", "sparq_ruler")
RULER_PREFIX = "sparq_ruler"       # the group, and sparq_ruler_<task> for each of ruler.TASKS


def parse_compression(method: str, compression) -> float:
    """compression (0.125, "0.125" or "1/8") -> a ratio in (0, 1]; dense takes none (or 1)."""
    if compression is None:
        if method != "dense":
            raise ValueError(f"method={method} needs compression= (a transfer ratio in (0, 1], e.g. 1/8)")
        return 1.0
    value = parse_ratio(compression, "compression")
    if method == "dense" and value != 1.0:
        raise ValueError(f"method=dense reads the whole cache: compression must be 1 or left out, "
                         f"got {compression!r}")
    return value


@dataclasses.dataclass
class _Row:
    """One scored sequence: prefill [P >= 1 tokens], forced [S] (fed through decode steps), targets
    (the tokens scored, in order); first_from_prefill: the prefill's logits score targets[0]."""

    prefill: list
    forced: list
    targets: list
    first_from_prefill: bool


class SparqJaxLM(TemplateLM):
    """lm-eval's LM over a LanguageModel. model_args: pretrained (anything models.from_pretrained
    takes - a known name, a .gguf, a checkpoint folder - or a LanguageModel), method (one of
    sq.METHOD_NAMES), compression (a ratio such as 1/8; not for dense), dtype, batch_size (rows per
    prefill), max_length (default: the model's max_position_embeddings), max_gen_toks (default 256).
    device (lm-eval's flag) is not used: JAX's default device runs it.
    Every argument is checked before a weight is read; transfer_ratios lists (request kind, measured
    transfer ratio, decode steps) of each call."""

    def __init__(self, pretrained=None, method: str = "dense", compression=None, dtype: str = "float32",
                 batch_size=1, max_batch_size=None, device=None, max_length=None, max_gen_toks=256,
                 progress: bool = True):
        super().__init__()
        if method not in sq.METHOD_NAMES:
            raise ValueError(f"method={method!r} is unknown; choose from {', '.join(sq.METHOD_NAMES)}")
        self.method_name = method
        self.compression = parse_compression(method, compression)
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise ValueError("batch_size=auto is not supported by sparq-jax; give a number of rows")
        self._batch_size = check_int("batch_size", int(batch_size) if isinstance(batch_size, str)
                                     and batch_size.isdigit() else batch_size)
        self._max_gen_toks = check_int("max_gen_toks", max_gen_toks)
        self.progress = progress
        if pretrained is None:
            raise ValueError("model_args needs pretrained= (a known name, a .gguf file or a checkpoint folder)")
        if isinstance(pretrained, LanguageModel):
            lm, config = pretrained, pretrained.config
        else:
            config = hf.open_checkpoint(pretrained).config          # a missing checkpoint fails here
            lm = None
        self._max_length = (check_int("max_length", max_length) if max_length is not None
                            else config.max_position_embeddings)
        # A compression no prompt up to max_length reaches fails now, before any weight is read.
        sq.method_from_name(method, self.compression, config.head_dim, self._max_length, grouped=config.grouped)
        if lm is None:
            lm = hf.from_pretrained(pretrained, dtype=dtype)
        if lm.tokenizer is None:
            raise ValueError(f"pretrained={pretrained!r} has no tokenizer; lm-eval's requests are text")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.pretrained_name = pretrained if isinstance(pretrained, str) else repr(pretrained)
        self.transfer_ratios: list[tuple[str, float, int]] = []

    # lm-eval's properties -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as HFLM: BOS if the tokenizer has one, else EOS
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # the method -------------------------------------------------------------------------------
    def method_for(self, seq_len: int):
        """The method at self.compression for a cache of seq_len positions (ValueError if unreachable)."""
        c = self.lm.config
        try:
            return sq.method_from_name(self.method_name, self.compression, c.head_dim,
                                       harness.budget_length(int(seq_len)), grouped=c.grouped)
        except ValueError as err:
            raise ValueError(f"sparq-jax: a batch of requests of about {int(seq_len)} tokens: {err}") from None

    def _record(self, kind: str, meter: TransferMeter, steps: int) -> None:
        self.transfer_ratios.append((kind, meter.ratio, steps))
        if self.method_name != "dense" and steps:
            tqdm.write(f"sparq-jax {kind}: {self.method_name} at {self.compression:g}, measured transfer "
                       f"ratio {meter.ratio:.4f} over {steps} decode steps", file=sys.stderr)

    def _prefill(self, rows: list[list[int]], extra: int, method, meter: TransferMeter) -> harness.Decoding:
        """A Decoding of `method` from a dense prefill of rows with room for `extra` decode steps; its
        logits are the prefill's (each row's last token)."""
        logits, state, lengths = harness.prefill_rows(self.lm, rows, max(extra, 1), progress=self.progress,
                                                     **prefill_options([method]))
        return harness.Decoding.start(self.lm, state, lengths, method, meter, logits)

    def _batches(self, n: int) -> list[range]:
        return [range(b, min(b + self.batch_size, n)) for b in range(0, n, self.batch_size)]

    def _after_batch(self) -> None:
        # Budgets and widths are bucketed as the harness's, so batches share compiles; the freed cache
        # copies go back to the system (harness.release_memory).
        harness.release_memory()

    # loglikelihood ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None,
                              kind: str = "loglikelihood"):
        """requests: [(request strings or None, context ids, continuation ids)] -> [(log p, is_greedy)]."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("sparq-jax: a loglikelihood request needs context and continuation tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"sparq-jax: a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            # as HFLM: the window the model sees is the last max_length + 1 tokens, less the last one
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            ctx = whole[:len(whole) - len(cont)]
            if len(ctx) >= 2:
                rows.append(_Row(ctx[:-1], [ctx[-1]] + list(cont[:-1]), list(cont), False))
            else:
                rows.append(_Row(ctx, list(cont[:-1]), list(cont), True))
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i].prefill) + len(rows[i].forced)))
        batches = [[order[i] for i in b] for b in self._batches(len(order))]
        # every batch's method first: a compression a prompt cannot reach fails before any prefill
        methods = []
        for b in batches:
            steps = max(len(rows[i].forced) for i in b)
            methods.append(self.method_for(max(len(rows[i].prefill) for i in b) + (steps + 1) // 2))
        out: list = [None] * len(rows)
        meter = TransferMeter(methods[0] if methods else sq.Dense(), self.lm.config.head_dim,
                              self.lm.config.sliding_window)
        total_steps = 0
        bar = tqdm(total=len(rows), desc=f"sparq-jax {kind} ({self.method_name})", file=sys.stderr,
                   disable=disable_tqdm or not self.progress, dynamic_ncols=True)
        for b, method in zip(batches, methods):
            batch = [rows[i] for i in b]
            steps = max(len(r.forced) for r in batch)
            run = self._prefill([r.prefill for r in batch], steps, method, meter)
            logp = np.zeros(len(batch), np.float64)
            greedy = np.ones(len(batch), bool)

            def score(logits, offset):
                # row r's logits here score targets[j] with j = offset + (1 if the prefill scored one)
                targets, live = np.zeros(len(batch), np.int32), np.zeros(len(batch), bool)
                for r, row in enumerate(batch):
                    j = offset + int(row.first_from_prefill)
                    if 0 <= j < len(row.targets):
                        targets[r], live[r] = row.targets[j], True
                nll = np.asarray(token_nll(logits, jnp.asarray(targets)), np.float64)
                top = np.asarray(jnp.argmax(logits, axis=-1))
                logp[live] -= nll[live]
                greedy[live] &= top[live] == targets[live]

            score(run.logits, -1)          # only rows whose prefill scores their first target
            for j in range(steps):
                score(run.step(np.asarray([r.forced[j] if j < len(r.forced) else r.prefill[-1] for r in batch],
                                          np.int32)), j)
            total_steps += run.steps
            for r, i in enumerate(b):
                out[i] = (float(logp[r]), bool(greedy[r]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            del run
            self._after_batch()
            bar.update(len(b))
        bar.close()
        self._record(kind, meter, total_steps)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's rolling windows (as HFLM), every token scored
        through a decode step."""
        windows, owner = [], []
        for i, (string,) in enumerate([req.args for req in requests]):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, kind="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # generation ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations, stopped at the request's `until` strings (and eos) as HFLM's."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        plans = []
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"sparq-jax decodes greedily; a task asks for do_sample=True "
                                 f"({requests[idx[0]].args[1]})")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new = check_int("max_gen_toks", kwargs.pop("max_gen_toks"))
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks={new} must be < max_length={self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new)
                        for i in idx}
            # one-token contexts are prefilled whole (no decode step before the first token): own batches
            order = sorted(idx, key=lambda i: (len(contexts[i]) < 2, -len(contexts[i])))
            split = sum(len(contexts[i]) >= 2 for i in order)
            for b in self._batches(split) + [range(split + k.start, split + k.stop)
                                             for k in self._batches(len(order) - split)]:
                chunk = [order[k] for k in b]
                plans.append((chunk, [contexts[i] for i in chunk], until, new,
                              self.method_for(max(len(contexts[i]) for i in chunk))))
        out: list = [None] * len(requests)
        meter = TransferMeter(plans[0][4] if plans else sq.Dense(), self.lm.config.head_dim,
                              self.lm.config.sliding_window)
        total_steps = 0
        bar = tqdm(total=len(requests), desc=f"sparq-jax generate_until ({self.method_name})", file=sys.stderr,
                   disable=disable_tqdm or not self.progress, dynamic_ncols=True)
        eos = set(self.lm.eos_token_id) | {self.eot_token_id}
        for chunk, contexts, until, new, method in plans:
            texts, steps = self._generate(contexts, until, new, method, meter, eos)
            total_steps += steps
            for i, text in zip(chunk, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            self._after_batch()
            bar.update(len(chunk))
        bar.close()
        self._record("generate_until", meter, total_steps)
        return out

    def _generate(self, contexts, until, new, method, meter, eos):
        one = len(contexts[0]) < 2          # then every context of the batch has one token
        run = self._prefill([c if one else c[:-1] for c in contexts], new, method, meter)
        if not one:
            run.step(np.asarray([c[-1] for c in contexts], np.int32))
        generated = [[] for _ in contexts]
        done = np.zeros(len(contexts), bool)
        for j in range(new):
            token = harness.greedy(run.logits)
            for r in np.flatnonzero(~done):
                if int(token[r]) in eos:
                    done[r] = True
                    continue
                generated[r].append(int(token[r]))
                text = self.tok_decode(generated[r])
                done[r] = any(s and s in text for s in until)
            if done.all() or j + 1 == new:
                break
            run.step(token)
        texts = [postprocess_generated_text(self.tok_decode(g), until, None) for g in generated]
        return texts, run.steps

    def get_model_info(self) -> dict:
        return {"sparq_jax_method": self.method_name, "sparq_jax_compression": self.compression,
                "pretrained": self.pretrained_name}


# Registered once per process (a second import under another module name keeps the first).
try:
    register_model(MODEL_NAME)(SparqJaxLM)
except ValueError:
    pass


def task_manager(include_path=None, tasks=None, metadata: Optional[dict] = None):
    """lm-eval's TaskManager with the shipped tasks (TASKS_DIR) and include_path (a folder or a list)
    on its include path, and lm-eval's own tasks - unless `tasks` (names) are all found without them
    (indexing lm-eval's thousands of task files takes a while); metadata: the tasks' (--metadata)."""
    from lm_eval.tasks import TaskManager
    extra = [] if include_path is None else ([include_path] if isinstance(include_path, str) else list(include_path))
    for folder in extra:
        if not os.path.isdir(folder):
            raise ValueError(f"include_path {folder!r} is not a folder")
    if tasks is not None:
        ours = TaskManager(include_path=[TASKS_DIR, *extra], include_defaults=False, metadata=metadata)
        if all(t in ours.all_tasks for t in tasks):
            return ours
    return TaskManager(include_path=[TASKS_DIR, *extra], metadata=metadata)


def ruler_tasks(tasks) -> list[str]:
    """The models.evaluation.ruler tasks among lm-eval task names (sparq_ruler: all of them)."""
    from . import ruler
    out = []
    for t in tasks:
        if t == RULER_PREFIX:
            out += list(ruler.TASKS)
        elif t.startswith(RULER_PREFIX + "_") and t[len(RULER_PREFIX) + 1:] in ruler.TASKS:
            out.append(t[len(RULER_PREFIX) + 1:])
    return list(dict.fromkeys(out))


def run(pretrained, method: str, compression, tasks, include_path=None, limit: Optional[int] = None,
        batch_size: int = 1, dtype: str = "float32", output: Optional[str] = None, print_table: bool = True,
        metadata: Optional[dict] = None, **simple_evaluate_kwargs) -> dict:
    """lm_eval.simple_evaluate of the sparq-jax model on `tasks` (names; the shipped ones and any in
    include_path) -> lm-eval's results dict. Prints lm-eval's table; output: also write the results
    as JSON there. Model arguments are checked (and the tasks found) before any weight is read.
    metadata: the tasks' (lm-eval's --metadata); the sparq_ruler tasks get pretrained= and, from
    limit, num_samples (per length, so that limit documents cover every length), and their lengths
    are checked against the model's tokenizer and context before any weight is read."""
    import lm_eval

    if output:
        check_output_path(output, "output")
    manager = task_manager(include_path, tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; the shipped ones are "
                         f"{', '.join(SHIPPED_TASKS)} (more with include_path)")
    metadata = dict(metadata or {})
    if ruler_tasks(tasks) and not isinstance(pretrained, LanguageModel):
        from .lm_eval_tasks import ruler_utils
        metadata.setdefault("pretrained", pretrained)
        if isinstance(limit, int) and "num_samples" not in metadata:
            lengths = metadata.get("max_seq_lengths", [4096])
            metadata["num_samples"] = -(-limit // max(1, len(lengths) if isinstance(lengths, list) else 1))
        ruler_utils.check(ruler_tasks(tasks), metadata)
        manager = task_manager(include_path, tasks, metadata)
    model = SparqJaxLM(pretrained=pretrained, method=method, compression=compression, dtype=dtype,
                       batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit, task_manager=manager,
                                      **simple_evaluate_kwargs)
    results["config"]["model"] = MODEL_NAME
    results["config"]["model_args"] = {"pretrained": model.pretrained_name, "method": method,
                                       "compression": model.compression, "dtype": dtype, "batch_size": batch_size}
    results["config"]["sparq_jax_transfer_ratios"] = model.transfer_ratios
    if print_table:
        print(lm_utils.make_table(results))
    if output:
        with open(output, "w") as f:
            json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2,
                      default=lm_utils.handle_non_serializable)
    return results
