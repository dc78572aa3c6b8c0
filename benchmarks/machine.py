"""What the benchmarks share: the offline environment they run in, and what machine they ran on
(CPU model, cores, vector ISA, load average, fp32 matmul rate)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    """``{"model", "cores" (usable by this process), "isa" (comma-separated flags)}``."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "isa": ",".join(isa) or "?"}


def load_avg() -> str:
    """The 1/5/15-minute load averages, or "?"."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def offline_env() -> None:
    """Environment defaults every benchmark sets before importing torch or pyspark: no hub
    downloads, no tokenizer thread pools, Spark workers on this interpreter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def matmul_gflops(threads: int, n: int = 2048, dtype: str = "float32", seconds: float = 2.0) -> float:
    """Best GFLOP/s of an ``n x n @ n x n`` torch matmul on ``threads`` threads over ~``seconds``
    (2n³ FLOPs per product; one warm-up product first)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        c = torch.empty(n, n, dtype=dt)
        torch.matmul(a, b, out=c)  # warm-up
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)
