"""Flax NNX ports of Llama and Mistral, loaded from Hugging Face checkpoints.

    import models, sparq_jax as sq
    lm = models.from_pretrained("path/to/checkpoint")          # or a Hugging Face repo id
    ids = lm.generate(input_ids, attention_mask, method=sq.SparQ(rank=16, top_k=256))

(The top-level name `models` is generic; it is this project's package.)
"""
import os

from .config import ConfigError, ModelConfig, RopeParameters
from .hf import CheckpointError, from_pretrained, save_pretrained
from .llama import Llama, init_model
from .lm import LanguageModel, bucket_length
from .tokenizer import byte_tokenizer

# The small trained model that ships with the package (it may not exist yet).
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")

__all__ = ["BUNDLED", "CheckpointError", "ConfigError", "LanguageModel", "Llama", "ModelConfig", "RopeParameters",
           "bucket_length", "byte_tokenizer", "from_pretrained", "init_model", "save_pretrained"]
