"""The wire protocol objects: each one's error body, stream error event, between-events test
and token-count names; and which protocol an upstream's stream is read in."""

from __future__ import annotations

import json

import pytest

from dispatch.routing.endpoints import BY_NAME
from dispatch.wire.framing import NDJSON, SSE
from dispatch.wire.protocols import ANTHROPIC, OLLAMA, OPENAI, Usage, streamed_as


def test_error_bodies_are_each_protocols_shape():
    assert json.loads(OPENAI.error_body(404, "model_not_found", "no", "model")) == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(OPENAI.error_body(502, "upstream_error", "x"))["error"]["type"] == (
        "server_error"
    )
    assert json.loads(ANTHROPIC.error_body(404, "model_not_found", "no")) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no", "code": "model_not_found"},
    }
    assert json.loads(ANTHROPIC.error_body(503, "slot_unavailable", "x"))["error"]["type"] == (
        "overloaded_error"
    )
    assert json.loads(OLLAMA.error_body(404, "model_not_found", "no")) == {
        "error": "no",
        "code": "model_not_found",
    }


def test_a_credential_in_a_quoted_url_never_reaches_the_client():
    said = "Slot 'a' at http://user:secret@host/v1 answered 500"
    for protocol in (OPENAI, OLLAMA):
        assert b"secret" not in protocol.error_body(502, "upstream_error", said)


def test_error_events_are_one_whole_event_of_the_streams_framing():
    event = OPENAI.error_event("upstream_reset", "cut")
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[6:])["error"]["code"] == "upstream_reset"
    named = ANTHROPIC.error_event("upstream_reset", "cut")
    assert named.startswith(b"event: error\ndata: {")
    assert json.loads(named.split(b"data: ", 1)[1])["type"] == "error"
    line = OLLAMA.error_event("upstream_reset", "cut")
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"error": "cut", "code": "upstream_reset"}


def test_an_event_cut_short_is_ended_before_the_error():
    assert OPENAI.error_event("e", "m", tail=b'{"a"').startswith(b"\n\ndata: ")
    assert OPENAI.error_event("e", "m", tail=b"}\n\n").startswith(b"data: ")
    assert OLLAMA.error_event("e", "m", tail=b'{"a"').startswith(b'\n{"error"')
    assert OLLAMA.error_event("e", "m", tail=b"}\n").startswith(b'{"error"')


@pytest.mark.parametrize(
    ("tail", "sse", "ndjson"),
    [
        (b"", True, True),
        (b"}\n\n", True, True),
        (b"\r\n\r\n", True, True),
        (b"}\r\r", True, False),
        (b"}\n", False, True),
        (b"}\r\n", False, True),
        (b'"a"}', False, False),
    ],
)
def test_between_events(tail, sse, ndjson):
    assert SSE.between_events(tail) is sse
    assert NDJSON.between_events(tail) is ndjson
    assert OPENAI.between_events(tail) is sse and ANTHROPIC.between_events(tail) is sse
    assert OLLAMA.between_events(tail) is ndjson


def test_usage_names_of_each_protocol():
    chat = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    responses = b'{"usage": {"input_tokens": 5, "output_tokens": 6}}'
    assert OPENAI.usage_in_answer(chat) == Usage(3, 4)
    assert OPENAI.usage_in_answer(responses) == Usage(5, 6)
    assert ANTHROPIC.usage_in_answer(responses) == Usage(5, 6)
    ollama = b'{"response": "hi", "done": true, "prompt_eval_count": 7, "eval_count": 8}'
    assert OLLAMA.usage_in_answer(ollama) == Usage(7, 8)
    assert OLLAMA.usage_in_answer(chat) == Usage(None, None)
    stream = b'{"response": "h", "done": false}\n' + ollama + b"\n"
    assert OLLAMA.usage_marker in stream
    assert OLLAMA.usage_in_stream(stream) == Usage(7, 8)
    sse = (
        b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 9}}\n\n'
    )
    assert ANTHROPIC.usage_in_stream(sse) == Usage(None, 9)


def test_a_stream_is_read_in_the_protocol_its_content_type_frames():
    assert streamed_as(OPENAI, "text/event-stream; charset=utf-8") is OPENAI
    assert streamed_as(ANTHROPIC, "text/event-stream") is ANTHROPIC
    assert streamed_as(OPENAI, "application/x-ndjson") is OLLAMA
    assert streamed_as(OPENAI, "application/json") is None
    assert streamed_as(OLLAMA, "audio/mpeg") is None


def test_the_endpoint_table_names_each_paths_protocol():
    assert BY_NAME["chat/completions"].protocol is OPENAI
    assert BY_NAME["messages"].protocol is ANTHROPIC
    assert BY_NAME["messages/count_tokens"].protocol is ANTHROPIC
    assert BY_NAME["messages"].key_header == ANTHROPIC.key_header == "x-api-key"
