import httpx


def test_seed_routing(seed_slots, hal0, fake_pair):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = c.post(
            "/v1/chat/completions", json={"model": "qwen3-coder-reap-25b-a3b-q5km", "messages": []}
        )
        assert r.status_code == 200, r.text
        assert r.json()["slot"] == "agent-hermes"
        assert r.headers["x-hal0-slot"] == "agent-hermes"
        r = c.post(
            "/v1/chat/completions",
            json={"model": "qwen3-coder-40b", "stream": True, "messages": []},
        )
        assert r.status_code == 200
        assert r.headers["x-hal0-slot"] == "primary"
        assert "hello from primary" in r.text
        r = c.get("/v1/models")
        print(r.json())
