"""Check that imports run one way and that no import cycle remains (issue 23 item 7).

``lint-imports`` (import-linter) and its graph library (grimp) walk a package's folder. finelake's
repository keeps ``jobs/``, ``udfs/`` and ``models/`` at the top level and installs them as
``finelake.jobs``, ``finelake.udfs`` and ``finelake.models`` (``setup.py``'s ``package_dir``), a layout
grimp cannot follow. So this script copies the Python files into a temporary folder in the
installed layout, runs ``lint-imports`` with the repository's ``.importlinter`` there, and then
looks for import cycles among finelake's modules (every import statement counts, function-level
ones included: a cycle hidden inside a function is still a cycle).

    python tools/lint_imports.py            # exit 0: contracts kept, no cycle
    python tools/lint_imports.py --root DIR # check another checkout (tests plant violations)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = {"jobs": "jobs", "udfs": "udfs", "models": "models"}
"""installed name under finelake -> folder at the repository root (as in setup.py)."""


def staged_tree(root: Path, dest: Path) -> Path:
    """Copy ``root``'s ``finelake/`` and the top-level subpackages into ``dest/finelake`` (Python
    files only), the layout the wheel installs; returns ``dest``."""
    pkg = dest / "finelake"
    shutil.copytree(root / "finelake", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name, folder in SUBPACKAGES.items():
        shutil.copytree(root / folder, pkg / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def cycles(tree: Path) -> list[list[str]]:
    """Import cycles among finelake's modules (strongly connected components of more than one
    module) in the staged ``tree``, each sorted."""
    sys.path.insert(0, str(tree))
    try:
        import grimp

        graph = grimp.build_graph("finelake", cache_dir=None)
    finally:
        sys.path.remove(str(tree))
    deps = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules
            for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components, iteratively
        work = [(v, iter(sorted(deps[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(deps[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for m in sorted(deps):
        if m not in index:
            visit(m)
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT), help="repository to check (default: this one)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    with tempfile.TemporaryDirectory(prefix="finelake-layers-") as tmp:
        tree = staged_tree(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        lint = Path(sys.executable).parent / "lint-imports"
        rc = subprocess.run([str(lint), str(root / ".importlinter"), "--no-cache"],
                            cwd=tree, env=env).returncode
        found = cycles(tree)
    for c in found:
        print(f"import cycle: {' <-> '.join(c)}")
    if not found:
        print("no import cycle among finelake's modules")
    return 1 if rc or found else 0


if __name__ == "__main__":
    sys.exit(main())
