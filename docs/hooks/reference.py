"""MkDocs hook: the reference pages generated from the code at build time, and what the build
needs to read the code.

* the configuration, tables, pipeline and ``finelake.method`` pages (:data:`GENERATED`), built by
  ``docs/hooks/reference_pages.py`` from the code when the site is built;
* mkdocstrings pointed at the package as it is installed (:func:`api_source_tree`);
* the CLI page (``docs/reference/cli.md``, rendered by ``mkdocs-click``) with the ``<...>`` of
  the click help texts kept (:func:`escape_html_outside_code`);
* docstrings' Sphinx roles (``:class:`X```) shown as plain code (:func:`on_page_content`).

``tests/test_docs.py`` imports this file and ``reference_pages.py`` without MkDocs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

try:
    from mkdocs.plugins import event_priority
except ImportError:  # the page builders are also imported by tests, without MkDocs
    def event_priority(_priority):
        return lambda f: f

GENERATED = ("reference/configuration.md", "reference/tables.md", "reference/pipeline.md",
             "reference/api/method.md")
"""The pages this hook adds (src paths under ``docs/``)."""

ROOT = Path(__file__).resolve().parents[2]


def _pages_module():
    """``reference_pages.py`` beside this file (a hook is loaded from its path, not a package)."""
    spec = importlib.util.spec_from_file_location("finelake_docs_reference_pages",
                                                  Path(__file__).with_name("reference_pages.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- MkDocs events


@event_priority(100)  # before mkdocstrings' own on_config, which may start its handlers
def on_config(config):
    """Point mkdocstrings at :func:`api_source_tree` (MkDocs ``on_config`` event)."""
    python = config.plugins["mkdocstrings"].config["handlers"].setdefault("python", {})
    global _TREE
    _TREE = api_source_tree()
    python["paths"] = [str(_TREE)]
    config.markdown_extensions.append(escape_html_extension())
    return config


_TREE: Optional[Path] = None


def on_shutdown():
    """Remove :func:`api_source_tree`'s folder (MkDocs ``on_shutdown`` event)."""
    import shutil

    if _TREE is not None:
        shutil.rmtree(_TREE, ignore_errors=True)


def on_files(files, config):
    """Add the generated pages to the build (MkDocs ``on_files`` event)."""
    from mkdocs.structure.files import File

    for src, content in pages().items():
        files.append(File.generated(config, src, content=content))
    return files


_ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|exc|obj|const):(<code>)~?")


def on_page_content(html, page, config, files):
    """Docstrings cite objects Sphinx-style (``:class:`Stage```); mkdocstrings renders that as
    ``:class:<code>Stage</code>``. Show the code span alone (MkDocs ``on_page_content`` event)."""
    return _ROLE.sub(r"\1", html)


def package_dirs(setup_py: Path = ROOT / "setup.py") -> dict[str, str]:
    """``package_dir`` of ``setup.py`` (``{"finelake.jobs": "jobs", ...}``), read without running it."""
    import ast

    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return ast.literal_eval(node.value)
    raise ValueError(f"{setup_py}: no package_dir")


def api_source_tree(base: Optional[Path] = None) -> Path:
    """A folder holding ``finelake/`` as it is installed, for mkdocstrings (griffe) to read.

    The repository keeps ``jobs/``, ``udfs/``, ``models/``, ``conf/`` beside ``finelake/`` and
    installs them as ``finelake.jobs`` ... (``setup.py``'s ``package_dir``); griffe's static
    finder follows ``finelake`` to its folder only. This builds, in a temporary folder,
    ``finelake/`` with a link to each entry of the repository's ``finelake/`` and one per mapped
    subpackage, so ``::: finelake.jobs.pipeline`` is read from the source like any other module.
    The folder is made under ``base`` (default: the system's temporary folder).
    """
    import tempfile

    tree = Path(tempfile.mkdtemp(prefix="finelake-docs-api-", dir=base))
    pkg = tree / "finelake"
    pkg.mkdir()
    mapped = {name.split(".", 1)[1]: ROOT / folder
              for name, folder in package_dirs().items() if name.startswith("finelake.")}
    for entry in (ROOT / "finelake").iterdir():
        if entry.name not in mapped:
            (pkg / entry.name).symlink_to(entry)
    for name, folder in mapped.items():
        (pkg / name).symlink_to(folder, target_is_directory=True)
    return tree


def pages() -> dict[str, str]:
    """Every generated page: src path under ``docs/`` -> Markdown."""
    from finelake.config import FinelakeConfig
    from finelake.jobs.pipeline import PIPELINE
    from finelake.tables import ALL_TABLES

    build = _pages_module()
    return {
        "reference/configuration.md": build.config_page(FinelakeConfig),
        "reference/tables.md": build.tables_page(ALL_TABLES.values(), PIPELINE),
        "reference/pipeline.md": build.pipeline_page(PIPELINE),
        "reference/api/method.md": build.method_api_page(ROOT / "finelake" / "method"),
    }


# ----------------------------------------------------------------------------- the CLI page

_MARK = "<!-- escape-html -->"


def escape_html_outside_code(line: str) -> str:
    """``<`` and ``>`` of a Markdown line shown as written, except inside backtick code spans
    (click help texts say ``<fi>`` and ``<lake>``, which Markdown would take for HTML tags)."""
    parts = re.split(r"(`+[^`]*`+)", line)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;")
                   for p in parts)


def _escape_extension_class():
    from markdown.extensions import Extension
    from markdown.preprocessors import Preprocessor

    class Escape(Preprocessor):
        """Between two ``<!-- escape-html -->`` lines (around ``::: mkdocs-click``), after
        mkdocs-click expanded its block and fenced code was set aside: escape ``<`` / ``>``."""

        def run(self, lines):
            out, inside = [], False
            for line in lines:
                if line.strip() == _MARK:
                    inside = not inside
                    continue
                out.append(escape_html_outside_code(line) if inside else line)
            return out

    class Ext(Extension):
        def extendMarkdown(self, md):
            md.preprocessors.register(Escape(md), "finelake_escape_html", 22)

    return Ext


def escape_html_extension():
    """The Markdown extension of :func:`escape_html_outside_code` (added in :func:`on_config`)."""
    return _escape_extension_class()()
