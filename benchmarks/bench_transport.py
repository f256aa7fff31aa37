"""Per-call overhead of OpenAIModel's transport: the openai SDK vs direct httpx.

A loopback OpenAI-compatible server (a thread of this process) answers every chat
completion with the same 32-token answer carrying ``top_logprobs=5``. The same
``OpenAIModel`` settings then make ``--calls`` sequential one-prompt ``generate``
calls through each transport:

- ``sdk``: the shipped transport (``openai.OpenAI(...).post(..., cast_to=httpx.Response)``
  over an ``httpx.Client``);
- ``httpx``: the previous transport, ``httpx.Client.post`` straight to the endpoint,
  reproduced here (same body, headers, timeout, parsing and retry state).

Both go through the whole model path (settings, body, parsing of logprobs and
top-k entropies, samples), so the difference is the transport alone. The variants
are interleaved in blocks (A B A B ...); per-call milliseconds are reported as
min / median / max over the blocks and the ratio is taken per block. CPU time is
that of the calling thread only (the client side: the server is another thread),
and is far less sensitive than wall time to other processes sharing the cores.

Usage: ``python benchmarks/bench_transport.py [--calls 500 --blocks 5]``.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_TOKENS = 32
TOP_K = 5


def completion_body() -> bytes:
    """One chat completion of 32 tokens, each with 5 alternatives."""
    probs = [0.6, 0.2, 0.1, 0.05, 0.03]
    content = []
    for i in range(N_TOKENS):
        tok = f" w{i}"
        top = [{"token": tok if j == 0 else f"<alt{j}>", "logprob": math.log(p),
                "bytes": None} for j, p in enumerate(probs)]
        content.append({"token": tok, "logprob": math.log(probs[0]), "bytes": None,
                        "top_logprobs": top})
    body = {
        "id": "cmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant",
                                 "content": "".join(c["token"] for c in content)},
                     "logprobs": {"content": content}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": N_TOKENS, "total_tokens": 40},
    }
    return json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    payload = completion_body()

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and
        # delayed ACKs add ~40 ms per call and hide the transport.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)


def direct_httpx_model(**params: Any) -> Any:
    """An OpenAIModel whose requests go straight through ``httpx.Client.post``
    (the transport before the SDK), everything else unchanged."""
    import httpx

    from confroute.models.openai import OpenAIModel
    from confroute.models.openai.client import ClientPool
    from confroute.models.openai.retry import interpret, transport_failure
    from confroute.models.openai.wire import Parsed, request_headers

    class HttpxPool(ClientPool):
        client: httpx.Client | None = None
        sem = threading.BoundedSemaphore(1)

        def post(self, s: Any, body: Any, state: Any, count: Any) -> Parsed:
            if self.client is None:
                limits = httpx.Limits(max_connections=s.max_concurrency,
                                      max_keepalive_connections=s.max_concurrency)
                self.client = httpx.Client(limits=limits, timeout=s.timeout)
            while True:
                timeout = state.attempt_timeout()
                with self.sem:
                    state.attempts += 1
                    count(requests=1)
                    try:
                        r = self.client.post(s.url, json=body, headers=request_headers(s),
                                             timeout=timeout)
                        outcome = interpret(r.status_code, r.headers, r.content, s.endpoint)
                    except httpx.HTTPError as exc:
                        outcome = transport_failure(exc, httpx)
                if isinstance(outcome, Parsed):
                    return outcome
                time.sleep(state.on_failure(outcome))

        def close(self) -> None:
            if self.client is not None:
                self.client.close()
            super().close()

    class DirectModel(OpenAIModel):
        def _init_runtime(self) -> None:
            super()._init_runtime()
            self._clients = HttpxPool()

    return DirectModel("bench", **params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500, help="calls per transport")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved blocks")
    args = ap.parse_args()

    import httpx
    import openai

    from confroute import GenerationConfig
    from confroute.models.openai import OpenAIModel

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    params: dict[str, Any] = dict(base_url=url, api_key="sk-bench", top_logprobs=TOP_K,
                                  max_concurrency=1)
    models = {"sdk": OpenAIModel("bench", **params), "httpx": direct_httpx_model(**params)}
    config = GenerationConfig(max_new_tokens=N_TOKENS)
    per_block = args.calls // args.blocks
    for m in models.values():  # warm-up: connections, imports, first parse
        for _ in range(20):
            [[sample]] = m.generate(["q"], config)
        assert sample.token_entropies is not None and len(sample.token_entropies) == N_TOKENS
    ms: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.blocks):
        for name, m in models.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(per_block):
                m.generate(["q"], config)
            ms[name].append((time.perf_counter() - t0) / per_block * 1e3)
            cpu[name].append((time.thread_time() - c0) / per_block * 1e3)
    for m in models.values():
        m.close()
    server.shutdown()
    server.server_close()
    ratio = [a / b for a, b in zip(ms["sdk"], ms["httpx"])]
    cpu_ratio = [a / b for a, b in zip(cpu["sdk"], cpu["httpx"])]
    print(f"openai {openai.__version__}, httpx {httpx.__version__}; "
          f"{per_block * args.blocks} calls per transport in {args.blocks} interleaved blocks")
    print("| quantity | min | median | max |")
    print("|---|---|---|---|")
    for label, values in (("SDK transport, ms per call", ms["sdk"]),
                          ("direct httpx, ms per call", ms["httpx"]),
                          ("SDK / direct httpx (wall)", ratio),
                          ("SDK transport, client CPU ms per call", cpu["sdk"]),
                          ("direct httpx, client CPU ms per call", cpu["httpx"]),
                          ("SDK / direct httpx (CPU)", cpu_ratio)):
        print(f"| {label} | {min(values):.3g} | {statistics.median(values):.3g} "
              f"| {max(values):.3g} |")


if __name__ == "__main__":
    main()
