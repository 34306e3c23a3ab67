"""How llama.cpp's llama-server is built for the demo: portably, whatever the CPU reports
(issue 11), offline, and kept under a key of its flags."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.llama_servers import llama_server_binary
from tools import llama_build

# What an Intel Xeon with AVX-512 and AMX reports (the machine of issue 11), and a plain
# AVX2 desktop: both must get the same build, since neither build may use AVX-512 or AMX.
XEON_AMX = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx "
    "avx2 fma f16c bmi2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 "
    "amx_tile amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu\n"
)
AVX2_DESKTOP = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c\n"
OLD_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt\n"


def _options(args: str) -> dict[str, str]:
    return dict(re.findall(r"-D(\w+)=(\w+)", args))


def test_a_cpu_that_reports_amx_gets_no_native_avx512_or_amx_code() -> None:
    build = llama_build.choose("x86_64", llama_build.cpu_flags(XEON_AMX))
    options = _options(build.cmake_args)
    assert options["GGML_NATIVE"] == "OFF"
    assert "-march=native" not in build.cmake_args
    for name, value in options.items():
        if "AVX512" in name or "AMX" in name or "VNNI" in name:
            assert value == "OFF", name
    assert {options[n] for n in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")} == {"ON"}
    # One class of machine, one wheel: AVX-512 and AMX never change the build or its key.
    assert build == llama_build.choose("x86_64", llama_build.cpu_flags(AVX2_DESKTOP))


def test_a_cpu_without_avx2_gets_the_plain_x86_64_baseline() -> None:
    build = llama_build.choose("x86_64", llama_build.cpu_flags(OLD_CPU))
    options = _options(build.cmake_args)
    assert build.baseline == "x86-64"
    assert options["GGML_NATIVE"] == "OFF" and options["GGML_AVX2"] == "OFF"
    assert options["GGML_AVX"] == "OFF"


def test_other_architectures_build_without_native_flags() -> None:
    build = llama_build.choose("aarch64", frozenset())
    assert _options(build.cmake_args) == {"GGML_NATIVE": "OFF"}


def test_every_build_is_offline_static_and_release() -> None:
    build = llama_build.choose("x86_64", llama_build.cpu_flags(XEON_AMX))
    options = _options(" ".join(build.all_args))
    assert options["CMAKE_BUILD_TYPE"] == "Release"
    assert options["BUILD_SHARED_LIBS"] == "OFF"  # one self-contained binary
    # The web UI would be downloaded from Hugging Face, HTTPS needs OpenSSL's headers.
    assert options["LLAMA_USE_PREBUILT_UI"] == "OFF" and options["LLAMA_BUILD_UI"] == "OFF"
    assert options["LLAMA_OPENSSL"] == "OFF"
    assert options["LLAMA_BUILD_TESTS"] == "OFF" and options["LLAMA_BUILD_EXAMPLES"] == "OFF"
    # The CPU options come last: nothing fixed overrides them.
    assert build.all_args[-len(build.cmake_args.split()) :] == build.cmake_args.split()


def test_each_flag_set_has_its_own_build_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary is kept under its version and a hash of every CMake option."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    avx2 = llama_build.choose("x86_64", llama_build.cpu_flags(AVX2_DESKTOP))
    plain = llama_build.choose("x86_64", llama_build.cpu_flags(OLD_CPU))
    assert avx2.key != plain.key
    assert llama_build.build_dir(avx2) == Path("/cache/hal0web/llama-server") / avx2.key
    assert llama_build.VERSION in avx2.key and avx2.baseline in avx2.key


@pytest.mark.parametrize(
    ("line", "seen"),
    [
        ("[12/206] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o", (5, "12/206 steps")),
        ("[206/206] Linking CXX executable bin/llama-server", (100, "206/206 steps")),
        ("[ 42%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o", (42, "make")),
        ("-- Configuring done", None),
    ],
)
def test_progress_is_read_from_ninja_and_make(line: str, seen: tuple[int, str] | None) -> None:
    assert llama_build.progress_percent(line) == seen


def test_an_install_copies_the_cached_binary_and_records_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later install takes the kept binary (no compiler run) and replaces another key's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build = llama_build.choose("x86_64", llama_build.cpu_flags(AVX2_DESKTOP))
    kept = llama_build.build_dir(build)
    kept.mkdir(parents=True)
    (kept / "llama-server").write_bytes(b"#!/bin/sh\necho kept\n")
    (kept / "llama-server").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / llama_build.STAMP_NAME).write_text("0.3.36-avx2-another\n")
    (venv / "bin" / "llama-server").write_bytes(b"old")

    installed = llama_build.install(build, venv)
    assert installed == venv / "bin" / "llama-server"
    assert subprocess.run([installed], capture_output=True, text=True).stdout == "kept\n"
    assert llama_build.installed_key(venv) == build.key
    # Installed already: nothing is copied again.
    (kept / "llama-server").write_bytes(b"changed")
    assert llama_build.install(build, venv) == installed
    assert installed.read_bytes() != b"changed"


def test_flags_prints_every_cmake_option() -> None:
    done = subprocess.run(
        [sys.executable, "tools/llama_build.py", "flags"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.stdout.split() == llama_build.this_machine().all_args


def test_the_installed_llama_server_is_the_portable_build() -> None:
    """What `make test` installed: this machine's key, the vendored llama.cpp commit, and
    compiled without -march=native or AVX-512/AMX code (the kept compile commands say how
    each file was compiled)."""
    binary = llama_server_binary()
    build = llama_build.this_machine()
    assert llama_build.installed_key(Path(sys.prefix)) == build.key
    assert binary.read_bytes() == (llama_build.build_dir(build) / "llama-server").read_bytes()

    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0
    assert f"commit {llama_build.LLAMA_COMMIT}" in version.stdout + version.stderr

    kept = llama_build.build_dir(build)
    cache = dict(re.findall(r"^(\w+):\w+=(.*)$", (kept / "CMakeCache.txt").read_text(), re.M))
    assert cache["GGML_NATIVE"] == "OFF" and cache["BUILD_SHARED_LIBS"] == "OFF"
    commands = " ".join(
        e["command"] for e in json.loads((kept / "compile_commands.json").read_text())
    )
    assert "-march=native" not in commands
    assert not re.search(r"-mavx512|-mamx", commands)
    if build.baseline == "avx2":
        assert "-mavx2" in commands and "-mfma" in commands


def test_only_the_vendored_llama_cpp_is_extracted_from_the_sdist(tmp_path: Path) -> None:
    root = f"llama_cpp_python-{llama_build.VERSION}"
    sdist = tmp_path / f"{root}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in (
            (f"{root}/vendor/llama.cpp/CMakeLists.txt", b"project(llama.cpp)\n"),
            (f"{root}/llama_cpp/__init__.py", b""),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    source = llama_build._extract_llama_cpp(sdist, tmp_path / "out")
    assert (source / "CMakeLists.txt").read_text() == "project(llama.cpp)\n"
    assert not (tmp_path / "out" / root / "llama_cpp").exists()
