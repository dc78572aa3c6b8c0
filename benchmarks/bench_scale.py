"""Scale benchmark of the Spark/Delta plumbing: ingest, index, match, instantiate, judge, budget.

    python benchmarks/bench_scale.py --documents 20000 --templates 100000 --json out/20k.json
    python benchmarks/bench_scale.py --plot out/20k.json out/200k.json --out docs/bench_scale.png

Every model is the synthetic ``load`` backend (:mod:`finelake.models.load_backend`, profile
``conf/load-test.yaml``): a deterministic generator returning well-formed grounded outputs and an
embedder of the production width (1024). The figures measure finelake's own work around the
models (Spark jobs, Arrow transfer, prompt building and parsing, excerpt expansion, FAISS, Delta
merges, token counting), never model quality or model speed; the GPU cost of the models is the
README's "Cost per million documents on GPUs".

Inputs, made before anything is timed:

* ``N`` documents: text drawn word by word from the vocabulary of the shipped sample documents
  (``sample/documents.jsonl``), in sentences of 8-25 words, each document's length in characters
  drawn from the sample documents' lengths (seeded), so no two documents are near-duplicates and
  ingest keeps them all; written as one JSONL file.
* ``M`` templates with 1-3 ``<fi>`` slots and a compatible-document description each, written to
  ``templates`` (and one ``ok`` genericization per template, the complexity target of §3.2)
  by Spark from ``spark.range``; the load embedder puts them in ``M / --templates-per-topic``
  topics, so a document clears the 0.5 threshold against about that many templates.

Output (``--json``): per stage ``rows_in``, ``rows_out``, ``seconds``, ``rows_per_s``,
``us_per_row`` and the peak RSS of the Python driver and of the JVM during the stage, plus
``driver_peak_rss_mb`` (the Python driver process; in ``local[N]`` mode the JVM hosts the executors
too, so its figure, ``jvm_peak_rss_mb``, is reported apart and is bounded by
``spark.driver.memory``), ``document_tokens`` and ``pair_tokens`` (from ``budget_ledger``), the
machine (:mod:`benchmarks.machine`) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ("ingest", "index", "match", "instantiate", "judge", "budget")


# ----------------------------------------------------------------------------- inputs


def sample_profile(path: Path) -> tuple[list[str], list[int]]:
    """The vocabulary (words of 2+ letters, in order of first use) and the character lengths of
    the sample documents at ``path`` (JSONL with a ``text`` field)."""
    words, seen, lengths = [], set(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            lengths.append(len(text))
            for w in re.findall(r"[A-Za-z][A-Za-z'-]+", text):
                if w not in seen:
                    seen.add(w)
                    words.append(w)
    return words, lengths


def write_documents(path: Path, n: int, words: list[str], lengths: list[int], seed: int) -> int:
    """Write ``n`` synthetic documents as JSONL (``{"text": ...}``); returns the characters written.

    Each document: sentences of 8-25 words drawn uniformly from ``words``, first word capitalized,
    until its length (drawn from ``lengths``) is reached. Deterministic for a seed."""
    rng = random.Random(seed)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            target = rng.choice(lengths)
            parts, size = [], 0
            while size < target:
                s = " ".join(rng.choices(words, k=rng.randint(8, 25)))
                s = s[0].upper() + s[1:] + "."
                parts.append(s)
                size += len(s) + 1
            text = " ".join(parts)
            total += len(text)
            f.write(json.dumps({"text": text, "source": "bench_scale"}) + "\n")
    return total


def write_templates(ctx, m: int) -> None:
    """``m`` templates (and one ok genericization each) written by Spark, never through driver
    lists: template ``i`` has ``1 + i % 3`` slots and a description naming its kinds and ``i``."""
    from pyspark.sql import functions as F

    from finelake.tables import GENERICIZATIONS, TEMPLATES

    spark = ctx.spark
    df = spark.range(m).select(F.col("id"))
    k1, k2, k3 = (F.concat(F.lit("kind "), ((F.col("id") * p) % 997).cast("string")) for p in (7, 13, 31))
    slots = (F.col("id") % 3 + 1).cast("int")
    tpl = (F.when(slots == 1, F.concat(F.lit("What should I know about <fi>"), k1, F.lit("</fi>?")))
           .when(slots == 2, F.concat(F.lit("How does <fi>"), k1, F.lit("</fi> affect <fi>"), k2,
                                      F.lit("</fi>?")))
           .otherwise(F.concat(F.lit("Compare <fi>"), k1, F.lit("</fi> and <fi>"), k2,
                               F.lit("</fi> for <fi>"), k3, F.lit("</fi>."))))
    desc = F.concat(F.lit("A document about a specific "), k1, F.lit(" (template "),
                    F.col("id").cast("string"), F.lit(")"))
    tid = F.substring(F.sha1(F.concat(tpl, F.lit("\u0000"), F.col("id").cast("string"))), 1, 16)
    t = df.select(tid.alias("template_id"),
                  tpl.alias("template"), desc.alias("compatible_document_description"),
                  slots.alias("num_slots"), F.array(F.col("id").cast("string")).alias("source_query_ids"),
                  F.lit(1).cast("long").alias("source_count"), F.lit("load:load").alias("model_id"),
                  F.lit("bench_scale").alias("prompt_version"))
    ctx.lake.merge(TEMPLATES, t, ctx.run_id)
    g = t.select(F.col("source_query_ids")[0].alias("query_id"), F.lit("ok").alias("status"),
                 "template_id", "template", "compatible_document_description", "num_slots",
                 "model_id", "prompt_version")
    ctx.lake.merge(GENERICIZATIONS, g, ctx.run_id)


# ----------------------------------------------------------------------------- measuring


class RssSampler:
    """Peak resident memory (MiB) of this process and of its JVM child, sampled every
    ``interval`` seconds in a thread; :meth:`mark` starts a new stage's peaks."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = {"driver": 0.0, "jvm": 0.0}
        self.stage = {"driver": 0.0, "jvm": 0.0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _jvm(self):
        for c in self.proc.children(recursive=True):
            try:
                if c.name() == "java":
                    return c
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return None

    def _run(self):
        jvm = None
        while not self._stop.wait(self.interval):
            try:
                d = self.proc.memory_info().rss / 2**20
                jvm = jvm if jvm is not None and jvm.is_running() else self._jvm()
                j = jvm.memory_info().rss / 2**20 if jvm is not None else 0.0
            except Exception:  # noqa: BLE001
                continue
            for key, v in (("driver", d), ("jvm", j)):
                self.peak[key] = max(self.peak[key], v)
                self.stage[key] = max(self.stage[key], v)

    def start(self):
        self._t.start()
        return self

    def mark(self) -> dict:
        out = dict(self.stage)
        self.stage = {"driver": 0.0, "jvm": 0.0}
        return out

    def stop(self):
        self._stop.set()
        self._t.join()


def run(args) -> dict:
    """Make the inputs, run the six stages once each, and return the figures (see module doc)."""
    sys.path.insert(0, str(HERE))
    from machine import cpu_info  # benchmarks/machine.py

    from finelake.config import load_config
    from finelake.runtime import StageContext
    from finelake.tables import BUDGET_LEDGER

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    lake = work / "lake"
    if lake.exists() and not args.reuse:
        raise SystemExit(f"{lake} exists: pass another --workdir, or --reuse to resume it")
    topics = max(1, args.templates // args.templates_per_topic)
    overrides = [f"lake={lake}", "run.max_documents=null", "run.max_queries=null",
                 f"models.embedder.options.topics={topics}",
                 f"instantiate.chunk_documents={args.chunk_documents}",
                 *args.set]
    cfg = load_config(args.conf, overrides)
    words, lengths = sample_profile(ROOT / "sample" / "documents.jsonl")
    docs = work / "documents.jsonl"
    t0 = time.perf_counter()
    if not docs.exists():
        chars = write_documents(docs, args.documents, words, lengths, args.seed)
        print(f"[bench_scale] {args.documents} documents, {chars / 1e6:.1f} M characters "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    load_before = os.getloadavg()
    ctx = StageContext(cfg)
    rss = RssSampler().start()
    ctx.spark  # session start is not a stage
    from finelake.tables import TEMPLATES

    if not ctx.lake.exists(TEMPLATES):
        t0 = time.perf_counter()
        write_templates(ctx, args.templates)
        print(f"[bench_scale] {args.templates} templates written ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    rss.mark()
    import importlib

    from finelake.jobs.ingest import run_ingest

    stages = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.perf_counter()
        if stage == "ingest":
            st = run_ingest(ctx, documents=str(docs))
            st = st[-1] if isinstance(st, (list, tuple)) else st
        else:
            mod = importlib.import_module(f"finelake.jobs.{stage}")
            st = getattr(mod, f"run_{stage}")(ctx)
        secs = time.perf_counter() - t0
        peaks = rss.mark()
        rows_in = int(st.rows_in or 0)
        stages[stage] = {"rows_in": rows_in, "rows_out": int(st.rows_out or 0),
                         "seconds": round(secs, 2),
                         "rows_per_s": round(rows_in / secs, 1) if secs else None,
                         "us_per_row": round(secs / rows_in * 1e6, 1) if rows_in else None,
                         "driver_rss_mb": round(peaks["driver"]), "jvm_rss_mb": round(peaks["jvm"]),
                         "summary": st.summary()}
        print(f"[bench_scale] {stage}: {rows_in} rows in {secs:.1f} s "
              f"({stages[stage]['us_per_row']} us/row); driver {peaks['driver']:.0f} MiB, "
              f"JVM {peaks['jvm']:.0f} MiB\n    {st.summary()}", flush=True)
    from pyspark.sql import functions as F

    tokens = {"document_tokens": 0, "pair_tokens": 0}
    if ctx.lake.exists(BUDGET_LEDGER):
        r = ctx.lake.read(BUDGET_LEDGER).agg(F.sum("doc_tokens").alias("d"),
                                             F.sum("used_tokens").alias("p")).collect()[0]
        tokens = {"document_tokens": int(r["d"] or 0), "pair_tokens": int(r["p"] or 0)}
    rss.stop()
    out = {"documents": args.documents, "templates": args.templates, "topics": topics,
           "profile": cfg.profile, "spark_master": cfg.spark.master,
           "stages": stages, **tokens,
           "driver_peak_rss_mb": round(rss.peak["driver"]), "jvm_peak_rss_mb": round(rss.peak["jvm"]),
           "spark_driver_memory": cfg.spark.conf.get("spark.driver.memory"),
           "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()],
           "machine": cpu_info(), "workdir": str(work)}
    ctx.spark.stop()
    return out


def chunk_overhead(args) -> dict:
    """The chunk loop's per-chunk overhead with 1x and 10x as many pending rows (issue 23).

    One lake with ``10 * --documents`` documents and ``--templates`` templates is ingested,
    indexed and matched, then copied twice; instantiate runs on the first copy with
    ``--max-documents N`` and on the second with ``10 N``: the same chunk size
    (``instantiate.chunk_documents``), the same tables, 1x and 10x as many pending pairs. Per
    chunk, the overhead is its wall time less the seconds its tasks spent in the row function
    (:class:`finelake.jobs.chunks.ChunkRun`): reading its keys and inputs by key, the shuffle, the
    plan, waiting for the previous commit. The ratio of the medians must stay at most 1.5.
    """
    import shutil
    import statistics

    from finelake.config import load_config
    from finelake.jobs.instantiate import run_instantiate
    from finelake.runtime import StageContext

    n = args.documents
    base = argparse.Namespace(**{**vars(args), "documents": 10 * n,
                                 "stages": ["ingest", "index", "match"]})
    prep = run(base)
    work = Path(prep["workdir"])
    out = {"documents": 10 * n, "templates": args.templates, "pending_1x_documents": n,
           "chunk_documents": args.chunk_documents, "prepare": prep["stages"]}
    for label, limit in (("1x", n), ("10x", 10 * n)):
        lake = work / f"lake_{label}"
        shutil.rmtree(lake, ignore_errors=True)
        shutil.copytree(work / "lake", lake)
        topics = max(1, args.templates // args.templates_per_topic)
        cfg = load_config(args.conf, [f"lake={lake}", "run.max_documents=null",
                                      f"models.embedder.options.topics={topics}",
                                      f"instantiate.chunk_documents={args.chunk_documents}",
                                      *args.set])
        ctx = StageContext(cfg)
        t0 = time.perf_counter()
        st = run_instantiate(ctx, max_documents=limit)
        secs = time.perf_counter() - t0
        cr = st.chunk_run
        ctx.spark.stop()
        out[label] = {"pending_pairs": st.rows_in - st.skipped, "chunks": cr.chunks,
                      "seconds": round(secs, 1),
                      "overhead_s_median": round(statistics.median(cr.overhead_s), 3),
                      "overhead_s_mean": round(statistics.fmean(cr.overhead_s), 3),
                      "busy_s_median": round(statistics.median(cr.busy_s), 3),
                      "commit_s_median": round(statistics.median(cr.commit_s), 3),
                      "longest_commit_wait_s": round(cr.idle_s, 3),
                      "overhead_s": [round(x, 3) for x in cr.overhead_s]}
        print(f"[bench_scale] chunk overhead {label}: {cr.chunks} chunks, median "
              f"{out[label]['overhead_s_median']} s outside the row function, "
              f"{out[label]['busy_s_median']} s in it", flush=True)
    out["chunk_overhead_s"] = {k: out[k]["overhead_s_median"] for k in ("1x", "10x")}
    out["ratio"] = round(out["10x"]["overhead_s_median"] / out["1x"]["overhead_s_median"], 3)
    out["machine"] = prep["machine"]
    return out


# ----------------------------------------------------------------------------- plot


def plot(paths: list[str], out: str) -> str:
    """Microseconds per input row, per stage, for each JSON result (one line per run size);
    writes a PNG to ``out`` and returns a markdown table of the same figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["documents"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs = [s for s in STAGES if s in r["stages"]]
        ax.plot(xs, [r["stages"][s]["us_per_row"] for s in xs], marker="o",
                label=f"{r['documents']:,} docs / {r['templates']:,} templates")
    ax.set_yscale("log")
    ax.set_ylabel("microseconds per input row (log)")
    ax.set_title("finelake plumbing cost per row (load backend, local[2])")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    head = "| stage | " + " | ".join(f"{r['documents']:,} docs: rows in / s / us per row" for r in runs)
    lines = [head + " | ratio |", "|---" * (len(runs) + 2) + "|"]
    for s in STAGES:
        if not all(s in r["stages"] for r in runs):
            continue
        cells = [f"{r['stages'][s]['rows_in']:,} / {r['stages'][s]['seconds']:.0f} / "
                 f"{r['stages'][s]['us_per_row']:.0f}" for r in runs]
        a, b = runs[0]["stages"][s]["us_per_row"], runs[-1]["stages"][s]["us_per_row"]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {b / a:.2f} |")
    lines.append("| driver peak RSS (MiB) | " + " | ".join(str(r["driver_peak_rss_mb"]) for r in runs)
                 + " | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=20000, help="N documents to generate")
    p.add_argument("--templates", type=int, default=100000, help="M templates to generate")
    p.add_argument("--templates-per-topic", type=int, default=16,
                   help="templates per load-embedder topic (~ candidates per document)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--conf", default="load-test", help="a profile with load_test: true")
    p.add_argument("--workdir", help="inputs and lake (default: a new temporary folder)")
    p.add_argument("--reuse", action="store_true", help="resume an existing --workdir's lake")
    p.add_argument("--chunk-documents", type=int, default=2000,
                   help="instantiate.chunk_documents (documents per Delta commit)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--set", action="append", default=[], help="extra profile override key=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="finelake's INFO log (step times)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="plot these results instead of running")
    p.add_argument("--chunk-overhead", action="store_true",
                   help="measure the chunk loop's per-chunk overhead with 1x and 10x pending rows "
                        "(10 x --documents ingested; instantiate on N and 10 N documents)")
    p.add_argument("--out", default="docs/bench_scale.png", help="with --plot: the PNG to write")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot, args.out))
        return
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("finelake").setLevel(logging.INFO)
    res = chunk_overhead(args) if args.chunk_overhead else run(args)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
