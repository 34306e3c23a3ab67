"""Build llama.cpp's ``llama-server`` portably, keyed by its build flags, and install it.

The demo's model servers are llama.cpp's own ``llama-server``, compiled from the llama.cpp
source that the ``llama-cpp-python`` sdist on PyPI vendors (``vendor/llama.cpp``): PyPI is
what this project may download from, and the version pin names one llama.cpp commit.

llama.cpp's default build (``GGML_NATIVE=ON``) compiles with ``-march=native``: a binary built
on one CPU can fault on another, and on CPUs that report AMX but whose kernel or hypervisor
gives the process no AMX tile state the first matrix multiply dies in ``ldtilecfg``
(issue 11). So it is built with ``GGML_NATIVE=OFF`` and an explicit, widely held instruction
set, with AVX-512 and AMX off; statically linked (one self-contained file), without the web
UI download, HTTPS, tests or examples, so the build needs no network beyond the sdist.

The binary is kept in a directory named by the version and a hash of every CMake option, and
copied from there into the venv as ``bin/llama-server`` (a copy outlives a cleared cache, and
a rebuild never changes a running server's file; router mode starts its model instances from
``/proc/self/exe``, which is that copy). Another flag set is another directory; an install
whose recorded key differs is replaced.

Stdlib (and pip, for the sdist) only: it runs in a fresh venv before anything else.

    python tools/llama_build.py install     # build if needed, install, record the key
    python tools/llama_build.py flags       # print the CMake options this machine gets
    python tools/llama_build.py key         # print this machine's build key
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
DIST = "llama-cpp-python"
TARGET = "llama-server"
# The llama.cpp commit that sdist vendors (its CHANGELOG: "update llama.cpp to
# ggml-org/llama.cpp@0c1e57098"). The sdist has no .git, so without it --version says
# "unknown".
LLAMA_COMMIT = "0c1e57098"
# Where the installed binary and the key it was built with are recorded, inside the venv.
STAMP_NAME = ".llama-server-build"

# Never on: what a process may not be allowed to use even where the CPU reports it.
_ALWAYS_OFF = ("GGML_NATIVE", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI",
               "GGML_AVX512_BF16", "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8",
               "GGML_AMX_BF16")  # fmt: skip
# Every x86-64 CPU since Haswell (2013) and Zen (2017) has these; they are what makes the
# CPU backend fast enough for the demo.
_AVX2_FLAGS = ("avx", "avx2", "fma", "f16c")
_AVX2_OPTIONS = ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")
# The same on every machine: a self-contained release binary, built offline. The UI would be
# downloaded from Hugging Face (LLAMA_USE_PREBUILT_UI); HTTPS needs OpenSSL's headers; the
# tests and examples are not what the demo runs.
FIXED_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
              "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
              f"-DLLAMA_BUILD_COMMIT={LLAMA_COMMIT}")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Build:
    """One portable build: a name people read, and the CPU options that make it."""

    baseline: str
    cmake_args: str  # the CPU options only (what differs between machines)

    @property
    def all_args(self) -> list[str]:
        """Every option CMake is configured with."""
        return [*FIXED_ARGS, *self.cmake_args.split()]

    @property
    def key(self) -> str:
        options = " ".join(self.all_args)
        digest = hashlib.sha256(f"{TARGET} {DIST}=={VERSION} {options}".encode()).hexdigest()
        return f"{VERSION}-{self.baseline}-{digest[:12]}"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text."""
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def choose(machine: str, flags: frozenset[str]) -> Build:
    """The build for this machine: AVX2 where the CPU has it, plain x86-64 where it does not.

    The choice depends only on features every process may use, never on AVX-512 or AMX, so
    machines of one class share one binary.
    """
    off = [f"-D{name}=OFF" for name in _ALWAYS_OFF]
    if machine not in ("x86_64", "amd64", "AMD64"):
        # Other architectures: llama.cpp's generic baseline for the target, no -march=native.
        return Build(f"{machine.lower()}-generic", " ".join(["-DGGML_NATIVE=OFF"]))
    if all(flag in flags for flag in _AVX2_FLAGS):
        on = [f"-D{name}=ON" for name in _AVX2_OPTIONS]
        return Build("avx2", " ".join(off + on))
    plain = [f"-D{name}=OFF" for name in _AVX2_OPTIONS]
    return Build("x86-64", " ".join(off + plain))


def this_machine() -> Build:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return choose(platform.machine(), cpu_flags(cpuinfo))


def cache_root() -> Path:
    """Outside the checkout, so clones (and worktrees) share the builds."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hal0web" / "llama-server"


def build_dir(build: Build) -> Path:
    """Where the binary of this build is kept, with what it was built from."""
    return cache_root() / build.key


def installed_binary(prefix: Path | None = None) -> Path:
    """Where ``install`` puts the binary: the venv's ``bin/``."""
    return Path(prefix or sys.prefix) / "bin" / TARGET


def installed_key(prefix: Path | None = None) -> str | None:
    stamp = Path(prefix or sys.prefix) / STAMP_NAME
    try:
        return stamp.read_text().strip() or None
    except OSError:
        return None


# Ninja prints "[12/345] Building ..."; Make prints "[ 12%] Building ...".
_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")
_MAKE_PERCENT = re.compile(r"^\s*\[\s*(\d+)%\]")


def progress_percent(line: str) -> tuple[int, str] | None:
    """(per cent done, what to show) for one line of build output, if it says."""
    match = _NINJA_STEP.match(line)
    if match:
        done, total = int(match.group(1)), int(match.group(2))
        return 100 * done // total, f"{done}/{total} steps"
    match = _MAKE_PERCENT.match(line)
    if match:
        return int(match.group(1)), "make"
    return None


def _run_logged(cmd: list[str], log_path: Path, started: float, show_progress: bool) -> None:
    """Run one build step into the log; print the progress every ten per cent."""
    shown = -10
    tail: deque[str] = deque(maxlen=40)
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            seen = progress_percent(line) if show_progress else None
            if seen is not None and seen[0] >= shown + 10:
                shown = seen[0]
                minutes = (time.monotonic() - started) / 60
                print(f">>>   compiling llama-server: {seen[0]:3d} % ({seen[1]}, "
                      f"{minutes:.1f} min)", flush=True)  # fmt: skip
        rc = proc.wait()
    if rc != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f">>> building {TARGET} failed (exit {rc}); the whole log: {log_path}")


def _download_sdist(into: Path, log_path: Path) -> Path:
    """The llama-cpp-python sdist from PyPI, through pip (it checks the index's hashes)."""
    found = sorted(into.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    print(f">>> llama.cpp: downloading the {DIST}=={VERSION} source (75 MB) from PyPI",
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps",
           "--no-binary", ":all:", "-d", str(into), f"{DIST}=={VERSION}"]  # fmt: skip
    _run_logged(cmd, log_path, time.monotonic(), show_progress=False)
    found = sorted(into.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        raise SystemExit(f">>> pip downloaded no {DIST} sdist into {into}; the log: {log_path}")
    return found[0]


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    """Only ``vendor/llama.cpp`` of the sdist, extracted into ``into``; its path."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise SystemExit(f">>> {sdist} holds no {prefix}")
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths out
            archive.extractall(into, members=members, filter="data")
        else:  # the sdist came through pip, checked against the index's hash
            archive.extractall(into, members=members)
    return into / prefix


def _check_tools() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise SystemExit(
            ">>> The demo compiles llama.cpp and needs a C/C++ compiler: install one first\n"
            ">>> (Debian/Ubuntu: sudo apt-get install build-essential), or use HAL0_DEMO=0"
        )
    if shutil.which("cmake") is None:
        raise SystemExit(
            ">>> The demo compiles llama.cpp with CMake: install it first\n"
            ">>> (Debian/Ubuntu: sudo apt-get install cmake), or use HAL0_DEMO=0"
        )


def compile_server(build: Build, target: Path) -> Path:
    """Download, configure and compile; keep the binary and what it was built with."""
    _check_tools()
    log_path = target.parent / f"{build.key}.log"
    target.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    sdist = _download_sdist(cache_root() / "sdist", log_path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{build.key}-", dir=target.parent) as work:
        source = _extract_llama_cpp(sdist, Path(work))
        tree = Path(work) / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        configure = ["cmake", "-S", str(source), "-B", str(tree), *generator, *build.all_args]
        _run_logged(configure, log_path, started, show_progress=False)
        compile_cmd = ["cmake", "--build", str(tree), "--target", TARGET, "-j", jobs]
        _run_logged(compile_cmd, log_path, started, show_progress=True)
        # Kept beside the binary: what tests and people read to see how it was built.
        staging = Path(work) / "result"
        staging.mkdir()
        shutil.copy2(tree / "bin" / TARGET, staging / TARGET)
        shutil.copy2(tree / "CMakeCache.txt", staging / "CMakeCache.txt")
        shutil.copy2(tree / "compile_commands.json", staging / "compile_commands.json")
        (staging / "cmake-args").write_text(" ".join(build.all_args) + "\n")
        # Last, all at once: a directory under the key always holds a finished build.
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    minutes = (time.monotonic() - started) / 60
    print(f">>> built {TARGET} in {minutes:.1f} min (kept in {target})", flush=True)
    return target / TARGET


def install(build: Build, prefix: Path | None = None) -> Path:
    """Build if needed, copy the binary into the venv, record the key. Returns its path."""
    dest = installed_binary(prefix)
    if installed_key(prefix) == build.key and dest.is_file():
        return dest
    target = build_dir(build)
    binary = target / TARGET
    if binary.is_file():
        print(f">>> llama.cpp: using the {build.baseline} {TARGET} cached in {target}", flush=True)
    else:
        print(f">>> llama.cpp: compiling a portable {build.baseline} {TARGET} from source "
              "(GGML_NATIVE=OFF, no AVX-512/AMX).", flush=True)  # fmt: skip
        print(">>> This takes 7-10 minutes on 2 cores the first time; the binary is kept "
              "for later installs.", flush=True)  # fmt: skip
        binary = compile_server(build, target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy then rename: a running server keeps its old file; nobody sees half a binary.
    partial = dest.with_name(dest.name + ".partial")
    shutil.copy2(binary, partial)
    os.replace(partial, dest)
    (Path(prefix or sys.prefix) / STAMP_NAME).write_text(build.key + "\n")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "flags", "key"])
    args = parser.parse_args(argv)
    build = this_machine()
    if args.action == "flags":
        print(" ".join(build.all_args))
    elif args.action == "key":
        print(build.key)
    else:
        install(build)


if __name__ == "__main__":
    main()
