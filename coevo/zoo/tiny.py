"""Tiny Llama-architecture models and character tokenizers, built locally (no hub)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from merging.writer import share_readable

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, so digits and letters stay atomic."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in charset:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` one, with coevo's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 128,
    max_positions: int = 128,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **config_kwargs: int,
) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer as a Hugging Face model dir."""
    tokenizer = tokenizer or char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config_kwargs))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    share_readable(out_dir)
    return out_dir


def perturbed_copy(src: Path, out_dir: Path, *, seed: int, scale: float = 0.02) -> Path:
    """Copy a model dir with Gaussian noise added to every weight: a stand-in expert for tests."""
    model = LlamaForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(src).save_pretrained(out_dir)
    share_readable(Path(out_dir))
    return Path(out_dir)
