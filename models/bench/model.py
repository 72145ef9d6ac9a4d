"""Prefill and decode throughput of a real checkpoint: ours (Dense and SparQ decode) and, as the peer,
transformers' torch model of the same checkpoint on this machine."""
from __future__ import annotations

import dataclasses
import inspect
import os
import platform
import statistics
import time

import jax
import numpy as np

import sparq_jax as sq

from .. import hf
from .timing import DTYPES


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The flags of `benchmark.py model`. SparQ is sparq_jax.method_from_name("sparq") at `compression`."""

    model: str                         # what models.from_pretrained takes: a folder, a .gguf, a name
    contexts: tuple = (2048, 4096, 8192)
    batches: tuple = (1, 4)
    new_tokens: int = 16               # decode steps timed per run (+1 from prefill)
    compression: float = 0.125
    dtype: str = "float32"
    reps: int = 2                      # timed repetitions after the compiling one
    torch: bool = True                 # time transformers' model too
    seed: int = 0
    one_call: bool = False             # also time the prefill as one jitted call (no chunks, no progress)
    dtypes: tuple = ()                 # instead of dtype: these side by side (prefill, dense decode, logit error)

    def __post_init__(self):
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be >= 2 (the first token comes from the prefill)")
        for dtype in (self.dtype, *self.dtypes):
            if dtype not in DTYPES:
                raise ValueError(f"--dtype(s) must be among {sorted(DTYPES)}, got {dtype!r}")
        if self.dtypes and (len(set(self.dtypes)) < 2 or "float32" not in self.dtypes):
            raise ValueError(f"--dtypes must name float32 and at least one other dtype, got {','.join(self.dtypes)}")


def torch_peer(path: str, dtype: str, dequantize: bool = False):
    """transformers' model of the same checkpoint (torch, this machine), or (None, why not).
    dequantize: a GGUF's weights unpacked into a dense model of dtype (our weights, rounded alike),
    rather than left in GGUF blocks whose kernels compute in fp32 whatever the dtype."""
    try:
        import torch
        import transformers
    except ImportError as err:
        return None, f"torch / transformers not importable ({err})"
    kwargs = {"dtype": getattr(torch, dtype)}
    if os.path.isfile(path) and path.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.split(path)
        if dequantize:
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    elif os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        folder = path
    else:
        return None, f"{path} is neither a safetensors folder nor a .gguf file"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    except Exception as err:  # an architecture or file transformers cannot read: no peer, say why
        return None, f"transformers could not load {path} ({type(err).__name__}: {err})"
    return model, None


def torch_last_logits(model, ids: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits [B, V] of the last position of ids [B, S] (untimed)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), logits_to_keep=1)
        return out.logits[:, -1].float().numpy()


def logit_error(got: np.ndarray, want: np.ndarray) -> dict:
    """{"max_abs", "rms"} of got - want (fp32 logits [B, V])."""
    diff = np.asarray(got, np.float64) - np.asarray(want, np.float64)
    return {"max_abs": float(np.max(np.abs(diff))), "rms": float(np.sqrt(np.mean(diff ** 2)))}


def dtype_case(o: ModelOptions, lms: dict, peers: dict, ids: np.ndarray) -> dict:
    """One (B, S) of ids [B, S] for every dtype of o.dtypes, interleaved repetition after repetition:
    ours and the peer's prefill, then ours' Dense decode; the last position's logits of each dtype
    against float32's, ours and the peer's -> {"batch", "context", "new_tokens", "<dtype>": {
    "prefill_tokens_per_s", "dense", "torch", "logit_error" (vs our float32), "torch_logit_error"
    (the peer's vs its float32)}, "<dtype>_vs_float32": {"prefill", "decode", "logit_error_vs_torch"}}."""
    (b, s), n = ids.shape, o.new_tokens
    prefill_s = {dt: [] for dt in o.dtypes}
    torch_s = {dt: [] for dt in o.dtypes}
    decode_s = {dt: [] for dt in o.dtypes}
    logits, states = {}, {}
    for rep in range(1 + o.reps):
        for dt, lm in lms.items():
            states.pop(dt, None)
            start = time.perf_counter()
            logits[dt], states[dt] = lm.prefill(ids, max_len=s + n, transposed_keys=True)
            jax.block_until_ready(logits[dt])
            prefill_s[dt].append(time.perf_counter() - start)
            if peers.get(dt) is not None and rep:
                torch_s[dt].append(time_torch(peers[dt], ids, n))
    for _ in range(1 + o.reps):
        for dt, lm in lms.items():
            _, stats = lm.decode(logits[dt], states[dt], n, method=sq.Dense(), eos_token_id=[], return_stats=True)
            decode_s[dt].append(stats.decode_s / stats.decode_steps)
    states.clear()
    peer_logits = {dt: torch_last_logits(p, ids) for dt, p in peers.items() if p is not None}
    row = {"batch": b, "context": s, "new_tokens": n}
    for dt in o.dtypes:
        step = statistics.median(decode_s[dt][1:])
        row[dt] = {"prefill_tokens_per_s": b * s / statistics.median(prefill_s[dt][1:]), "prefill_s": prefill_s[dt][1:],
                   "dense": {"step_ms": step * 1e3, "tokens_per_s": b / step},
                   "logit_error": logit_error(logits[dt], logits["float32"])}
        if dt in peer_logits:
            tp, td = zip(*torch_s[dt])
            row[dt]["torch"] = {"prefill_tokens_per_s": b * s / statistics.median(tp),
                                "tokens_per_s": b * (n - 1) / statistics.median(td)}
            row[dt]["torch_logit_error"] = logit_error(peer_logits[dt], peer_logits["float32"])
            row[dt]["logit_error_vs_torch_float32"] = logit_error(logits[dt], peer_logits["float32"])
    for dt in o.dtypes:
        if dt != "float32":
            ratios = {"prefill": row[dt]["prefill_tokens_per_s"] / row["float32"]["prefill_tokens_per_s"],
                      "decode": row[dt]["dense"]["tokens_per_s"] / row["float32"]["dense"]["tokens_per_s"]}
            if "torch_logit_error" in row[dt]:
                ours, theirs = row[dt]["logit_error"], row[dt]["torch_logit_error"]
                ratios["logit_error_vs_torch"] = {k: ours[k] / theirs[k] for k in ours}
            row[f"{dt}_vs_float32"] = ratios
    return row


def run_dtypes(o: ModelOptions) -> dict:
    """dtype_case for every (context, batch) of o, printed -> {"config", "results"}."""
    from .. import from_pretrained

    lms = {dt: from_pretrained(o.model, dtype=dt) for dt in o.dtypes}
    config = lms["float32"].config
    peers, why = {}, None
    for dt in o.dtypes:
        peers[dt], why = torch_peer(hf.resolve_path(o.model), dt, dequantize=True) if o.torch else (None, "--no-torch")
        if peers[dt] is not None:
            time_torch(peers[dt], np.zeros((1, 16), np.int64), 2)
    if any(p is None for p in peers.values()):
        peers = {}
        print(f"no torch peer: {why}")
    results = []
    rng = np.random.default_rng(o.seed)
    for s in o.contexts:
        for b in o.batches:
            row = dtype_case(o, lms, peers, rng.integers(0, config.vocab_size, (b, s)).astype(np.int32))
            results.append(row)
            for dt in o.dtypes:
                r = row[dt]
                peer_text = "" if "torch" not in r else (
                    f"; torch prefill {r['torch']['prefill_tokens_per_s']:.0f} tok/s, decode "
                    f"{r['torch']['tokens_per_s']:.2f} tok/s, torch's logit error vs its float32 "
                    f"{r['torch_logit_error']['max_abs']:.3g} max / {r['torch_logit_error']['rms']:.3g} rms")
                ratio = "" if dt == "float32" else (
                    f" [vs float32: prefill {row[dt + '_vs_float32']['prefill']:.2f}x, decode "
                    f"{row[dt + '_vs_float32']['decode']:.2f}x]")
                print(f"B={b} S={s} {dt}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, dense decode "
                      f"{r['dense']['tokens_per_s']:.2f} tok/s, logit error vs float32 {r['logit_error']['max_abs']:.3g} "
                      f"max / {r['logit_error']['rms']:.3g} rms{peer_text}{ratio}", flush=True)
    return {"config": {**config.to_dict(), "model": o.model, "dtypes": list(o.dtypes),
                       "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
                       "machine": platform.machine(), "jax": jax.__version__, "torch_peer": why or "transformers"},
            "results": results}


def time_torch(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) of transformers' model with its KV cache."""
    import torch

    with torch.inference_mode():
        x = torch.tensor(ids, dtype=torch.long)
        start = time.perf_counter()
        # logits_to_keep=1: the last position's logits only, as our prefill (all of them would add a
        # [S, vocab] product: 10 GB and ~0.5 TFLOP for Qwen2.5's 152k vocabulary at 16k)
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        # transformers 5 calls the KV cache `cache`, 4 `past_key_values`
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{name: past})
            past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - start


def model_case(o: ModelOptions, lm, peer, ids: np.ndarray, sparq) -> dict:
    """One (B, S) of ids [B, S]: prefill (the first call compiles) and each method's decode, then the
    peer's -> {"batch", "context", "new_tokens", "sparq_method", "prefill_first_call_s",
    "prefill_tokens_per_s", "dense" and "sparq" ({"step_ms", "tokens_per_s"}), "sparq_speedup",
    "torch" (with a peer)}."""
    (b, s), n = ids.shape, o.new_tokens
    methods = {"dense": sq.Dense(), "sparq": sparq}
    prefill_s, one_call_s, torch_s = [], [], []
    for rep in range(1 + o.reps):          # ours and the peer's prefill interleaved, repetition after repetition
        start = time.perf_counter()
        logits, state = lm.prefill(ids, max_len=s + n, transposed_keys=True)
        jax.block_until_ready(logits)
        prefill_s.append(time.perf_counter() - start)
        if o.one_call:
            start = time.perf_counter()
            jax.block_until_ready(one_call_prefill(lm, ids, s + n))
            one_call_s.append(time.perf_counter() - start)
        if peer is not None and rep:
            torch_s.append(time_torch(peer, ids, n))
    decode_s = {name: [] for name in methods}
    for _ in range(1 + o.reps):
        for name, method in methods.items():
            _, stats = lm.decode(logits, state, n, method=method, eos_token_id=[], return_stats=True)
            decode_s[name].append(stats.decode_s / stats.decode_steps)
    del state
    row = {"batch": b, "context": s, "new_tokens": n,
           "sparq_method": {"rank": sparq.rank, "top_k": sparq.top_k, "local_window": sparq.local_window},
           "prefill_first_call_s": prefill_s[0],     # compiles included (an estimate of them alone
                                                      # went negative once compiling cost less than the noise)
           "prefill_tokens_per_s": b * s / statistics.median(prefill_s[1:]),
           "prefill_s": prefill_s[1:]}
    if o.one_call:
        row["one_call_prefill_tokens_per_s"] = b * s / statistics.median(one_call_s[1:])
        row["one_call_prefill_s"] = one_call_s[1:]
    for name in methods:
        step = statistics.median(decode_s[name][1:])
        row[name] = {"step_ms": step * 1e3, "tokens_per_s": b / step}
    row["sparq_speedup"] = row["dense"]["step_ms"] / row["sparq"]["step_ms"]
    if peer is not None:
        tp, td = zip(*torch_s)
        row["prefill_vs_torch"] = statistics.median(tp) / statistics.median(prefill_s[1:])
        row["torch"] = {"prefill_tokens_per_s": b * s / statistics.median(tp), "prefill_s": list(tp),
                        "step_ms": statistics.median(td) / (n - 1) * 1e3,
                        "tokens_per_s": b * (n - 1) / statistics.median(td)}
    return row


def one_call_prefill(lm, ids: np.ndarray, max_len: int):
    """lm.prefill's logits as one jitted call over the whole prompt (what prefill ran before it went
    chunk by chunk from Python for its progress reports): the chunks' cost, side by side."""
    from ..lm import _prefill_jit

    mask = np.ones_like(ids)
    return _prefill_jit(lm._graphdef, lm.params, ids, mask, max_len=max_len, transposed_keys=True, h2o=False,
                        mesh=lm.mesh)[0]


def run_model(o: ModelOptions) -> dict:
    """Every (context, batch) of o timed and printed -> the JSON document {"config", "results":
    model_case's rows} (with o.dtypes: run_dtypes's)."""
    from .. import from_pretrained

    if o.dtypes:
        return run_dtypes(o)

    lm = from_pretrained(o.model, dtype=o.dtype)
    config = lm.config
    peer, why = torch_peer(hf.resolve_path(o.model), o.dtype) if o.torch else (None, "--no-torch")
    if peer is None:
        print(f"no torch peer: {why}")
    else:
        time_torch(peer, np.zeros((1, 16), np.int64), 2)       # warm-up: first calls set up torch's kernels
    results = []
    rng = np.random.default_rng(o.seed)
    for s in o.contexts:
        if s + o.new_tokens > config.max_position_embeddings:
            print(f"note: context {s} + {o.new_tokens} new tokens exceeds max_position_embeddings="
                  f"{config.max_position_embeddings}")
        sparq = sq.method_from_name("sparq", o.compression, config.head_dim, s, grouped=config.grouped)
        for b in o.batches:
            row = model_case(o, lm, peer, rng.integers(0, config.vocab_size, (b, s)).astype(np.int32), sparq)
            results.append(row)
            peer_text = "" if peer is None else (
                f"; torch prefill {row['torch']['prefill_tokens_per_s']:.0f} tok/s (ours "
                f"{row['prefill_vs_torch']:.2f}x), decode {row['torch']['tokens_per_s']:.2f} tok/s")
            one_call = (f", one jitted call {row['one_call_prefill_tokens_per_s']:.0f} tok/s" if o.one_call else "")
            print(f"B={b} S={s}: prefill {row['prefill_tokens_per_s']:.0f} tok/s{one_call} (first call, "
                  f"compiling included, {row['prefill_first_call_s']:.1f} s); decode dense {row['dense']['tokens_per_s']:.2f} tok/s, "
                  f"SparQ(r={sparq.rank}, k={sparq.top_k}) {row['sparq']['tokens_per_s']:.2f} tok/s "
                  f"({row['sparq_speedup']:.2f}x){peer_text}", flush=True)
    return {"config": {**config.to_dict(), "model": o.model, "dtype": o.dtype, "compression": o.compression,
                       "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
                       "machine": platform.machine(), "jax": jax.__version__, "torch_peer": why or "transformers"},
            "results": results}
