"""Per-request fields for the OpenAI-compatible back-end (e.g. a client's ``tools``).

A routing server answers many clients through one shared :class:`OpenAIModel`;
what one client asked for (``tools``, ``response_format``, ``user``, ...) must
reach the cloud request made *for that client* and no other. :func:`request_fields`
scopes such fields to the current task with a :class:`contextvars.ContextVar`:
asyncio tasks and ``asyncio.to_thread`` copy the context, so concurrent requests
never see each other's fields, and code outside the ``with`` block sees none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from confroute._validation import param_error

__all__ = ["RESERVED_FIELDS", "current_request_fields", "request_fields"]

#: Body fields a per-request mapping never overrides: the model, the number of
#: choices and the transport (confroute reads complete, non-streamed replies).
RESERVED_FIELDS = frozenset({"model", "n", "stream", "stream_options", "prompt"})

_FIELDS: ContextVar[Mapping[str, Any] | None] = ContextVar(
    "confroute_openai_request_fields", default=None)


@contextlib.contextmanager
def request_fields(fields: Mapping[str, Any]) -> Iterator[None]:
    """Add ``fields`` to every request body an ``OpenAIModel`` sends inside the block.

    The fields override the ones the model builds from its ``GenerationConfig``
    (e.g. ``stop``, ``seed``, ``messages``), except :data:`RESERVED_FIELDS`; the
    model's own ``extra_body`` (the operator's configuration) still wins over them.

    Parameters
    ----------
    fields : mapping of str to JSON-able values
        E.g. ``{"tools": [...], "tool_choice": "auto", "user": "u-1"}``.

    Raises
    ------
    InvalidTypeError
        If ``fields`` is not a mapping with str keys.

    Examples
    --------
    >>> from confroute.models.openai import request_fields
    >>> with request_fields({"user": "u-1"}):
    ...     pass  # cloud.generate(...) here sends "user": "u-1"
    """
    if not isinstance(fields, Mapping) or not all(isinstance(k, str) for k in fields):
        raise param_error("fields", "request_fields", "a mapping with str keys", fields,
                          type_error=True)
    token = _FIELDS.set(dict(fields))
    try:
        yield
    finally:
        _FIELDS.reset(token)


def current_request_fields() -> dict[str, Any]:
    """The fields of the innermost :func:`request_fields` block (empty outside one).

    Returns
    -------
    dict
        A copy, without :data:`RESERVED_FIELDS`.
    """
    fields = _FIELDS.get()
    return {k: v for k, v in (fields or {}).items() if k not in RESERVED_FIELDS}
