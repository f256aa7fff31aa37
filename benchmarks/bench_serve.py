"""Load test of ``confroute serve`` on loopback: throughput, latency, exact budget, no loss.

Runs the routing server (uvicorn in a background thread, 127.0.0.1 only) with a
``BudgetPolicy(max_cloud_fraction=0.3, enforce="total")`` router whose edge is a
tiny random local model (or the embedded SmolLM2 with ``--edge embedded``) and
whose cloud is an :class:`~confroute.models.OpenAIModel` talking real HTTP to a
local OpenAI-compatible stub (``tests/fault_server.py``, answering after
``--cloud-latency`` seconds). For 8, 32 and 128 concurrent closed-loop clients
(asyncio + httpx) it reports throughput, p50/p99 latency, the cloud share, and
checks that

* the realised cloud share never exceeds 30 % at any prefix of the arrival
  order (responses sorted by their ``confroute.ledger_seq``), and
* no request is lost or duplicated: every message carries a unique id, every id
  gets exactly one response whose ``confroute.prompt_hash`` is the hash of the
  conversation that id sent, and the ledger saw exactly the requests sent.

Bounded: ``--requests-per-client`` requests per client and ``--max-seconds`` per
level. Usage::

    python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --clients 8 32 --requests-per-client 3
    python benchmarks/bench_serve.py --edge embedded
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.tiny_models / tests.fault_server
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGET = Fraction(3, 10)
TOPICS = ["What is {i} plus {i}?", "Capital of country {i}?", "Say {i} twice.",
          "Who wrote book {i}?", "Is {i} prime?"]


def traffic_prompt(uid: str, i: int) -> str:
    return f"[{uid}] " + TOPICS[i % len(TOPICS)].format(i=i)


# Calibration traffic looks like the load (same templates, other ids), so the rule
# wants roughly the budgeted share and the online ledger has to enforce it exactly.
_RNG = random.Random(0)
CAL_PROMPTS = [[{"role": "user", "content": traffic_prompt(f"{_RNG.getrandbits(48):012x}", i)}]
               for i in range(60)]


@dataclass
class Result:
    uid: str
    status: int | None
    latency: float
    record: dict[str, Any] | None
    expected_hash: str
    error: str | None = None


@dataclass
class Level:
    clients: int
    sent: int = 0
    results: list[Result] = field(default_factory=list)
    elapsed: float = 0.0
    timed_out: bool = False
    ledger_requests: int = 0
    ledger_cloud: int = 0


def build_router(edge_kind: str, cloud_url: str, edge_tokens: int) -> Any:
    from confroute import GenerationConfig, Router
    from confroute.estimators.logprob import SequenceLogProb
    from confroute.models.openai import OpenAIModel
    from confroute.policies import BudgetPolicy

    if edge_kind == "embedded":
        from confroute.models.embedded import load_default_edge_model

        edge = load_default_edge_model()
    else:
        from confroute.models.hf import HFLanguageModel
        from tests.tiny_models import make_causal_lm

        # without the chat template the tiny random model emits visible text
        edge = HFLanguageModel(*make_causal_lm("llama", seed=0), use_chat_template=False)
    cloud = OpenAIModel("stub-cloud", base_url=cloud_url, api_key="local", timeout=10.0,
                        max_retries=1, max_concurrency=64)
    est = SequenceLogProb(max_new_tokens=edge_tokens)
    got = est.estimate(CAL_PROMPTS, edge)
    # Label as good the more confident half; Platt scaling gives a smooth p_good.
    import numpy as np

    scores = np.nan_to_num(got.scores, nan=np.inf)
    labels = (scores <= np.median(scores)).astype(int)
    policy = BudgetPolicy(max_cloud_fraction=float(BUDGET), enforce="total")
    router = Router(est, "platt", policy, edge=edge, cloud=cloud,
                    edge_max_new_tokens=edge_tokens,
                    cloud_config=GenerationConfig(max_new_tokens=16))
    router.calibrate(CAL_PROMPTS, labels, samples=got.samples)
    return router


async def run_level(base_url: str, clients: int, per_client: int, max_seconds: float) -> Level:
    import httpx

    from confroute.serve import prompt_hash

    level = Level(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for j in range(per_client):
            uid = uuid.uuid4().hex[:12]
            text = traffic_prompt(uid, c * per_client + j)
            messages = [{"role": "user", "content": text}]
            expected = prompt_hash(tuple(messages))
            level.sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(base_url + "/chat/completions",
                                    json={"model": "confroute", "messages": messages})
                body = r.json()
                level.results.append(Result(uid, r.status_code, time.perf_counter() - t0,
                                            body.get("confroute"), expected))
            except Exception as exc:  # counted as lost
                level.results.append(Result(uid, None, time.perf_counter() - t0, None,
                                            expected, error=f"{type(exc).__name__}: {exc}"))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as http:
        tasks = [asyncio.create_task(client(c, http)) for c in range(clients)]
        _done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for t in pending:
            t.cancel()
        level.timed_out = bool(pending)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    level.elapsed = time.perf_counter() - t0
    return level


def check(level: Level) -> dict[str, Any]:
    ok = [r for r in level.results if r.status in (200, 502) and r.record is not None]
    ids = [r.uid for r in level.results]
    answered = [r.uid for r in ok]
    duplicated = len(answered) - len(set(answered))
    lost = level.sent - len(set(answered))
    mismatched = sum(r.record["prompt_hash"] != r.expected_hash for r in ok)  # type: ignore[index]
    seqs = sorted(r.record["ledger_seq"] for r in ok)  # type: ignore[index]
    seq_ok = seqs == list(range(len(seqs))) and level.ledger_requests == level.sent
    # realised cloud share at every prefix of the arrival order (ledger order)
    by_seq = sorted(ok, key=lambda r: r.record["ledger_seq"])  # type: ignore[index]
    cloud_so_far = 0
    worst = Fraction(0)
    prefix_ok = True
    for k, r in enumerate(by_seq, 1):
        rec = r.record
        assert rec is not None
        if rec["source"] == "cloud" and not rec["degraded"]:
            cloud_so_far += 1
        share = Fraction(cloud_so_far, k)
        worst = max(worst, share)
        if share > BUDGET:
            prefix_ok = False
    lat = sorted(r.latency for r in ok)

    def pct(q: float) -> float:
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000.0

    n_cloud = sum(1 for r in ok if r.record and r.record["source"] == "cloud")
    denied = sum(1 for r in ok if r.record and r.record["reason"].startswith("budget:"))
    return {
        "clients": level.clients,
        "requests": level.sent,
        "answered": len(set(answered)),
        "lost": lost,
        "duplicated": duplicated + (len(ids) - len(set(ids))),
        "hash_mismatch": mismatched,
        "ledger_ok": seq_ok and level.ledger_cloud == n_cloud,
        "throughput": len(ok) / level.elapsed if level.elapsed else float("nan"),
        "p50": pct(0.50),
        "p99": pct(0.99),
        "mean": statistics.fmean(lat) * 1000.0 if lat else float("nan"),
        "cloud_share": n_cloud / max(1, len(ok)),
        "max_prefix_share": float(worst),
        "prefix_ok": prefix_ok,
        "denied_by_budget": denied,
        "degraded": sum(1 for r in ok if r.record and r.record["degraded"]),
        "non_200": sum(1 for r in level.results if r.status != 200),
        "timed_out": level.timed_out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="time bound per concurrency level (default 120)")
    parser.add_argument("--cloud-latency", type=float, default=0.05,
                        help="seconds the local cloud stub holds each request (default 0.05)")
    parser.add_argument("--edge-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if any(c < 1 or c > 256 for c in args.clients) or not 1 <= args.requests_per_client <= 20:
        parser.error("clients must be in [1, 256] and --requests-per-client in [1, 20]")

    from confroute.serve import create_app, serve_in_thread
    from tests.fault_server import FaultServer

    rows = []
    with FaultServer(latency=args.cloud_latency, model_id="stub-cloud") as cloud_srv:
        t0 = time.perf_counter()
        router = build_router(args.edge, cloud_srv.base_url, args.edge_tokens)
        setup = time.perf_counter() - t0
        app = create_app(router, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
        with serve_in_thread(app) as srv:
            asyncio.run(run_level(srv.base_url, 2, 2, args.max_seconds))  # warm-up, not reported
            for clients in args.clients:
                router.policy.reset()  # a fresh ledger per level
                level = asyncio.run(run_level(srv.base_url, clients, args.requests_per_client,
                                              args.max_seconds))
                snap = router.policy.snapshot()
                level.ledger_requests, level.ledger_cloud = snap.requests, snap.cloud
                rows.append(check(level))
            batcher = app.state.batcher

    print(f"\n## confroute serve load test ({args.edge} edge, budget {float(BUDGET):.0%} "
          f"enforce='total', cloud stub latency {args.cloud_latency * 1000:.0f} ms)\n")
    print(f"setup (load + calibrate) {setup:.1f} s; edge batches {batcher.batches}, "
          f"largest {batcher.largest_batch}; CPU threads {os.cpu_count()}\n")
    print("| clients | requests | answered | lost | dup | req/s | p50 ms | p99 ms "
          "| cloud share | max prefix share | denied by budget | degraded | checks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for r in rows:
        good = (r["lost"] == 0 and r["duplicated"] == 0 and r["hash_mismatch"] == 0
                and r["prefix_ok"] and r["ledger_ok"] and not r["timed_out"])
        failed |= not good
        print(f"| {r['clients']} | {r['requests']} | {r['answered']} | {r['lost']} | "
              f"{r['duplicated']} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['cloud_share']:.1%} | {r['max_prefix_share']:.1%} | "
              f"{r['denied_by_budget']} | {r['degraded']} | {'ok' if good else 'FAIL'} |")
    print("\nchecks: every id answered exactly once with the hash of its own conversation, "
          "ledger seqs 0..N-1 and ledger counts equal to what was sent/served, cloud share "
          f"<= {float(BUDGET):.0%} at every prefix of the arrival (ledger) order.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
