"""The reference pages' builders: plain functions of the objects they describe (no MkDocs).

* :func:`config_page` from the pydantic models of :mod:`finelake.config` (every key, its type,
  default, unit and description);
* :func:`tables_page` from :data:`finelake.tables.ALL_TABLES` (columns, key, description, which
  stages read and write each table);
* :func:`pipeline_page` from :data:`finelake.jobs.pipeline.PIPELINE` (each stage's reads, writes,
  gates, resources and options, and a Mermaid picture of the data flow);
* :func:`method_api_page`: one mkdocstrings block per module of ``finelake/method/``.

Nothing is hand-copied: renaming a config field, a column or a stage changes the page with no
Markdown edit. ``docs/hooks/reference.py`` adds the pages to the build; ``tests/test_docs.py``
calls these functions directly.
"""

from __future__ import annotations

import json
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional


# ----------------------------------------------------------------------------- configuration

_UNITS = (  # suffix of a key -> unit (the project names keys by their unit where they have one)
    ("_seconds", "seconds"), ("_s", "seconds"), ("_hours", "hours"), ("_chars", "characters"),
    ("max_tokens", "tokens"), ("_tokens", "tokens"), ("_rows", "rows"), ("_documents", "documents"),
    ("_share", "fraction 0–1"), ("_ratio", "fraction 0–1"), ("_mb", "MiB"), ("_words", "words"),
)


def unit_of(key: str) -> str:
    """The unit a key's name states (``commit_backoff_s`` -> seconds), or an empty string."""
    for suffix, unit in _UNITS:
        if key.endswith(suffix):
            return unit
    return ""


def _is_model(tp: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _args(tp: Any) -> tuple:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def nested_models(tp: Any) -> list[type]:
    """The pydantic model classes an annotation holds (``Optional[ModelConfig]``,
    ``list[DocumentFilterConfig]``, ``dict[str, X]``...)."""
    if _is_model(tp):
        return [tp]
    out: list[type] = []
    for a in _args(tp):
        if a is not Ellipsis:
            out.extend(nested_models(a))
    return out


def _bounds(metadata: Iterable[Any]) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for m in metadata:
        for attr, sign in signs.items():
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sign} {v:g}" if isinstance(v, (int, float)) else f"{sign} {v}")
    return ", ".join(parts)


def type_name(tp: Any, anchors: Optional[dict[type, str]] = None) -> str:
    """A reader's name for an annotation: ``int``, ``float | null``, ``"a" | "b"``,
    ``list of str``, ``map str → float``, a link to a section for a nested model."""
    anchors = anchors or {}
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if _is_model(tp):
        name = anchors.get(tp)
        return f"[{tp.__name__}](#{name})" if name else tp.__name__
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in _args(tp))
    if origin is typing.Annotated:
        base, *meta = _args(tp)
        metas = [x for m in meta for x in (getattr(m, "metadata", None) or [m])]
        b = _bounds(metas)
        return type_name(base, anchors) + (f" ({b})" if b else "")
    if _is_union(tp):
        return " | ".join(type_name(a, anchors) for a in _args(tp))
    if origin in (list, tuple, set):
        return "list of " + " ".join(type_name(a, anchors) for a in _args(tp) if a is not Ellipsis)
    if origin is dict:
        k, v = _args(tp)
        return f"map {type_name(k, anchors)} → {type_name(v, anchors)}"
    return getattr(tp, "__name__", str(tp))


def default_text(field) -> str:
    """A field's default as YAML would spell it; ``required`` when there is none."""
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if _is_model(type(value)):
        return "(section)"
    return "`" + json.dumps(value, default=str).replace("|", "\\|") + "`" if value is not None else "`null`"


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, ``|`` escaped, ``<tags>`` and ``*`` shown as
    written (descriptions say ``<lake>/<name>`` and ``spark.*``)."""
    text = " ".join(str(text).split())
    for a, b in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(a, b)
    return text


def config_keys(root: type, prefix: str = "") -> list[tuple[str, type, str]]:
    """Every key reachable from ``root``: ``(dotted key, owning model, field name)``, depth first.
    A key holding models (``models.generator``) is listed, then the model's own keys under it."""
    out = []
    for name, field in root.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        out.append((key, root, name))
        for sub in nested_models(field.annotation):
            sep = "[]." if typing.get_origin(field.annotation) is list else "."
            out.extend(config_keys(sub, key + sep))
    return out


def _sections(root: type) -> list[tuple[str, type]]:
    """Each model class once, with the key it is first found under ('' for the root)."""
    seen: dict[type, str] = {root: ""}
    for key, owner, name in config_keys(root):
        ann = owner.model_fields[name].annotation
        for sub in nested_models(ann):
            seen.setdefault(sub, key + ("[]" if typing.get_origin(ann) is list else ""))
    return [(k, m) for m, k in seen.items()]


def _anchor(cls: type) -> str:
    return cls.__name__.lower()


def config_page(root: type) -> str:
    """The configuration reference: one section per pydantic model reachable from ``root``
    (:class:`finelake.config.FinelakeConfig`), a row per key: type, default, unit, description."""
    import inspect

    sections = _sections(root)
    anchors = {cls: _anchor(cls) for _, cls in sections}
    used_at: dict[type, list[str]] = {}
    for key, owner, name in config_keys(root):
        for sub in nested_models(owner.model_fields[name].annotation):
            used_at.setdefault(sub, []).append(key)
    lines = [
        "# Configuration reference",
        "",
        "*Generated from the pydantic models in `finelake/config.py` when the site is built; "
        "edit the `description=` there, not this page.*",
        "",
        "A profile is a YAML file (`conf/local.yaml`, `conf/databricks.yaml`, ...) validated "
        "against these models: an unknown key or a value of the wrong type is an error that "
        "names the key and the file that sets it. Any key can be overridden on the command line "
        "with `--set key.path=value` (the value is read as YAML). See "
        "[Profiles and models](../concepts/profiles.md) for `extends:` and the packaged profiles.",
        "",
        "*Unit* is what the key's name says (`_s` seconds, `_chars` characters, `_tokens` tokens, "
        "...); bounds are checked when the profile loads.",
        "",
    ]
    for path, cls in sections:
        title = f"`{path}`" if path else "Top level"
        shared = len(used_at.get(cls, [])) > 1
        if shared:
            title = f"{cls.__name__}"
        lines += [f"## {title} {{#{anchors[cls]}}}", ""]
        if shared:
            lines += ["Used at " + ", ".join(f"`{k}`" for k in used_at[cls]) + ".", ""]
        doc = inspect.getdoc(cls)
        if doc and cls.__doc__ and cls.__module__.startswith("finelake"):
            lines += [" ".join(doc.split("\n\n")[0].split()), ""]
        lines += ["| key | type | default | unit | description |", "|---|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            key = field.alias or name
            full = f"{path}.{key}" if path and not shared else key
            tp = type_name(field.annotation, anchors)
            b = _bounds(field.metadata)
            if b:
                tp += f" ({b})"
            lines.append(f"| `{full}` | {_cell(tp)} | {default_text(field)} | {unit_of(key)} | "
                         f"{_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def _stage_names(pipeline, tdef, attr: str) -> list[str]:
    return [s.name for s in pipeline if any(t.name == tdef.name for t in getattr(s, attr))]


def tables_page(tables: Iterable[Any], pipeline: Iterable[Any]) -> str:
    """The tables reference: per :class:`finelake.tables.TableDef`, its description, key,
    partitioning, the stages that write and read it, and its columns with their Arrow types."""
    pipeline = list(pipeline)
    tables = list(tables)
    lines = [
        "# Tables reference",
        "",
        "*Generated from `finelake/tables.py` (`ALL_TABLES`) and the stages of "
        "`finelake.jobs.pipeline.PIPELINE` when the site is built.*",
        "",
        "Every table is a Delta table at `<lake>/<name>`, registered as `finelake.<name>` for SQL "
        "(on clusters, in the catalog and schema of the profile's `catalog:` section). Writes are "
        "merges on the key, so a rerun never duplicates a row; every row carries `run_id`, the run "
        "that first wrote it. Tables keyed on a string also hold an internal `key_bucket` column "
        "(merge pruning, see [Scale a run](../how-to/scale.md)); `finelake sql` shows it, "
        "`Lake.read` leaves it out.",
        "",
        "| table | key | written by | what |",
        "|---|---|---|---|",
    ]
    for t in tables:
        writers = ", ".join(_stage_names(pipeline, t, "writes")) or "—"
        lines.append(f"| [`{t.name}`](#{t.name}) | {', '.join(t.key)} | {writers} | "
                     f"{_cell(t.description)} |")
    lines.append("")
    for t in tables:
        lines += [f"## `{t.name}` {{#{t.name}}}", "", _cell(t.description), ""]
        lines.append(f"**Key:** {', '.join(f'`{k}`' for k in t.key)}" +
                     (f" · **partitioned by:** {', '.join(t.partition_by)}" if t.partition_by else ""))
        writers, readers = _stage_names(pipeline, t, "writes"), _stage_names(pipeline, t, "reads")
        if writers or readers:
            lines.append("")
            lines.append(f"**Written by:** {', '.join(writers) or '—'} · "
                         f"**read by:** {', '.join(readers) or '—'}")
        lines += ["", "| column | type |", "|---|---|"]
        for f in t.schema:
            mark = " (key)" if f.name in t.key else ""
            lines.append(f"| `{f.name}`{mark} | `{f.type}` |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline


def _resources(r) -> str:
    if not r.uses_gpu:
        return "CPU (every core)"
    parts = [f"{r.gpus:g} GPU per task"]
    if r.cpus:
        parts.append(f"{r.cpus} CPUs")
    for name in ("executor_memory", "python_memory"):
        if getattr(r, name, None):
            parts.append(f"{name.replace('_', ' ')} {getattr(r, name)}")
    return ", ".join(parts)


def _mermaid_id(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def pipeline_mermaid(pipeline: Iterable[Any]) -> str:
    """A Mermaid flowchart of the stages (boxes) and the tables (cylinders) they read and write."""
    lines = ["flowchart LR"]
    tables: dict[str, None] = {}
    for s in pipeline:
        shape = f"s_{_mermaid_id(s.name)}[[{s.name}]]" if s.uses_model else \
            f"s_{_mermaid_id(s.name)}[{s.name}]"
        lines.append(f"  {shape}")
        for t in s.reads:
            tables.setdefault(t.name)
            lines.append(f"  t_{_mermaid_id(t.name)} --> s_{_mermaid_id(s.name)}")
        for t in s.writes:
            tables.setdefault(t.name)
            lines.append(f"  s_{_mermaid_id(s.name)} --> t_{_mermaid_id(t.name)}")
    for t in tables:
        lines.append(f"  t_{_mermaid_id(t)}[({t})]")
    return "\n".join(lines)


def pipeline_page(pipeline: Iterable[Any]) -> str:
    """The pipeline reference: every stage of ``PIPELINE`` in order, what it reads and writes,
    the gates it waits for, the resources a task asks for and its command-line options."""
    pipeline = list(pipeline)
    run = [s.name for s in pipeline if s.in_run]
    lines = [
        "# Pipeline reference",
        "",
        "*Generated from `finelake.jobs.pipeline.PIPELINE` when the site is built.* The same list "
        "drives `finelake <stage>`, `finelake run`, the retry gates, the Databricks bundle's tasks "
        "and `finelake emr-steps`; [Stages, gates and the canary](../concepts/stages.md) explains "
        "the two kinds of stage.",
        "",
        f"`finelake run` runs, in order: {' → '.join(run)}. "
        + ("Not part of it (run on its own): "
           + ", ".join(s.name for s in pipeline if not s.in_run) + "." if len(run) < len(pipeline) else ""),
        "",
        "Double-bordered boxes run a model on the executors; cylinders are Delta tables.",
        "",
        "```mermaid",
        pipeline_mermaid(pipeline),
        "```",
        "",
        "| stage | kind | reads | writes | waits for (gates) | resources per task | options |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in pipeline:
        kind = "model stage" if hasattr(s, "rows") else "driver stage"
        gates = ", ".join(f"{g.stage} (`retry` rows in `{g.table.name}`)" for g in s.gates) or "—"
        opts = [f"`--{o.replace('_', '-')}`" for o in s.options if o != "inputs"]
        if "inputs" in s.options:
            opts.insert(0, "`--queries`, `--documents`, field names")
        if s.gates:
            opts.append("`--force`")
        lines.append(
            f"| [`{s.name}`](#{s.name}) | {kind} | "
            f"{', '.join(f'[`{t.name}`](tables.md#{t.name})' for t in s.reads) or '—'} | "
            f"{', '.join(f'[`{t.name}`](tables.md#{t.name})' for t in s.writes) or '—'} | "
            f"{gates} | {_resources(s.resources)} | {', '.join(opts) or '—'} |")
    lines.append("")
    for s in pipeline:
        lines += [f"## `{s.name}` {{#{s.name}}}", "", _cell(s.help), ""]
        if hasattr(s, "rows"):
            lines.append(f"One row per `{s.key}` in [`{s.table.name}`](tables.md#{s.table.name}); "
                         f"chunks by `{s.chunk_key}`; executor row function "
                         f"`{s.rows.__module__}.{s.rows.__name__}`.")
        else:
            where = s.run.__module__ + ("" if s.run.__name__ == "<lambda>" else f".{s.run.__name__}")
            lines.append(f"Runs on the driver: `{where}`.")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Python API


def method_api_page(method_dir: Path) -> str:
    """One mkdocstrings block per module of ``finelake/method`` (found on disk, so a new module
    is documented without an edit here)."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(method_dir)]) if not m.name.startswith("_"))
    lines = [
        "# `finelake.method`",
        "",
        "*Generated: one section per module of `finelake/method/`, from its docstrings.*",
        "",
        "The method's pure logic: parsing, filters, excerpt expansion, sampling, budgeting, "
        "judging. Nothing here imports Spark or loads a model, so every rule is tested on its own.",
        "",
    ]
    for n in names:
        lines += [f"::: finelake.method.{n}", "    options:", "      heading_level: 2", ""]
    return "\n".join(lines)
