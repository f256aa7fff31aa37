"""Two OS processes on one Redis ledger while redis-server is killed and restarted.

The failure mode holds in every process during the outage (fail_closed: nothing
escalates; fail_open: each process escalates at most its emergency allowance), and
when Redis returns (empty: no persistence) both processes reconnect and enforce the
budget again on a new global admission order, at every prefix.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from tests.redis_server import REDIS_SERVER, RedisServer

pytest.importorskip("redis", reason="the redis client is needed (pip install 'confroute[redis]')")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server binary not found (apt-get install redis-server)")

BUDGET = 0.3
ALLOWANCE = 3


def _admit_loop(url: str, mode: str, conn: Any) -> None:
    """Admit requests that all want the cloud until ``stop_at``; send back what happened."""
    from confroute.policies import BudgetPolicy

    pol = BudgetPolicy(max_cloud_fraction=BUDGET, ledger=url, ledger_key="outage",
                       ledger_failure_mode=mode, ledger_emergency_allowance=ALLOWANCE
                       ).fit(np.linspace(0.0, 1.0, 101))
    pol.snapshot()  # connect now, while Redis is up (as a replica does at start-up)
    conn.send("ready")
    start_at, stop_at = conn.recv()
    out = []
    while time.time() < start_at:
        time.sleep(0.001)
    while time.time() < stop_at:
        t0 = time.time()
        ticket = pol.admit(0.0)  # p_good 0: the rule always asks for the cloud
        out.append((t0, ticket.seq, ticket.escalate, ticket.reason))
        time.sleep(0.002)
    conn.send(out)


def _check_order(records: list[tuple[float, int, bool, str]]) -> int:
    """One admission order: seqs exactly 0..n-1, cloud <= floor(0.3 k) at every prefix k."""
    records = sorted(records, key=lambda r: r[1])
    assert [r[1] for r in records] == list(range(len(records)))  # nothing lost, one order
    cloud = np.cumsum([r[2] for r in records])
    b = Fraction(repr(BUDGET))
    allowed = (b.numerator * np.arange(1, len(records) + 1)) // b.denominator
    assert (cloud <= allowed).all()
    return int(cloud[-1]) if len(records) else 0


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
def test_two_processes_through_a_redis_outage(mode: str) -> None:
    ctx = mp.get_context("spawn")
    with RedisServer() as server:
        pipes, procs = [], []
        for _ in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_admit_loop, args=(server.url, mode, child), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        assert [conn.recv() for conn in pipes] == ["ready", "ready"]  # both connected
        start = time.time() + 0.2
        stop = start + 5.0
        for conn in pipes:
            conn.send((start, stop))
        time.sleep(max(0.0, start + 1.0 - time.time()))
        server.kill()
        killed = time.time()  # every admission that starts from now on finds Redis dead
        time.sleep(1.5)
        restarting = time.time()  # no admission that started before this saw the new Redis
        server.start()
        results = [conn.recv() for conn in pipes]
        for proc in procs:
            proc.join(timeout=30)
    records = [r for res in results for r in res]
    before = [r for r in records if r[1] >= 0 and r[0] < killed]
    after = [r for r in records if r[1] >= 0 and r[0] >= restarting]
    offline = [r for r in records if r[1] < 0]
    assert not [r for r in records if r[1] >= 0 and killed <= r[0] < restarting]
    assert before and after and offline
    assert all("unreachable" in r[3] for r in offline)
    assert _check_order(before) > 0
    assert _check_order(after) > 0  # enforcing again (not stuck closed) on a new order
    emergency = [[r for r in res if r[1] < 0 and r[2]] for res in results]
    if mode == "fail_closed":
        assert emergency == [[], []]  # every answer stayed on the edge
    else:  # each process spends at most its own allowance (all of it: every request wanted)
        assert [len(e) for e in emergency] == [ALLOWANCE, ALLOWANCE]
