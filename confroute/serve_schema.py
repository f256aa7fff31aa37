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

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "JSON_FORMATS",
    "MEDIA_PARTS",
    "ROLES",
    "SERVED_FIELDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "ContentPart",
    "StreamOptions",
    "openai_error",
]

ROLES = ("developer", "system", "user", "assistant", "tool")
Role = Literal["developer", "system", "user", "assistant", "tool"]

_CONTENT = "a string or an array of content parts"
#: Content parts the edge model cannot read: a request holding one is escalated.
MEDIA_PARTS = ("image_url", "input_audio", "file")
#: ``response_format`` types the edge model cannot promise: such a request is escalated.
JSON_FORMATS = ("json_object", "json_schema")

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
    "logprobs": "a boolean",
    "top_logprobs": "an integer in [0, 20]",
    "tools": "a list of tool objects",
    "tools[*]": "a tool object",
    "tool_choice": "'none', 'auto', 'required' or an object naming a tool",
    "parallel_tool_calls": "a boolean",
    "response_format": "an object with a string 'type'",
}
# Fields whose wrong-typed values are reported with code "invalid_type" (the others,
# numbers mostly, say "invalid_value", as OpenAI does).
_TYPE_CODE_FIELDS = frozenset({
    "messages", "messages[*]", "messages[*].content", "messages[*].name", "model", "stream",
    "stream_options", "stream_options.include_usage", "user", "metadata", "logprobs",
    "tools", "tools[*]", "tool_choice", "parallel_tool_calls", "response_format",
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
    """One element of an array ``content``: text, or an image, audio or file part.

    Text parts are read by the edge model; image, audio and file parts
    (:data:`MEDIA_PARTS`, their payload kept as sent) make the request escalate
    to the cloud, which receives them unchanged.
    """

    type: str
    text: str | None = None


class ChatMessage(_Open):
    """One chat message. ``content`` is a string or an array of content parts.

    ``developer`` messages are routed as ``system`` messages (the edge model's chat
    template and most servers know no ``developer`` role). ``content`` may be null
    only in an ``assistant`` message (one that made tool calls).
    """

    role: Role
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            _check_unicode(value)
            return value
        if value is None and info.data.get("role") == "assistant":
            return value
        if not isinstance(value, list):
            raise PydanticCustomError(
                "invalid_type",
                "must be {expected} (null content only in an assistant message). Got {got}.",
                {"expected": _CONTENT, "got": type(value).__name__},
            )
        for j, part in enumerate(value):
            _check_part(part, j)
        return value

    @property
    def text(self) -> str:
        """The text parts as one string (concatenated, in order; media parts left out)."""
        content = self.content
        if isinstance(content, str):
            return content
        return "".join(part.text or "" for part in content or () if part.type == "text")

    @property
    def has_media(self) -> bool:
        """Whether ``content`` holds an image, audio or file part."""
        content = self.content
        return isinstance(content, list) and any(p.type != "text" for p in content)

    @property
    def routed_role(self) -> str:
        """The role the router sees (``developer`` becomes ``system``)."""
        return "system" if self.role == "developer" else self.role


def _check_part(part: Any, j: int) -> None:
    """Refuse a content part that is neither text nor a media part with its payload."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        _check_unicode(part["text"], f" (element {j})")
        return
    if kind in MEDIA_PARTS and isinstance(part.get(kind), dict):
        return
    if isinstance(kind, str) and kind not in MEDIA_PARTS and kind != "text":
        raise PydanticCustomError(
            "unsupported_content",
            "has a content part of type {kind} at index {j}; this server accepts the part "
            "types 'text', 'image_url', 'input_audio' and 'file'.",
            {"kind": repr(kind), "j": j},
        )
    raise PydanticCustomError(
        "invalid_type",
        "must be {expected}: element {j} is not a valid part (an object with 'type': 'text' "
        "and a string 'text', or a 'type' of {media} with an object of that name). Got {got}.",
        {"expected": _CONTENT, "j": j, "media": ", ".join(repr(m) for m in MEDIA_PARTS),
         "got": repr(part)[:80]},
    )


class StreamOptions(_Open):
    """``stream_options``: ``include_usage`` adds a final chunk with the token usage."""

    include_usage: bool | None = None


#: Request fields the server handles itself (through the router and its configs)
#: rather than forwarding them to the cloud as they are.
SERVED_FIELDS = ("messages", "model", "stream", "stream_options", "n", "max_tokens",
                 "max_completion_tokens", "temperature", "top_p", "logprobs", "top_logprobs")


class ChatCompletionRequest(_Open):
    """An OpenAI chat-completion request as this server accepts it.

    Unknown fields are accepted and forwarded to the cloud (``extra="allow"``,
    see :meth:`forwarded`). Server limits
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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format", mode="after")
    @classmethod
    def _check_format(cls, value: Any) -> Any:
        if value is not None and not isinstance(value.get("type"), str):
            raise PydanticCustomError(
                "invalid_value", "must be {expected}. Got {got}.",
                {"expected": _EXPECTED["response_format"], "got": repr(value)[:80]})
        return value

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

    @property
    def forced(self) -> str | None:
        """Why the edge model cannot honour this request, or None if it can.

        ``"media"``: a message holds an image, audio or file part; ``"tools"``:
        ``tools`` are given and ``tool_choice`` is not ``"none"``; ``"json"``:
        ``response_format`` asks for ``json_object`` or ``json_schema``. The
        first that applies, in that order.
        """
        if any(m.has_media for m in self.messages):
            return "media"
        if self.tools and self.tool_choice != "none":
            return "tools"
        if self.response_format is not None and self.response_format.get("type") in JSON_FORMATS:
            return "json"
        return None

    def forwarded(self) -> dict[str, Any]:
        """The fields sent to the cloud as they are: every field but :data:`SERVED_FIELDS`.

        ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``,
        ``seed``, ``stop``, ``user``, ``metadata`` and any unknown field
        (``logit_bias``, ``presence_penalty``, ...) are included when given.
        """
        return self.model_dump(exclude=set(SERVED_FIELDS), exclude_none=True)


def _param(loc: Sequence[Any]) -> tuple[str | None, str | None]:
    """(parameter path, its pattern with "[*]") of a pydantic error location."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None, None
    path, pattern = "", ""
    for p in parts:
        if isinstance(p, int):
            path, pattern = f"{path}[{p}]", f"{pattern}[*]"
        elif p in {"str", "list[str]", "list[ContentPart]", "dict[str,any]"} or str(p).startswith(
                ("function-", "literal[")):
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
