"""A byte-level Hugging Face tokenizer: ids 0-255 are the bytes, then <s>, </s>, <pad>.

Saved with save_pretrained, transformers.AutoTokenizer loads it like any other (tokenizer.json). It
needs no training data, so it serves the project's own small models.
"""
from __future__ import annotations

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def _byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel expects)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def byte_tokenizer():
    """A PreTrainedTokenizerFast over the 256 bytes plus <s> (prepended), </s> and <pad>, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    # No merges: every byte is its own token. One pre-token per text (no regex split) keeps it exact.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left")
