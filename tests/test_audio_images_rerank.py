"""Audio, images and rerank through hal0web: the `openai` SDK for audio and images, plain
HTTP for rerank. Two slots of each type, so a request that lands on the wrong one fails."""

from __future__ import annotations

import base64

import httpx
import pytest

from dispatch.models import ApiKey

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 64  # a 16 KB "recording"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(255 - i % 256 for i in range(4096))


def test_transcription_is_routed_by_its_form_field(fleet_sdk, fleet):
    raw = fleet_sdk.audio.transcriptions.with_raw_response.create(
        model="whisper-b", file=("talk.wav", WAV, "audio/wav")
    )
    assert raw.headers["x-hal0-slot"] == "stt-b"
    assert raw.parse().text == f"stt-b heard talk.wav ({len(WAV)} bytes) as whisper-b"
    sent = fleet["stt-b"].seen("/v1/audio/transcriptions")[-1]
    assert WAV in sent.body  # the file part as the client sent it
    assert not fleet["stt-a"].seen("/v1/audio/transcriptions")
    # response_format=text: a plain-text answer passes as it is.
    text = fleet_sdk.audio.transcriptions.create(
        model="whisper-a", file=("x.wav", WAV, "audio/wav"), response_format="text"
    )
    assert text.strip() == f"stt-a heard x.wav ({len(WAV)} bytes) as whisper-a"


def test_an_alias_rewrites_only_the_model_field(fleet, hal0):
    boundary = "hal0-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    body = (
        head
        + WAV
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper'.encode()
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="language"\r\n\r\nde'.encode()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = httpx.post(
        hal0.url + "/v1/audio/translations",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-hal0-resolution"] == "alias:stt-a"
    sent = fleet["stt-a"].seen("/v1/audio/translations")[-1]
    # Byte for byte the same body, only the field's value changed (and so its length).
    assert sent.body == body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-a\r\n")
    assert sent.headers["content-type"] == f"multipart/form-data; boundary={boundary}"
    assert sent.headers["content-length"] == str(len(body) + 2)


def test_a_form_without_a_model_goes_to_no_default_silently(fleet, hal0):
    r = httpx.post(
        hal0.url + "/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, timeout=10
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required"
    r = httpx.post(
        hal0.url + "/v1/audio/transcriptions",
        json={"model": "whisper-a"},
        timeout=10,
    )
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_speech_streams_the_audio_bytes_through(fleet_sdk, fleet):
    with fleet_sdk.audio.speech.with_streaming_response.create(
        model="voice-b", voice="alloy", input="hello"
    ) as response:
        assert response.headers["x-hal0-slot"] == "tts-b"
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    assert audio == b"".join(f"ID3 tts-b alloy voice-b {i};".encode() for i in range(3))


def test_images_generate_and_edit(fleet_sdk, fleet, hal0):
    made = fleet_sdk.images.generate(model="paint-b", prompt="a cat")
    assert base64.b64decode(made.data[0].b64_json) == b"img-b drew a cat as paint-b"
    edited = fleet_sdk.images.edit(model="paint", image=("cat.png", PNG, "image/png"), prompt="hat")
    assert (
        base64.b64decode(edited.data[0].b64_json)
        == f"img-a edited cat.png ({len(PNG)} bytes) as paint-a".encode()
    )
    assert PNG in fleet["img-a"].seen("/v1/images/edits")[-1].body
    # Variations (the SDK marks create_variation deprecated): plain multipart.
    r = httpx.post(
        hal0.url + "/v1/images/variations",
        data={"model": "paint-b"},
        files={"image": ("c.png", PNG, "image/png")},
        timeout=10,
    )
    assert r.headers["x-hal0-slot"] == "img-b"
    assert base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(b"img-b edited c.png")


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/reranking", "/rerank"])
def test_rerank_on_every_spelling(fleet, hal0, path):
    body = {"model": "rerank-b", "query": "q", "documents": ["a", "b", "c"]}
    r = httpx.post(hal0.url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-hal0-slot"] == "rr-b"
    data = r.json()
    assert data["slot"] == "rr-b" and len(data["results"]) == 3
    # The client's spelling, under the slot's API root (/rerank is llama.cpp's /v1/rerank).
    assert data["path"] == "/v1/" + path.removeprefix("/v1/").lstrip("/")
    assert not fleet["rr-a"].seen(data["path"])


def test_root_rerank_is_an_api_path_keyed_and_without_csrf(fleet, hal0):
    _, key = ApiKey.issue("rag")
    body = {"model": "rerank-a", "query": "q", "documents": ["a"]}
    r = httpx.post(hal0.url + "/rerank", json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(
        hal0.url + "/rerank", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert r.status_code == 200 and r.json()["slot"] == "rr-a"
    assert "authorization" not in fleet["rr-a"].seen("/v1/rerank")[-1].headers
    assert r.headers["x-request-id"]
    r = httpx.options(hal0.url + "/rerank", timeout=10)
    assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"


def test_a_model_on_the_wrong_kind_of_slot_is_endpoint_not_supported(fleet, hal0):
    r = httpx.post(
        hal0.url + "/v1/rerank",
        json={"model": "alpha", "query": "q", "documents": ["a"]},
        timeout=10,
    )
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "endpoint_not_supported"
    assert "llm-a" in err["message"] and "rerank" in err["message"]
    assert not fleet["llm-a"].seen("/v1/rerank")
