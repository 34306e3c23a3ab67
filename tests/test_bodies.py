"""Only `model` changes in a forwarded body; every other byte stays as the client sent it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.bodies import parse, with_model
from dispatch.errors import ApiError


def test_rewrite_touches_only_the_model_value():
    raw = b'{ "messages" : [ {"content": "say \\"model\\": \\"x\\""} ] ,"model":"alias",\n "n": 1.50 }'
    out = with_model(parse(raw), "real/model")
    assert out == raw.replace(b'"alias"', b'"real/model"')


def test_same_model_returns_the_very_same_bytes():
    raw = b'{"model": "m",  "x": 1}'
    assert with_model(parse(raw), "m") is raw


def test_missing_model_is_added_in_front():
    assert json.loads(with_model(parse(b'{"messages": []}'), "d")) == {"model": "d", "messages": []}
    assert json.loads(with_model(parse(b"  { }"), "d")) == {"model": "d"}


def test_nested_model_keys_fall_back_to_a_full_reencode():
    raw = b'{"tools": [{"model": "alias"}], "model": "alias"}'
    out = json.loads(with_model(parse(raw), "real"))
    assert out == {"tools": [{"model": "alias"}], "model": "real"}


def test_null_model_is_rewritten():
    assert json.loads(with_model(parse(b'{"model": null, "a": 1}'), "d")) == {"model": "d", "a": 1}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"nope", "invalid_json"),
        (b"[1]", "invalid_request_error"),
        (b'{"model": 1}', "invalid_model"),
        (b'{"stream": 1}', "invalid_request_error"),
    ],
)
def test_parse_errors(raw, code):
    with pytest.raises(ApiError) as exc:
        parse(raw)
    assert exc.value.code == code and exc.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    body=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
    model=st.text(min_size=1, max_size=10),
    new=st.text(min_size=1, max_size=10),
    indent=st.sampled_from([None, 1, 2]),
)
def test_rewrite_keeps_the_json_meaning(body, model, new, indent):
    body = {**body, "model": model}
    raw = json.dumps(body, indent=indent, ensure_ascii=bool(indent)).encode()
    out = json.loads(with_model(parse(raw), new))
    assert out == {**body, "model": new}
