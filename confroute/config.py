"""A TOML configuration file for a routing deployment (``confroute serve --config``).

One file names the edge model, the cloud fallback chain, the saved router, the
budget and the server options; :func:`load_config` reads and validates it and
:meth:`Config.build` turns it into a :class:`~confroute.router.Router` and the
server options, the same from Python as from the command line::

    [edge]
    path = "embedded"                 # or a local model folder
    [edge.options]                    # HFLanguageModel / from_pretrained keywords
    dtype = "float32"

    [[clouds]]                        # the first is the primary, the next its fallbacks
    model = "gpt-4o-mini"
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"    # the key itself never goes in the file
    headers = { "X-Team" = "${TEAM:-research}" }
    timeout = 30.0
    max_retries = 2
    max_retry_time = 20.0             # the retry budget of one request, in seconds
    price_table = { prompt = 0.15, completion = 0.60 }
    logprobs = false
    max_concurrency = 16

    [router]
    path = "router.json"              # default: the built-in router
    on_cloud_error = "degrade"

    [budget]
    max_cloud_fraction = 0.2
    period = "1d"

    [server]
    host = "127.0.0.1"
    port = 8000

A ``[cascade]`` section serves a k-tier :class:`~confroute.cascade.Cascade`
instead of the edge/cloud router (``confroute serve --config`` then routes
every request through it; :meth:`Config.build_cascade` is the Python
equivalent). Tiers are listed cheapest first; each is a local model (``path``:
``"embedded"`` or a model folder, with ``options``) or an OpenAI-compatible
``cloud`` (the keys of ``[[clouds]]``), with its cost (``cost_per_call``, or
``price_in`` and ``price_out`` per million tokens) and, on every tier but the
last, a saved calibrated ``router`` whose estimator and calibrator give the
tier's ``p_good``::

    [cascade]
    thresholds = [0.7, 0.6]           # one per tier but the last (default 0.5 each)
    agreement = false                 # also stop when a tier agrees with the previous one

    [[cascade.tiers]]
    name = "small"
    path = "embedded"
    router = "small_router.json"
    cost_per_call = 0.0

    [[cascade.tiers]]
    name = "medium"
    path = "models/gemma-3-270m"
    router = "medium_router.json"
    price_in = 0.02
    price_out = 0.04
    max_new_tokens = 32               # default: the router's edge_max_new_tokens, else 64

    [[cascade.tiers]]
    name = "cloud"
    cloud = { model = "gpt-4o-mini", api_key_env = "OPENAI_API_KEY" }
    price_in = 0.15
    price_out = 0.60
    max_share = 0.3                   # optional budget: at most 30 % of the queries that
    ledger = "redis://127.0.0.1:6379/0"   # reach tier 1 enter this tier, shared by replicas

Every string may use ``${VAR}`` (the variable must be set) or ``${VAR:-default}``;
``$${`` is a literal ``${``. Relative paths are resolved against the file's folder.
Bad keys raise :class:`~confroute.errors.ConfigError` naming the key path (e.g.
``clouds[1].timeout``); values that came from the environment and header values are
never echoed in errors. Validation uses pydantic (``pip install "confroute[config]"``;
the ``serve`` extra brings it too).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confroute.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from confroute._config_schema import CascadeSection
    from confroute.cascade import Cascade
    from confroute.router import Router

__all__ = ["Config", "ServeOptions", "load_config", "parse_config"]

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class ServeOptions:
    """Server options of a config file: where to listen and the budget to enforce.

    Attributes
    ----------
    host : str
    port : int
    model_name : str
        Model id reported to clients.
    max_cloud_fraction, max_cloud_cost : float or None
    period : str, float or None
    prices : mapping or None
        ``{"input": p, "output": c}`` per million tokens for the spend cap (None:
        the primary cloud's price table).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "confroute"
    max_cloud_fraction: float | None = None
    max_cloud_cost: float | None = None
    period: str | float | None = None
    prices: Mapping[str, float] | None = field(default=None)

    def app_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`confroute.serve.create_app` (all but the router)."""
        return {"model_name": self.model_name, "max_cloud_fraction": self.max_cloud_fraction,
                "max_cloud_cost": self.max_cloud_cost, "period": self.period,
                "prices": dict(self.prices) if self.prices is not None else None}


@dataclass(frozen=True)
class Config:
    """A validated configuration (from :func:`load_config` or :func:`parse_config`).

    Attributes
    ----------
    edge : dict
        ``path`` (``"embedded"`` or a model folder) and ``options`` (keywords of
        :class:`~confroute.models.HFLanguageModel` / ``from_pretrained``).
    clouds : list of dict
        Keyword arguments of :class:`~confroute.models.OpenAIModel`, one per cloud,
        in fallback order.
    router : dict
        ``path`` (None: the built-in router) and ``on_cloud_error`` (None: as saved).
    serve : ServeOptions
    cascade : dict or None
        The ``[cascade]`` section (paths resolved, checked), or None: ``tiers``
        (one dict per tier: ``name``, ``path`` and ``options`` or ``cloud``
        (OpenAIModel keywords), ``router``, ``cost_per_call``, ``price_in``,
        ``price_out``, ``max_new_tokens``, ``max_share``, ``ledger``, ``ledger_key``,
        ``ledger_failure_mode``), ``thresholds`` and ``agreement``.
    """

    edge: dict[str, Any]
    clouds: list[dict[str, Any]] = field(repr=False)  # headers may hold secrets
    router: dict[str, Any]
    serve: ServeOptions
    cascade: dict[str, Any] | None = field(default=None, repr=False)

    def build_clouds(self) -> list[Any]:
        """The cloud chain as :class:`~confroute.models.OpenAIModel` objects (no network)."""
        from confroute.models.openai import OpenAIModel

        return [OpenAIModel(**dict(c)) for c in self.clouds]

    def build_edge(self) -> Any:
        """The edge model (loads weights)."""
        return _local_model(self.edge["path"], self.edge["options"])

    def build_cascade(self) -> Cascade:
        """The ``[cascade]`` section as a :class:`~confroute.cascade.Cascade` (loads weights).

        Each tier's model is loaded (a cloud tier's client makes no call yet),
        its saved router loaded with that model as the router's edge. Tier
        budgets (``max_share``) are built first and connect to their shared
        ledger at once.

        Raises
        ------
        ConfigError
            The config has no ``[cascade]`` section.
        LedgerUnavailableError
            A tier's ``ledger`` names a Redis server that does not answer.
        InvalidParameterError
            A tier's ledger key holds another budget.
        """
        if self.cascade is None:
            raise ConfigError("The config has no [cascade] section: build() gives its router.")
        from confroute.cascade import Cascade, Tier
        from confroute.router import Router

        budgets = [_tier_budget(t) for t in self.cascade["tiers"]]  # before any model loads
        tiers = []
        for t, budget in zip(self.cascade["tiers"], budgets):
            if t["cloud"] is not None:
                from confroute.models.openai import OpenAIModel

                model = OpenAIModel(**dict(t["cloud"]))
            else:
                model = _local_model(t["path"], t["options"])
            router = None if t["router"] is None else Router.load(t["router"], edge=model)
            tokens = t["max_new_tokens"] or getattr(router, "edge_max_new_tokens", None) or 64
            tiers.append(Tier(model, router=router, name=t["name"],
                              cost_per_call=t["cost_per_call"], price_in=t["price_in"],
                              price_out=t["price_out"], max_new_tokens=int(tokens),
                              policy=budget))
        return Cascade(tiers, thresholds=self.cascade["thresholds"],
                       agreement=self.cascade["agreement"])

    def build(self) -> tuple[Router, ServeOptions]:
        """Load the router with its edge model and cloud chain.

        Returns
        -------
        router : Router
            The saved router (the built-in one when no path is given) with
            ``edge`` and ``cloud=[...]`` (the fallback chain) attached.
        serve : ServeOptions
            Pass ``serve.app_kwargs()`` to :func:`confroute.serve.create_app`.
        """
        from confroute.router import Router

        path = self.router["path"]
        if path is None:
            from importlib import resources

            path = str(resources.files("confroute.data").joinpath("default_router.json"))
        router = Router.load(path, edge=self.build_edge(), cloud=self.build_clouds() or None)
        if self.router["on_cloud_error"] is not None:
            router.on_cloud_error = self.router["on_cloud_error"]
        return router, self.serve


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a TOML configuration file.

    Parameters
    ----------
    path : str or path-like

    Raises
    ------
    ConfigError
        If the file is missing or not TOML, a key is unknown or has a bad value
        (the message names its path, e.g. ``clouds[1].timeout``), or a ``${VAR}``
        is unset and has no default.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"The config file {str(p)!r} does not exist.")
    tomllib = _tomllib()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The config file {str(p)!r} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=p.parent, source=f"the config file {str(p)!r}")


def parse_config(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = ".",
                 source: str = "the config") -> Config:
    """Validate an already parsed config mapping (the TOML document as a dict).

    Parameters
    ----------
    data : mapping
    base_dir : path-like, default "."
        Folder that relative paths are resolved against.
    source : str
        Named in error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a table. Got {type(data).__name__}.")
    expanded, from_env = _expand(data, "", source, os.environ)
    from confroute._config_schema import validate

    doc = validate(expanded, source, from_env)
    base = Path(base_dir)
    edge_path = doc.edge.path
    if edge_path != "embedded" and not Path(edge_path).is_absolute():
        edge_path = str(base / edge_path)
    router_path = doc.router.path
    if router_path is not None and not Path(router_path).is_absolute():
        router_path = str(base / router_path)
    budget, server = doc.budget, doc.server
    prices = budget.prices.model_dump() if budget.prices is not None else None
    serve = ServeOptions(host=server.host, port=server.port, model_name=server.model_name,
                         max_cloud_fraction=budget.max_cloud_fraction,
                         max_cloud_cost=budget.max_cloud_cost, period=budget.period,
                         prices=prices)
    clouds = [c.openai_kwargs() for c in doc.clouds]
    cascade = None if doc.cascade is None else _cascade_spec(doc.cascade, base, source)
    return Config(edge={"path": edge_path, "options": dict(doc.edge.options)}, clouds=clouds,
                  router={"path": router_path, "on_cloud_error": doc.router.on_cloud_error},
                  serve=serve, cascade=cascade)


def _ledger_url(url: str | None, key: str, bad: Any) -> str | None:
    """``url`` if it is a Redis URL (checked without connecting), else the key's ConfigError."""
    if url is None:
        return None
    from confroute.errors import InvalidParameterError
    from confroute.ledgers import check_ledger_url, redact_url

    try:
        return check_ledger_url(url, "ledger", "a cascade tier")
    except InvalidParameterError:
        raise bad(key, "a Redis URL such as 'redis://127.0.0.1:6379/0'",
                  repr(redact_url(url))) from None


def _tier_budget(tier: Mapping[str, Any]) -> Any:
    """The budget for entering a tier (None without ``max_share``), connected to its ledger.

    A :class:`~confroute.policies.BudgetPolicy` whose rule wants every query with
    ``p_good < 1`` (the cascade's threshold already decided that the query moves
    on), so only its exact budget decides: at most ``floor(max_share * n)`` of the
    ``n`` queries that reached the previous tier enter this one, across every
    process sharing ``ledger``.
    """
    if tier["max_share"] is None:
        return None
    from confroute.policies import BudgetPolicy

    policy = BudgetPolicy(max_cloud_fraction=tier["max_share"], enforce="total",
                          ledger=tier["ledger"], ledger_key=tier["ledger_key"],
                          ledger_failure_mode=tier["ledger_failure_mode"])
    policy.set_state({"threshold_": 1.0, "calibration_cloud_fraction_": tier["max_share"],
                      "cloud_fraction_interval_": [0.0, 1.0], "n_calibration_": 0})
    policy.snapshot()  # connects a shared ledger now: unreachable Redis fails at start-up
    return policy


def _local_model(path: str, options: Mapping[str, Any]) -> Any:
    """``"embedded"`` or an HF model folder, loaded with ``options``."""
    if path == "embedded":
        from confroute.models.embedded import load_default_edge_model

        return load_default_edge_model(**dict(options))
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(path, **dict(options))


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or path == "embedded" or Path(path).is_absolute():
        return path
    return str(base / path)


def _cascade_spec(section: CascadeSection, base: Path, source: str) -> dict[str, Any]:
    """The checked ``[cascade]`` section: what pydantic's per-key checks cannot see."""
    from confroute.cascade import nominal_cost

    def bad(key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"The '{key}' key of {source} is invalid ({expected}). Got {got}.")

    tiers: list[dict[str, Any]] = []
    k = len(section.tiers)
    for i, t in enumerate(section.tiers):
        where = f"cascade.tiers[{i}]"
        if (t.path is None) == (t.cloud is None):
            raise bad(f"{where}.path", "give exactly one of 'path' (a local model) or 'cloud'",
                      f"path={t.path!r} and {'a' if t.cloud else 'no'} cloud")
        per_token = t.price_in is not None or t.price_out is not None
        both_prices = t.price_in is not None and t.price_out is not None
        if (t.cost_per_call is not None) == per_token or (per_token and not both_prices):
            raise bad(f"{where}.cost_per_call", "one kind of cost: 'cost_per_call', or both "
                      "'price_in' and 'price_out'", f"cost_per_call={t.cost_per_call!r}, "
                      f"price_in={t.price_in!r}, price_out={t.price_out!r}")
        if t.max_share is not None and i == 0:
            raise bad(f"{where}.max_share", "no budget on the first tier (every query enters "
                      "it)", repr(t.max_share))
        if t.ledger is not None and t.max_share is None:
            raise bad(f"{where}.ledger", "a ledger only with 'max_share' (the budget it keeps)",
                      "a ledger URL without max_share")
        if t.router is None and i < k - 1:
            raise bad(f"{where}.router", "every tier but the last needs a saved calibrated "
                      "router (its p_good decides whether the query stops there)", "none")
        tiers.append({"name": t.name, "path": _resolve(t.path, base), "options": t.options,
                      "cloud": None if t.cloud is None else t.cloud.openai_kwargs(),
                      "router": _resolve(t.router, base), "cost_per_call": t.cost_per_call,
                      "price_in": t.price_in, "price_out": t.price_out,
                      "max_new_tokens": t.max_new_tokens, "max_share": t.max_share,
                      "ledger": _ledger_url(t.ledger, f"{where}.ledger", bad),
                      "ledger_key": t.ledger_key or f"confroute:cascade:{t.name}",
                      "ledger_failure_mode": t.ledger_failure_mode})
    costs = [nominal_cost(t.cost_per_call, t.price_in, t.price_out) for t in section.tiers]
    if any(b < a for a, b in itertools.pairwise(costs)):
        raise bad("cascade.tiers", "tiers ordered by non-decreasing cost per call (per-token "
                  "tiers: of a 1000-in/100-out call)", f"costs {costs}")
    th = section.thresholds
    if th is not None and (len(th) != k - 1 or not all(0 <= x <= 1 or x == float("inf")
                                                       for x in th)):
        raise bad("cascade.thresholds", f"a list of {k - 1} numbers in [0, 1] or inf, one per "
                  f"tier but the last of the {k} tiers", f"{list(th)!r}")
    return {"tiers": tiers, "thresholds": None if th is None else list(th),
            "agreement": section.agreement}


def _tomllib() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError as exc:  # pragma: no cover - a dependency on 3.10
        raise MissingDependencyError("Reading TOML on Python 3.10 needs tomli: "
                                     "pip install tomli") from exc
    return tomli


def _expand(value: Any, where: str, source: str,
            env: Mapping[str, str]) -> tuple[Any, set[str]]:
    """``value`` with ``${VAR}`` expanded in every string, and the key paths that used one."""
    if isinstance(value, str):
        used = False

        def sub(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$${":
                return "${"
            used = True
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"The '{where}' key of {source} uses the environment variable "
                              f"{name!r}, which is not set (write ${{{name}:-default}} to give "
                              "a default).")

        out = _VAR.sub(sub, value)
        return out, {where} if used else set()
    if isinstance(value, Mapping):
        items, paths = {}, set()
        for k, v in value.items():
            items[k], got = _expand(v, f"{where}.{k}" if where else str(k), source, env)
            paths |= got
        return items, paths
    if isinstance(value, list):
        seq, paths = [], set()
        for i, v in enumerate(value):
            item, got = _expand(v, f"{where}[{i}]", source, env)
            seq.append(item)
            paths |= got
        return seq, paths
    return value, set()
