"""The generator's native library is portable (issue 14): built for the x86-64-v3 baseline, not for
the build machine's CPU, and a CPU it cannot serve gets a clear error, never a segfault."""

from __future__ import annotations

import platform

import pytest

from finelake import cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")

SAMPLE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
          "AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_system_info_is_parsed_item_by_item():
    info = cpu.parse_system_info(SAMPLE)
    assert info["AVX2"] == "1" and info["AMX_INT8"] == "1" and info["REPACK"] == "1"
    assert len(info) == 13


def test_missing_features_are_named_and_native_builds_recognised():
    info = cpu.parse_system_info(SAMPLE)
    epyc = frozenset({"sse3", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2", "avx512f",
                      "avx512_vnni"})
    assert cpu.missing_features(info, epyc) == ["AMX_INT8"]
    old = frozenset({"sse3", "ssse3", "avx"})
    assert cpu.missing_features(info, old) == ["AMX_INT8", "AVX2", "AVX512", "AVX512_VNNI",
                                               "BMI2", "F16C", "FMA"]
    assert cpu.native_features(info) == ["AVX512", "AVX512_VNNI", "AMX_INT8"]
    portable = cpu.parse_system_info("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
                                     "BMI2 = 1 | AVX512 = 0 | AMX_INT8 = 0 | ")
    assert cpu.native_features(portable) == []
    assert cpu.missing_features(portable, epyc) == []


@pytest.mark.skipif(not X86, reason="the baseline is defined for x86-64")
def test_installed_llama_cpp_is_the_portable_build_not_this_machines_native_one():
    """Read from the library itself: a native build on an AVX-512 or AMX machine (the CI machines
    vary) reports AVX512 / AMX_INT8 = 1 and fails here; on an AVX2-only machine the two coincide."""
    pytest.importorskip("llama_cpp")
    info = cpu.llama_cpp_system_info()
    assert info.get("AVX2") == "1" and info.get("FMA") == "1" and info.get("F16C") == "1", info
    assert cpu.native_features(info) == [], f"llama.cpp was compiled for a specific CPU: {info}"
    assert cpu.missing_features(info, cpu.host_features()) == []
    assert cpu.check_llama_cpp_cpu() == info


def test_a_cpu_without_the_builds_features_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu, "llama_cpp_system_info", lambda: cpu.parse_system_info(SAMPLE))
    monkeypatch.setattr(cpu, "host_features", lambda: frozenset({"sse3", "ssse3", "avx", "avx2"}))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    with pytest.raises(cpu.UnsupportedCPU, match=r"lacks AMX_INT8, AVX512, AVX512_VNNI, BMI2, "
                                                 r"F16C, FMA.*llama_cpp_wheel.py --rebuild"):
        cpu.check_llama_cpp_cpu()


def test_the_build_tool_never_compiles_for_the_native_cpu():
    """tools/llama_cpp_wheel.py's flags: native off, AVX2 baseline on, AVX-512 and AMX off."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "llama_cpp_wheel.py"
    spec = importlib.util.spec_from_file_location("llama_cpp_wheel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    flags = mod.cmake_flags("x86_64")
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
    assert "-DGGML_AVX512=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags
    assert not any(f.endswith("=ON") and ("AVX512" in f or "AMX" in f) for f in flags)
    key_a, _ = mod.wheel_dir(flags)
    key_b, _ = mod.wheel_dir(flags + ["-DGGML_AVX512=ON"])
    assert key_a != key_b  # other flags never reuse this wheel
