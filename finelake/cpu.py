"""What the CPU can run, and what the llama.cpp library in this environment was built for.

llama-cpp-python is compiled from source. ``make setup`` builds it for a fixed baseline
(``tools/llama_cpp_wheel.py``: x86-64-v3 = AVX2, FMA, F16C, BMI2; no AVX-512, no AMX) rather than
for the build machine's own CPU, because a native build crashed on Xeons with AMX and a native
AVX-512 build dies with SIGILL on CPUs without it. This module

* reads the host's CPU features with ``archspec`` (Spack's CPU detection library),
* reads what the loaded ggml reports (``llama_print_system_info``), and
* checks, *before* the library runs any kernel, that the host has every instruction set the
  library was built with, so a CPU the build cannot serve gets a :class:`UnsupportedCPU` naming the
  missing features instead of a segfault or SIGILL in a Spark worker.
"""

from __future__ import annotations

import functools
import platform
import re

from finelake.errors import FinelakeError

# ggml's name in llama_print_system_info -> the Linux /proc/cpuinfo flag(s) (archspec's names).
GGML_TO_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE3": ("sse3",),  # /proc/cpuinfo says "pni"; host_features adds "sse3"
    "SSSE3": ("ssse3",),
    "AVX": ("avx",),
    "AVX2": ("avx2",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f",),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_INT8": ("amx_int8",),
}
"""Only x86 features are mapped; ARM builds are checked by ggml itself at load."""

NATIVE_ONLY = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_INT8")
"""Instruction sets the portable build leaves out; one of them reported as 1 means the library
was compiled for some machine's own CPU (``GGML_NATIVE``), not for the baseline."""


class UnsupportedCPU(FinelakeError):
    """This CPU lacks instruction sets the installed llama.cpp library was compiled with."""


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """The host CPU's feature flags, lower case as in ``/proc/cpuinfo`` (``avx2``, ``amx_int8``),
    as archspec reads them (``detected_info``: the raw flags, not those of the nearest named
    microarchitecture, which would drop e.g. ``avx512_vnni`` or ``amx_int8``)."""
    from archspec.cpu.detect import detected_info

    flags = set(detected_info().features)
    if "pni" in flags:  # /proc/cpuinfo's name for SSE3
        flags.add("sse3")
    return frozenset(flags)


def host_description() -> str:
    """One line: brand, machine and the nearest named microarchitecture (archspec), e.g.
    ``AMD EPYC (x86_64, x86_64_v4)``."""
    import archspec.cpu
    from archspec.cpu.detect import brand_string, detected_info

    name = brand_string() or detected_info().vendor or "unknown CPU"
    return f"{name} ({platform.machine()}, {archspec.cpu.host().name})"


def parse_system_info(text: str) -> dict[str, str]:
    """``llama_print_system_info()`` text -> ``{"AVX2": "1", "AVX512": "0", ...}``.

    The text is ``"CPU : SSE3 = 1 | AVX = 1 | ... | "`` (one ``NAME = VALUE`` per item; backends
    other than the CPU's may add their own prefixes). Items without ``=`` are ignored.
    """
    out: dict[str, str] = {}
    for m in re.finditer(r"([A-Za-z0-9_]+)\s*=\s*([^|]+?)\s*(?:\||$)", text):
        out[m.group(1)] = m.group(2).strip()
    return out


@functools.lru_cache(maxsize=1)
def llama_cpp_system_info() -> dict[str, str]:
    """What the installed llama.cpp library was built with (:func:`parse_system_info`).

    Only reads the build's feature table: no kernel runs, so this is safe on any CPU.

    Raises:
        ImportError: llama-cpp-python is not installed.
    """
    import llama_cpp

    raw = llama_cpp.llama_print_system_info()
    return parse_system_info(raw.decode() if isinstance(raw, bytes) else str(raw))


def missing_features(built: dict[str, str], host: frozenset[str]) -> list[str]:
    """Names (ggml's) of the instruction sets ``built`` uses that ``host`` lacks, sorted."""
    return sorted(name for name, flags in GGML_TO_CPU_FLAGS.items()
                  if built.get(name) == "1" and not all(f in host for f in flags))


def native_features(built: dict[str, str]) -> list[str]:
    """Instruction sets beyond the portable baseline that the build reports as compiled in."""
    return [n for n in NATIVE_ONLY if built.get(n) == "1"]


def check_llama_cpp_cpu() -> dict[str, str]:
    """Check that this CPU can run the installed llama.cpp build; return its system info.

    Call before the first model load in a process (the llama_cpp backend does).

    Raises:
        UnsupportedCPU: the build uses instruction sets this CPU lacks; the message names them
            and says how to rebuild (``python tools/llama_cpp_wheel.py --rebuild``).
        ImportError: llama-cpp-python is not installed.
    """
    built = llama_cpp_system_info()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return built
    missing = missing_features(built, host_features())
    if missing:
        raise UnsupportedCPU(
            f"this CPU ({host_description()}) lacks {', '.join(missing)}, which the installed "
            f"llama-cpp-python was compiled with; finelake needs a build for its portable baseline "
            f"(x86-64-v3: AVX2, FMA, F16C): run `python tools/llama_cpp_wheel.py --rebuild` "
            f"(make setup does) on a machine with AVX2")
    return built
