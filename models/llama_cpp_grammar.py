"""JSON schemas and regular expressions as llama.cpp grammars (GBNF), for constrained output.

The converters are llama-cpp-python's own; :func:`schema_to_gbnf` adds integer ranges as enums,
which that converter would otherwise not enforce.
"""

from __future__ import annotations

import json
import math
from typing import Any

from finelake.models.generation import require
from finelake.models.llama_cpp_load import PIP_HINT

MAX_ENUM_RANGE = 256


def _integer_ranges_as_enums(node: Any) -> Any:
    """Copy of a JSON schema where ``{"type": "integer", "minimum": a, "maximum": b}`` with at most
    :data:`MAX_ENUM_RANGE` values becomes ``{"enum": [a, ..., b]}``: llama-cpp-python's schema
    converter ignores numeric bounds, an enum it enforces."""
    if isinstance(node, list):
        return [_integer_ranges_as_enums(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _integer_ranges_as_enums(v) for k, v in node.items()}
    if out.get("type") == "integer" and "enum" not in out:
        lo = out.get("minimum")
        hi = out.get("maximum")
        if "exclusiveMinimum" in out and isinstance(out["exclusiveMinimum"], (int, float)):
            lo = math.floor(out["exclusiveMinimum"]) + 1
        if "exclusiveMaximum" in out and isinstance(out["exclusiveMaximum"], (int, float)):
            hi = math.ceil(out["exclusiveMaximum"]) - 1
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) \
                and 0 <= hi - lo < MAX_ENUM_RANGE:
            for k in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                out.pop(k, None)
            out["enum"] = list(range(math.ceil(lo), math.floor(hi) + 1))
    return out


def schema_to_gbnf(schema: dict) -> str:
    """llama.cpp grammar (GBNF text, root rule ``root``) accepting JSON that matches ``schema``.

    Uses llama-cpp-python's converter (types, properties/required, enum/const, anyOf/oneOf, $ref,
    string ``pattern``/``minLength``/``maxLength``, array ``minItems``/``maxItems``). It does not
    enforce numeric bounds; integer ranges of up to :data:`MAX_ENUM_RANGE` values are enforced by
    rewriting them as enums, wider numeric bounds are not enforced.

    Raises:
        ImportError: llama-cpp-python is missing.
        ValueError / KeyError / AssertionError: a schema construct the converter does not support.
    """
    require("llama_cpp", PIP_HINT, "llama_cpp")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(_integer_ranges_as_enums(schema)))


def regex_to_gbnf(pattern: str) -> str:
    """llama.cpp grammar (GBNF text) accepting exactly the strings that fully match ``pattern``.

    Supports the regex subset of llama.cpp's JSON-schema ``pattern`` converter (literals, classes,
    groups, alternation, ``? * + {m,n}``, ``.``); ``^``/``$`` anchors are implied.

    Raises:
        AssertionError / ValueError: unsupported regex syntax.
    """
    require("llama_cpp", PIP_HINT, "llama_cpp")
    from llama_cpp.llama_grammar import SchemaConverter

    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=True)
    p = pattern if pattern.startswith("^") else "^" + pattern
    p = p if p.endswith("$") else p + "$"
    conv._visit_pattern(p, "root")
    return conv.format_grammar()
