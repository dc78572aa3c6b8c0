"""What the document quality filters of ``ingest.filters`` drop on an input, and how fast they run.

Run:  python benchmarks/bench_document_filters.py                       (the shipped sample)
      python benchmarks/bench_document_filters.py --documents docs.jsonl --field text --json out.json

Each filter finelake knows (:data:`finelake.method.document_filters.FILTERS`) alone, and the cluster
profiles' chain (``conf/_cluster.yaml``), over the input's documents normalized and exactly
deduplicated as ingest does, on all of them and on the first ``--first`` by content id (the
documents ``finelake run`` processes with ``run.max_documents``: 120 in the local profile).
Printed: drops by reason, and the chain's documents per second and CPU milliseconds per document
in this process (one core; the first call imports spaCy and is timed apart; on a shared machine the
CPU time is the figure to compare). No Spark: the verdicts are the same ones ingest's
executors compute (:class:`~finelake.method.document_filters.DocumentFilters`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from importlib import resources


def _texts(path: str | None, field: str) -> list[str]:
    from finelake.method.text import content_id, normalize_text

    src = resources.files("finelake.sample").joinpath("documents.jsonl") if path is None else path
    with open(src, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    seen, out = set(), []
    for line in lines:
        if line.strip():
            t = normalize_text(json.loads(line)[field])
            if t and content_id(t) not in seen:
                seen.add(content_id(t))
                out.append(t)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--documents", help="JSONL file (default: the shipped sample's documents)")
    ap.add_argument("--field", default="text")
    ap.add_argument("--first", type=int, default=120, help="documents first by content id")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from finelake.config import load_config
    from finelake.method.document_filters import FILTERS, DocumentFilters, filter_specs
    from finelake.method.text import content_id

    texts = _texts(args.documents, args.field)
    first = set(sorted(texts, key=content_id)[: args.first])
    chain = filter_specs(load_config("databricks").ingest.filters)
    runs = {"chain:" + ",".join(n for n, _ in chain): chain}  # first: it pays spaCy's load
    runs.update({name: ((name, "{}"),) for name in FILTERS})
    out: dict = {"documents": len(texts), "first": len(first), "load": os.getloadavg()[0],
                 "drops": {}, "drops_first": {}}
    for label, specs in runs.items():
        flt = DocumentFilters(specs)
        t0 = time.perf_counter()
        flt.reason(texts[0])
        warm, cpu = time.perf_counter(), time.process_time()
        reasons = flt.reasons(texts)
        secs, cpu = time.perf_counter() - warm, time.process_time() - cpu
        allc = collections.Counter(r for r in reasons if r)
        firstc = collections.Counter(r for t, r in zip(texts, reasons) if r and t in first)
        out["drops"][label] = dict(sorted(allc.items()))
        out["drops_first"][label] = dict(sorted(firstc.items()))
        if label.startswith("chain:"):
            out["chain_docs_per_s"] = round(len(texts) / secs, 1)
            out["chain_cpu_ms_per_doc"] = round(1000 * cpu / len(texts), 2)
            out["first_call_s"] = round(warm - t0, 2)
        print(f"{label:58s} all {sum(allc.values()):4d}/{len(texts)}  first {args.first}: "
              f"{sum(firstc.values()):3d}  {dict(allc)}", flush=True)
    print(f"chain: {out['chain_docs_per_s']} documents/s, {out['chain_cpu_ms_per_doc']} ms of CPU "
          f"per document, after a {out['first_call_s']} s first call (spaCy's import); load "
          f"average {out['load']:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
