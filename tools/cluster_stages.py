"""Run some pipeline stages, in order, in one Spark application (``make cluster-test``'s reruns and
its multi-GPU scenario: stages of one application share its Python workers, which is what those
scenarios look at; ``finelake <stage>`` would start one application per stage).

    spark-submit tools/cluster_stages.py --stages judge,budget --conf PROFILE --lake LAKE \\
        [--set KEY=VALUE ...] [--max-queries N] [--max-documents N]

Prints each stage's summary line, as ``finelake run`` does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

STAGES = ("genericize", "index", "match", "instantiate", "judge", "budget")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", required=True, help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--conf", required=True)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--max-queries", type=int)
    ap.add_argument("--max-documents", type=int)
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "httpx", "urllib3", "filelock", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finelake.config import load_config
    from finelake.runtime import StageContext

    ctx = StageContext(load_config(args.conf, args.overrides, lake=args.lake))
    for stage in stages:
        mod = importlib.import_module(f"finelake.jobs.{stage}")
        stats = getattr(mod, f"run_{stage}")(ctx, max_queries=args.max_queries,
                                             max_documents=args.max_documents)
        print(stats.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
