"""The pydantic schema of a config file (:mod:`confroute.config`); imported only when parsing."""

from __future__ import annotations

from typing import Any, Literal

from confroute.errors import ConfigError, MissingDependencyError

try:
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as exc:  # pragma: no cover - pydantic comes with the serve extra
    raise MissingDependencyError(
        'Reading a confroute config file needs pydantic: pip install "confroute[config]"'
    ) from exc

__all__ = ["CascadeSection", "ConfigDoc", "TierSection", "is_secret_path", "validate"]

_SECRET_HINTS = ("headers", "api_key", "key", "token", "secret", "password")


def is_secret_path(path: str) -> bool:
    """Whether a value at this key path may be a secret (never echoed in errors)."""
    return any(h in path.lower() for h in _SECRET_HINTS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PriceTable(_Strict):
    """Prices per one million tokens."""

    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)


class BudgetPrices(_Strict):
    """Prices per one million tokens used for the spend cap."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class EdgeSection(_Strict):
    path: str = "embedded"
    options: dict[str, Any] = Field(default_factory=dict)


class CloudSection(_Strict):
    """One OpenAI-compatible cloud; keys map one to one to OpenAIModel's parameters."""

    model: str = Field(min_length=1)
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    name: str | None = None
    endpoint: Literal["chat", "completions"] = "chat"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    max_retry_time: float = Field(default=60.0, ge=0)
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    max_concurrency: int = Field(default=8, ge=1)
    logprobs: bool = True
    top_logprobs: int = Field(default=5, ge=0, le=20)
    system_prompt: str | None = None
    price_table: PriceTable | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)

    def openai_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~confroute.models.OpenAIModel`."""
        kw = self.model_dump(exclude={"model", "price_table", "headers", "extra_body"})
        kw["price_table"] = self.price_table.model_dump() if self.price_table else None
        kw["headers"] = dict(self.headers) or None
        kw["extra_body"] = dict(self.extra_body) or None
        return {"model": self.model, **kw}


class RouterSection(_Strict):
    path: str | None = None
    on_cloud_error: Literal["degrade", "raise", "error"] | None = None


class BudgetSection(_Strict):
    max_cloud_fraction: float | None = Field(default=None, ge=0, le=1)
    max_cloud_cost: float | None = Field(default=None, ge=0)
    period: str | float | None = None
    prices: BudgetPrices | None = None


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = Field(default="confroute", min_length=1)


class TierSection(_Strict):
    """One tier of a cascade: a local model (``path``) or an OpenAI-compatible ``cloud``."""

    name: str = Field(min_length=1)
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    cloud: CloudSection | None = None
    router: str | None = None
    cost_per_call: float | None = Field(default=None, ge=0)
    price_in: float | None = Field(default=None, ge=0)
    price_out: float | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_share: float | None = Field(default=None, ge=0, le=1)
    ledger: str | None = None
    ledger_key: str | None = Field(default=None, min_length=1)
    ledger_failure_mode: Literal["fail_closed", "fail_open"] = "fail_closed"


class CascadeSection(_Strict):
    tiers: list[TierSection] = Field(min_length=2)
    thresholds: list[float] | None = None
    agreement: bool = False


class ConfigDoc(_Strict):
    edge: EdgeSection = Field(default_factory=EdgeSection)
    clouds: list[CloudSection] = Field(default_factory=list)
    router: RouterSection = Field(default_factory=RouterSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    server: ServerSection = Field(default_factory=ServerSection)
    cascade: CascadeSection | None = None


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and part[:1].islower() and "[" in part):
            # skip pydantic's union-branch tags ("function-after[...]", "str", ...)
            out += f".{part}" if out else str(part)
    return out


def _received(err: Any, path: str, from_env: set[str]) -> str:
    if err["type"] == "extra_forbidden":
        return "an unknown key"
    if err["type"] == "missing":
        return "nothing (the key is required)"
    value = err.get("input")
    if path in from_env or is_secret_path(path) or isinstance(value, (dict, list)):
        return f"a value of type {type(value).__name__}"
    return f"{value!r} (type {type(value).__name__})"


def validate(data: dict[str, Any], source: str, from_env: set[str]) -> ConfigDoc:
    """The validated document; the first error becomes a ConfigError naming its key path."""
    try:
        return ConfigDoc.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = _key_path(tuple(err["loc"]))
        expected = str(err["msg"])
        if err["type"] == "extra_forbidden":
            expected = "Not a key of the config (the keys are listed in confroute.config)"
        raise ConfigError(f"The '{path}' key of {source} is invalid ({expected}). Got "
                          f"{_received(err, path, from_env)}.") from None
