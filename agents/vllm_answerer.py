"""The judge's resident model on a vLLM engine: one engine for the session, each merged
model's weights swapped in with `reload_weights`, all its tasks answered in one batched
greedy `generate`.

A `agents.answerer.Resident`, like the transformers judge for CPU and tiny models
(`agents.answerer.Answerer`): it swaps weights in (`load`) and writes replies (`replies`); the
answers are read the same way for both. Greedy decoding on both gives
the same answers on the zoo's models (tests/test_vllm.py).

A swap costs a weights read (tens of ms on the zoo, seconds at 7B from RAM-backed storage)
where a restart costs the engine's start (25-60 s on 2 CPU cores, minutes on a GPU node).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from agents.answerer import Resident
from agents.backends import import_vllm, vllm_engine_kwargs
from agents.task_format import truncate_at_stop


class VLLMAnswerer(Resident):
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
        self._vllm = import_vllm()
        kwargs = vllm_engine_kwargs(dtype, gpu_memory_utilization, max_model_len, tensor_parallel_size)
        started = time.perf_counter()
        self.llm = self._vllm.LLM(model=str(base_dir), seed=seed, **kwargs)
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
        return [truncate_at_stop(out.outputs[0].text, stop) for out in outputs]
