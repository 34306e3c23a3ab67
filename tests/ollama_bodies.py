"""Ollama request bodies for hypothesis: mostly what the API takes, with any JSON in every
field now and then (tests/test_ollama_translate.py, tests/test_ollama_fuzz.py)."""

from __future__ import annotations

from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON,
        "content": st.text(max_size=10) | JSON,
        "images": st.lists(st.sampled_from(["iVBORw0KGgo=", "/9j/4AAQ", "R0lGODlh"])) | JSON,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "function": st.fixed_dictionaries(
                        {"name": st.text(max_size=5)}, optional={"arguments": JSON}
                    )
                }
            )
        )
        | JSON,
        "tool_name": st.text(max_size=5) | JSON,
    },
)
OLLAMA_BODY = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
        "prompt": st.text(max_size=10) | JSON,
        "system": st.text(max_size=10) | JSON,
        "suffix": st.text(max_size=5) | JSON,
        "raw": st.booleans() | JSON,
        "images": JSON,
        "input": st.lists(st.text(max_size=5)) | JSON,
        "format": st.sampled_from(["json", "", {"type": "object"}]) | JSON,
        "think": st.sampled_from([True, False, "low", "high"]) | JSON,
        "options": st.dictionaries(
            st.sampled_from(
                ["temperature", "top_k", "top_p", "seed", "num_predict", "stop", "num_ctx"]
            ),
            JSON,
        )
        | JSON,
        "keep_alive": st.sampled_from([0, "5m", "0s", -1, "1h30m"]) | JSON,
        "tools": JSON,
        "stream": st.booleans() | st.none(),
        "dimensions": JSON,
    },
)
