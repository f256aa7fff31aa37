"""A small OpenAI-compatible HTTP server on 127.0.0.1 that injects scripted faults.

Used by the remote-model tests: the client under test talks real HTTP to it.
Each POST to a completion endpoint consumes the next step of the script (``"ok"``
once the script is exhausted):

==============  ===============================================================
step            behaviour
==============  ===============================================================
``ok``          a well-formed completion with ``n`` choices, logprobs and usage
``500``/``503`` an OpenAI-shaped error body with that status
``400``         a non-retryable client error
``429``         rate limited, with ``Retry-After: Step.retry_after`` and
                ``retry-after-ms: Step.retry_after_ms`` if given
``sleep``       wait ``Step.sleep`` seconds (past the client's timeout), then ok
``truncated``   200 whose JSON body is cut in half (correctly framed)
``malformed``   200 whose body is not JSON at all
``reset``       close the socket (RST) without any response
``partial``     announce a full Content-Length, send half, close the socket
``ignore_n``    a well-formed completion with a single choice whatever ``n`` was
==============  ===============================================================

The generated text of choice ``i`` is ``"The answer is i"`` split into four
tokens, except for two request shapes a chat client uses for tools and structured
output: a chat request with ``tools`` gets one tool call of the first tool (or of
the function named by ``tool_choice``) with ``FaultServer.tool_arguments`` as its
JSON arguments (``finish_reason: "tool_calls"``), and a chat request with a
``response_format`` of type ``json_schema`` or ``json_object`` gets
``FaultServer.json_content`` as JSON text. Every token has the same top-k
distribution ``probs`` (the chosen token is the most likely one), so tests can
compute the expected entropies exactly.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["DEFAULT_PROBS", "FaultServer", "RecordedRequest", "Step"]

DEFAULT_PROBS = (0.6, 0.2, 0.1, 0.05, 0.03, 0.01, 0.005)

KINDS = frozenset(
    {"ok", "500", "503", "400", "429", "sleep", "truncated", "malformed", "reset", "partial",
     "ignore_n"}
)


@dataclass(frozen=True)
class Step:
    """One scripted behaviour (see the module docstring)."""

    kind: str
    retry_after: str | None = None
    sleep: float = 0.0
    retry_after_ms: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown step {self.kind!r}; valid: {sorted(KINDS)}")


class Headers(dict[str, str]):
    """Received headers, looked up case-insensitively as HTTP requires (clients
    differ in the case they send: the openai SDK sends lower-case names)."""

    def _key(self, name: object) -> object:
        if isinstance(name, str):
            for k in self.keys():
                if k.lower() == name.lower():
                    return k
        return name

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(self._key(name))  # type: ignore[index]

    def __contains__(self, name: object) -> bool:
        return super().__contains__(self._key(name))

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(self._key(name), default)  # type: ignore[call-overload]


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: Headers
    time: float


def _tokens(index: int, max_tokens: int) -> tuple[list[str], bool]:
    full = ["The", " answer", " is", f" {index}"]
    return full[:max_tokens], max_tokens < len(full)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    # -- helpers -------------------------------------------------------------

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None,
              content_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header(
            "Content-Length", str(len(payload) if content_length is None else content_length)
        )
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = {"error": {"message": message, "type": "server_error", "code": status}}
        self._send(status, json.dumps(body).encode(), headers)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST instead of a graceful FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    # -- endpoints -----------------------------------------------------------

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            models = {"object": "list",
                      "data": [{"id": self.server.model_id, "object": "model", "owned_by": "test"}]}
            self._send(200, json.dumps(models).encode())
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        srv = self.server
        if not isinstance(body, dict):
            body = {}
        srv.record(RecordedRequest(self.path, body, Headers(self.headers.items()),
                                   time.monotonic()))
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no route {self.path}")
            return
        step = srv.next_step()
        srv.enter()
        counted = True
        try:
            if srv.latency:
                srv.stopping.wait(srv.latency)
            # In flight while being processed, not while the reply is on the wire: the
            # client may read it and send its next request before this thread runs again.
            srv.leave()
            counted = False
            self._respond(step, body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up (timeout) or we reset on purpose
        finally:
            if counted:
                srv.leave()

    def _respond(self, step: Step, body: dict[str, Any]) -> None:
        kind = step.kind
        if kind in ("500", "503", "400"):
            self._error(int(kind), f"scripted {kind}")
            return
        if kind == "429":
            headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
            if step.retry_after_ms is not None:
                headers["retry-after-ms"] = step.retry_after_ms
            self._error(429, "Rate limit reached", headers)
            return
        if kind == "reset":
            self._reset()
            return
        if kind == "sleep":
            self.server.stopping.wait(step.sleep)
        if kind == "malformed":
            self._send(200, b"<html>upstream proxy error</html>")
            return
        n = 1 if kind == "ignore_n" or self.server.ignore_n else int(body.get("n") or 1)
        payload = json.dumps(self.server.completion(self.path, body, n)).encode()
        if kind == "truncated":
            self._send(200, payload[: len(payload) // 2])
        elif kind == "partial":
            self._send(200, payload[: len(payload) // 2], content_length=len(payload))
            self._reset()
        else:
            self._send(200, payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, probs: Sequence[float], ignore_n: bool, latency: float,
                 model_id: str, answer: Callable[[dict[str, Any]], str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tool_arguments: dict[str, Any] = {}
        self.json_content: Any = {}
        self.probs = tuple(probs)
        self.ignore_n = ignore_n
        self.latency = latency
        self.model_id = model_id
        self.answer = answer
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._script: list[Step] = []
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def next_step(self) -> Step:
        with self._lock:
            return self._script.pop(0) if self._script else Step("ok")

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def completion(self, path: str, body: dict[str, Any], n: int) -> dict[str, Any]:
        chat = path == "/v1/chat/completions"
        max_tokens = int(body.get("max_tokens") or 16)
        want_lp = body.get("logprobs")
        k = int(body.get("top_logprobs") or 0) if chat else int(want_lp or 0)
        choices = []
        completion_tokens = 0
        for i in range(n):
            toks, cut = _tokens(i, max_tokens)
            if self.answer is not None:  # the scripted text, as one token
                toks, cut = [self.answer(body)], False
            completion_tokens += len(toks)
            choice: dict[str, Any] = {"index": i, "finish_reason": "length" if cut else "stop"}
            alts = [f"<alt{j}>" for j in range(1, len(self.probs))]
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(toks)}
                choice["logprobs"] = None
                if self._structured(body, choice, i):
                    choices.append(choice)
                    continue
                if want_lp:
                    content = []
                    for t in toks:
                        cands = [t, *alts][:k]
                        top = [{"token": c, "logprob": math.log(p), "bytes": list(c.encode())}
                               for c, p in zip(cands, self.probs)]
                        content.append({"token": t, "logprob": math.log(self.probs[0]),
                                        "bytes": list(t.encode()), "top_logprobs": top})
                    choice["logprobs"] = {"content": content}
            else:
                choice["text"] = "".join(toks)
                choice["logprobs"] = None
                if want_lp is not None and want_lp is not False:
                    tops = []
                    for t in toks:
                        cands = [t, *alts][:k]
                        tops.append({c: math.log(p) for c, p in zip(cands, self.probs)})
                    offsets, pos = [], 0
                    for t in toks:
                        offsets.append(pos)
                        pos += len(t)
                    choice["logprobs"] = {
                        "tokens": toks,
                        "token_logprobs": [math.log(self.probs[0])] * len(toks),
                        "top_logprobs": tops,
                        "text_offset": offsets,
                    }
            choices.append(choice)
        if chat:
            words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            words = len(str(body.get("prompt", "")).split())
        return {
            "id": "cmpl-test",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", self.model_id),
            "choices": choices,
            "usage": {"prompt_tokens": words, "completion_tokens": completion_tokens,
                      "total_tokens": words + completion_tokens},
        }


    def _structured(self, body: dict[str, Any], choice: dict[str, Any], index: int) -> bool:
        """Answer with a tool call or JSON content when the request asks for one."""
        tools = body.get("tools") or []
        fmt = body.get("response_format") or {}
        if tools:
            name = tools[0].get("function", {}).get("name", "tool")
            chosen = body.get("tool_choice")
            if isinstance(chosen, dict):
                name = chosen.get("function", {}).get("name", name)
            call = {"id": f"call_{index}", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(self.tool_arguments)}}
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice["finish_reason"] = "tool_calls"
            return True
        if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
            choice["message"] = {"role": "assistant", "content": json.dumps(self.json_content)}
            choice["finish_reason"] = "stop"
            return True
        return False


class FaultServer:
    """Context manager running the fault-injecting server in a background thread.

    Parameters
    ----------
    script : iterable of Step or str
        Behaviours consumed one per completion request; ``"ok"`` afterwards.
    probs : sequence of float
        Top-k token distribution reported for every generated token.
    ignore_n : bool
        Always return one choice (like llama.cpp builds that ignore ``n``).
    latency : float
        Seconds each completion request is held before answering.
    tool_arguments : dict, optional
        JSON arguments of the tool call returned to a chat request with ``tools``.
    json_content : JSON value, optional
        The content returned to a chat request asking for a JSON ``response_format``.
    answer : callable, optional
        ``answer(request_body) -> str``: the text of every choice (one token),
        instead of ``"The answer is i"``.
    """

    def __init__(self, script: Iterable[Step | str] = (), *,
                 probs: Sequence[float] = DEFAULT_PROBS, ignore_n: bool = False,
                 latency: float = 0.0, model_id: str = "test-model",
                 tool_arguments: dict[str, Any] | None = None,
                 json_content: Any = None,
                 answer: Callable[[dict[str, Any]], str] | None = None) -> None:
        self._server = _Server(probs, ignore_n, latency, model_id, answer)
        self._server.tool_arguments = dict(tool_arguments or {})
        self._server.json_content = {} if json_content is None else json_content
        self.push(*script)
        self._thread: threading.Thread | None = None

    def push(self, *steps: Step | str) -> None:
        """Append steps to the script."""
        parsed = [s if isinstance(s, Step) else Step(str(s)) for s in steps]
        with self._server._lock:
            self._server._script.extend(parsed)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Completion and model requests received so far (oldest first)."""
        with self._server._lock:
            return [r for r in self._server.requests if r.path != "/v1/models"]

    @property
    def max_in_flight(self) -> int:
        return self._server.max_in_flight

    @property
    def remaining_steps(self) -> int:
        with self._server._lock:
            return len(self._server._script)

    def start(self) -> FaultServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
