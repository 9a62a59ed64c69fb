"""The embedded seed generator: a small LM trained to write merge programs from the prompt."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from agents.generator import completion_text, format_exemplars
from agents.prompts import Prompt
from coevo.zoo.programs import random_program
from coevo.zoo.tiny import SPECIAL_TOKENS, tiny_llama_config, wrap_tokenizer
from coevo.zoo.train import encode_pairs, train_lm


def corpus_example(rng: random.Random, prompt: Prompt, n_experts: int) -> tuple[str, str]:
    """A (rendered prompt, completion) pair: random exemplars with made-up scores, then a program."""
    exemplars = [
        (random_program(rng), rng.uniform(0.0, 60.0)) for _ in range(rng.choice([0, 0, 1, 2]))
    ]
    exemplars.sort(key=lambda item: -item[1])
    text = prompt.render(n_experts=n_experts, exemplars=format_exemplars(exemplars))
    return text, completion_text(random_program(rng))


def bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)


def build_generator(
    out_dir: Path,
    prompt: Prompt,
    *,
    n_experts: int,
    seed: int,
    steps: int,
    corpus_size: int = 4000,
    on_step=None,
) -> float:
    """Train the seed generator on a corpus of valid programs; returns its final training loss."""
    rng = random.Random(f"generator:{seed}")
    pairs = [corpus_example(rng, prompt, n_experts) for _ in range(corpus_size)]
    tokenizer = bpe_tokenizer([p + c for p, c in pairs[:1500]], vocab_size=768)
    # The prompt is context, the program is what is learned; a little prompt loss keeps the
    # model calibrated on exemplar code, which the DPO step later conditions on.
    encoded = encode_pairs(tokenizer, pairs, prompt_loss=False)
    longest = max(len(ids) for ids, _ in encoded)
    config = tiny_llama_config(
        len(tokenizer), hidden_size=128, layers=2, heads=4, intermediate_size=256,
        max_positions=max(1024, longest + 256),
    )
    torch.manual_seed(seed)  # the initial weights too: the build runs this in a fresh process
    model = LlamaForCausalLM(config)
    loss = train_lm(
        model, encoded, steps=steps, batch_size=16, lr=2e-3, seed=seed,
        pad_id=tokenizer.pad_token_id, warmup=30, on_step=on_step,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return loss
