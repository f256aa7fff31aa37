"""Four ``confroute serve`` processes sharing one Redis budget ledger, Redis killed mid-run.

Issue 16's replica acceptance, on loopback and bounded. The script starts

* its own ``redis-server`` on a free loopback port (no persistence),
* a loopback OpenAI-compatible cloud (``tests/fault_server.py``, answering after
  ``--cloud-latency`` seconds),
* 2 x 4 real ``python -m confroute serve --config ...`` **processes** on 8
  loopback ports, each with ``--max-cloud-fraction 0.3``: 4 with their
  in-process ledgers (4 separate budgets: the latency baseline only) and 4 with
  ``--ledger redis://127.0.0.1:P/0`` (one shared budget). The edge is a tiny
  random causal LM saved to a temp folder (so the ledger and the server, not a
  model, are measured) and the router is calibrated on traffic like the load
  (about half the requests ask for the cloud, so the 30 % budget binds),

then concurrent closed-loop clients (64; asyncio + httpx) send requests in two
phases:

1. **A/B**: ``2 N`` requests alternating between the two sets (round-robin over
   the 4 replicas of each), so both see the same load at the same time: the
   difference of their p50 / p95 latencies is the added latency of the Redis
   ledger. Every response carries ``confroute.ledger_seq``, the request's index
   in the **global admission order** (the Redis script's counter); sorting the
   Redis set's responses by it gives that order: at every prefix ``n`` the
   cloud answers must be <= floor(0.3 n) (max prefix excess 0), the seqs
   exactly 0..N-1, and every request answered (0 lost);
2. **kill** (Redis set only): traffic keeps flowing while redis-server is
   killed (SIGKILL) after a third of the phase's requests and restarted on
   the same port after another third (requests go on for at least 3 s after
   the restart, whatever the count). ``fail_closed`` (the default): every
   answer admitted while Redis is down (``ledger_seq`` -1, reason "ledger
   store unreachable") is the edge's, none is lost. Redis comes back **empty**
   (no persistence), so "recovers" means: each replica tries Redis again at
   most every ``retry_interval`` (1 s), recreates the ledger on its first
   admission and the budget **restarts from zero** on a new admission order
   (seq 0, 1, ...) that must again respect floor(0.3 n) at every prefix.
   Escalations held back during the outage are not paid back later. Since the
   outage adds no cloud answer and floor(0.3 a) + floor(0.3 b) <= floor(0.3 (a
   + d + b)), the bound also holds on the whole run taken as one order.

It also measures admit+settle pairs per second through the same Redis (one
client, the policy API, as ``bench_ledger.py`` part 1) and the added latency
per request.  Prints one
table and writes ``runs/bench/replicas.json``. Usage::

    python benchmarks/bench_replicas.py                      # 2,000 requests per phase
    python benchmarks/bench_replicas.py --requests 200 --kill-requests 300   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.* and benchmarks.*
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGET = Fraction(3, 10)
REPLICAS = 4
KEY = "confroute:bench-replicas"
API_KEY_ENV = "CONFROUTE_BENCH_CLOUD_KEY"


@dataclass
class Reply:
    """One request as the client saw it."""

    replica: int
    sent: float  # perf_counter at send
    latency: float
    status: int | None
    source: str | None = None
    routed_to: str | None = None
    seq: int | None = None
    reason: str = ""
    degraded: bool = False
    error: str | None = None


# --------------------------------------------------------------------------- set-up
def write_deployment(root: Path, cloud_url: str, edge_tokens: int) -> Path:
    """A tiny edge folder, a calibrated router saved next to it, and the confroute.toml."""
    from benchmarks.bench_serve import build_router
    from tests.tiny_models import save_causal_lm

    save_causal_lm(root / "edge")
    router = build_router("tiny", cloud_url, edge_tokens)
    router.save(root / "router.json")
    config = root / "confroute.toml"
    config.write_text(
        "[edge]\npath = \"edge\"\n[edge.options]\nuse_chat_template = false\n\n"
        f"[[clouds]]\nmodel = \"stub-cloud\"\nbase_url = \"{cloud_url}\"\n"
        f"api_key_env = \"{API_KEY_ENV}\"\ntimeout = 10.0\nmax_retries = 1\n"
        "logprobs = false\nmax_concurrency = 64\n\n"
        "[router]\npath = \"router.json\"\n", encoding="utf-8")
    return config


class Replicas:
    """``REPLICAS`` ``python -m confroute serve`` subprocesses on free loopback ports."""

    def __init__(self, config: Path, ledger: str | None, max_batch: int, log_dir: Path) -> None:
        from tests.redis_server import free_port

        self.ports = [free_port() for _ in range(REPLICAS)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               API_KEY_ENV: "local", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = []
        for i, port in enumerate(self.ports):
            cmd = [sys.executable, "-m", "confroute", "serve", "--config", str(config),
                   "--port", str(port), "--max-cloud-fraction", str(float(BUDGET)),
                   "--max-batch", str(max_batch), "--log-level", "warning"]
            if ledger is not None:
                cmd += ["--ledger", ledger, "--ledger-key", KEY]
            name = f"replica{i}-{'redis' if ledger else 'memory'}.log"
            log = open(log_dir / name, "wb")  # noqa: SIM115 - closed in stop()
            self.logs.append(log)
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until every replica answers ``/health``."""
        import httpx

        t0 = time.monotonic()
        pending = set(range(REPLICAS))
        while pending:
            for i in list(pending):
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"replica {i} exited with {self.procs[i].returncode}; "
                                       f"see {self.logs[i].name}")
                try:
                    if httpx.get(self.urls[i] + "/health", timeout=1.0).status_code == 200:
                        pending.discard(i)
                except httpx.HTTPError:
                    pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"replicas {sorted(pending)} did not start in {timeout} s")
            time.sleep(0.2)
        return time.monotonic() - t0

    def health(self) -> list[dict[str, Any]]:
        import httpx

        return [httpx.get(u + "/health", timeout=10.0).json() for u in self.urls]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for log in self.logs:
            log.close()


# --------------------------------------------------------------------------- load
async def drive(urls: list[str], n: int, clients: int, max_seconds: float,
                events: list[tuple[int, Any]] | None = None) -> tuple[list[Reply], int]:
    """Send ``n`` requests from ``clients`` closed-loop clients, round-robin over ``urls``.

    ``events`` are ``(after_k_replies, callable)``: each callable runs (in a
    thread) once ``after_k_replies`` replies have arrived, while traffic flows;
    requests keep coming (up to ``4 n``) until every event has finished.

    Returns
    -------
    replies : list of Reply
    sent : int
        Requests sent (a request without a reply was lost).
    """
    import httpx

    from benchmarks.bench_serve import traffic_prompt

    replies: list[Reply] = []
    counter = itertools.count()
    sent = 0
    todo = sorted(events or [], key=lambda e: e[0])
    done_events: list[asyncio.Future[Any]] = []
    # one connection per request: a kept-alive connection can be closed by uvicorn's
    # keep-alive timer just as a request is written on it (a transport race, not a loss)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)

    def fire() -> None:
        while todo and len(replies) >= todo[0][0]:
            _, action = todo.pop(0)
            done_events.append(asyncio.ensure_future(asyncio.to_thread(action)))

    def more(i: int) -> bool:
        pending = bool(todo) or not all(e.done() for e in done_events)
        return i < n or (pending and i < 4 * n)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        for i in counter:
            if not more(i):
                return
            sent += 1
            replica = i % len(urls)  # round-robin by request: every replica gets 1/len
            messages = [{"role": "user", "content": traffic_prompt(uuid.uuid4().hex[:12], i)}]
            t0 = time.perf_counter()
            try:
                r = await http.post(urls[replica] + "/v1/chat/completions",
                                    json={"model": "confroute", "messages": messages})
                rec = r.json().get("confroute") or {}
                replies.append(Reply(replica, t0, time.perf_counter() - t0, r.status_code,
                                     rec.get("source"), rec.get("routed_to"),
                                     rec.get("ledger_seq"), rec.get("reason", ""),
                                     bool(rec.get("degraded"))))
            except Exception as exc:  # counted as lost
                replies.append(Reply(replica, t0, time.perf_counter() - t0, None,
                                     error=f"{type(exc).__name__}: {exc}"))
            fire()

    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        tasks = [asyncio.create_task(client(c, http)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*done_events)
    return replies, sent


# --------------------------------------------------------------------------- checks
def on_ledger(r: Reply) -> bool:
    """Admitted by the shared ledger (seq >= 0; -1 = decided while Redis was unreachable)."""
    return r.status in (200, 502) and r.seq is not None and r.seq >= 0


def prefix_check(replies: list[Reply]) -> dict[str, Any]:
    """The budget on one admission order: cloud answers <= floor(0.3 n) at every prefix n.

    ``replies`` are the answered requests of one ledger series (seq >= 0).
    """
    order = sorted(replies, key=lambda r: int(r.seq or 0))
    seqs = [r.seq for r in order]
    cloud = np.cumsum([r.routed_to == "cloud" and not r.degraded for r in order])
    n = np.arange(1, len(order) + 1)
    allowance = (BUDGET.numerator * n) // BUDGET.denominator
    excess = int(max(0, (cloud - allowance).max())) if len(order) else 0
    share = cloud / n if len(order) else np.zeros(0)
    return {"admitted": len(order), "seqs_exact": seqs == list(range(len(order))),
            "cloud": int(cloud[-1]) if len(order) else 0,
            "final_share": float(share[-1]) if len(order) else 0.0,
            "max_prefix_share": float(share.max()) if len(order) else 0.0,
            "max_prefix_excess": excess}


def latency_ms(replies: list[Reply]) -> dict[str, float]:
    lat = np.array([r.latency for r in replies if r.status == 200]) * 1000.0
    if not len(lat):
        return {"p50": math.nan, "p95": math.nan}
    return {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}


def lost(replies: list[Reply], sent: int) -> int:
    """Requests without a routed response (a 502 after a failed cloud call still has one)."""
    return sent - sum(1 for r in replies if r.status in (200, 502) and r.source is not None)


def failures(replies: list[Reply]) -> list[dict[str, Any]]:
    """The replies that were not a 200 (at most 20), for the JSON."""
    bad = [r for r in replies if r.status != 200]
    return [{"replica": r.replica, "status": r.status, "error": r.error, "reason": r.reason}
            for r in bad[:20]]


def ledger_pairs_per_second(url: str, n: int) -> dict[str, float]:
    """Policy admit+settle pairs per second, one client, in-process vs this Redis."""
    from confroute.policies import BudgetPolicy

    out = {}
    cal = np.linspace(0.0, 1.0, 101)
    for name, ledger in (("memory", None), ("redis", url)):
        pol = BudgetPolicy(max_cloud_fraction=0.3, ledger=ledger,
                           ledger_key="confroute:bench-replicas-pairs").fit(cal)
        t0 = time.perf_counter()
        for i in range(n):
            pol.settle(pol.admit(0.0), spent=bool(i % 2))
        out[name] = n / (time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- phases
def run_phases(config: Path, server: Any, args: argparse.Namespace,
               log_dir: Path) -> dict[str, Any]:
    """Both replica sets up at once; A/B traffic, then the kill phase on the Redis set."""
    times: dict[str, float] = {}

    def kill() -> None:
        times["kill"] = time.perf_counter()
        server.kill()

    def restart() -> None:
        times["restart"] = time.perf_counter()  # before Redis is back: nothing admitted yet
        server.start()
        times["restarted"] = time.perf_counter()
        time.sleep(3.0)  # traffic goes on: the replicas retry Redis within 1 s and enforce

    mem = Replicas(config, None, args.max_batch, log_dir)
    red = Replicas(config, server.url, args.max_batch, log_dir)
    t0 = time.perf_counter()
    try:
        startup = max(mem.wait_ready(), red.wait_ready())
        warm, _ = asyncio.run(drive(mem.urls + red.urls, 4 * 2 * REPLICAS, 8,
                                    args.max_seconds))
        # requests alternate between the sets: both see the same load at the same time
        urls = [u for pair in zip(mem.urls, red.urls) for u in pair]
        t1 = time.perf_counter()
        ab, ab_sent = asyncio.run(drive(urls, 2 * args.requests, args.clients,
                                        args.max_seconds))
        t2 = time.perf_counter()
        mem.stop()  # the kill phase loads the Redis set only
        health_before = red.health()
        third = args.kill_requests // 3
        t3 = time.perf_counter()
        kill_replies, kill_sent = asyncio.run(drive(
            red.urls, args.kill_requests, args.clients, args.max_seconds,
            events=[(third, kill), (2 * third, restart)]))
        t4 = time.perf_counter()
        health_after = red.health()
    finally:
        mem.stop()
        red.stop()
    times.update(startup_s=startup, warmup_s=t1 - t0 - startup, ab_s=t2 - t1, kill_s=t4 - t3,
                 ab_sent=ab_sent, kill_sent=kill_sent)
    n_mem = len(mem.urls)
    return {"startup_s": startup,
            "warm": [r for r in warm if r.replica >= n_mem],
            "memory": [r for r in ab if r.replica % 2 == 0],
            "shared": [r for r in ab if r.replica % 2 == 1],
            "kill": kill_replies, "times": times, "health_before": health_before,
            "health_after": health_after}


def analyse_kill(warm: list[Reply], shared: list[Reply], kill: list[Reply],
                 times: dict[str, float], n_kill: int) -> dict[str, Any]:
    """Split the kill phase into before / down / after and check each part."""
    ok = [r for r in kill if r.status in (200, 502) and r.source is not None]
    down = [r for r in ok if not on_ledger(r)]
    t_kill, t_back = times.get("kill", math.inf), times.get("restart", math.inf)
    # A reply received before Redis was started again was admitted before the kill; one
    # received after was admitted after the restart (send times would not do: a request
    # can wait in a replica's queue for longer than the outage).
    pre = [r for r in ok if on_ledger(r) and r.sent + r.latency < t_back]
    post = [r for r in ok if on_ledger(r) and r.sent + r.latency >= t_back]
    series_a = [r for r in warm + shared if on_ledger(r)] + pre
    return {
        "before_kill": {**prefix_check(series_a), "in_phase": len(pre)},
        "redis_down": {"answered": len(down),
                       "all_edge": all(r.routed_to == "edge" and r.source == "edge"
                                       for r in down),
                       "cloud": sum(r.routed_to == "cloud" for r in down),
                       "reason_says_unreachable": all("unreachable" in r.reason for r in down)},
        "after_restart": prefix_check(post),
        "lost": lost(kill, n_kill),
        "non_200": failures(kill),
        "outage_s": times.get("restarted", math.nan) - t_kill,
    }


def summarise(args: argparse.Namespace, red: dict[str, Any],
              pairs: dict[str, float]) -> dict[str, Any]:
    shared = prefix_check([r for r in red["warm"] + red["shared"] if on_ledger(r)])
    lat_mem, lat_red = latency_ms(red["memory"]), latency_ms(red["shared"])
    kill = analyse_kill(red["warm"], red["shared"], red["kill"], red["times"],
                        int(red["times"]["kill_sent"]))
    ledger_after = [h["ledger"] for h in red["health_after"]]
    return {
        "setup": {"replicas": REPLICAS, "clients": args.clients, "requests": args.requests,
                  "kill_requests": args.kill_requests,
                  "kill_sent": int(red["times"]["kill_sent"]), "budget": float(BUDGET),
                  "cloud_latency_s": args.cloud_latency, "max_batch": args.max_batch,
                  "edge": "tiny random llama (about 50k parameters), 8 new tokens",
                  "cpus": os.cpu_count(), "load_avg_start": args.load_start,
                  "load_avg_end": os.getloadavg()[0], "python": platform.python_version(),
                  "startup_s": red["startup_s"]},
        "phase_seconds": {k: v for k, v in red["times"].items() if k.endswith("_s")},
        "memory": {"lost": lost(red["memory"], args.requests), **lat_mem,
                   "non_200": failures(red["memory"]),
                   "cloud_share": float(np.mean([r.routed_to == "cloud"
                                                 for r in red["memory"]] or [0]))},
        "redis": {"lost": lost(red["shared"], args.requests), **lat_red, **shared,
                  "non_200": failures(red["shared"])},
        "added_latency_ms": {"p50": lat_red["p50"] - lat_mem["p50"],
                             "p95": lat_red["p95"] - lat_mem["p95"]},
        "ledger_pairs_per_s": pairs,
        "kill": kill,
        "health_after_restart": {"store_up": [led["store_up"] for led in ledger_after],
                                 "requests": [led["requests"] for led in ledger_after]},
    }


def passed(s: dict[str, Any]) -> bool:
    k = s["kill"]
    return bool(s["redis"]["lost"] == 0 and s["redis"]["max_prefix_excess"] == 0
                and s["redis"]["seqs_exact"] and s["memory"]["lost"] == 0 and k["lost"] == 0
                and k["before_kill"]["max_prefix_excess"] == 0 and k["before_kill"]["seqs_exact"]
                and k["redis_down"]["answered"] > 0 and k["redis_down"]["all_edge"]
                and k["after_restart"]["admitted"] > 0 and k["after_restart"]["seqs_exact"]
                and k["after_restart"]["max_prefix_excess"] == 0
                and k["after_restart"]["cloud"] > 0 and all(s["health_after_restart"]["store_up"]))


def print_table(s: dict[str, Any]) -> None:
    st, m, r, k = s["setup"], s["memory"], s["redis"], s["kill"]
    print(f"\n## {REPLICAS} confroute serve replicas, one Redis ledger, budget "
          f"{st['budget']:.0%} ({st['clients']} clients, round-robin; {st['edge']}; cloud stub "
          f"{st['cloud_latency_s'] * 1000:.0f} ms; {st['cpus']} CPUs, load "
          f"{st['load_avg_start']:.1f} -> {st['load_avg_end']:.1f})\n")
    print("| phase | requests | lost | on the ledger (seqs exact) | cloud | max prefix share "
          "| max prefix excess | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| in-process ledgers (4 budgets, baseline) | {st['requests']} | {m['lost']} | - | "
          f"{m['cloud_share']:.1%} | - | - | {m['p50']:.1f} | {m['p95']:.1f} |")
    print(f"| shared Redis ledger | {st['requests']} | {r['lost']} | {r['admitted']} "
          f"({r['seqs_exact']}) | {r['final_share']:.1%} | {r['max_prefix_share']:.1%} | "
          f"{r['max_prefix_excess']} | {r['p50']:.1f} | {r['p95']:.1f} |")
    b, d, a = k["before_kill"], k["redis_down"], k["after_restart"]
    print(f"| kill: before the kill (order since start) | {b['in_phase']} | - | {b['admitted']} "
          f"({b['seqs_exact']}) | {b['final_share']:.1%} | {b['max_prefix_share']:.1%} | "
          f"{b['max_prefix_excess']} | - | - |")
    print(f"| kill: Redis down {k['outage_s']:.1f} s (fail_closed) | {d['answered']} | - | "
          f"0 (all edge: {d['all_edge']}) | {d['cloud']} | - | - | - | - |")
    print(f"| kill: after restart (new order) | {a['admitted']} | {k['lost']} (whole kill "
          f"phase) | {a['admitted']} ({a['seqs_exact']}) | {a['final_share']:.1%} | "
          f"{a['max_prefix_share']:.1%} | {a['max_prefix_excess']} | - | - |")
    pr, add = s["ledger_pairs_per_s"], s["added_latency_ms"]
    print(f"\nledger admit+settle pairs/s (1 client, policy API): in-process "
          f"{pr['memory']:,.0f}, Redis {pr['redis']:,.0f}; added latency per request "
          f"(Redis - in-process, end to end): p50 {add['p50']:+.1f} ms, p95 {add['p95']:+.1f} ms")
    print(f"start-up of the 8 replicas: {st['startup_s']:.0f} s; after the restart every "
          "replica reports store_up="
          f"{s['health_after_restart']['store_up']}")
    print(f"checks: {'ok' if passed(s) else 'FAIL'}")


BEGIN, END = "<!-- bench-replicas:begin -->", "<!-- bench-replicas:end -->"


def markdown(s: dict[str, Any]) -> str:
    """The docs/performance.md section of a run."""
    st, m, r, k = s["setup"], s["memory"], s["redis"], s["kill"]
    b, d, a = k["before_kill"], k["redis_down"], k["after_restart"]
    pr, add = s["ledger_pairs_per_s"], s["added_latency_ms"]
    return "\n".join([
        BEGIN, "", "## Replicas sharing one Redis ledger", "",
        f"`python benchmarks/bench_replicas.py` ({st['date']}; run by `nox -s bench` after "
        f"`bench_ledger.py`). {REPLICAS} `confroute serve` processes with `--ledger "
        f"redis://127.0.0.1:P/0 --max-cloud-fraction {st['budget']}` and, at the same time, "
        f"{REPLICAS} with in-process ledgers (the latency baseline), {st['clients']} "
        f"closed-loop clients sending requests round-robin over the 8 (alternating the "
        f"two sets); edge: {st['edge']}; cloud: a loopback OpenAI-compatible stub answering "
        f"after {st['cloud_latency_s'] * 1000:.0f} ms. Measured on this machine: "
        f"{st['cpus']} CPUs shared with other work, load average {st['load_avg_start']:.1f} "
        f"at the start and {st['load_avg_end']:.1f} at the end, so the latencies are mostly "
        "CPU contention between 8 servers, the clients and the cloud stub.", "",
        "| | requests | lost | admitted on the ledger (seqs exactly 0..n-1) | cloud share "
        "| max prefix share | max prefix excess over floor(0.3 n) | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| in-process ledgers (4 separate budgets) | {st['requests']} | {m['lost']} | - | "
        f"{m['cloud_share']:.1%} | - | - | {m['p50']:.1f} | {m['p95']:.1f} |",
        f"| one Redis ledger | {st['requests']} | {r['lost']} | {r['admitted']} "
        f"({'yes' if r['seqs_exact'] else 'NO'}) | {r['final_share']:.1%} | "
        f"{r['max_prefix_share']:.1%} | {r['max_prefix_excess']} | {r['p50']:.1f} | "
        f"{r['p95']:.1f} |",
        f"| kill phase: before the kill (order since start) | {b['in_phase']} | - | "
        f"{b['admitted']} ({'yes' if b['seqs_exact'] else 'NO'}) | {b['final_share']:.1%} | "
        f"{b['max_prefix_share']:.1%} | {b['max_prefix_excess']} | - | - |",
        f"| kill phase: Redis down {k['outage_s']:.1f} s (fail_closed) | {d['answered']} | - | "
        f"0 (all on the edge: {'yes' if d['all_edge'] else 'NO'}) | {d['cloud']} | - | - "
        "| - | - |",
        f"| kill phase: after the restart (a new order) | {a['admitted']} | {k['lost']} "
        f"(whole phase) | {a['admitted']} ({'yes' if a['seqs_exact'] else 'NO'}) | "
        f"{a['final_share']:.1%} | {a['max_prefix_share']:.1%} | {a['max_prefix_excess']} "
        "| - | - |", "",
        f"- Ledger admit+settle pairs per second (one client, `BudgetPolicy` API, the same "
        f"Redis): {pr['redis']:,.0f} through Redis, {pr['memory']:,.0f} in-process "
        "(`bench_ledger.py` has the raw and multi-process figures; goal >= 5,000 through "
        "Redis).",
        f"- Added latency per request (Redis set minus in-process set, end to end, same run): "
        f"p50 {add['p50']:+.1f} ms, p95 {add['p95']:+.1f} ms (goal <= 2 ms at p50). With "
        "requests queueing for 2 shared cores these end-to-end differences are contention "
        "noise (their sign changes from run to run); the ledger's own share is the time of "
        f"one admit+settle pair: {1e3 / pr['redis'] - 1e3 / pr['memory']:.2f} ms more "
        "through Redis than in-process, here.",
        "- Recovery: Redis (no persistence) comes back empty; each replica retries it at "
        "most once a second and recreates the ledger on its next admission, so the budget "
        "restarts from zero on a new admission order, enforced again at every prefix "
        "(escalations held back during the outage are not paid back). Since the outage "
        "adds no cloud answer, floor(0.3 a) + floor(0.3 b) <= floor(0.3 (a + d + b)) "
        "keeps the bound on the whole run read as one order. "
        f"After the restart every replica's `/health` reports `store_up`: "
        f"{all(s['health_after_restart']['store_up'])}.",
        f"- Responses other than 200 (a 502 is a failed cloud call, still routed and "
        f"recorded): {len(m['non_200'])} in-process set, {len(r['non_200'])} Redis set, "
        f"{len(k['non_200'])} kill phase.",
        f"- Checks: {'all passed' if passed(s) else '**FAILED**'}; wall time "
        f"{st['wall_s']:.0f} s (" + ", ".join(
            f"{name[:-2]} {sec:.0f} s" for name, sec in s["phase_seconds"].items()) + ").",
        "", END, ""])


def splice(doc: Path, section: str) -> None:
    """Replace this benchmark's section of ``doc`` (between its markers), or append it."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    doc.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per phase")
    ap.add_argument("--kill-requests", type=int, default=900,
                    help="requests of the kill phase (Redis dies after a third, returns after "
                    "two thirds; requests go on until 3 s after the restart)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--cloud-latency", type=float, default=0.02)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="bound per phase")
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench" / "replicas.json"))
    ap.add_argument("--write-doc", type=Path, default=None,
                    help="splice the results into this page (docs/performance.md)")
    args = ap.parse_args(argv)
    if not (1 <= args.requests <= 20000 and 30 <= args.kill_requests <= 20000
            and 1 <= args.clients <= 256):
        ap.error("--requests in [1, 20000], --kill-requests in [30, 20000], --clients in "
                 "[1, 256]")
    from tests.fault_server import FaultServer
    from tests.redis_server import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        print("bench_replicas: redis-server not found (apt-get install redis-server); skipped")
        return 0
    args.load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="confroute-replicas-") as tmp, \
            FaultServer(latency=args.cloud_latency, model_id="stub-cloud") as cloud, \
            RedisServer() as server:
        root = Path(tmp)
        config = write_deployment(root, cloud.base_url, 8)
        pairs = ledger_pairs_per_second(server.url, args.pairs)
        red = run_phases(config, server, args, root)
    summary = summarise(args, red, pairs)
    summary["setup"]["wall_s"] = time.perf_counter() - t_start
    summary["setup"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print_table(summary)
    if args.write_doc is not None:
        splice(args.write_doc, markdown(summary))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "passed": passed(summary)}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
