"""Loading llama.cpp: the library after a CPU-feature check, and GGUF files requantized once.

:func:`load_llama_cpp` hands out llama-cpp-python only after checking that this CPU has every
instruction set the library was built with (:mod:`finelake.cpu`: a missing one is an
``UnsupportedCPU`` naming it, not a SIGILL in a Spark worker). :func:`requantized_gguf` converts a
GGUF file once per machine, for the ``requantize`` option of
:class:`finelake.models.llama_cpp_backend.LlamaCppGenerator`.
"""

from __future__ import annotations

import ctypes
import os

from finelake.models.generation import require

PIP_HINT = "pip install llama-cpp-python==0.3.36 (or pip install 'finelake[models]')"


REQUANTIZE_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                    "f16": "LLAMA_FTYPE_MOSTLY_F16"}
# GGUF general.file_type values whose matrices llama.cpp's CPU backend multiplies row by row (no
# batched gemm kernel): Q4_1, Q5_0, Q5_1. "auto" requantizes these to Q8_0.
ROW_BY_ROW_FTYPES = {3, 8, 9}


def load_llama_cpp():
    """The ``llama_cpp`` module, after checking that this CPU has every instruction set the
    library was compiled with (:func:`finelake.cpu.check_llama_cpp_cpu`).

    Raises:
        ImportError: llama-cpp-python is missing (the message has the pip line).
        finelake.cpu.UnsupportedCPU: the build needs instruction sets this CPU lacks (named).
    """
    from finelake.cpu import check_llama_cpp_cpu

    lc = require("llama_cpp", PIP_HINT, "llama_cpp")
    check_llama_cpp_cpu()
    return lc


def requantized_gguf(src: str, qtype: str) -> str:
    """``src`` converted by llama.cpp (``llama_model_quantize``, requantizing allowed) to ``qtype``.

    Made once per machine into ``$FINELAKE_CACHE/gguf/`` under a file lock (concurrent Spark
    workers convert once); later calls return the cached file.

    Args:
        src: a GGUF file.
        qtype: ``q8_0`` (near-lossless from 4/5-bit sources, 1.6x the size of Q4_1), ``q4_0``
            (lossy), or ``f16``.

    Raises:
        ValueError: unknown ``qtype``. RuntimeError: llama.cpp failed to convert.
    """
    if qtype not in REQUANTIZE_TYPES:
        raise ValueError(f"requantize must be one of {sorted(REQUANTIZE_TYPES)}, not {qtype!r}")
    lc = load_llama_cpp()
    from filelock import FileLock

    from finelake.storage import cache_dir

    st = os.stat(src)
    out = cache_dir() / "gguf" / f"{os.path.basename(src)[:-5]}.{st.st_size}.{qtype}.gguf"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.exists():
            return str(out)
        tmp = out.with_name(out.name + ".tmp")
        params = lc.llama_model_quantize_default_params()
        params.ftype = getattr(lc, REQUANTIZE_TYPES[qtype])
        params.allow_requantize = True
        params.nthread = 1
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.exists():
            raise RuntimeError(f"llama.cpp could not requantize {src} to {qtype} (code {rc})")
        os.replace(tmp, out)
    return str(out)
