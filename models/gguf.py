"""GGUF checkpoints (llama.cpp's single-file format): config, tensors and tokenizer from one file.

A .gguf file holds metadata (the architecture's hyperparameters, the tokenizer's vocabulary and
merges, the chat template) and tensors in llama.cpp's names and layout, often quantized. This module
turns them into what from_pretrained takes from a safetensors folder:
- a ModelConfig, from the `<architecture>.*` metadata;
- {Hugging Face tensor name: entry} whose read() dequantizes with the `gguf` package (llama.cpp's own
  reader, numpy only) into fp32 in Hugging Face's layout;
- a tokenizer built from the vocabulary in the file (byte-level BPE with `tokenizers`; the chat
  template kept), with no torch involved.
Every problem with a file is found from its header before a weight is dequantized.

The architectures are a table (ARCHITECTURES): what a llama-style file differs in (whether llama.cpp
permuted the Q / K rows, tensors the architecture lacks) is data there, and the tokenizers'
pre-tokenizer types are another (PRE_TOKENIZERS).

`gguf` is imported only when a GGUF file is read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from .config import CheckpointError, ConfigError, ModelConfig

SUFFIX = ".gguf"
# Tensor types read as they are; the others go through gguf.quants.dequantize.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
# llama.cpp's per-layer names -> Hugging Face's (after "model.layers.{n}.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# GGUF's token types (llama.cpp's llama_token_type): 3 control (special), 4 user-defined (added)
_CONTROL, _USER_DEFINED = 3, 4


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How the files of one GGUF architecture (general.architecture) map onto llama.Llama."""

    model_type: str            # the ModelConfig model_type that runs it
    # llama.cpp's converter (convert_hf_to_gguf.py) permutes the Q / K rows per head for the llama
    # architecture only, so that its kernels rotate interleaved pairs; read() undoes it.
    permuted_qk: bool
    # Hugging Face per-layer tensors (after "model.layers.{n}.") that llama.Llama has when the file
    # has attention biases but the architecture does not: filled with zeros, the same model.
    zero_with_bias: tuple[str, ...] = ()


ARCHITECTURES = {
    # Mistral's GGUF files say llama too (a sliding window in the metadata tells them apart).
    "llama": Architecture("llama", permuted_qk=True),
    # Qwen2: Llama with q / k / v biases and none on o_proj; transformers' GGUF loading and
    # llama.cpp's converter leave its Q / K rows as they are.
    "qwen2": Architecture("llama", permuted_qk=False, zero_with_bias=("self_attn.o_proj.bias",)),
}


class GGUFError(CheckpointError):
    """A GGUF file this package cannot load."""


def find(path: str) -> Optional[str]:
    """The GGUF file `path` names: itself if it is a .gguf file, the one .gguf in a folder that has no
    config.json, else None. GGUFError for a folder with several."""
    if os.path.isfile(path):
        return path if path.lower().endswith(SUFFIX) else None
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(SUFFIX))
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(found)}); pass the one to load")
    return os.path.join(path, found[0]) if found else None


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor as a checkpoint entry: read() -> fp32 numpy in Hugging Face's layout."""

    path: str
    gguf_name: str
    type_name: str             # GGML type: F32, Q4_1, ...
    shape: tuple[int, ...]     # Hugging Face's layout (GGUF lists dims fastest first: reversed)
    offset: int                # absolute byte offset in the file
    nbytes: int
    heads: Optional[int]       # Q / K projections of a permuted_qk architecture: rows permuted per head
    dtype: str = "F32"         # what read() returns (safetensors' name)

    def read(self) -> np.ndarray:
        gguf = _import_gguf()
        raw = np.fromfile(self.path, dtype=np.uint8, count=self.nbytes, offset=self.offset)
        if self.type_name in _PLAIN:
            x = raw.view(np.dtype(_PLAIN[self.type_name]).newbyteorder("<")).astype(np.float32)
        else:
            qtype = gguf.GGMLQuantizationType[self.type_name]
            x = gguf.quants.dequantize(raw.reshape(-1, raw.size // _rows(self.shape)), qtype).astype(np.float32)
        x = x.reshape(self.shape)
        if self.heads is not None:
            x = unpermute(x, self.heads)
        return x


@dataclasses.dataclass(frozen=True)
class _Zeros:
    """A tensor the architecture does not have (Architecture.zero_with_bias): read() -> zeros."""

    shape: tuple[int, ...]
    dtype: str = "F32"

    def read(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permute of a Q / K projection [heads * D, H]: within each
    head, the rotary halves (x[:D/2], x[D/2:]) become interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of permute: Hugging Face's rows back from a GGUF Q / K projection."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    path: str
    config: ModelConfig
    entries: dict
    metadata: dict             # key -> value for the scalar and string keys (arrays left out)
    reader: object             # the gguf.GGUFReader (tokenizer arrays are read from it on demand)


def open_gguf(path: str) -> GGUFCheckpoint:
    """Parse and check a GGUF file: its config and tensor entries. GGUFError / ConfigError naming the
    problem before any weight is read (another architecture, a truncated file, a tensor type `gguf`
    cannot dequantize; missing or misshaped tensors are found by the caller against the config)."""
    gguf = _import_gguf()
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader raises ValueError, struct / numpy errors on damaged headers
        raise GGUFError(f"{path} is not a readable GGUF file (damaged or truncated): "
                        f"{type(err).__name__}: {err}") from None
    metadata = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:   # scalars and strings; arrays (the vocabulary) are read on demand
            try:
                metadata[key] = field.contents()
            except Exception:
                continue
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; this package runs the GGUF "
                        f"architectures {', '.join(map(repr, ARCHITECTURES))} (Mistral's files say 'llama')")
    kind = ARCHITECTURES[arch]
    config = _config(path, metadata, reader, arch)
    entries, problems = {}, []
    for t in reader.tensors:
        type_name = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        start = int(t.data_offset)
        nbytes = int(t.n_bytes)
        if start + nbytes > size:
            problems.append(f"{t.name} needs bytes {start}..{start + nbytes} of a {size}-byte file (truncated?)")
            continue
        if not _can_read(gguf, type_name):
            problems.append(f"{t.name} has tensor type {type_name}, which the gguf package "
                            f"(version {_version(gguf)}) cannot dequantize")
            continue
        name = _hf_name(t.name)
        heads = None
        if kind.permuted_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = config.num_attention_heads
        elif kind.permuted_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            heads = config.num_key_value_heads
        entries[name] = _Tensor(path, t.name, type_name, shape, start, nbytes, heads)
    if config.attention_bias:
        for n in range(config.num_hidden_layers):
            for rest in kind.zero_with_bias:
                name = f"model.layers.{n}.{rest}"
                if name in entries:
                    problems.append(f"{arch} has no {rest}, yet the file holds {name}")
                else:
                    entries[name] = _Zeros(_zero_shape(config, rest))
    if problems:
        raise GGUFError(f"{path}: " + "; ".join(problems[:8])
                        + (f" and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return GGUFCheckpoint(path, config, entries, metadata, reader)


def _zero_shape(config: ModelConfig, rest: str) -> tuple[int, ...]:
    shapes = {"self_attn.o_proj.bias": (config.hidden_size,)}
    return shapes[rest]


def _version(gguf) -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return getattr(gguf, "__version__", "?")


def _can_read(gguf, type_name: str) -> bool:
    if type_name in _PLAIN:
        return True
    qtype = gguf.GGMLQuantizationType[type_name]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _hf_name(name: str) -> str:
    """llama.cpp's tensor name -> Hugging Face's (unknown names are kept, to be reported as unexpected)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return name


def _config(path: str, md: dict, reader, arch: str) -> ModelConfig:
    """config.json's fields from the `arch`.* metadata, checked as a config.json would be."""
    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    def need(key):
        if f"{arch}.{key}" not in md:
            raise GGUFError(f"{path}: the metadata has no '{arch}.{key}'")
        return md[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count={get('rope.dimension_count')} differs from the "
                        f"head dimension {head_dim}; partial rotary embeddings are not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: holds rope_freqs.weight (llama.cpp's form of Llama 3.1's rope scaling), "
                        f"which is not supported; load the model's safetensors checkpoint instead")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    d = {
        "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    window = get("attention.sliding_window")
    if window:
        d.update(model_type="mistral", sliding_window=int(window))
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling == "yarn":
        d["rope_scaling"] = {"rope_type": "yarn", "factor": float(need("rope.scaling.factor")),
                             "original_max_position_embeddings": int(need("rope.scaling.original_context_length"))}
    elif scaling != "none":
        raise GGUFError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (none, linear, yarn)")
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as err:
        raise GGUFError(f"{path}: the metadata gives an unusable config: {err}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer

@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE vocabulary splits text before its merges (llama.cpp's tokenizer.ggml.pre,
    llama-vocab.cpp), as the model's own tokenizer.json does it."""

    split: Optional[str] = None    # the regex (isolated matches); None: GPT-2's
    digits: bool = False           # every digit its own piece first
    nfc: bool = False              # NFC-normalized first


# Qwen2's tokenizer.json (and llama.cpp's "qwen2"): each digit a piece, a word keeps one leading mark.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2"), PreTokenizer()),
    # SmolLM's tokenizer.json: each digit on its own, then GPT-2's split
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), PreTokenizer(digits=True)),
    # Qwen2's tokenizer.json also NFC-normalizes (transformers' GGUF conversion leaves that out)
    "qwen2": PreTokenizer(split=_QWEN2_SPLIT, nfc=True),
}


def _array(reader, key: str) -> Optional[list]:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer(checkpoint: GGUFCheckpoint):
    """A transformers PreTrainedTokenizerFast (left padding) from the file's vocabulary, or None when
    the file has none. Byte-level BPE vocabularies (tokenizer.ggml.model "gpt2") are built here with
    `tokenizers`; others (SentencePiece "llama") through transformers' GGUF tokenizer conversion."""
    md, reader = checkpoint.metadata, checkpoint.reader
    kind = md.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        return _transformers_tokenizer(checkpoint.path)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _array(reader, "tokenizer.ggml.tokens")
    types = _array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _array(reader, "tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = PRE_TOKENIZERS.get(md.get("tokenizer.ggml.pre", "default"))
    if pre is None:
        return _transformers_tokenizer(checkpoint.path)
    if pre.nfc:
        bpe.normalizer = normalizers.NFC()
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre.digits else []
    if pre.split is None:       # GPT-2's own split inside the byte-level step
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    bpe.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    bpe.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    bpe.add_special_tokens(special)
    bpe.add_tokens(added)

    def token(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", token("eos_token_id")),
                                ("unk_token", token("unknown_token_id")),
                                ("pad_token", token("padding_token_id"))) if v is not None}
    out = PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left",
                                  chat_template=md.get("tokenizer.chat_template"), **kwargs)
    return out


def _transformers_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.padding_side = "left"
    return tok
