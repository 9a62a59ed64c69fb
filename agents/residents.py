"""The resident model a session's judge answers with, as its config says.

`make_resident` builds the vLLM engine (weights swapped in per model) or the transformers
`Answerer`; the session's context builds one in the orchestrator's process, and on a cluster
each judge actor (`agents.cluster.JudgeActor`) builds its own on its node.
"""

from __future__ import annotations

from pathlib import Path

from agents.answerer import Answerer, Resident
from agents.config import DiscoveryConfig
from agents.console import say
from agents.vllm_answerer import VLLMAnswerer


def make_resident(config: DiscoveryConfig, base_dir: Path, *, device: str | None = None) -> Resident:
    """The judge's resident model for `config` on the base model in `base_dir` (`device`
    overrides judge.device, e.g. "cuda" inside a GPU actor)."""
    cfg = config.judge
    if cfg.engine == "vllm":
        engine = VLLMAnswerer(
            base_dir, max_new_tokens=cfg.max_new_tokens, dtype=cfg.vllm_dtype,
            gpu_memory_utilization=cfg.vllm_memory, max_model_len=cfg.vllm_max_model_len,
            tensor_parallel_size=cfg.vllm_tensor_parallel, seed=config.seed,
        )
        say(f"[judge] vLLM engine up in {engine.start_seconds:.0f}s; each model's weights are swapped in")
        return engine
    return Answerer(base_dir, device=device or cfg.device, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
