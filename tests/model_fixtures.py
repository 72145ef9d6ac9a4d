"""Tiny random Llama / Mistral checkpoints written by transformers (PyTorch), the reference for the
model tests. Each is built once per test session into a temporary folder."""
from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 160
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            # A wide init spreads the logits, so greedy decoding rarely meets near ties.
            initializer_range=0.25)

# name -> (model class name, config overrides, config.json written in transformers-4 format)
CASES = {
    # GQA, llama3 RoPE (original context 32, so both scaled and unscaled bands are exercised)
    "llama_gqa_llama3": ("LlamaForCausalLM", dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32)), True),
    # MHA, tied embeddings, linear RoPE, attention and MLP biases
    "llama_mha_tied_linear": ("LlamaForCausalLM", dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), False),
    # Mistral, sliding window shorter than the test prompts, MQA
    "mistral_window": ("MistralForCausalLM", dict(
        num_key_value_heads=1, sliding_window=7, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        False),
    # dynamic NTK RoPE, grown beyond max_position_embeddings by the test prompts
    "llama_dynamic": ("LlamaForCausalLM", dict(
        max_position_embeddings=12, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
        False),
    "llama_yarn": ("LlamaForCausalLM", dict(
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64)), False),
}


def to_transformers4_config(path: str) -> None:
    """Rewrite a saved config.json the way transformers 4 wrote it: rope_theta + rope_scaling."""
    with open(path) as f:
        d = json.load(f)
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def build_checkpoint(folder: str, name: str, seed: int = 0, dtype: str = "float32", **save_kwargs):
    """Write checkpoint `name` of CASES into folder (weights in `dtype`); returns the reference:
    transformers' model loaded back from that folder in fp32."""
    import torch
    import transformers

    cls_name, overrides, v4 = CASES[name]
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = cls(config_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0; make them matter
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(folder, **save_kwargs)
    if v4:
        to_transformers4_config(os.path.join(folder, "config.json"))
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits [B, T, V] with position ids from the mask (as its generate does)."""
    import torch

    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.float().numpy()


def left_padded_batch(lengths, vocab: int = VOCAB, seed: int = 0, pad: int = 0):
    """Random prompts (ids 3..vocab-1) of the given lengths, left-padded: (ids, mask) int32 [B, T]."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), pad, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = rng.integers(3, vocab, n)
        mask[b, t - n:] = 1
    return ids, mask
