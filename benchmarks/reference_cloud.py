"""A recorded reference cloud: a real OpenAI-compatible HTTP server on 127.0.0.1.

It answers each chat completion with the stored answer of the conversation's last
user message (for the traffic benchmark: the first gold alias of the question),
so a router's escalations travel over real HTTP through the official client
stack (:class:`~confroute.models.OpenAIModel`, or the ``openai`` SDK) exactly as
they would to a hosted model. A question without a stored answer gets an
OpenAI-shaped 404 error: never a made-up answer.

Same pattern as ``tests/fault_server.py`` (ThreadingHTTPServer in a daemon
thread), without the fault script.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["ReferenceCloudServer", "last_user_content"]


def last_user_content(messages: Any) -> str | None:
    """Content of the last ``user`` message of an OpenAI ``messages`` list, or None."""
    if not isinstance(messages, list):
        return None
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return str(m["content"])
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep stderr for progress bars
        pass

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, code: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error",
                                      "param": None, "code": code}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.server.model_id, "object": "model", "owned_by": "confroute"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "The request body is not valid JSON.", "invalid_json")
            return
        question = last_user_content(body.get("messages") if isinstance(body, dict) else None)
        answer = None if question is None else self.server.answers.get(question)
        if answer is None:
            self.server.count(missing=True)
            self._error(404, "The reference cloud has no recorded answer for this question.",
                        "no_recorded_answer")
            return
        self.server.count(missing=False)
        prompt_tokens = sum(len(str(m.get("content", "")).split())
                            for m in body["messages"] if isinstance(m, dict))
        completion_tokens = max(1, len(answer.split()))
        self._send(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
            "created": int(time.time()), "model": self.server.model_id,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answers: Mapping[str, str], model_id: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = dict(answers)
        self.model_id = model_id
        self.lock = threading.Lock()
        self.served = 0
        self.missing = 0

    def count(self, *, missing: bool) -> None:
        with self.lock:
            if missing:
                self.missing += 1
            else:
                self.served += 1


class ReferenceCloudServer:
    """OpenAI-compatible server that answers each question with its stored answer.

    Parameters
    ----------
    answers : mapping of str to str
        Answer per question, keyed by the content of the last user message.
    model_id : str, default "reference-cloud"
        The model id it reports.

    Attributes
    ----------
    base_url : str
        ``http://127.0.0.1:<port>/v1`` once started.
    served, missing : int
        Requests answered, and requests for questions it has no answer for.
    """

    def __init__(self, answers: Mapping[str, str], *, model_id: str = "reference-cloud") -> None:
        if not isinstance(answers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in answers.items()):
            raise TypeError("answers must be a mapping of str questions to str answers")
        self._answers = dict(answers)
        self.model_id = model_id
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the reference cloud is not started: call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def served(self) -> int:
        return 0 if self._server is None else self._server.served

    @property
    def missing(self) -> int:
        return 0 if self._server is None else self._server.missing

    def start(self) -> ReferenceCloudServer:
        self._server = _Server(self._answers, self.model_id)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="reference-cloud", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> ReferenceCloudServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
