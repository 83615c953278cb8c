"""The tokenizer the random-init architectures use when no CLIP vocabulary is at hand."""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges), built in memory.

    It needs no vocabulary file, so the embedded default runs offline; 512 + 2 tokens.
    """
    symbols = sorted(ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols] + list(SPECIAL_TOKENS))}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
