"""``confroute serve``: run the OpenAI-compatible routing server of :mod:`confroute.serve`."""

from __future__ import annotations

import argparse
from typing import Any

from confroute._validation import check_float, check_int
from confroute.cli._common import default_router_path, load_model, load_router
from confroute.errors import InvalidParameterError, MissingDependencyError

__all__ = ["app_from_args", "apply_ledger", "check_traffic_args", "cmd_serve", "register"]

_INSTALL_HINT = 'pip install "confroute[serve]"'
# defaults of the options a --config file may set (a flag left at its default does not override)
_DEFAULTS: dict[str, Any] = {"edge": "embedded", "host": "127.0.0.1", "port": 8000,
                             "model_name": "confroute", "max_cloud_fraction": None,
                             "max_cloud_cost": None, "period": None}


def register(sub: Any) -> None:
    """Add ``serve`` to the ``confroute`` command (cheap: imports nothing heavy)."""
    p = sub.add_parser(
        "serve", help="run an OpenAI-compatible routing server",
        description="Serve POST /v1/chat/completions (streaming and not), GET /v1/models, "
        "GET /health and GET /metrics. Each conversation is routed by the router: the edge "
        "answer is kept or the conversation is escalated to the cloud model. The decision is "
        "returned in the 'confroute' response field and the X-Confroute-* headers. Needs "
        f"{_INSTALL_HINT}.",
    )
    p.add_argument("--config", default=None,
                   help="a confroute.toml naming the edge, the cloud fallback chain, the router, "
                   "the budget and the server options (options given here override it)")
    p.add_argument("--router", help="saved router file (default: the built-in one)")
    p.add_argument("--edge", default=_DEFAULTS["edge"], help="edge model spec (default: embedded)")
    p.add_argument("--cloud", help="cloud model spec (without it, escalations follow the "
                   "router's on_cloud_error)")
    p.add_argument("--host", default=_DEFAULTS["host"], help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_DEFAULTS["port"], help="port (default 8000)")
    p.add_argument("--model-name", default=_DEFAULTS["model_name"],
                   help="model id reported to clients (default confroute)")
    p.add_argument("--max-prompt-chars", type=int, default=32000,
                   help="largest conversation, in content characters (default 32000)")
    p.add_argument("--max-messages", type=int, default=64,
                   help="largest number of messages (default 64)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="largest edge micro-batch (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long to gather a micro-batch, in ms (default 5)")
    p.add_argument("--max-cloud-fraction", type=float, default=None,
                   help="enforce a cloud budget: at most this share of requests (0-1) goes to "
                   "the cloud, exactly, at every point of the arrival order")
    p.add_argument("--max-cloud-cost", type=float, default=None,
                   help="enforce a cloud spend cap (in the currency of the prices), per "
                   "--period when given")
    p.add_argument("--period", default=None,
                   help="budget period: seconds or 30m, 1h, 1d (default: the server's lifetime)")
    p.add_argument("--adapt-window", type=int, default=0, metavar="N",
                   help="with --max-cloud-fraction: escalate the least confident share of the "
                   "last N requests instead of every request under the router's threshold "
                   "while the budget lasts (default 0: off; the cap holds either way)"),
    p.add_argument("--price-input", type=float, default=None,
                   help="cloud price per million input tokens (for --max-cloud-cost; default: "
                   "the cloud model's price table)")
    p.add_argument("--price-output", type=float, default=None,
                   help="cloud price per million output tokens (for --max-cloud-cost)")
    p.add_argument("--ledger", default=None, metavar="URL",
                   help="keep the policy's budget ledger in Redis (e.g. "
                   "redis://127.0.0.1:6379/0) so every replica using the same URL and "
                   "--ledger-key enforces one exact budget (default: in-process)")
    p.add_argument("--ledger-key", default="confroute:ledger",
                   help="prefix of the shared ledger's Redis keys (default confroute:ledger)")
    p.add_argument("--ledger-failure-mode", default="fail_closed",
                   choices=("fail_closed", "fail_open"),
                   help="while Redis is unreachable: keep answers on the edge (fail_closed, "
                   "default) or escalate up to --ledger-emergency-allowance (fail_open)")
    p.add_argument("--ledger-emergency-allowance", type=int, default=0,
                   help="escalations this replica may make while Redis is unreachable "
                   "(fail_open; default 0)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    _add_traffic_options(p)
    p.set_defaults(func=cmd_serve)


def _add_traffic_options(p: Any) -> None:
    g = p.add_argument_group(
        "learning from traffic",
        "Log every decision, label a share of the kept answers with background cloud calls "
        "(never delaying a response), and watch for drift: gauges confroute_drift_cloud_share, "
        "_agreement, _ece and _psi on /metrics and under 'traffic' in /health, a warning in "
        "the log when a bound is crossed. Refit later with 'confroute recalibrate'.")
    g.add_argument("--decision-log", metavar="FILE",
                   help="append one row per request to this SQLite decision log")
    g.add_argument("--store-prompts", choices=("hash", "text"), default="hash",
                   help="keep a SHA-256 of each prompt (default) or its text")
    g.add_argument("--shadow-rate", type=float, default=0.0, metavar="R",
                   help="share of kept requests also answered by the cloud in the background "
                   "and labelled (default 0); needs --decision-log and --cloud")
    g.add_argument("--shadow-max-calls", type=int, metavar="N",
                   help="at most N shadow calls in this process")
    g.add_argument("--shadow-max-cost", type=float, metavar="C",
                   help="at most C of shadow cost in this process (a full-length answer's "
                   "price is reserved per call)")
    g.add_argument("--labeler", default="cloud_agreement", choices=("cloud_agreement", "judge"),
                   help="how a shadow answer pair is labelled: cloud_agreement (default; "
                   "escalated requests are then labelled too, at no extra call) or judge (the "
                   "cloud model judges)")


def check_traffic_args(args: argparse.Namespace) -> None:
    """Check the traffic options before any model is loaded."""
    owner = "confroute serve"
    check_float(args.shadow_rate, "--shadow-rate", owner, min_value=0.0, max_value=1.0)
    check_int(args.shadow_max_calls, "--shadow-max-calls", owner, min_value=0, allow_none=True)
    check_float(args.shadow_max_cost, "--shadow-max-cost", owner, min_value=0.0,
                allow_none=True)
    if args.decision_log is None and (args.shadow_rate > 0 or args.store_prompts != "hash"):
        raise InvalidParameterError(f"The '--shadow-rate' and '--store-prompts' options of "
                                    f"{owner} need '--decision-log FILE' (where labels go).")
    if args.shadow_rate > 0 and not args.cloud:
        raise InvalidParameterError(f"The '--shadow-rate' option of {owner} needs '--cloud' "
                                    "(the model that answers shadow requests).")


def _require_server() -> Any:
    """uvicorn, after checking fastapi too: fail before any model is loaded."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            f"The confroute routing server needs fastapi and uvicorn: {_INSTALL_HINT}"
        ) from exc
    return uvicorn


def app_from_args(args: argparse.Namespace) -> Any:
    """Load the router and models named by ``confroute serve`` options and build the app.

    With ``--config``, the file gives every option the command line leaves at its
    default (an option given with its default value does not override the file).

    Returns
    -------
    fastapi.FastAPI
    """
    _require_server()
    check_traffic_args(args)
    if getattr(args, "config", None) is not None:
        from confroute.config import load_config

        cfg = load_config(args.config)
        if cfg.cascade is not None:
            return _cascade_app(args, cfg)
    from confroute.serve import create_app

    router, opts = _router_and_options(args)
    tap = None
    if args.decision_log:  # the log's fingerprint is the saved router's, before any budget
        from confroute.shadow import build_traffic_tap

        tap = build_traffic_tap(router, args.decision_log, store_prompts=args.store_prompts,
                                shadow_rate=args.shadow_rate,
                                shadow_max_calls=args.shadow_max_calls,
                                shadow_max_cost=args.shadow_max_cost, labeler=args.labeler)
    budget: dict[str, Any] = {k: opts[k] for k in ("max_cloud_fraction", "max_cloud_cost",
                                                   "period", "prices")}
    if getattr(args, "ledger", None) is not None:
        if budget["max_cloud_fraction"] is not None or budget["max_cloud_cost"] is not None:
            from confroute.serve import apply_budget

            router = apply_budget(router, **budget, adapt_window=args.adapt_window)
            # the budget first, then its ledger
            budget = {}
        apply_ledger(router.policy, args.ledger, key=args.ledger_key,
                     failure_mode=args.ledger_failure_mode,
                     emergency_allowance=args.ledger_emergency_allowance)
    return create_app(router, model_name=opts["model_name"],
                      max_prompt_chars=args.max_prompt_chars, max_messages=args.max_messages,
                      max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, traffic=tap,
                      adapt_window=args.adapt_window if budget else 0, **budget)


# options of the edge/cloud router that a [cascade] config replaces (flag, attribute)
_ROUTER_ONLY = (("--router", "router"), ("--cloud", "cloud"), ("--ledger", "ledger"),
                ("--max-cloud-fraction", "max_cloud_fraction"),
                ("--max-cloud-cost", "max_cloud_cost"), ("--period", "period"),
                ("--price-input", "price_input"), ("--price-output", "price_output"),
                ("--decision-log", "decision_log"))


def _cascade_app(args: argparse.Namespace, cfg: Any) -> Any:
    """The cascade server of a config with a ``[cascade]`` section (checked before loading)."""
    given = [flag for flag, name in _ROUTER_ONLY if getattr(args, name, None) is not None]
    if _given(args, "edge"):
        given.insert(0, "--edge")
    if given:
        raise InvalidParameterError(
            f"The '{given[0]}' option of confroute serve does not apply to a config with a "
            "[cascade] section (its tiers name the models, routers and costs). Got "
            f"{', '.join(given)}.")
    from confroute.serve_cascade import create_cascade_app

    cascade = cfg.build_cascade()
    for key in ("host", "port"):  # cmd_serve reads them from args
        if not _given(args, key):
            setattr(args, key, getattr(cfg.serve, key))
    name = args.model_name if _given(args, "model_name") else cfg.serve.model_name
    return create_cascade_app(cascade, model_name=name, max_prompt_chars=args.max_prompt_chars,
                              max_messages=args.max_messages, max_batch=args.max_batch,
                              batch_wait_ms=args.batch_wait_ms)


def apply_ledger(policy: Any, url: str, *, key: str = "confroute:ledger",
                 failure_mode: str = "fail_closed", emergency_allowance: int = 0) -> None:
    """Move an online policy's budget ledger to the shared Redis ledger at ``url``.

    Connects at once, so an unreachable Redis or a budget that differs from the
    one stored under ``key`` stops the server before it starts. The counts of
    the shared ledger are kept (a starting replica joins them).

    Raises
    ------
    InvalidParameterError
        The policy keeps no ledger, a bad URL, or another budget under ``key``.
    LedgerUnavailableError
        Redis does not answer.
    """
    from confroute.policies import OnlinePolicy

    if not isinstance(policy, OnlinePolicy) or "ledger" not in policy.get_params():
        raise InvalidParameterError(
            "The '--ledger' option of confroute serve needs a router whose policy keeps a "
            "budget ledger (BudgetPolicy or CostAwarePolicy). Got "
            f"{type(policy).__name__}.")
    policy.set_params(ledger=url, ledger_key=key, ledger_failure_mode=failure_mode,
                      ledger_emergency_allowance=emergency_allowance)
    policy.snapshot()


def _given(args: argparse.Namespace, name: str) -> bool:
    return bool(getattr(args, name) != _DEFAULTS.get(name))


def _router_and_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The router and create_app options, from the flags and the ``--config`` file."""
    prices = None
    if args.price_input is not None or args.price_output is not None:
        prices = {"input": args.price_input or 0.0, "output": args.price_output or 0.0}
    flags = {"model_name": args.model_name, "max_cloud_fraction": args.max_cloud_fraction,
             "max_cloud_cost": args.max_cloud_cost, "period": args.period, "prices": prices}
    if getattr(args, "config", None) is None:
        return load_router(args.router, args.edge, args.cloud), flags
    from confroute.config import load_config
    from confroute.router import Router

    cfg = load_config(args.config)
    edge = load_model(args.edge, role="edge") if _given(args, "edge") else cfg.build_edge()
    cloud = load_model(args.cloud, role="cloud") if args.cloud else cfg.build_clouds() or None
    path = args.router or cfg.router["path"] or default_router_path()
    router = Router.load(path, edge=edge, cloud=cloud)
    if cfg.router["on_cloud_error"] is not None:
        router.on_cloud_error = cfg.router["on_cloud_error"]
    opts = cfg.serve.app_kwargs()
    for key, value in flags.items():
        if (_given(args, key) if key != "prices" else value is not None):
            opts[key] = value
    for key in ("host", "port"):  # cmd_serve reads them from args
        if not _given(args, key):
            setattr(args, key, getattr(cfg.serve, key))
    return router, opts


def cmd_serve(args: argparse.Namespace) -> int:
    """Entry point of ``confroute serve``."""
    uvicorn = _require_server()
    uvicorn.run(app_from_args(args), host=args.host, port=args.port, log_level=args.log_level)
    return 0
