"""A real OpenAI-compatible completions server on localhost whose replies a test scripts.

The LLM roles (task writer, judge, gibberish filter, best-of-N) are tested through the real
`OpenAIBackend` over real HTTP against this server: only the model behind it is scripted.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def completions_server(
    reply: Callable[[str], str], *, requests: list[dict[str, Any]] | None = None
) -> Iterator[str]:
    """Serve `POST /v1/completions` on 127.0.0.1 until the block ends; yields the base URL
    (`http://127.0.0.1:PORT/v1`). Each of a request's `n` choices is `reply(prompt)` (a list
    of prompts gets `n` choices per prompt); every request body is appended to `requests`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if requests is not None:
                with lock:
                    requests.append(request)
            if self.path != "/v1/completions":
                status, body = 404, {"error": {"message": f"no route {self.path}"}}
            else:
                prompts = request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]]
                n = int(request.get("n", 1))
                texts = [reply(prompt) for prompt in prompts for _ in range(n)]
                status = 200
                body = {
                    "id": "cmpl-scripted",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": request.get("model", ""),
                    "choices": [
                        {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"}
                        for i, text in enumerate(texts)
                    ],
                }
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
