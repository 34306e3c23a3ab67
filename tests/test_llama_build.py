"""How llama.cpp is built for the demo: portably, whatever the CPU reports (issue 11)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.llama_servers import skip_without_demo
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


def test_each_flag_set_has_its_own_wheel_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's cache keys a wheel by its source, not by CMAKE_ARGS; ours keys it by both."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    avx2 = llama_build.choose("x86_64", llama_build.cpu_flags(AVX2_DESKTOP))
    plain = llama_build.choose("x86_64", llama_build.cpu_flags(OLD_CPU))
    assert avx2.key != plain.key
    assert llama_build.wheel_dir(avx2) == Path("/cache/hal0web/llama-wheels") / avx2.key
    assert llama_build.VERSION in avx2.key


def test_the_installed_llama_cpp_is_the_portable_build() -> None:
    """What `make test` installed: this machine's key, and no AVX-512/AMX kernels in it.

    A natively built llama.cpp on a CPU reporting AVX-512 or AMX lists them here."""
    skip_without_demo()
    import llama_cpp

    stamp = Path(sys.prefix) / ".llama-build"
    assert stamp.read_text().strip() == llama_build.this_machine().key
    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in info or llama_build.this_machine().baseline != "avx2", info
    assert not re.search(r"(AVX512\w* = 1|AMX\w* = 1)", info), info
