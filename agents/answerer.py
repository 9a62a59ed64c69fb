"""The resident model that answers tasks: batched greedy decoding, weights hot-swapped.

It loads the base architecture once and copies each model dir's weights into it, tensor by
tensor, the CPU counterpart of reloading weights into a resident vLLM engine. The judge
(`agents.judge`) scores what it answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.task_format import TaskFormat, chat_prompt, read_reply, truncate_at_stop
from agents.tasks import Task
from merging.io import open_weights


class Resident:
    """A resident model the judge asks: this module's transformers `Answerer`, or the vLLM
    engine (`agents.vllm_answerer.VLLMAnswerer`). Subclasses swap weights in (`load`) and
    write greedy replies (`replies`); reading answers out of them is shared here."""

    tokenizer: Any
    max_new_tokens: int

    def load(self, model_dir: Path) -> None:
        raise NotImplementedError

    def replies(
        self, prompts: Sequence[str], *, max_new_tokens: int | None = None, stop: Sequence[str] = ()
    ) -> list[str]:
        raise NotImplementedError

    def answers(self, prompts: Sequence[str]) -> list[str]:
        """The loaded model's greedy answer to each prompt: the first line it writes, stripped."""
        return [reply.split("\n", 1)[0].strip() for reply in self.replies(prompts)]

    def answer(self, model_dir: Path, prompts: Sequence[str]) -> list[str]:
        """The answers of the model in `model_dir` (swapped in first) to `prompts`."""
        self.load(model_dir)
        return self.answers(prompts)

    def answer_tasks(self, model_dir: Path, tasks: Sequence[Task]) -> list[str]:
        """The answers of the model in `model_dir` to `tasks`, each shown and read the way its
        task set's format says (chat template, answer length, stops, extraction)."""
        self.load(model_dir)
        out = [""] * len(tasks)
        by_format: dict[TaskFormat, list[int]] = {}
        for index, task in enumerate(tasks):
            by_format.setdefault(task.fmt, []).append(index)
        for fmt, indices in by_format.items():
            if fmt.plain:  # the zoo's format: as `answers`, at the judge's answer length
                replies = self.replies([tasks[i].prompt for i in indices])
            else:
                prompts = [chat_prompt(tasks[i].prompt, fmt, self.tokenizer) for i in indices]
                replies = self.replies(prompts, max_new_tokens=fmt.max_new_tokens, stop=fmt.stop)
            for i, reply in zip(indices, replies, strict=True):
                out[i] = read_reply(reply, fmt)
        return out

    def answer_many(self, items: Sequence[tuple[Path, list[Task]]]) -> Iterator[list[str]]:
        """The answers of each (model dir, tasks), in order: here one model after another; a
        judge pool (`agents.cluster.JudgePool`) answers several at once."""
        for model_dir, tasks in items:
            yield self.answer_tasks(model_dir, tasks)


class Answerer(Resident):
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

    def replies(
        self, prompts: Sequence[str], *, max_new_tokens: int | None = None, stop: Sequence[str] = ()
    ) -> list[str]:
        """The loaded model's greedy reply to each prompt (special tokens dropped), cut at the
        first stop sequence; generation ends early once every reply of a batch has stopped."""
        limit = max_new_tokens or self.max_new_tokens
        extra = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            with torch.inference_mode():
                generated = self.model.generate(
                    **enc,
                    max_new_tokens=limit,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **extra,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            out += [truncate_at_stop(text, stop) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return out
