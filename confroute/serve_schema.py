"""Pydantic request models of the routing server (``confroute serve``) and their errors.

The models follow the OpenAI chat-completions request. FastAPI validates each
request body against :class:`ChatCompletionRequest` (so ``/openapi.json`` shows
it) and :func:`openai_error` turns a validation error into the OpenAI error body
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``.

Imported lazily by :func:`confroute.serve.create_app` (pydantic is part of the
``serve`` extra through fastapi).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "ROLES",
    "ChatCompletionRequest",
    "ChatMessage",
    "ContentPart",
    "StreamOptions",
    "openai_error",
]

ROLES = ("developer", "system", "user", "assistant", "tool")
Role = Literal["developer", "system", "user", "assistant", "tool"]

_CONTENT = "a string or an array of text content parts"

# What each field must be, by its parameter path with list indices written "[*]".
_EXPECTED: Mapping[str, str] = {
    "messages": "a list of message objects",
    "messages[*]": "an object with 'role' and 'content'",
    "messages[*].role": "one of " + ", ".join(repr(r) for r in ROLES),
    "messages[*].content": _CONTENT,
    "messages[*].name": "a string",
    "model": "a string",
    "stream": "a boolean",
    "stream_options": "an object",
    "stream_options.include_usage": "a boolean",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "n": "an integer >= 1",
    "max_tokens": "an integer >= 1",
    "max_completion_tokens": "an integer >= 1",
    "seed": "an integer >= 0",
    "stop": "a non-empty string or a list of at most 4 of them",
    "user": "a string",
    "metadata": "an object with string values",
}
# Fields whose wrong-typed values are reported with code "invalid_type" (the others,
# numbers mostly, say "invalid_value", as OpenAI does).
_TYPE_CODE_FIELDS = frozenset({
    "messages", "messages[*]", "messages[*].content", "messages[*].name", "model", "stream",
    "stream_options", "stream_options.include_usage", "user", "metadata",
})
_TYPE_ERRORS = frozenset({
    "model_type", "model_attributes_type", "list_type", "dict_type", "string_type", "bool_type",
    "int_type", "float_type", "literal_error", "union_tag_invalid", "is_instance_of",
})


def _check_unicode(text: str, where: str = "") -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``).

    JSON can escape a lone surrogate; Python then holds a string that no tokenizer
    or UTF-8 encoder accepts, so it is a client error (400), not an edge failure.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_value",
            "must be valid Unicode text{where}: it holds a lone surrogate "
            "(U+{code:04X}) at index {at}.",
            {"where": where, "code": ord(text[exc.start]), "at": exc.start},
        ) from None


class _Open(BaseModel):
    """Strict (no type coercion), finite numbers only, unknown fields kept."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class ContentPart(_Open):
    """One element of an array ``content``; only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


class ChatMessage(_Open):
    """One chat message. ``content`` is a string or an array of text content parts.

    ``developer`` messages are routed as ``system`` messages (the edge model's chat
    template and most servers know no ``developer`` role). Image, audio and file
    parts are refused: the edge model reads text only.
    """

    role: Role
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if isinstance(value, str):
            _check_unicode(value)
            return value
        if not isinstance(value, list):
            raise PydanticCustomError(
                "invalid_type",
                "must be {expected} (null content is not supported). Got {got}.",
                {"expected": _CONTENT, "got": type(value).__name__},
            )
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                _check_unicode(part["text"], f" (element {j})")
                continue
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    "unsupported_content",
                    "has a content part of type {kind} at index {j}: image, audio and file "
                    "parts are not supported by the edge model of this server; send text parts "
                    "only.",
                    {"kind": repr(kind), "j": j},
                )
            raise PydanticCustomError(
                "invalid_type",
                "must be {expected}: element {j} is not a text part "
                "(an object with 'type': 'text' and a string 'text'). Got {got}.",
                {"expected": _CONTENT, "j": j, "got": repr(part)[:80]},
            )
        return value

    @property
    def text(self) -> str:
        """The content as one string (text parts concatenated, in order)."""
        content = self.content
        if isinstance(content, str):
            return content
        return "".join(part.text or "" for part in content or ())

    @property
    def routed_role(self) -> str:
        """The role the router sees (``developer`` becomes ``system``)."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Open):
    """``stream_options``: ``include_usage`` adds a final chunk with the token usage."""

    include_usage: bool | None = None


class ChatCompletionRequest(_Open):
    """An OpenAI chat-completion request as this server accepts it.

    Unknown fields are accepted and ignored (``extra="allow"``). Server limits
    (number of messages, conversation length, ``n``) are checked after parsing by
    :func:`confroute.serve.create_app`.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    user: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is None or (isinstance(stops, list) and 0 < len(stops) <= 4
                             and all(isinstance(s, str) and s for s in stops)):
            for stop in stops or ():
                _check_unicode(stop)
            return value
        raise PydanticCustomError(
            "invalid_value", "must be {expected}. Got {got}.",
            {"expected": _EXPECTED["stop"], "got": repr(value)[:80]},
        )

    @property
    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when not given)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``, else None."""
        return self.max_completion_tokens or self.max_tokens


def _param(loc: Sequence[Any]) -> tuple[str | None, str | None]:
    """(parameter path, its pattern with "[*]") of a pydantic error location."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None, None
    path, pattern = "", ""
    for p in parts:
        if isinstance(p, int):
            path, pattern = f"{path}[{p}]", f"{pattern}[*]"
        elif p in {"str", "list[str]", "list[ContentPart]"} or str(p).startswith("function-"):
            continue  # union members and validator wrappers are not parameters
        else:
            path = f"{path}.{p}" if path else str(p)
            pattern = f"{pattern}.{p}" if pattern else str(p)
    return path, pattern


def _body_error(err: Mapping[str, Any]) -> tuple[str, str] | None:
    """(message, code) for errors about the body as a whole, else None."""
    kind = err.get("type")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", "invalid_json"
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if not loc:
        return "The request body must be a JSON object.", "invalid_body"
    return None


def openai_error(err: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI error body for one pydantic (or FastAPI request) validation error.

    Parameters
    ----------
    err : mapping
        One item of ``ValidationError.errors()`` (``type``, ``loc``, ``msg``, ``input``).

    Returns
    -------
    dict
        ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``.
    """
    whole = _body_error(err)
    param: str | None = None
    if whole is not None:
        message, code = whole
    else:
        param, pattern = _param(err["loc"])
        kind = str(err.get("type"))
        expected = _EXPECTED.get(pattern or "")
        if kind == "missing":
            message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
        elif kind == "too_short" and pattern == "messages":
            message, code = "'messages' must contain at least one message.", "empty_array"
        elif kind in {"invalid_type", "invalid_value", "unsupported_content"}:  # our own
            message, code = f"'{param}' {err['msg']}", kind
        else:
            code = ("invalid_type" if kind in _TYPE_ERRORS and pattern in _TYPE_CODE_FIELDS
                    else "invalid_value")
            what = expected or f"valid ({err.get('msg')})"
            message = f"'{param}' must be {what}. Got {repr(err.get('input'))[:80]}."
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}
