"""Shared budget ledger on Redis: admit+settle pairs per second and the added latency per admission.

Starts its own ``redis-server`` on a free loopback port (no persistence), then:

1. one client: ``BudgetPolicy.admit`` + ``settle`` pairs per second with the
   Redis ledger and with the in-process ledger; the added latency per admission
   is the difference of the two median ``admit`` latencies;
2. the raw :class:`~confroute.ledgers.RedisLedger` (no policy work): pairs per second;
3. ``--procs`` processes sharing one ledger at once: aggregate pairs per second,
   and a check that the shared count equals the sum of the escalations kept.

Goals (issue 16): >= 5,000 pairs/s, <= 2 ms added p50. Bounded: a few thousand
pairs per part. Usage: ``python benchmarks/bench_ledger.py [--pairs 3000 --procs 4]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAL = np.linspace(0.0, 1.0, 101)


def _policy(url: str | None, key: str) -> object:
    from confroute.policies import BudgetPolicy

    return BudgetPolicy(max_cloud_fraction=0.3, ledger=url, ledger_key=key).fit(CAL)


def _pairs(pol: object, n: int) -> tuple[float, list[float]]:
    """(pairs per second, admit latencies in s) for n admit+settle pairs, half refunded."""
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        ticket = pol.admit(0.0)  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t0)
        pol.settle(ticket, spent=bool(i % 2))  # type: ignore[attr-defined]
    return n / (time.perf_counter() - start), lat


def _worker(url: str, key: str, n: int, barrier: object, out: object) -> None:
    pol = _policy(url, key)
    barrier.wait()  # type: ignore[attr-defined]
    start = time.perf_counter()
    kept = 0
    for i in range(n):
        ticket = pol.admit(0.0)  # type: ignore[attr-defined]
        spent = bool(i % 2)
        pol.settle(ticket, spent=spent)  # type: ignore[attr-defined]
        kept += int(ticket.escalate and spent)
    out.put((time.perf_counter() - start, kept))  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3000, help="pairs per part (and per process)")
    ap.add_argument("--procs", type=int, default=4, help="processes sharing the ledger")
    args = ap.parse_args(argv)
    from tests.redis_server import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        print("bench_ledger: redis-server not found (apt-get install redis-server); skipped")
        return 0
    from confroute.ledgers import LedgerSpec, RedisLedger, make_ticket

    with RedisServer() as server:
        url, n = server.url, args.pairs
        rate_mem, lat_mem = _pairs(_policy(None, "m"), n)
        rate_redis, lat_redis = _pairs(_policy(url, "single"), n)
        led = RedisLedger(url, spec=LedgerSpec(share=Fraction(3, 10)), key="raw")
        start = time.perf_counter()
        for i in range(n):
            adm = led.admit(True, Fraction(1, 10))
            ticket = make_ticket(adm, p_good=0.0, wanted=True, cost=0.1, reason="")
            led.settle(ticket, bool(i % 2), None)
        raw = n / (time.perf_counter() - start)
        client = led.client
        start = time.perf_counter()
        for _ in range(n):
            client.ping()
        pings = n / (time.perf_counter() - start)  # the floor any client round trip has here
        p50_mem, p50_redis = statistics.median(lat_mem), statistics.median(lat_redis)
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(args.procs), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(url, "shared", n, barrier, out))
                 for _ in range(args.procs)]
        for p in procs:
            p.start()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        wall = max(r[0] for r in results)
        snap = _policy(url, "shared").snapshot()  # type: ignore[attr-defined]
        kept = sum(r[1] for r in results)
        total = args.procs * n
    rows = [
        ("policy admit+settle pairs/s, in-process ledger", f"{rate_mem:,.0f}"),
        ("policy admit+settle pairs/s, Redis ledger (1 client)", f"{rate_redis:,.0f}"),
        ("raw RedisLedger admit+settle pairs/s (1 client)", f"{raw:,.0f}"),
        ("for scale: bare PING round trips/s (1 client)", f"{pings:,.0f}"),
        (f"aggregate pairs/s, {args.procs} processes sharing one ledger", f"{total / wall:,.0f}"),
        ("admit p50, in-process / Redis (ms)", f"{1e3 * p50_mem:.3f} / {1e3 * p50_redis:.3f}"),
        ("added latency per admission, p50 (ms)", f"{1e3 * (p50_redis - p50_mem):.3f}"),
        ("shared count exact (requests, cloud kept)",
         f"{snap.requests == total and snap.cloud == kept} ({snap.requests}, {snap.cloud})"),
        ("cloud share kept <= 30%", f"{snap.cloud <= (3 * total) // 10}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if snap.requests == total and snap.cloud == kept else 1


if __name__ == "__main__":
    raise SystemExit(main())
