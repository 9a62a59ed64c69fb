"""A plain causal-LM training loop for the tiny zoo models (faster than a Trainer at this size)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], *, prompt_loss: bool
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels for prompt+answer+eos; prompt tokens are masked unless prompt_loss."""
    encoded = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = (p if prompt_loss else [-100] * len(p)) + a
        encoded.append((p + a, labels))
    return encoded


def _batch(
    items: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(items):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def train_lm(
    model: PreTrainedModel,
    examples: Sequence[tuple[list[int], list[int]]] | Callable[[random.Random], tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    warmup: int = 20,
    weight_decay: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train with AdamW and a linear-decay schedule; returns the mean loss of the last 20 steps.

    `examples` is either a fixed list (sampled with replacement) or a function drawing one
    fresh example from an RNG (an endless synthetic stream).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )
    recent: list[float] = []
    for step in range(steps):
        if callable(examples):
            items = [examples(rng) for _ in range(batch_size)]
        else:
            items = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        ids, labels, mask = _batch(items, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        recent = (recent + [loss.item()])[-20:]
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return sum(recent) / len(recent)
