"""Build (once) and install a portable llama-cpp-python wheel: never compiled for this machine's CPU.

llama-cpp-python ships on PyPI as an sdist only, and its default build compiles ggml with
``GGML_NATIVE=ON`` (``-march=native``): a wheel built on an AVX-512/AMX Xeon then segfaults or dies
with SIGILL elsewhere, and even on its own machine the native AMX build crashed at the first
``llama_decode`` (issue 14). This tool builds with a fixed, documented instruction-set baseline
instead:

* x86-64: ``x86-64-v3`` (Haswell and later: SSE4.2, AVX, AVX2, FMA, F16C, BMI2; no AVX-512, no
  AMX), the same set as ggml's ``haswell`` CPU variant. Every x86-64 server CPU since 2015 has it.
* aarch64: ``GGML_NATIVE=OFF`` (ggml's generic armv8 baseline).

The wheel is kept in ``$FINELAKE_CACHE/wheels/llama-cpp-python/<key>/`` where ``<key>`` hashes the
version, the CMake flags, the Python tag and the platform, with a ``build.json`` describing it; a
later setup with the same key installs that wheel instead of compiling again (pip's own wheel cache
is bypassed on purpose: it is keyed by the sdist alone, so it would hand back a wheel built with
other flags, such as an earlier native build).

Usage (standard library only; run with the virtualenv's Python)::

    python tools/llama_cpp_wheel.py            # build if needed, then pip install the wheel
    python tools/llama_cpp_wheel.py --print    # print the key, flags and wheel folder, do nothing

``finelake doctor`` then checks what the installed library reports (``llama_print_system_info``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

VERSION = "0.3.36"

# ggml's x86 "haswell" variant (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS): x86-64-v3.
X86_64_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_F16C=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
]
AARCH64_FLAGS = ["-DGGML_NATIVE=OFF"]
# Not needed by finelake and slow to compile.
COMMON_FLAGS = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF"]


def cmake_flags(machine: str | None = None) -> list[str]:
    """The CMake flags for ``machine`` (``platform.machine()``). Raises SystemExit on others."""
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64"):
        return X86_64_FLAGS + COMMON_FLAGS
    if m in ("aarch64", "arm64"):
        return AARCH64_FLAGS + COMMON_FLAGS
    raise SystemExit(f"llama_cpp_wheel: no portable baseline defined for machine {m!r}")


def wheel_dir(flags: list[str]) -> tuple[str, Path]:
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
    key = hashlib.sha256(json.dumps([VERSION, flags, tag]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("FINELAKE_CACHE", Path.home() / ".cache" / "finelake"))
    return key, root / "wheels" / "llama-cpp-python" / key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--print", action="store_true", help="print key, flags and folder; do nothing")
    ap.add_argument("--rebuild", action="store_true", help="build even if a wheel is cached")
    args = ap.parse_args()
    flags = cmake_flags()
    key, d = wheel_dir(flags)
    if args.print:
        print(json.dumps({"version": VERSION, "key": key, "cmake_args": " ".join(flags),
                          "folder": str(d)}, indent=2))
        return
    wheels = sorted(d.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if wheels and not args.rebuild:
        print(f"llama-cpp-python {VERSION}: reusing the portable wheel {wheels[-1]}")
    else:
        d.mkdir(parents=True, exist_ok=True)
        for w in wheels:
            w.unlink()
        env = dict(os.environ, CMAKE_ARGS=" ".join(flags), FORCE_CMAKE="1")
        print(f"llama-cpp-python {VERSION}: building a portable wheel (CMAKE_ARGS={env['CMAKE_ARGS']}); "
              "a few minutes on 2 cores, once per machine", flush=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}",
                        "-w", str(d)], env=env, check=True)
        wheels = sorted(d.glob(f"llama_cpp_python-{VERSION}-*.whl"))
        if not wheels:
            raise SystemExit(f"llama_cpp_wheel: pip wheel left no wheel in {d}")
        (d / "build.json").write_text(json.dumps(
            {"version": VERSION, "cmake_args": " ".join(flags), "machine": platform.machine(),
             "built_on": platform.node(), "seconds": round(time.time() - t0)}, indent=2) + "\n")
        print(f"llama-cpp-python {VERSION}: built in {time.time() - t0:.0f} s -> {wheels[-1]}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(wheels[-1])], check=True)


if __name__ == "__main__":
    main()
