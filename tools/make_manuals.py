"""Build a held-out input of a different kind from the shipped sample: Debian manual pages.

Development tool (the quality measurement of issue 26 runs the pipeline on it); finelake never
reads its output at run time. It renders manual pages installed on this machine with ``man`` as a
user reads them (80 columns, plain text: header and footer lines, NAME / SYNOPSIS / OPTIONS
blocks, option lists), because raw software documentation with its page furniture is the input
the answer and instruction filters are for.

    python tools/make_manuals.py OUT.jsonl [--n 120] [--seed 26] [--sections 1,5,8]

Selection: the page files of the given sections of ``/usr/share/man`` (English, no symlinks),
grouped by the Debian package that installed them (dpkg's file lists), so that one package
(google-cloud-cli ships 16,000 of this machine's 17,000 pages) does not make the input one kind of
page; packages in a ``--seed``-shuffled order, a shuffled page of each in turn (a second round when
one is not enough), kept when the rendered text has 800-8,000 characters, until ``--n`` pages. Each row: ``{"text", "source": "debian_manpage", "metadata":
{"title", "section", "path", "package", "version", "licence"}}``; the package is the Debian
package that installed the page (``dpkg -S``), the licence the first ``License:`` field of that
package's ``/usr/share/doc/<package>/copyright`` (DEP-5; ``see copyright`` otherwise). A
``OUT.provenance.md`` beside the JSONL lists the packages, versions and licences, the machine's
``man`` version and the command line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
MIN_CHARS, MAX_CHARS = 800, 8000


def page_files(sections: list[str]) -> list[Path]:
    """Manual page files (not symlinks, not ``.so`` redirects) of ``sections``, sorted."""
    out = []
    for sec in sections:
        d = MAN_ROOT / f"man{sec}"
        if d.is_dir():
            out += [p for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()]
    return out


def render(path: Path) -> str:
    """The page as ``man`` shows it at 80 columns, overstrikes removed (``col -bx``)."""
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    man = subprocess.run(["man", "-P", "cat", "-l", str(path)], capture_output=True, env=env,
                         timeout=30)
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, timeout=30)
    return col.stdout.decode("utf-8", errors="replace").strip("\n")


def packages() -> dict[str, str]:
    """Installed file path -> Debian package, from dpkg's file lists."""
    out = {}
    for lst in sorted(Path("/var/lib/dpkg/info").glob("*.list")):
        pkg = lst.name[:-len(".list")].split(":")[0]
        for line in lst.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(str(MAN_ROOT)):
                out[line] = pkg
    return out


def version_of(pkg: str) -> str:
    v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return v.stdout.strip()


def licence_of(pkg: str) -> str:
    """First ``License:`` of the package's DEP-5 copyright file, else a pointer to that file."""
    cp = Path("/usr/share/doc") / pkg / "copyright"
    try:
        m = re.search(r"^License:\s*(\S.*)$", cp.read_text(encoding="utf-8", errors="replace"), re.M)
    except OSError:
        return "unknown (no copyright file)"
    return m.group(1).strip()[:80] if m else f"see {cp}"


def _row(p: Path, text: str, pkg: str) -> dict:
    return {"text": text, "source": "debian_manpage",
            "metadata": {"title": p.name.removesuffix(".gz"), "section": p.parent.name.removeprefix("man"),
                         "path": str(p), "package": pkg, "version": version_of(pkg),
                         "licence": licence_of(pkg)}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--sections", default="1,5,8")
    a = ap.parse_args(argv)
    owner = packages()
    by_pkg: dict[str, list[Path]] = collections.defaultdict(list)
    for p in page_files(a.sections.split(",")):
        by_pkg[owner.get(str(p), "unknown")].append(p)
    rng = random.Random(a.seed)
    order = sorted(by_pkg)
    rng.shuffle(order)
    for pkg in order:
        rng.shuffle(by_pkg[pkg])
    rows, seen = [], set()
    while len(rows) < a.n and any(by_pkg.values()):
        for pkg in order:
            if len(rows) >= a.n:
                break
            while by_pkg[pkg]:  # this package's next page that renders to a kept length
                p = by_pkg[pkg].pop()
                text = render(p)
                if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
                    break
            else:
                continue
            seen.add(text)
            rows.append(_row(p, text, pkg))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    man_v = subprocess.run(["man", "--version"], capture_output=True, text=True).stdout.strip()
    pk = collections.Counter((r["metadata"]["package"], r["metadata"]["version"],
                              r["metadata"]["licence"]) for r in rows)
    lines = [f"# Provenance of {out.name}", "",
             f"{len(rows)} Debian manual pages rendered on this machine by `{man_v}` at 80 columns "
             f"(`tools/make_manuals.py {' '.join(argv if argv is not None else sys.argv[1:])}`).",
             "Each page keeps the licence of the package that ships it:", "",
             "| package | version | licence | pages |", "|---|---|---|---:|"]
    lines += [f"| {p} | {v} | {lic} | {n} |" for (p, v, lic), n in sorted(pk.items())]
    out.with_suffix(".provenance.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(rows)} manual pages -> {out}")


if __name__ == "__main__":
    main()
