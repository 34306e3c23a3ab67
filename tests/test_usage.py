"""Token counts read from what upstreams send: a JSON answer's usage, a stream's usage chunk."""

from __future__ import annotations

import orjson
import pytest

from dispatch.api.relay import answer_usage as _usage
from dispatch.api.relay import stream_usage as _stream_usage
from dispatch.observability.decisions import DecisionRecord


def rec() -> DecisionRecord:
    return DecisionRecord(request_id="r", endpoint="chat/completions", model="m")


def test_json_answer_usage_nested_details_and_a_model_quoting_the_key():
    answer = {
        "choices": [{"message": {"content": 'she wrote {"usage": {"prompt_tokens": 999}}'}}],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    r = rec()
    _usage(r, orjson.dumps(answer))
    assert (r.prompt_tokens, r.completion_tokens) == (11, 5)


def test_big_embeddings_answer_with_usage_at_the_end():
    answer = {"data": [{"embedding": [0.5] * 200_000}], "usage": {"prompt_tokens": 4}}
    r = rec()
    _usage(r, orjson.dumps(answer))
    assert (r.prompt_tokens, r.completion_tokens) == (4, None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "many", "completion_tokens": true}}',
        b'{"usage": {"prompt_tokens": -3}}',
        b'{"usage": {"prompt_tokens": 1',
        b"not json at all",
    ],
)
def test_odd_usage_is_ignored(body):
    r = rec()
    _usage(r, body)
    assert (r.prompt_tokens, r.completion_tokens) == (None, None)


def test_stream_usage_chunk():
    chunk = (
        b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
    )
    r = rec()
    _stream_usage(r, chunk)
    assert (r.prompt_tokens, r.completion_tokens) == (7, 3)


def test_responses_and_anthropic_name_their_counts_input_and_output():
    r = rec()
    _usage(
        r,
        b'{"id": "resp_1", "object": "response", "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}',
    )
    assert (r.prompt_tokens, r.completion_tokens) == (3, 4)
    r = rec()
    _usage(r, b'{"type": "message", "usage": {"input_tokens": 9, "output_tokens": 2}}')
    assert (r.prompt_tokens, r.completion_tokens) == (9, 2)
