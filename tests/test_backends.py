"""LLM backends on a real tiny model, and the OpenAI protocol against a real local HTTP server."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.backends import (
    Adapter,
    BackendError,
    LLMBackend,
    OpenAIBackend,
    TransformersBackend,
    make_backend,
    truncate_at_stop,
)
from coevo.zoo.tiny import save_tiny_llama

PROMPTS = ["def merge(task_vectors", "x = ", "return "]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("backend_models")
    first = save_tiny_llama(root / "gen0", seed=0, max_positions=256)
    second = save_tiny_llama(root / "gen1", seed=1, max_positions=256)
    return first, second


@pytest.fixture(scope="module")
def backend(model_dirs: tuple[Path, Path]) -> TransformersBackend:
    # batch_size 4 < prompts x n below, so chunking is exercised.
    return TransformersBackend(model_dirs[0], batch_size=4)


def test_truncate_at_stop_cuts_at_earliest() -> None:
    assert truncate_at_stop("abc\n\ndef", ["\n\n", "c"]) == "ab"
    assert truncate_at_stop("abc", None) == "abc"
    assert truncate_at_stop("abc", ["z", ""]) == "abc"


def test_shapes_are_prompts_by_n(backend: TransformersBackend) -> None:
    out = backend.generate(PROMPTS, n=3, max_new_tokens=8, seed=0)
    assert len(out) == len(PROMPTS)
    assert all(len(completions) == 3 for completions in out)
    assert all(isinstance(text, str) for completions in out for text in completions)
    assert isinstance(backend, LLMBackend)


def test_seed_makes_sampling_reproducible(backend: TransformersBackend) -> None:
    first = backend.generate(PROMPTS, n=3, max_new_tokens=12, seed=7)
    again = backend.generate(PROMPTS, n=3, max_new_tokens=12, seed=7)
    other = backend.generate(PROMPTS, n=3, max_new_tokens=12, seed=8)
    assert first == again
    assert first != other
    # n samples of one prompt differ: a random tiny model almost never repeats 12 characters.
    assert len(set(first[0])) == 3


def test_greedy_is_deterministic(backend: TransformersBackend) -> None:
    out = backend.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=12)
    assert all(a == b for a, b in out)
    assert backend.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=12, seed=3) == out


def test_stop_truncates_completion(backend: TransformersBackend) -> None:
    full = backend.generate(["def merge("], temperature=0.0, max_new_tokens=30)[0][0]
    stop = full[5]
    cut = backend.generate(["def merge("], temperature=0.0, max_new_tokens=30, stop=[stop])[0][0]
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_reload_swaps_model(model_dirs: tuple[Path, Path]) -> None:
    local = TransformersBackend(model_dirs[0])
    before = local.generate(PROMPTS, temperature=0.0, max_new_tokens=12)
    local.reload(model_dirs[1])
    assert local.model_dir == model_dirs[1]
    assert str(model_dirs[1]) in local.name
    assert local.generate(PROMPTS, temperature=0.0, max_new_tokens=12) != before
    local.reload(model_dirs[0])
    assert local.generate(PROMPTS, temperature=0.0, max_new_tokens=12) == before


def test_a_lora_version_is_merged_in_memory_and_dropped_again(model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs[0]),
                          LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for key, tensor in peft.named_parameters():
            if "lora_B" in key:
                tensor.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft.save_pretrained(tmp_path / "v1")
    local = TransformersBackend(model_dirs[0])
    before = local.generate(PROMPTS, temperature=0.0, max_new_tokens=12)
    local.use(model_dirs[0], Adapter("v1", tmp_path / "v1"))
    assert local.name.endswith(f"+{tmp_path / 'v1'}")
    assert local.generate(PROMPTS, temperature=0.0, max_new_tokens=12) != before
    local.use(model_dirs[0])
    assert local.generate(PROMPTS, temperature=0.0, max_new_tokens=12) == before
    with pytest.raises(BackendError, match="not a PEFT adapter dir"):
        local.use(model_dirs[0], Adapter("v2", model_dirs[1]))


def test_openai_adapter_paths_as_the_server_sees_them(tmp_path: Path) -> None:
    remote = OpenAIBackend("http://127.0.0.1:1/v1", "gen", path_map=(tmp_path / "w", "/work"))
    assert remote.server_path(tmp_path / "w" / "generators" / "s" / "v1") == "/work/generators/s/v1"
    assert remote.server_path(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    assert OpenAIBackend("http://127.0.0.1:1/v1", "gen").server_path(Path("rel")) == str(Path("rel").resolve())


def test_openai_adapter_load_on_a_server_without_lora_fails_in_one_line(server: tuple[str, ServerState], tmp_path: Path) -> None:
    remote = OpenAIBackend(server[0], "gen")
    with pytest.raises(BackendError, match=r"answered HTTP 501 to GET /models") as err:
        remote.use(tmp_path, Adapter("v1", tmp_path / "v1"))
    assert "\n" not in str(err.value)
    assert remote.model == "gen"  # still sampling the served model


def test_reload_rejects_non_model_dir(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no config.json"):
        TransformersBackend(tmp_path)


def test_make_backend_kinds(model_dirs: tuple[Path, Path]) -> None:
    assert isinstance(make_backend("transformers", model_dir=model_dirs[0]), TransformersBackend)
    remote = make_backend("openai", base_url="http://127.0.0.1:1/v1", model="gen")
    assert isinstance(remote, OpenAIBackend)
    with pytest.raises(ValueError, match="unknown LLM backend 'llama.cpp'"):
        make_backend("llama.cpp")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_gives_clear_error(model_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(BackendError, match=r"vllm is not installed: pip install 'coevo\[gpu\]'"):
        make_backend("vllm", model_dir=model_dirs[0])


# --- a real OpenAI-compatible server: /v1/completions served by a TransformersBackend ---------


@dataclass
class ServerState:
    backend: TransformersBackend
    fail_first: int = 0
    fail_status: int = 500
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(request)
                state.headers.append(dict(self.headers))
                failing = len(state.requests) <= state.fail_first
            if self.path != "/v1/completions":
                self._reply(404, {"error": {"message": f"no route {self.path}"}})
                return
            if failing:
                self._reply(state.fail_status, {"error": {"message": "engine busy"}})
                return
            prompts = request["prompt"]
            prompts = [prompts] if isinstance(prompts, str) else prompts
            n = int(request.get("n", 1))
            with state.lock:  # one generate at a time: the model and the RNG are shared
                texts = state.backend.generate(
                    prompts,
                    n=n,
                    temperature=float(request.get("temperature", 1.0)),
                    top_p=float(request.get("top_p", 1.0)),
                    max_new_tokens=int(request.get("max_tokens", 16)),
                    seed=request.get("seed"),
                    stop=request.get("stop"),
                )
            choices = [
                {"index": i * n + j, "text": text, "logprobs": None, "finish_reason": "length"}
                for i, completions in enumerate(texts)
                for j, text in enumerate(completions)
            ]
            # Out of order on purpose: clients must order choices by index.
            self._reply(
                200,
                {
                    "id": "cmpl-test",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": request["model"],
                    "choices": choices[::-1],
                },
            )

    return Handler


@pytest.fixture()
def server(backend: TransformersBackend) -> Iterator[tuple[str, ServerState]]:
    state = ServerState(backend=backend)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_openai_backend_matches_local_model(
    server: tuple[str, ServerState], backend: TransformersBackend
) -> None:
    base_url, state = server
    remote = OpenAIBackend(base_url, "gen0", api_key="secret", max_concurrency=2)
    greedy = remote.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=10, stop=["\n"])
    assert greedy == backend.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=10, stop=["\n"])
    sampled = remote.generate(PROMPTS, n=3, max_new_tokens=10, seed=5)
    # The server runs one request per prompt, each seeded with 5.
    assert sampled == [backend.generate([p], n=3, max_new_tokens=10, seed=5)[0] for p in PROMPTS]
    request = state.requests[0]
    assert request["model"] == "gen0" and request["max_tokens"] == 10 and request["stop"] == ["\n"]
    assert all(h.get("Authorization") == "Bearer secret" for h in state.headers)
    remote.close()


def test_openai_backend_retries_server_errors(server: tuple[str, ServerState]) -> None:
    base_url, state = server
    state.fail_first = 1
    out = OpenAIBackend(base_url, "gen0").generate(["x = "], temperature=0.0, max_new_tokens=4)
    assert len(out) == 1 and len(out[0]) == 1
    assert len(state.requests) == 2


def test_openai_backend_gives_up_on_client_error(server: tuple[str, ServerState]) -> None:
    base_url, state = server
    state.fail_first, state.fail_status = 5, 400
    with pytest.raises(BackendError, match="rejected the request with HTTP 400"):
        OpenAIBackend(base_url, "gen0").generate(["x = "], max_new_tokens=4)
    assert len(state.requests) == 1


def test_openai_backend_unreachable_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "gen0", timeout_s=2.0)
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"at http://127\.0\.0\.1:\d+/v1 unreachable: "):
        remote.generate(["x = "], max_new_tokens=4)
    assert time.perf_counter() - start < 10.0
