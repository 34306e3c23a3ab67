"""The one reader of outside JSON (issue 24): what orjson reads, lone surrogate escapes too,
never deeper than MAX_DEPTH levels, and nothing but a ValueError for any text."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dispatch.lib import json_reader
from dispatch.lib.json_reader import MAX_DEPTH, TooDeep, loads


def nested(depth: int, inner: bytes = b"1", kinds: bytes = b"[{") -> bytes:
    """``inner`` inside ``depth`` arrays and objects, alternating as ``kinds`` says."""
    opens, closes = [], []
    for level in range(depth):
        kind = kinds[level % len(kinds)]
        opens.append(b"[" if kind == ord("[") else b'{"k":')
        closes.append(b"]" if kind == ord("[") else b"}")
    return b"".join(opens) + inner + b"".join(reversed(closes))


def depth_of(value: object) -> int:
    """How deep ``value`` nests (without recursing: a test's stack is deep already)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack += ((c, depth + 1) for c in (item.values() if isinstance(item, dict) else item))
    return deepest


ESCAPES = [b'"plain"', b'"\\u00e9"', b'"\\ud83d"', b'"\\udc00"', b'"\\ud83d\\ude00"']


@pytest.mark.parametrize("inner", ESCAPES)
@pytest.mark.parametrize("kinds", [b"[", b"{", b"[{"])
def test_the_bound_is_exact_with_and_without_escapes(inner, kinds):
    value = loads(nested(MAX_DEPTH, inner, kinds))
    assert depth_of(value) == MAX_DEPTH
    assert value == json.loads(nested(MAX_DEPTH, inner, kinds))  # the surrogate kept as sent
    with pytest.raises(TooDeep) as exc:
        loads(nested(MAX_DEPTH + 1, inner, kinds))
    assert str(MAX_DEPTH) in str(exc.value) and exc.value.limit == MAX_DEPTH


@pytest.mark.parametrize("inner", ESCAPES)
@pytest.mark.parametrize("depth", [1001, 1024, 1025, 1100, 5000, 100_000])
def test_deeper_than_anything_is_too_deep_never_a_recursion_error(depth, inner):
    # The measured 500s: past ~1,000 levels with a \u escape the standard library's parser
    # ran out of Python's stack (RecursionError).
    with pytest.raises(TooDeep):
        loads(nested(depth, inner))
    with pytest.raises(TooDeep):  # cut short too: deeper than the bound before it is invalid
        loads(nested(depth, inner)[:-10])


def test_a_lone_surrogate_is_read_as_the_servers_read_it():
    assert loads(b'{"a": "cut \\ud83d"}') == {"a": "cut \ud83d"}
    assert loads('{"a": "\\udc00"}') == {"a": "\udc00"}  # text too (a tool call's arguments)
    # An escaped backslash before a u is no escape: text as it is, next to a real surrogate.
    assert loads(b'["\\\\ud83d", "\\ud83d"]') == ["\\ud83d", "\ud83d"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN, "b": "\\ud83d"}',
        b'[Infinity, "\\udc00"]',
        b'["\\ud83d" "x"]',
        # Past a double's range: refused, with a surrogate escape as without one (the standard
        # library would read inf).
        b'{"k\\ud800\\udc00": 1E400}',
    ],
)
def test_what_is_not_json_stays_refused_with_orjsons_words(raw):
    with pytest.raises(orjson.JSONDecodeError) as exc:
        loads(raw)
    with pytest.raises(orjson.JSONDecodeError) as plain:
        orjson.loads(raw)
    assert str(exc.value) == str(plain.value)


def test_orjson_says_depth_in_the_words_the_reader_knows():
    # The reader tells orjson's depth error by its message: a new wording fails here first.
    with pytest.raises(orjson.JSONDecodeError) as exc:
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    assert exc.value.msg == json_reader._ORJSON_TOO_DEEP


def test_many_brackets_shallow_are_read_whatever_the_size():
    # More brackets than MAX_DEPTH: the wrapped reading, below and above the size at which
    # counting stops.
    for count in (MAX_DEPTH + 1, 40_000):
        raw = b"[" + b",".join([b'{"a": [1, {"b": "\\ud83d"}]}'] * count) + b"]"
        assert loads(raw) == json.loads(raw)
        assert loads(raw.replace(b"\\ud83d", b"x")) == orjson.loads(raw.replace(b"\\ud83d", b"x"))


# A string full of brackets: the text is read wrapped (more brackets than MAX_DEPTH), while
# its structure is the other tokens'.
BRACKETS = b'"' + b"[{" * MAX_DEPTH + b'"'
# A text of tokens that make and break structure; padded with brackets (or not) so that
# both readings (as it is, and wrapped) see it.
TOKENS = st.sampled_from(
    [b"[", b"]", b"{", b"}", b",", b":", b"1", b'"k"', b'"\\ud83d"', b'"\\u00e9"', b" ", b"x"]
)
TOKENS = TOKENS | st.just(BRACKETS)
TEXTS = st.lists(TOKENS, max_size=30).map(b"".join)


@given(text=TEXTS, pad=st.sampled_from([0, 0, 300, MAX_DEPTH - 2, MAX_DEPTH + 1, 2000]))
@example(text=b"1],[2", pad=MAX_DEPTH)
@example(text=BRACKETS + b"],[2", pad=0)  # one text inside the reader's arrays, two outside
@example(text=b"[" + BRACKETS + b"]]],[[[2", pad=0)
@example(text=b"]", pad=MAX_DEPTH)
@example(text=b"", pad=MAX_DEPTH)
@example(text=b'"\\ud83d"]],[[1', pad=MAX_DEPTH)
def test_any_text_reads_as_the_standard_library_within_the_bound(text, pad):
    """Whatever the text: the reader agrees with the standard library (which reads lone
    surrogates as orjson does not) on every JSON text within the bound, refuses every other
    with a ValueError, and says TooDeep for a valid text past it."""
    raw = b"[" * pad + text + b"]" * pad
    try:
        expected = json.loads(raw, parse_constant=lambda name: {}[name])
    except (ValueError, KeyError, RecursionError):
        expected = ValueError
    try:
        got = loads(raw)
    except TooDeep:
        assert expected is ValueError or depth_of(expected) > MAX_DEPTH
        return
    except ValueError:
        assert expected is ValueError
        return
    assert expected is not ValueError and got == expected
    assert depth_of(got) <= MAX_DEPTH


async def test_a_probe_answer_nested_past_the_limit_reads_as_no_json() -> None:
    """The watcher's probes read a server's answer with the same bounded reader: a deep
    answer is "not JSON" to them, never a RecursionError out of the probe loop."""
    import httpx

    from dispatch.upstream.client import Upstream

    deep = b"[" * 5000 + b'"\\u00e9"' + b"]" * 5000
    client = Upstream(
        httpx.MockTransport(lambda request: httpx.Response(200, stream=httpx.ByteStream(deep)))
    )
    result = await client.probe("http://127.0.0.1:9/v1/models", 5.0, 1 << 20)
    assert (result.status, result.body) == (200, None)
