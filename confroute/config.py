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

Every string may use ``${VAR}`` (the variable must be set) or ``${VAR:-default}``;
``$${`` is a literal ``${``. Relative paths are resolved against the file's folder.
Bad keys raise :class:`~confroute.errors.ConfigError` naming the key path (e.g.
``clouds[1].timeout``); values that came from the environment and header values are
never echoed in errors. Validation uses pydantic (``pip install "confroute[config]"``;
the ``serve`` extra brings it too).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confroute.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
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
    """

    edge: dict[str, Any]
    clouds: list[dict[str, Any]] = field(repr=False)  # headers may hold secrets
    router: dict[str, Any]
    serve: ServeOptions

    def build_clouds(self) -> list[Any]:
        """The cloud chain as :class:`~confroute.models.OpenAIModel` objects (no network)."""
        from confroute.models.openai import OpenAIModel

        return [OpenAIModel(**dict(c)) for c in self.clouds]

    def build_edge(self) -> Any:
        """The edge model (loads weights)."""
        path, options = self.edge["path"], dict(self.edge["options"])
        if path == "embedded":
            from confroute.models.embedded import load_default_edge_model

            return load_default_edge_model(**options)
        from confroute.models.hf import HFLanguageModel

        return HFLanguageModel(path, **options)

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
    return Config(edge={"path": edge_path, "options": dict(doc.edge.options)}, clouds=clouds,
                  router={"path": router_path, "on_cloud_error": doc.router.on_cloud_error},
                  serve=serve)


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
