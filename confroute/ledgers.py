"""Budget ledgers of the online policies: in-process (default) and shared on Redis.

A ledger counts admitted requests, escalations and cloud spend, and decides
whether one more escalation fits the budget, atomically. :class:`MemoryLedger`
does it under the owning policy's lock, so a budget is exact inside one
process. :class:`RedisLedger` does it in atomic server-side Lua scripts on one
Redis server, so any number of processes (``confroute serve`` replicas) that
share the server and the ``key`` enforce **one** exact budget: every admission
is one script call, Redis runs scripts one at a time, so all processes see a
single global arrival order and the bound of the in-process ledger holds on
that order.

Layout on Redis (``K`` = ``key``): ``K:params`` (hash: budget signature,
instance id, reset epoch, start time on the server clock), ``K:s:<id>:<epoch>:<period>``
(hash: requests, cloud, spend in integer micro-units) and, for a window
budget, ``K:w:<id>:<epoch>`` (sorted set of the arrival indices of the
escalations still in the window). Periods are cut on the **server's** clock
(``TIME``), so replicas agree on the boundaries. Standalone Redis only (the
scripts derive their keys; not Redis Cluster).

**When Redis is unreachable** after start-up, the ledger follows
``failure_mode``: ``"fail_closed"`` keeps every answer on the edge (no
escalation can be counted, so none is made); ``"fail_open"`` lets up to
``emergency_allowance`` escalations through, counted locally by this process
(over the ledger's life, given back by refunds), then keeps answers on the
edge. The state is in :meth:`RedisLedger.snapshot` (``store_up``,
``emergency_used``). The ledger tries Redis again at most every
``retry_interval`` seconds and recovers by itself when it answers; if Redis
lost its data meanwhile (no persistence), counting starts again from zero.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from confroute._stats import budget_allowance
from confroute._validation import check_choice, check_float, check_int
from confroute.errors import (
    InvalidParameterError,
    LedgerUnavailableError,
    MissingDependencyError,
)

__all__ = [
    "FAILURE_MODES",
    "PASSWORD_ENV",
    "Admission",
    "Ledger",
    "LedgerSnapshot",
    "LedgerSpec",
    "MemoryLedger",
    "RedisLedger",
    "Ticket",
    "check_ledger_url",
    "make_ticket",
    "redact_url",
]

FAILURE_MODES = ("fail_closed", "fail_open")
_SCHEMES = ("redis", "rediss", "unix")
#: Environment variable with the Redis password, used when the URL has none (a ledger URL
#: is a policy parameter, so it is written into saved router files: keep secrets out of it).
PASSWORD_ENV = "CONFROUTE_LEDGER_PASSWORD"
MICRO = 10**6  # Redis counts spend in integer micro-units of the policy's cost unit


# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Ticket:
    """One online decision made by ``OnlinePolicy.admit`` (see :mod:`confroute.policies`).

    Attributes
    ----------
    seq : int
        Arrival index in the ledger (0-based since the last reset or period
        boundary; global across processes for a :class:`RedisLedger`; -1 when
        decided while the shared store was unreachable).
    p_good : float
        The probability the decision was made on (NaN if unscorable).
    escalate : bool
        True if the request goes to the cloud.
    wanted : bool
        True if the policy's rule alone asked to escalate.
    denied_by_budget : bool
        True if the rule asked to escalate but the budget refused.
    cost : float
        Cloud cost reserved in the ledger (0 when the request stays on the edge).
    reason : str
        Short human-readable reason.
    settled : bool
        True once :meth:`OnlinePolicy.settle` was called for this ticket.
    """

    seq: int
    p_good: float
    escalate: bool
    wanted: bool
    denied_by_budget: bool
    cost: float
    reason: str
    settled: bool = False
    _token: object = field(default=None, repr=False)


class LedgerSnapshot(NamedTuple):
    """Counts of an online ledger at one instant (since the last reset or period boundary).

    Read with ``policy.snapshot()`` (``policy.ledger`` is now the parameter that
    names the ledger's store). Calling a snapshot returns it unchanged.
    """

    requests: int
    """Requests admitted."""
    cloud: int
    """Escalations counted (failed cloud calls given back by ``settle`` are not)."""
    window_cloud: int
    """Escalations among the last ``window`` requests (BudgetPolicy with enforce="window")."""
    spent: float
    """Cloud spend counted: reservations, corrected by ``settle(..., cost=...)``."""
    backend: str = "memory"
    """Where the ledger lives: ``"memory"`` (this process) or ``"redis"`` (shared)."""
    store_up: bool = True
    """False while a shared store is unreachable (counts are then the last ones seen)."""
    emergency_used: int = 0
    """Escalations let through on the local emergency allowance (``fail_open``)."""

    def __call__(self) -> LedgerSnapshot:
        return self


@dataclass(frozen=True)
class LedgerSpec:
    """What a ledger enforces; fixed for the ledger's life.

    Attributes
    ----------
    share : Fraction or None
        Cloud count <= floor(share * requests).
    window : int or None
        ... counted over the last ``window`` requests only.
    period : float or None
        Counts restart every ``period`` seconds.
    spend_cap : Fraction or None
        Counted spend + reservation <= spend_cap.
    """

    share: Fraction | None = None
    window: int | None = None
    period: float | None = None
    spend_cap: Fraction | None = None

    def signature(self) -> str:
        """Canonical text of the budget, stored with a shared ledger and compared on use."""
        share = "-" if self.share is None else f"{self.share.numerator}/{self.share.denominator}"
        cap = "-" if self.spend_cap is None else str(_micro_floor(self.spend_cap))
        return (f"share={share};window={self.window or '-'};"
                f"period={'-' if self.period is None else repr(float(self.period))};"
                f"spend_cap_micro={cap}")


class Admission(NamedTuple):
    """What a ledger answers to one admission."""

    seq: int
    escalate: bool
    token: object
    note: str | None = None


def make_ticket(adm: Admission, *, p_good: float, wanted: bool, cost: float,
                reason: str) -> Ticket:
    """The :class:`Ticket` of one admission (``cost`` is what escalating would reserve)."""
    if adm.note:
        reason = f"{reason} [{adm.note}]"
    return Ticket(seq=adm.seq, p_good=p_good, escalate=adm.escalate, wanted=wanted,
                  denied_by_budget=wanted and not adm.escalate,
                  cost=cost if adm.escalate else 0.0, reason=reason, _token=adm.token)


def _decimal(x: float | Fraction) -> Fraction:
    """The decimal the user wrote (0.3 -> 3/10), not its binary approximation."""
    return Fraction(repr(float(x)))


def _micro_floor(x: float | Fraction) -> int:
    """A cap in micro-units, rounded down (never above the cap)."""
    return math.floor(_decimal(x) * MICRO)


def _micro_ceil(x: float | Fraction) -> int:
    """A cost in micro-units, rounded up (never below the cost)."""
    return math.ceil(_decimal(x) * MICRO)


class Ledger(ABC):
    """A budget ledger: admit, settle, snapshot, reset. Callers serialise calls per process."""

    spec: LedgerSpec

    @abstractmethod
    def admit(self, wanted: bool, cost: Fraction) -> Admission:
        """Count one request; escalate iff ``wanted`` and the budget allows it."""

    @abstractmethod
    def settle(self, ticket: Ticket, spent: bool, cost: float | None) -> bool:
        """Refund (``spent=False``) or correct the spend of an escalation; True if changed."""

    @abstractmethod
    def snapshot(self) -> LedgerSnapshot:
        """Counts now."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the counts; tickets issued before can no longer be settled."""


# ---------------------------------------------------------------------------------------
class MemoryLedger(Ledger):
    """The in-process ledger (default); callers hold the owning policy's lock.

    Parameters
    ----------
    spec : LedgerSpec
    now : float
        Start of the first period on :func:`time.monotonic`.
    """

    def __init__(self, spec: LedgerSpec, now: float | None = None) -> None:
        self.spec = spec
        self.period_start = time.monotonic() if now is None else now
        self._new_counts()

    def _new_counts(self) -> None:
        self.token = object()  # tickets from before carry another token: not settleable
        self.requests = 0
        self.cloud = 0
        w = self.spec.window
        self.ring = np.zeros(w, dtype=bool) if w else None
        self.window_cloud = 0
        self.spent = Fraction(0)

    def reset(self) -> None:
        self.period_start = time.monotonic()
        self._new_counts()

    def roll(self, now: float) -> None:
        """Start a new period when ``now`` crossed a period boundary."""
        period = self.spec.period
        if period is not None and now - self.period_start >= period:
            self.period_start += math.floor((now - self.period_start) / period) * period
            self._new_counts()

    def snapshot(self) -> LedgerSnapshot:
        self.roll(time.monotonic())
        return LedgerSnapshot(self.requests, self.cloud, self.window_cloud, float(self.spent))

    def admit(self, wanted: bool, cost: Fraction) -> Admission:
        self.roll(time.monotonic())
        spec, seq = self.spec, self.requests
        self.requests += 1
        ring, w = self.ring, spec.window
        if ring is not None and w is not None:
            if seq >= w and ring[seq % w]:  # the request leaving the window
                self.window_cloud -= 1
            ring[seq % w] = False
        allowed = True
        if spec.share is not None:
            used, n = self.cloud, self.requests
            if ring is not None and w is not None:
                used, n = self.window_cloud, min(self.requests, w)
            allowed = used + 1 <= budget_allowance(spec.share, n)
        if spec.spend_cap is not None:
            allowed = allowed and self.spent + cost <= spec.spend_cap
        escalate = wanted and allowed
        if escalate:
            self.cloud += 1
            self.spent += cost
            if ring is not None and w is not None:
                ring[seq % w] = True
                self.window_cloud += 1
        return Admission(seq, escalate, self.token)

    def settle(self, ticket: Ticket, spent: bool, cost: float | None) -> bool:
        if ticket._token is not self.token or ticket.settled:
            return False
        ticket.settled = True
        if not ticket.escalate:
            return False
        if spent:
            if cost is None or Fraction(cost) == Fraction(ticket.cost):
                return False
            self.spent += Fraction(cost) - Fraction(ticket.cost)
            return True
        self.cloud -= 1
        self.spent -= Fraction(ticket.cost)
        ring, w = self.ring, self.spec.window
        in_window = w is not None and ticket.seq >= self.requests - w
        if ring is not None and w is not None and in_window and ring[ticket.seq % w]:
            ring[ticket.seq % w] = False
            self.window_cloud -= 1
        return True


# ---------------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with its user name and password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit((parts.scheme, f"***@{host}{port}", parts.path, parts.query,
                       parts.fragment))


def check_ledger_url(value: Any, name: str, owner: str) -> str | None:
    """None (in-process ledger) or a ``redis://``, ``rediss://`` or ``unix://`` URL."""
    if value is None:
        return None
    ok = isinstance(value, str) and urlsplit(value).scheme in _SCHEMES
    if not ok:
        shown = redact_url(value) if isinstance(value, str) else type(value).__name__
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be None (in-process ledger) or a Redis URL "
            f"such as 'redis://127.0.0.1:6379/0' (schemes {', '.join(_SCHEMES)}). Got {shown!r}."
        )
    return str(value)


# Shared prelude of every script: find (or create) the params, check the budget signature,
# locate the state of the current epoch and period on the server clock.
# KEYS[1] = K:params. ARGV[1] = signature, ARGV[2] = instance id, ARGV[3] = period or "-",
# ARGV[4] = "1" to create the params when missing.
_PRELUDE = """
local base = string.sub(KEYS[1], 1, -8)
local sig = redis.call('HGET', KEYS[1], 'sig')
if not sig then
  if ARGV[4] ~= '1' then return {-2} end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'inst', ARGV[2], 'epoch', 0,
             'start', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  sig = ARGV[1]
end
if sig ~= ARGV[1] then return {-1, sig} end
local p = redis.call('HMGET', KEYS[1], 'inst', 'epoch', 'start')
local pidx = 0
if ARGV[3] ~= '-' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  pidx = math.floor((now - tonumber(p[3])) / tonumber(ARGV[3]))
end
local token = p[1] .. ':' .. p[2] .. ':' .. pidx
local skey = base .. ':s:' .. token
local wkey = base .. ':w:' .. p[1] .. ':' .. p[2]
local function counts()
  local c = redis.call('HMGET', skey, 'requests', 'cloud', 'spent')
  return tonumber(c[1] or 0), tonumber(c[2] or 0), redis.call('ZCARD', wkey), tonumber(c[3] or 0)
end
"""

# ARGV[5] wanted, [6] cost (micro), [7] share num or -1, [8] share den, [9] window or 0,
# [10] spend cap (micro) or -1, [11] ttl of a period's state in ms or 0.
_ADMIT = _PRELUDE + """
local requests = redis.call('HINCRBY', skey, 'requests', 1)
if requests == 1 and tonumber(ARGV[11]) > 0 then redis.call('PEXPIRE', skey, ARGV[11]) end
local seq = requests - 1
local window = tonumber(ARGV[9])
local allowed = true
if tonumber(ARGV[7]) >= 0 then
  local used, n
  if window > 0 then
    redis.call('ZREMRANGEBYSCORE', wkey, '-inf', seq - window)
    used, n = redis.call('ZCARD', wkey), math.min(requests, window)
  else
    used, n = tonumber(redis.call('HGET', skey, 'cloud') or 0), requests
  end
  allowed = (used + 1) * tonumber(ARGV[8]) <= tonumber(ARGV[7]) * n
end
local cost = tonumber(ARGV[6])
if allowed and tonumber(ARGV[10]) >= 0 then
  allowed = tonumber(redis.call('HGET', skey, 'spent') or 0) + cost <= tonumber(ARGV[10])
end
local esc = 0
if ARGV[5] == '1' and allowed then
  esc = 1
  redis.call('HINCRBY', skey, 'cloud', 1)
  redis.call('HINCRBY', skey, 'spent', cost)
  if window > 0 then redis.call('ZADD', wkey, seq, seq) end
end
local r, c, w, s = counts()
return {seq, esc, token, r, c, w, s}
"""

# ARGV[5] ticket token, [6] seq, [7] cloud delta (-1 refund, 0 correction), [8] spend delta.
_SETTLE = _PRELUDE + """
if token ~= ARGV[5] then return {0} end
if tonumber(ARGV[7]) ~= 0 then
  redis.call('HINCRBY', skey, 'cloud', ARGV[7])
  redis.call('ZREM', wkey, ARGV[6])
end
redis.call('HINCRBY', skey, 'spent', ARGV[8])
return {1}
"""

_SNAPSHOT = _PRELUDE + """
local r, c, w, s = counts()
return {r, c, w, s}
"""

_RESET = _PRELUDE + """
redis.call('DEL', skey, wkey)
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return {0}
"""


class RedisLedger(Ledger):
    r"""A ledger shared by every process that uses the same Redis server and ``key``.

    Each operation is one atomic Lua script (registered with
    :meth:`redis.Redis.register_script`, run by ``EVALSHA``), so the budget of
    ``spec`` holds exactly on the global arrival order across processes: at
    every prefix, cloud count :math:`\le \lfloor b N \rfloor` (total), the same
    over the last ``window`` admissions (window), or per period of the server
    clock (period); spend :math:`\le` ``spend_cap`` in integer micro-units
    of the decimals written (reservations rounded up, the cap rounded down, so
    never above the cap).

    The budget signature is stored with the ledger: a process whose ``spec``
    differs from the one stored under ``key`` gets an
    :class:`~confroute.errors.InvalidParameterError` naming ``ledger``.

    Parameters
    ----------
    url : str
        ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        The URL is a policy parameter and so is written into saved routers: put
        the password in the environment variable ``CONFROUTE_LEDGER_PASSWORD``
        instead (used when the URL has none).
    spec : LedgerSpec
        The budget to enforce.
    key : str, default="confroute:ledger"
        Prefix of the Redis keys; processes sharing it share the budget.
    failure_mode : {"fail_closed", "fail_open"}, default="fail_closed"
        What admissions do while Redis is unreachable (see the module docstring).
    emergency_allowance : int >= 0, default=0
        Escalations this process may let through while Redis is unreachable
        (``fail_open`` only).
    timeout : float > 0, default=0.25
        Seconds to wait for Redis on one operation before treating it as unreachable.
    retry_interval : float >= 0, default=1.0
        Seconds between attempts to reach Redis again once it was found unreachable.

    Raises
    ------
    LedgerUnavailableError
        Redis does not answer at construction (the message names the URL,
        without credentials).
    InvalidParameterError
        A bad parameter, or another budget stored under ``key``.
    """

    def __init__(self, url: str, *, spec: LedgerSpec, key: str = "confroute:ledger",
                 failure_mode: str = "fail_closed", emergency_allowance: int = 0,
                 timeout: float = 0.25, retry_interval: float = 1.0) -> None:
        owner = "RedisLedger"
        self.url = check_ledger_url(url, "ledger", owner)
        if not isinstance(key, str) or not key:
            raise InvalidParameterError(
                f"The 'key' parameter of {owner} must be a non-empty str. Got {key!r}.")
        self.key, self.spec = key, spec
        self.failure_mode = check_choice(failure_mode, "failure_mode", owner, FAILURE_MODES)
        self.emergency_allowance = check_int(emergency_allowance, "emergency_allowance", owner,
                                             min_value=0)
        self.timeout = check_float(timeout, "timeout", owner, min_value=0.0, min_inclusive=False)
        self.retry_interval = check_float(retry_interval, "retry_interval", owner, min_value=0.0)
        self._sig = spec.signature()
        self._lock = threading.Lock()
        self._connect()
        self._check_started()

    # -- connection -----------------------------------------------------------------------
    def _connect(self) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise MissingDependencyError(
                'A Redis ledger needs the redis client: pip install "confroute[redis]"') from exc
        self._errors: tuple[type[BaseException], ...] = (redis.ConnectionError,
                                                         redis.TimeoutError, OSError)
        extra: dict[str, Any] = {}
        secret = os.environ.get(PASSWORD_ENV)
        if secret and urlsplit(str(self.url)).password is None:
            extra["password"] = secret  # credentials kept out of URLs and saved routers
        try:
            self._client = redis.Redis.from_url(
                str(self.url), socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), decode_responses=True, **extra)
        except ValueError as exc:
            raise InvalidParameterError(
                f"The 'ledger' parameter of RedisLedger must be a valid Redis URL. Got "
                f"{redact_url(str(self.url))!r} ({exc}).") from None
        reg = self._client.register_script
        self._scripts = {"admit": reg(_ADMIT), "settle": reg(_SETTLE),
                         "snapshot": reg(_SNAPSHOT), "reset": reg(_RESET)}
        self._inst = uuid.uuid4().hex[:12]
        self._down_since: float | None = None
        self._emergency_used = 0
        self._last = LedgerSnapshot(0, 0, 0, 0.0, "redis")

    def _check_started(self) -> None:
        try:
            self._run("snapshot", create=True)
        except self._errors as exc:
            raise LedgerUnavailableError(
                f"The 'ledger' parameter of RedisLedger names a Redis server that is "
                f"unreachable: {redact_url(str(self.url))} ({type(exc).__name__}: {exc}). Start "
                "Redis or fix the URL.") from None

    def _run(self, name: str, *args: Any, create: bool = True) -> list[Any]:
        """Run one script; raise InvalidParameterError on a budget mismatch."""
        period = "-" if self.spec.period is None else repr(float(self.spec.period))
        argv = [self._sig, self._inst, period, "1" if create else "0", *args]
        out = list(self._scripts[name](keys=[f"{self.key}:params"], args=argv))
        if out and out[0] == -1:
            raise InvalidParameterError(
                f"The 'ledger' parameter names a shared ledger (key {self.key!r} on "
                f"{redact_url(str(self.url))}) created with another budget: stored "
                f"{out[1]!r}, this policy has {self._sig!r}. Use the same budget parameters "
                "on every router sharing the key, or another key.")
        return out

    def _call(self, name: str, *args: Any, create: bool = True) -> list[Any] | None:
        """Run a script, or None when Redis is unreachable (recorded; retried later)."""
        down = self._down_since
        if down is not None and time.monotonic() - down < self.retry_interval:
            return None
        try:
            out = self._run(name, *args, create=create)
        except self._errors:
            self._down_since = time.monotonic()
            return None
        self._down_since = None
        return out

    @property
    def client(self) -> Any:
        """The :class:`redis.Redis` client of this ledger (for health checks and tooling)."""
        return self._client

    # -- ledger API -----------------------------------------------------------------------
    def admit(self, wanted: bool, cost: Fraction) -> Admission:
        spec = self.spec
        share = spec.share
        ttl = 0 if spec.period is None else int((2 * spec.period + 60) * 1000)
        with self._lock:
            out = self._call(
                "admit", "1" if wanted else "0", _micro_ceil(float(cost)),
                -1 if share is None else share.numerator, 1 if share is None else share.denominator,
                spec.window or 0, -1 if spec.spend_cap is None else _micro_floor(spec.spend_cap),
                ttl)
            if out is None:
                return self._admit_offline(wanted)
            seq, esc, token, r, c, w, s = out
            self._last = LedgerSnapshot(int(r), int(c), int(w), int(s) / MICRO, "redis", True,
                                        self._emergency_used)
            return Admission(int(seq), bool(esc), ("redis", str(token), int(seq)))

    def _admit_offline(self, wanted: bool) -> Admission:
        """Decision while Redis is unreachable (caller holds the lock)."""
        token = ("offline", self._inst)
        if not wanted:
            return Admission(-1, False, token, "ledger store unreachable")
        if self.failure_mode == "fail_open" and self._emergency_used < self.emergency_allowance:
            self._emergency_used += 1
            return Admission(-1, True, token, "ledger store unreachable: fail_open, emergency "
                             f"escalation {self._emergency_used}/{self.emergency_allowance}")
        return Admission(-1, False, token, f"ledger store unreachable: {self.failure_mode}, "
                         "kept on edge")

    def settle(self, ticket: Ticket, spent: bool, cost: float | None) -> bool:
        token = ticket._token
        if ticket.settled or not isinstance(token, tuple) or not ticket.escalate:
            ticket.settled = True
            return False
        with self._lock:
            if token[0] == "offline":
                ticket.settled = True
                if spent or token[1] != self._inst:
                    return False
                self._emergency_used -= 1
                return True
            old = _micro_ceil(ticket.cost)
            if spent:
                new = old if cost is None else _micro_ceil(cost)
                if new == old:
                    ticket.settled = True
                    return False
                args: tuple[Any, ...] = (token[1], token[2], 0, new - old)
            else:
                args = (token[1], token[2], -1, -old)
            out = self._call("settle", *args, create=False)
            if out is None:
                return False  # not settled: the caller may try again once Redis is back
            ticket.settled = True
            return bool(out[0] == 1)

    def snapshot(self) -> LedgerSnapshot:
        with self._lock:
            out = self._call("snapshot", create=False)
            if out is None:
                r, c, w, s = self._last[:4]
                return LedgerSnapshot(r, c, w, s, "redis", False, self._emergency_used)
            if out[0] == -2:  # Redis answered but lost the ledger (restart): nothing counted yet
                out = [0, 0, 0, 0]
            r, c, w, s = out
            self._last = LedgerSnapshot(int(r), int(c), int(w), int(s) / MICRO, "redis", True,
                                        self._emergency_used)
            return self._last

    def reset(self) -> None:
        """Empty the shared counts (every process sharing ``key`` starts again from zero).

        Raises
        ------
        LedgerUnavailableError
            Redis does not answer.
        """
        with self._lock:
            try:
                self._run("reset", create=True)
            except self._errors as exc:
                raise LedgerUnavailableError(
                    f"Cannot reset the shared ledger: Redis at {redact_url(str(self.url))} is "
                    f"unreachable ({type(exc).__name__}: {exc}).") from None
            self._down_since = None
            self._emergency_used = 0
            self._last = LedgerSnapshot(0, 0, 0, 0.0, "redis")

    # A copy (or a pickle sent to another process) reconnects to the same shared ledger.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("url", "key", "spec", "failure_mode", "emergency_allowance", "timeout",
                "retry_interval", "_sig")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._connect()
