"""Build and install llama-cpp-python portably, keyed by its build flags.

llama.cpp's default build (``GGML_NATIVE=ON``) compiles with ``-march=native``: a wheel built
on one CPU can fault on another, and on CPUs that report AMX but whose kernel or hypervisor
gives the process no AMX tile state the first matrix multiply dies in ``ldtilecfg``
(issue 11). So the demo's llama.cpp is built with ``GGML_NATIVE=OFF`` and an explicit,
widely held instruction set, with AVX-512 and AMX off.

pip's wheel cache is keyed by the source archive, not by ``CMAKE_ARGS``: a wheel built
natively earlier would be reused silently. So this script builds the wheel itself into a
directory named by the version and a hash of the flags, and installs from there. Another
flag set is another directory; an install whose recorded key differs is replaced.

Stdlib only: it runs in a fresh venv before anything else is installed.

    python tools/llama_build.py install     # build if needed, install, record the key
    python tools/llama_build.py flags       # print the CMAKE_ARGS this machine gets
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
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
DIST = "llama-cpp-python"

# Never on: what a process may not be allowed to use even where the CPU reports it.
_ALWAYS_OFF = ("GGML_NATIVE", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI",
               "GGML_AVX512_BF16", "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8",
               "GGML_AMX_BF16")  # fmt: skip
# Every x86-64 CPU since Haswell (2013) and Zen (2017) has these; they are what makes the
# CPU backend fast enough for the demo.
_AVX2_FLAGS = ("avx", "avx2", "fma", "f16c")
_AVX2_OPTIONS = ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")


@dataclass(frozen=True, slots=True)
class Build:
    """One portable build: a name people read, and the CMake options that make it."""

    baseline: str
    cmake_args: str

    @property
    def key(self) -> str:
        digest = hashlib.sha256(f"{DIST}=={VERSION} {self.cmake_args}".encode()).hexdigest()
        return f"{VERSION}-{self.baseline}-{digest[:12]}"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text."""
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def choose(machine: str, flags: frozenset[str]) -> Build:
    """The build for this machine: AVX2 where the CPU has it, plain x86-64 where it does not.

    The choice depends only on features every process may use, never on AVX-512 or AMX, so
    machines of one class share one wheel.
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


def wheel_dir(build: Build) -> Path:
    """Where the wheel for this build is kept: outside the checkout, so clones share it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hal0web" / "llama-wheels" / build.key


_PROGRESS = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def _build_wheel(build: Build, target: Path, log_path: Path) -> Path:
    """Compile the wheel with pip, printing the compiler's progress every ten per cent."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-v",
           "--no-deps", "--no-cache-dir", "--no-binary", DIST, "-w", str(target),
           f"{DIST}=={VERSION}"]  # fmt: skip
    env = dict(os.environ, CMAKE_ARGS=build.cmake_args, FORCE_CMAKE="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    started = time.monotonic()
    shown = -10
    tail: deque[str] = deque(maxlen=40)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            match = _PROGRESS.match(line)
            if match:
                done, total = int(match.group(1)), int(match.group(2))
                percent = 100 * done // total
                if percent >= shown + 10:
                    shown = percent
                    minutes = (time.monotonic() - started) / 60
                    print(f">>>   compiling llama.cpp: {percent:3d} % ({done}/{total} steps, "
                          f"{minutes:.1f} min)", flush=True)  # fmt: skip
        rc = proc.wait()
    if rc != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f">>> building {DIST} failed (exit {rc}); the whole log: {log_path}")
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise SystemExit(f">>> pip built no wheel into {target}; the log: {log_path}")
    minutes = (time.monotonic() - started) / 60
    print(f">>> built {wheels[-1].name} in {minutes:.1f} min (kept in {target})", flush=True)
    return wheels[-1]


def install(build: Build) -> None:
    stamp = Path(sys.prefix) / ".llama-build"
    if stamp.exists() and stamp.read_text().strip() == build.key:
        return
    target = wheel_dir(build)
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if wheels:
        wheel = wheels[-1]
        print(f">>> llama.cpp: using the {build.baseline} build cached in {target}", flush=True)
    else:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            raise SystemExit(
                ">>> The demo compiles llama.cpp and needs a C/C++ compiler: install one first\n"
                ">>> (Debian/Ubuntu: sudo apt-get install build-essential), or use HAL0_DEMO=0"
            )
        print(f">>> llama.cpp: compiling a portable {build.baseline} build from source "
              "(GGML_NATIVE=OFF, no AVX-512/AMX).", flush=True)  # fmt: skip
        print(">>> This takes about 5 minutes on 2 cores the first time; the wheel is kept "
              "for later installs.", flush=True)  # fmt: skip
        wheel = _build_wheel(build, target, target.parent / f"{build.key}.log")
    # --force-reinstall --no-deps replaces a natively built copy already in the venv; the
    # [server] extra's own dependencies come with the second, ordinary install.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(wheel)], check=True)
    subprocess.run([*pip, f"{DIST}[server] @ {wheel.as_uri()}"], check=True)
    stamp.write_text(build.key + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "flags", "key"])
    args = parser.parse_args(argv)
    build = this_machine()
    if args.action == "flags":
        print(build.cmake_args)
    elif args.action == "key":
        print(build.key)
    else:
        install(build)


if __name__ == "__main__":
    main()
