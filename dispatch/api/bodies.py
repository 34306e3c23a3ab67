"""Reading a request body just far enough to route it, and rewriting only ``model``.

The body is forwarded byte-for-byte. When the decision sends a different model name upstream
(an alias, a ``slot/model`` id, a default), only the value of the top-level ``model`` key
changes: it is spliced into the original bytes, which are never re-encoded, whatever else
the body holds (a nested ``model`` key, big integers, escapes, odd spacing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from dispatch.lib.json_reader import MAX_DEPTH, TooDeep, loads
from dispatch.wire.errors import ApiError

# The tokens that give a JSON text its structure: whole strings (so nothing inside one is
# mistaken for structure) and the structural characters. Numbers, true/false/null and
# whitespace lie between tokens and are skipped by the regex engine, not by Python. Inside
# a nested value only strings and brackets matter (its commas and colons are not ours), so
# a second pattern skips those too: an array of 8,000 token ids is then two tokens, not
# 8,000. (Strings as an unrolled loop: an alternation per character is ~10x slower.)
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
# Each pattern skips the bytes before its next token with one negated class, the regex
# engine's fastest loop (a search() tries the whole alternation at every byte).
_TOP_TOKEN = re.compile(rb'[^"{}\[\],:]*(' + _STRING + rb"|[{}\[\],:])")
_NESTED_TOKEN = re.compile(rb'[^"{}\[\]]*(' + _STRING + rb"|[{}\[\]])")
_QUOTE, _COMMA, _COLON = ord('"'), ord(","), ord(":")
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
_JSON_WS = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class ParsedBody:
    raw: bytes
    data: dict[str, Any]
    model: str | None
    stream: bool


def parse(raw: bytes) -> ParsedBody:
    if not raw.strip():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        data = loads(raw)
    except TooDeep:  # (the bound every reader of outside JSON holds to: lib.json_reader)
        raise ApiError(
            400,
            "json_too_deep",
            f"The request body nests arrays and objects deeper than {MAX_DEPTH} levels, "
            "hal0web's limit; send it less deeply nested.",
        ) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "invalid_request_error",
            f"The request body must be a JSON object, not {type(data).__name__}.",
        )
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(
            400,
            "invalid_model",
            f"`model` must be a string, not {type(model).__name__}.",
            param="model",
        )
    # The OpenAI schema allows "stream": null, meaning the default (no stream).
    stream = data.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(
            400, "invalid_request_error", "`stream` must be true or false.", param="stream"
        )
    return ParsedBody(raw, data, model, stream)


def top_level_spans(raw: bytes, key: str) -> list[tuple[int, int]]:
    """Where the values of ``key`` in the top-level object of ``raw`` (valid JSON) start and
    end. Keys are compared decoded, so ``"mod\\u0065l"`` is ``model``; nested keys of the
    same name are not top-level and are left out."""
    spans: list[tuple[int, int]] = []
    depth = 0
    expect_key = False
    matched = False  # the current top-level pair's key is `key`
    value_from = 0
    quoted = orjson.dumps(key)
    pos = 0
    while True:
        m = (_TOP_TOKEN if depth <= 1 else _NESTED_TOKEN).match(raw, pos)
        if m is None:
            return spans
        pos = m.end()
        c = raw[m.start(1)]
        if c == _QUOTE:
            if depth == 1 and expect_key:
                expect_key = False
                token = m.group(1)
                matched = token == quoted or (b"\\" in token and loads(token) == key)
            continue
        if c == _COLON:
            value_from = pos  # (only seen at depth 1)
        elif c == _COMMA:
            if matched:
                spans.append(_strip(raw, value_from, m.start(1)))
            matched, expect_key = False, True
        elif c in _OPEN:
            depth += 1
            if depth == 1:
                expect_key = True
        else:  # a closing bracket
            if depth == 1 and matched:
                spans.append(_strip(raw, value_from, m.start(1)))
                matched = False
            depth -= 1


def _strip(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """The span without the JSON whitespace around the value."""
    while raw[start] in _JSON_WS:
        start += 1
    while raw[end - 1] in _JSON_WS:
        end -= 1
    return start, end


# A literal `"model"` followed by a colon: the regex engine finds it with a fast literal
# scan. It is the key of some object when the byte before it (past whitespace) is `{` or
# `,`: in valid JSON a quote there cannot be inside a string (quotes in strings are
# escaped) nor close one (a string is followed by `,` `:` `}` `]`, never a bare word).
_MODEL_LITERAL = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*')
_STRING_AT = re.compile(_STRING)
# A key spelt with escapes is `model` only if one of its letters (m o d e l) is escaped:
# without any of those escapes in the body, the plain spelling is the only one. (Any other
# \u escape, an accented letter in a prompt, says nothing about the key.)
_MODEL_LETTER_ESCAPE = re.compile(rb"\\u006[45cdfCDF]")


def _after_brace_or_comma(raw: bytes, at: int) -> bool:
    at -= 1
    while at >= 0 and raw[at] in _JSON_WS:
        at -= 1
    return at >= 0 and raw[at] in b"{,"


def _model_spans(raw: bytes) -> list[tuple[int, int]]:
    """The spans of the top-level ``model`` values.

    The common case, one ``model`` key in the whole body spelt plainly, costs two literal
    scans (~0.1 ms for 64 KB); a nested ``model`` key (``metadata.model``) or an escaped
    m/o/d/e/l anywhere needs the structural walk (``top_level_spans``, ~1 ms for 64 KB).
    """
    keys = [m for m in _MODEL_LITERAL.finditer(raw) if _after_brace_or_comma(raw, m.start())]
    if len(keys) == 1 and _MODEL_LETTER_ESCAPE.search(raw) is None:
        start = keys[0].end()
        string = _STRING_AT.match(raw, start)
        return [(start, string.end() if string is not None else start + len(b"null"))]
    return top_level_spans(raw, "model")


def with_model(body: ParsedBody, upstream_model: str) -> bytes:
    """The body with its top-level ``model`` set to ``upstream_model``, all else unchanged."""
    if body.model == upstream_model:
        return body.raw
    value = orjson.dumps(upstream_model)
    raw = body.raw
    if "model" not in body.data:
        # Absent: added first, right after the opening brace.
        brace = raw.index(b"{") + 1
        sep = b"" if raw[brace:].lstrip().startswith(b"}") else b","
        return raw[:brace] + b'"model":' + value + sep + raw[brace:]
    # Every top-level occurrence: parsers differ on which of duplicate keys wins.
    out: list[bytes] = []
    done = 0
    for start, end in _model_spans(raw):
        out += (raw[done:start], value)
        done = end
    out.append(raw[done:])
    return b"".join(out)


# --- multipart/form-data (audio transcriptions, image edits) --------------------------------
# The body is a file and a few fields. Only the parts' headers are read, to find the `model`
# field; the file's bytes are skipped by a find() for the next delimiter, never decoded or
# re-encoded, and an alias rewrite replaces only the bytes of that field's value.

_FORM_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)
# `; name=` (not `; filename=`: there the `name=` follows "file", not the separator).
_PART_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;[ \t]*name=(?:"([^"]*)"|([^;\s]+))')
_PART_FILE = re.compile(rb"(?im)^content-disposition:[^\r\n]*;[ \t]*filename\*?=")


@dataclass(frozen=True, slots=True)
class FormBody:
    raw: bytes
    boundary: bytes
    model: str | None
    # Where each `model` field's value lies in `raw` (parsers differ on which of two wins).
    model_spans: tuple[tuple[int, int], ...]
    first_part: int  # where the first delimiter starts: a missing `model` goes before it


def _bad_form(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def parse_form(raw: bytes, content_type: str) -> FormBody:
    """Find the ``model`` field of a multipart/form-data body without re-encoding any of it."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise _bad_form(
            f"This endpoint takes multipart/form-data (a file and its fields), not "
            f"{media or 'a body without a Content-Type'}."
        )
    m = _FORM_BOUNDARY.search(content_type)
    if m is None:
        raise _bad_form("The multipart/form-data Content-Type names no boundary.")
    boundary = (m.group(1) or m.group(2)).encode("latin-1")
    delimiter = b"--" + boundary
    between = b"\r\n" + delimiter  # every delimiter after the first follows a line break
    first = pos = raw.find(delimiter)
    if pos < 0:
        raise _bad_form("The multipart body has no part (its boundary never occurs).")
    spans: list[tuple[int, int]] = []
    model: str | None = None
    while True:
        pos += len(delimiter)
        if raw.startswith(b"--", pos):  # the close delimiter: the last part has ended
            break
        head_end = raw.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise _bad_form("A part of the multipart body has no end to its headers.")
        start = head_end + 4
        end = raw.find(between, start)
        if end < 0:
            raise _bad_form("The multipart body ends without its closing boundary.")
        head = raw[pos:head_end]
        name = _PART_NAME.search(head)
        # The `model` field; a file part that happens to be named so is not it.
        is_model = name is not None and (name.group(1) or name.group(2)) == b"model"
        if is_model and _PART_FILE.search(head) is None:
            try:
                value = raw[start:end].decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(
                    400, "invalid_model", "`model` must be UTF-8 text.", param="model"
                ) from None
            spans.append((start, end))
            if model is None:
                model = value
        pos = end + 2  # at the next delimiter
    return FormBody(raw, boundary, model, tuple(spans), first)


def with_form_model(form: FormBody, upstream_model: str) -> bytes:
    """The body with its ``model`` field set to ``upstream_model``; every other byte as sent
    (the boundary, the file, the other fields). Only the Content-Length changes."""
    if form.model == upstream_model and len(form.model_spans) == 1:
        return form.raw
    value = upstream_model.encode()
    raw = form.raw
    if not form.model_spans:
        # Absent (a default slot's model): a part of its own, first.
        part = (
            b"--"
            + form.boundary
            + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            + value
            + b"\r\n"
        )
        return raw[: form.first_part] + part + raw[form.first_part :]
    out: list[bytes] = []
    done = 0
    for start, end in form.model_spans:
        out += (raw[done:start], value)
        done = end
    out.append(raw[done:])
    return b"".join(out)
