"""Only `model` changes in a forwarded body; every other byte stays as the client sent it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.api.bodies import parse, with_model
from dispatch.wire.errors import ApiError


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
    body.pop("stream", None)  # (anything but a boolean there is a 400: tested above)
    body = {**body, "model": model}
    raw = json.dumps(body, indent=indent, ensure_ascii=bool(indent)).encode()
    out = json.loads(with_model(parse(raw), new))
    assert out == {**body, "model": new}


# --- issue 13: the body is spliced, never re-encoded ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # A nested "model" key used to make the whole body re-encoded: big integers lost
        # digits, -1e2 became -100.0, escapes were decoded.
        (
            b'{"metadata": {"model": "alias"}, "model": "alias",'
            b' "seed": 123456789012345678901234567890, "t": -1e2, "s": "\\u00e9"}',
            b'{"metadata": {"model": "alias"}, "model": "real",'
            b' "seed": 123456789012345678901234567890, "t": -1e2, "s": "\\u00e9"}',
        ),
        # The nested one first, in a list, and the top-level one last.
        (
            b'{"tools":[{"model":"alias"}],\n\t"n":1.50,"model"  :  "alias"}',
            b'{"tools":[{"model":"alias"}],\n\t"n":1.50,"model"  :  "real"}',
        ),
        # The top-level key written with an escape is still the top-level key.
        (
            b'{"x": {"model": 1}, "mod\\u0065l": "alias"}',
            b'{"x": {"model": 1}, "mod\\u0065l": "real"}',
        ),
        # A null model with a nested one.
        (b'{"a": {"model": null}, "model": null}', b'{"a": {"model": null}, "model": "real"}'),
        # Absent at top level, present nested: added in front, the rest untouched.
        (b'{"a": {"model": "x"}, "n": 1E+2}', b'{"model":"real","a": {"model": "x"}, "n": 1E+2}'),
    ],
)
def test_rewrite_splices_the_top_level_value_whatever_is_nested(raw, expected):
    assert with_model(parse(raw), "real") == expected


def test_duplicate_top_level_model_keys_are_all_rewritten():
    # Parsers differ on which duplicate wins (first or last): send none of the old value.
    raw = b'{"model": "alias", "x": 1, "model": "alias"}'
    assert with_model(parse(raw), "real") == b'{"model": "real", "x": 1, "model": "real"}'


# Raw JSON text, written the many ways a client may write it, so the property test below
# checks bytes, not meaning.
_ws = st.sampled_from(["", " ", "\n", "\t", "  ", "\r\n"])
# (Within a double's range: past it, 1E400, orjson refuses the number, tests/test_json_reader.py.)
_numbers = st.from_regex(r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,2})?\Z")


def _escape(ch: str, how: int) -> str:
    if ch in '"\\' or ord(ch) < 0x20 or how == 1:
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else json.dumps(ch)[1:-1]
    return ch


@st.composite
def _json_string(draw, text=None):
    value = draw(st.text(max_size=6)) if text is None else text
    hows = draw(st.lists(st.integers(0, 1), min_size=len(value), max_size=len(value)))
    return '"' + "".join(_escape(c, h) for c, h in zip(value, hows, strict=True)) + '"'


_scalars = st.one_of(
    _numbers, st.sampled_from(["true", "false", "null"]), _json_string(), _json_string("model")
)


def _raw_object(children):
    key = st.one_of(_json_string(), _json_string("model"))
    pair = st.tuples(_ws, key, _ws, _ws, children, _ws).map(
        lambda p: "".join(p[:3]) + ":" + "".join(p[3:])
    )
    return st.lists(pair, max_size=3).map(lambda ps: "{" + ",".join(ps) + "}")


_raw_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        _raw_object(children),
        st.lists(st.tuples(_ws, children, _ws).map("".join), max_size=3).map(
            lambda xs: "[" + ",".join(xs) + "]"
        ),
    ),
    max_leaves=12,
)


@st.composite
def _bodies(draw):
    """(raw body, start and end of the top-level model value) built from raw pieces."""
    others = draw(
        st.lists(
            # (not "stream": anything but a boolean or null there is a 400, tested above)
            st.tuples(_json_string(), _raw_values).filter(
                lambda kv: json.loads(kv[0]) not in ("model", "stream")
            ),
            max_size=4,
            unique_by=lambda kv: json.loads(kv[0]),
        )
    )
    model_key = draw(_json_string("model"))
    model_value = draw(st.one_of(_json_string(), st.just("null")))
    at = draw(st.integers(0, len(others)))
    parts = [draw(_ws) + k + draw(_ws) + ":" + draw(_ws) + v + draw(_ws) for k, v in others]
    head = "{" + ",".join([*parts[:at], ""]) if at else "{"
    before = draw(_ws) + model_key + draw(_ws) + ":" + draw(_ws)
    after = draw(_ws) + ("," + ",".join(parts[at:]) if at < len(parts) else "") + "}"
    raw = draw(_ws) + head + before
    start = len(raw.encode())
    raw += model_value
    end = len(raw.encode())
    return (raw + after + draw(_ws)).encode(), start, end


@given(case=_bodies(), new=st.text(min_size=1, max_size=10))
def test_property_the_body_upstream_is_the_body_sent_except_the_one_value(case, new):
    raw, start, end = case
    body = parse(raw)
    out = with_model(body, new)
    if body.model == new:
        assert out == raw
    else:
        assert out == raw[:start] + json.dumps(new, ensure_ascii=False).encode() + raw[end:]


# --- issue 13: accept what the upstream would accept ---------------------------------------


def test_a_lone_surrogate_passes_untouched():
    # What JavaScript's JSON.stringify writes for a string cut in the middle of an emoji.
    raw = b'{"model": "alias", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    body = parse(raw)
    assert body.model == "alias"
    assert with_model(body, "real") == raw.replace(b'"alias"', b'"real"')


def test_a_lone_surrogate_in_the_model_itself_is_still_parsed():
    assert parse(b'{"model": "x\\udc00"}').model == "x\udc00"


@pytest.mark.parametrize(
    "raw", [b'{"model": "m", "x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}']
)
def test_non_json_constants_are_still_refused(raw):
    with pytest.raises(ApiError) as exc:
        parse(raw)
    assert exc.value.code == "invalid_json"


def test_stream_null_is_treated_as_absent():
    assert parse(b'{"model": "m", "stream": null}').stream is False


# --- issue 15: multipart/form-data, only the `model` field ---------------------------------

from dispatch.api.bodies import parse_form, with_form_model  # noqa: E402

BOUNDARY = "----hal0Boundary7MA4YWxk"
FILE = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"  # binary, with a fake delimiter


def _form(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        extra = "\r\nContent-Type: application/octet-stream" if filename else ""
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}{extra}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


CT = f"multipart/form-data; boundary={BOUNDARY}"


def test_the_model_field_is_found_past_a_binary_file():
    raw = _form(("file", FILE, "a.wav"), ("model", b"whisper", None), ("language", b"de", None))
    form = parse_form(raw, CT)
    assert form.model == "whisper"
    out = with_form_model(form, "whisper-large-v3")
    assert out == raw.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-large-v3\r\n")
    assert with_form_model(form, "whisper") is raw


def test_a_file_part_named_model_is_not_the_field_and_a_quoted_boundary_is_read():
    raw = _form(("model", b"binary", "model.bin"), ("model", b"m1", None))
    form = parse_form(raw, f'multipart/form-data; boundary="{BOUNDARY}"')
    assert form.model == "m1" and len(form.model_spans) == 1


def test_a_missing_model_field_is_added_as_the_first_part():
    import email
    from email import policy

    raw = _form(("file", FILE, "a.wav"))
    form = parse_form(raw, CT)
    assert form.model is None
    out = with_form_model(form, "d")
    assert out.endswith(raw)
    message = email.message_from_bytes(
        f"Content-Type: {CT}\r\n\r\n".encode() + out, policy=policy.HTTP
    )
    parts = list(message.iter_parts())
    assert parts[0].get_param("name", header="content-disposition") == "model"
    assert parts[0].get_payload(decode=True) == b"d"
    assert parts[1].get_payload(decode=True) == FILE


@pytest.mark.parametrize(
    ("raw", "content_type", "words"),
    [
        (b"{}", "application/json", "multipart/form-data"),
        (b"x", "multipart/form-data", "no boundary"),
        (b"nothing here", CT, "no part"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=model".encode(), CT, "headers"),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm'.encode(),
            CT,
            "closing boundary",
        ),
    ],
)
def test_bad_forms_are_400(raw, content_type, words):
    with pytest.raises(ApiError) as exc:
        parse_form(raw, content_type)
    assert exc.value.status == 400 and words in exc.value.message
