"""SSE event encoding (`orchestrator.streaming.sse`)."""

from __future__ import annotations

import json

import pytest

from orchestrator.streaming import sse


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "obj",
    [
        {"text": "plain", "output_ids": [1, 2, 3], "meta_info": {"e2e_latency": 0.012345}},
        {"text": "line\u2028sep\u0085nel and caf\u00e9 \U0001f600", "output_ids": []},
        {"nested": {"a": None, "b": [True, False], "c": 'quote " and \\ and \n\x0b\x1c\u2029'}},
        {"text": "a lone surrogate \ud800", "big": 2**70},  # orjson refuses both
        {1: "a non-string key"},
    ],
)
def test_an_event_is_one_line_that_round_trips(obj):
    event = sse(obj)
    assert event.startswith("data: ") and event.endswith("\n\n")
    payload = event[len("data: ") : -2]
    assert len(payload.splitlines()) == 1  # no raw U+2028 / U+0085 / newline splits it
    assert json.loads(payload) == json.loads(json.dumps(obj))  # what `json` would send
