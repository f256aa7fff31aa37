"""The escalation rule and prompt conversion shared by the framework adapters."""

from __future__ import annotations

import math

import pytest

from confroute.integrations.common import (
    decision_metadata,
    escalation_reason,
    rule_decision,
    to_prompt,
    truncate_at_stop,
)

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(("messages", "request_fields", "why"), [
    ([USER], {"tools": [TOOL]}, "carries tools"),
    ([USER], {"functions": [TOOL["function"]]}, "carries tools"),
    ([USER], {"tool_choice": "required"}, "carries tools"),
    ([USER], {"response_format": {"type": "json_object"}}, "structured output"),
    ([USER], {"response_format": {"type": "json_schema", "json_schema": {}}},
     "structured output"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], {},
     "tool calls or tool results"),
    ([USER, {"role": "tool", "content": "21", "tool_call_id": "1"}], {},
     "tool calls or tool results"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
     "not text"),
])
def test_requests_the_edge_cannot_honour_escalate_by_rule(messages, request_fields, why):
    reason = escalation_reason(messages, request_fields)
    assert reason is not None and reason.startswith("escalated by rule") and why in reason


@pytest.mark.parametrize("request_fields", [
    {}, {"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
    {"temperature": 0.2, "stop": ["\n"]},
])
def test_plain_text_requests_are_left_to_the_router(request_fields):
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}]}]
    assert escalation_reason(messages, request_fields) is None


def test_to_prompt_maps_developer_to_system_and_joins_text_parts():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}]
    assert to_prompt(messages) == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "a\nb"},
                                   {"role": "assistant", "content": ""}]


def test_rule_decisions_have_no_score():
    d = rule_decision([USER], "escalated by rule: x")
    assert d.source == "cloud" and math.isnan(d.p_good) and d.edge_answer is None
    meta = decision_metadata(d, model="m", cost=None)
    assert meta == {"source": "cloud", "p_good": None, "scores": {},
                    "reason": "escalated by rule: x", "escalated_by_rule": True, "model": "m",
                    "cost": None, "degraded": False, "error": None}
    assert decision_metadata(d, model="e", cost=0.0, degraded=True)["source"] == "edge"


@pytest.mark.parametrize(("stop", "expected"), [
    (None, "The answer is 4"), ([], "The answer is 4"), ([" is"], "The answer"),
    (["4", " answer"], "The"), (["zz"], "The answer is 4"),
])
def test_truncate_at_stop(stop, expected):
    assert truncate_at_stop("The answer is 4", stop) == expected
