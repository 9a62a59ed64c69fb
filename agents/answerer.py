"""The resident model that answers tasks: batched greedy decoding, weights hot-swapped.

It loads the base architecture once and copies each model dir's weights into it, tensor by
tensor, the CPU counterpart of reloading weights into a resident vLLM engine. The judge
(`agents.judge`) scores what it answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from merging.io import open_weights


class Answerer:
    """Answers prompts with any model that shares the base model's architecture."""

    def __init__(
        self, base_dir: Path, *, device: str = "cpu", batch_size: int = 256, max_new_tokens: int = 8
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.loaded: Path | None = Path(base_dir)

    def load(self, model_dir: Path) -> None:
        """Copy a model dir's weights into the resident model, tensor by tensor."""
        if self.loaded == Path(model_dir):
            return
        params = dict(self.model.state_dict())
        with open_weights(Path(model_dir)) as weights, torch.no_grad():
            for name in weights.names():
                if name not in params:
                    raise ValueError(f"model {model_dir} has tensor {name} unknown to the judge's base")
                params[name].copy_(weights.get(name))
        self.loaded = Path(model_dir)

    def answers(self, prompts: Sequence[str]) -> list[str]:
        """The loaded model's greedy answer to each prompt: the first line it writes, stripped."""
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            with torch.inference_mode():
                generated = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                out.append(text.split("\n", 1)[0].strip())
        return out

    def answer(self, model_dir: Path, prompts: Sequence[str]) -> list[str]:
        """The answers of the model in `model_dir` (swapped in first) to `prompts`."""
        self.load(model_dir)
        return self.answers(prompts)
