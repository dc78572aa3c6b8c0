"""Genericize with and without the JSON-schema decoding constraint (``genericize.constrained``).

Run:  python benchmarks/bench_genericize_constrained.py [--conf local] [--queries 20]

The profile's genericize model (``genericize.model`` or ``models.generator``) genericizes the first
``--queries`` sample queries twice through the stage's own row function
(:func:`finelake.jobs.genericize.genericize_rows`, no Spark), once with the schema sent
(constrained) and once without (replies read leniently: the first JSON object, extra keys
tolerated). For each it prints: replies, parse rate (replies of the expected JSON shape), valid
templates, flag counts, invalid reasons and seconds. The model loads once (the worker cache),
before the timed runs.

This is how the profiles' defaults were chosen: a model trained on free-text JSON (the released
``fineinstructions/query_templatizer``) may be pushed off its format by a grammar, while a model
as small as SmolLM2-135M may need one to produce JSON at all.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from importlib import resources

import pandas as pd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conf", default="local")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args(argv)

    from finelake.config import load_config
    from finelake.models.spec import ModelSpec
    from finelake.jobs.genericize import genericize_rows
    from finelake.method.replies import stage_signals
    from finelake.udfs.generation import load_generator

    cfg = load_config(args.conf)
    g = cfg.genericize
    spec = ModelSpec.of(g.model or cfg.models.generator, "generator")
    lines = resources.files("finelake.sample").joinpath("queries.jsonl").read_text(
        encoding="utf-8").split("\n")
    queries = [json.loads(x)["query"] for x in lines if x.strip()][:args.queries]
    pdf = pd.DataFrame({"query_id": [f"q{i}" for i in range(len(queries))], "query": queries})
    t0 = time.perf_counter()
    load_generator(spec)
    print(f"profile {args.conf}: genericize.mode={g.mode}, {spec['backend']} {spec['model']}, "
          f"{len(queries)} sample queries; model loaded in {time.perf_counter() - t0:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    for constrained in (True, False):
        t0 = time.perf_counter()
        rows = genericize_rows(pdf, spec, g.mode, g.max_slots, g.prompt_version,
                               constrained=constrained)
        secs = time.perf_counter() - t0
        sig = stage_signals((r.get("raw_output") is not None, r.get("reason"), r.get("flags"), 1)
                            for r in rows)
        valid = sum(r["status"] == "ok" for r in rows)
        reasons = Counter((r.get("reason") or "").split(";")[0].split(":")[0]
                          for r in rows if r["status"] != "ok")
        summ = sig.summary()
        print(f"constrained={str(constrained).lower():<5}  replies={sig.replies}  "
              f"parse_rate={summ['parse_rate']}  valid={valid}/{len(rows)}  "
              f"flags={summ.get('flags', '{}')}  {secs:.1f} s")
        print(f"    invalid: {dict(reasons.most_common())}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
