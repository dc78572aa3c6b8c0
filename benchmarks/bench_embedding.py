"""Throughput of Gaussian-pooled embedding, in Python and through Spark, against the machine's peak.

Run:  python benchmarks/bench_embedding.py            (1,000 sample documents, ~2-4 minutes)
      python benchmarks/bench_embedding.py --docs 200 --no-spark

What it prints (one table):

* the machine: CPU model, cores, ISA (AVX2 / AVX-512 / AVX-512-BF16), load average before and after
  (the figures are only as good as the machine was quiet);
* the fp32 matmul rate of this machine: a large torch matmul on all cores (GFLOP/s, best of several),
  measured before and after the runs; the larger of the two is the reference;
* the encoder's forward FLOPs, counted from the model config: per layer and token
  ``8h² + 4hi`` (Q, K, V, O projections and the two FFN matmuls; 2 FLOPs per multiply-add) plus
  ``4hT`` for attention (QKᵀ and AV) at sequence length T; embeddings, LayerNorm, softmax, GELU
  and pooling are not counted. FLOPs are counted on real tokens only (padding is waste, not work);
* documents/s and tokens/s of ``embed_pooled(K=5, σ=0.05, α=1)`` over the sample documents
  (400-4,000 characters, truncated at max_seq_length tokens), called directly in this process
  and through Spark (``mapInPandas`` via ``finelake.udfs.embedding.map_embeddings``, ``local[N]``,
  one torch thread per task) on the same rows, after a warm-up job that loads the model in every
  worker (the first job pays torch's cold import, 8-13 s per worker);
* Spark/direct wall-time ratio (target <= 1.10), achieved GFLOP/s and its fraction of the matmul
  rate (target >= 0.5 through Spark), peak RSS of this process, of the Spark workers, and of the JVM;
* the same in CPU time (process user+system seconds: this process for the direct run, the Python
  workers plus the JVM for Spark, read from /proc), compared with a one-thread matmul per CPU-second.
  On a shared machine wall-clock rates drop with the load; work per CPU-second barely does, so the
  CPU-time columns are the ones to compare between runs (OpenMP spin-waiting does count as CPU time);
* unless --bf16-docs 0: the direct run again in bfloat16 on the first 300 documents (this EPYC has AVX-512 BF16; on a CPU without
  it bf16 is slower) and the cosine between its vectors and the fp32 ones.

* with --compare-plain: the same direct run again on the plain path (``prefetch=False``,
  ``tokenize_group=0``: tokenize the whole call, then batches one by one, as before issue 16) and
  the max |difference| between the two runs' vectors.

On a GPU (``--device cuda``) the CPU-only rows (matmul rates, per CPU-second, Spark, the bf16 rerun)
are skipped; it prints docs/s, tokens/s, padding and peak GPU memory of the pipelined embedder and,
with --compare-plain, of the plain path. ``--random-encoder xlmr-large`` embeds with random weights
of BGE-M3's shape (XLM-RoBERTa large: 24 layers, d=1024, 16 heads, FFN 4096, 8,194 positions) and
the embedded MiniLM tokenizer, built in a temporary folder, so no download is needed (speed does
not depend on the weights). The prepared GPU command (from the repository root, with
``../shared/gpu-smoke`` copied to ``.gpu/`` and its wheels fetched, as its README says)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/.whl/*.whl . && \
    PYTHONPATH=/tmp/site python3 benchmarks/bench_embedding.py --device cuda --dtype float16 \
        --random-encoder xlmr-large --max-seq-length 8192 --batch-size 256 \
        --max-batch-tokens 131072 --docs 3000 --no-spark --compare-plain \
        --json "${OUT:-/tmp}/bench_embedding_gpu.json"

(about 3 minutes on an H200, most of it building and loading the random encoder; ``--docs-file``
points at longer documents: the H200 figures in the README used documents of 1,188 tokens on
average, the shipped sample is shorter.)

Never reads outside the repository (unless --docs-file says); the model is the embedded
all-MiniLM-L6-v2 unless --model or --random-encoder says.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from machine import ROOT, cpu_info, load_avg, matmul_gflops, offline_env  # benchmarks/ is the script's folder

offline_env()

DOCS = ROOT / "sample" / "documents.jsonl"
K, SIGMA, ALPHA = 5, 0.05, 1.0


# ----------------------------------------------------------------------------- machine


def matmul_gflops_per_cpu_s(n: int = 2048, dtype: str = "float32", reps: int = 4) -> float:
    """One-thread matmul GFLOP per CPU-second (load-independent peak of one core)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dt = getattr(torch, dtype)
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.matmul(a, b)
        c0 = time.process_time()
        for _ in range(reps):
            torch.matmul(a, b)
        return reps * 2 * n ** 3 / (time.process_time() - c0) / 1e9
    finally:
        torch.set_num_threads(old)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (NaN if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- FLOPs


def encoder_flops(config, lengths) -> tuple[float, float]:
    """(FLOPs per token at length 1 excluding attention, total forward FLOPs over ``lengths``).

    Per layer, for a sequence of T tokens: T·(8h² + 4hi) + 4hT² (see module docstring).
    """
    L = config.num_hidden_layers
    h = config.hidden_size
    i = config.intermediate_size
    per_tok = L * (8 * h * h + 4 * h * i)
    total = sum(L * (T * (8 * h * h + 4 * h * i) + 4 * h * T * T) for T in lengths)
    return per_tok, float(total)


# ----------------------------------------------------------------------------- runs


def run_direct(model_cfg: dict, texts: list[str], threads: int, emb=None) -> dict:
    """One timed ``embed_pooled`` call over ``texts`` after a 64-text warm-up. On CUDA the time ends
    after the vectors are back on the host (the call synchronizes) and ``peak_gib`` is the peak
    allocated GPU memory of the timed call."""
    import torch

    from finelake.models.embedding import create_embedder

    cuda = str(model_cfg["options"].get("device", "cpu")).startswith("cuda")
    if not cuda and threads:
        torch.set_num_threads(threads)
    if emb is None:
        opts = dict(model_cfg["options"])
        if not cuda and threads:
            opts["threads"] = threads
        emb = create_embedder({**model_cfg, "options": opts})
    emb.embed_pooled(texts[:64], K, SIGMA, ALPHA)  # warm-up (allocator, oneDNN / cuBLAS kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = dict(emb.stats)
    c0, t0 = time.process_time(), time.perf_counter()
    out = emb.embed_pooled(texts, K, SIGMA, ALPHA)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape == (len(texts), K + 1, emb.dim)
    run = {k: emb.stats[k] - before[k] for k in ("tokens", "padded_tokens", "batches")}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return {"seconds": secs, "cpu_seconds": cpu, "embedder": emb, "out": out, "peak_gib": peak,
            "prefetch": emb.prefetch, "attn": emb.attn_implementation, **run}


def run_plain(d: dict, texts: list[str], threads: int, model_cfg: dict) -> dict:
    """The direct run again on the same embedder, on the plain path (no thread, one group)."""
    emb = d["embedder"]
    old = emb.prefetch, emb.tokenize_group
    emb.prefetch, emb.tokenize_group = False, 1 << 62
    try:
        p = run_direct(model_cfg, texts, threads, emb=emb)
    finally:
        emb.prefetch, emb.tokenize_group = old
    p["max_abs_diff"] = float(abs(p["out"] - d["out"]).max())
    p["min_cos"] = float((p["out"] * d["out"]).sum(-1).min())
    del p["out"], p["embedder"]
    return p


def random_encoder(layers: int, max_seq_length: int, dtype: str) -> str:
    """A sentence-transformers folder (in a temporary directory) with random weights of BGE-M3's
    shape (XLM-RoBERTa large; ``layers`` of its 24) and the embedded MiniLM tokenizer, mean
    pooling. Returns its path."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer, models as stm
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from finelake.models.resolve import hf_path

    root = Path(tempfile.mkdtemp(prefix="bench-xlmr-"))
    tok = AutoTokenizer.from_pretrained(hf_path("embedded:all-minilm-l6-v2"))
    cfg = XLMRobertaConfig(vocab_size=tok.vocab_size, hidden_size=1024, num_hidden_layers=layers,
                           num_attention_heads=16, intermediate_size=4096,
                           max_position_embeddings=max(514, max_seq_length + 2), type_vocab_size=1,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = XLMRobertaModel(cfg).to(getattr(torch, {"float16": "float16", "bfloat16": "bfloat16"}
                                            .get(dtype, "float32")))
    model.save_pretrained(root / "hf")
    tok.model_max_length = max_seq_length
    tok.save_pretrained(root / "hf")
    st = SentenceTransformer(modules=[stm.Transformer(str(root / "hf"), max_seq_length=max_seq_length),
                                      stm.Pooling(cfg.hidden_size, "mean")], device="cpu")
    st.save(str(root / "st"))
    return str(root / "st")


def gpu_main(args, texts: list[str], model_cfg: dict) -> int:
    """``--device cuda``: the pipelined embedder (and with --compare-plain the plain path) on one
    GPU; prints a table and writes --json."""
    import torch

    d = run_direct(model_cfg, texts, 0)
    p = run_plain(d, texts, 0, model_cfg) if args.compare_plain else None
    emb = d.pop("embedder")
    del d["out"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run)"
    rows = [("gpu", gpu, f"torch {torch.__version__}"),
            ("model", args.random_encoder or args.model,
             f"{args.dtype}, attention {d['attn']}, max_seq_length {emb.max_seq_length}, batch <= "
             f"{args.batch_size} texts and <= {args.max_batch_tokens or 'any'} tokens")]
    for name, r in (("pipelined", d), ("plain", p)):
        if r is None:
            continue
        rows.append((f"{name}: docs/s, tokens/s", f"{len(texts) / r['seconds']:.1f} , "
                     f"{r['tokens'] / r['seconds']:.0f}",
                     f"{r['seconds']:.2f} s, {len(texts)} docs, mean {r['tokens'] / len(texts):.0f} tokens, "
                     f"padding {r['padded_tokens'] / r['tokens'] - 1:+.1%}, {r['batches']} batches, "
                     f"peak {r['peak_gib'] or 0:.1f} GiB, prefetch {r['prefetch']}"))
    if p:
        rows.append(("pipelined / plain speed", f"{p['seconds'] / d['seconds']:.2f}x",
                     f"vectors: max |diff| {p['max_abs_diff']:.2g}, min cosine {p['min_cos']:.7f}"))
    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": rows[0][1], "docs": len(texts),
                                               "pipelined": d, "plain": p, "args": vars(args)},
                                              indent=2, default=str))
    return 0


def _print(rows) -> None:
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print()
    print(f"{'measure':<{w}}  {'value':<{v}}  note")
    print(f"{'-' * w}  {'-' * v}  {'-' * 40}")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:<{v}}  {note}")


def _worker_rss(batches):
    import pandas as pd

    for _ in batches:
        yield pd.DataFrame({"pid": [os.getpid()],
                            "rss_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]})


def _probe(spark, cores: int) -> dict:
    """pid -> peak RSS (MB) of the Python workers that run the next tasks."""
    rows = spark.range(cores, numPartitions=cores).mapInPandas(
        _worker_rss, "pid long, rss_mb double").collect()
    return {int(r["pid"]): float(r["rss_mb"]) for r in rows}


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


class CpuSampler:
    """CPU seconds used by a process and its descendants (the JVM, the PySpark daemon and its
    workers) while running: /proc is sampled every ``interval`` s, so a worker that Spark stops
    (idle workers are stopped after a minute without activity) still counts up to its last sample."""

    def __init__(self, root: int, interval: float = 0.5):
        import threading

        self.root, self.interval = root, interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for p in [self.root, *_descendants(self.root)]:
            c = proc_cpu_seconds(p)
            if c == c:  # not NaN
                self.first.setdefault(p, c)
                self.last[p] = c

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self, pids=None) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last if pids is None or p in pids)


def run_spark(model_cfg: dict, texts: list[str], cores: int, arrow_batch: int) -> dict:
    import pandas as pd
    from pyspark.sql import SparkSession

    from finelake.udfs.embedding import map_embeddings

    spark = (SparkSession.builder.master(f"local[{cores}]").appName("bench-embedding")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", str(cores))
             .config("spark.default.parallelism", str(cores))
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch))
             .config("spark.python.worker.reuse", "true")
             .config("spark.driver.memory", "2g")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        # Deal documents round-robin by token length so every partition carries the same work.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        part = [0] * len(texts)
        for r, i in enumerate(order):
            part[i] = r % cores
        pdf = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts, "p": part})
        # Place row i in partition part[i] exactly. (``repartition(cores, "p")`` would hash-partition,
        # and murmur3 sends p=0 and p=1 to the same one of 2 partitions: one task got every row.)
        src = spark.createDataFrame(pdf)
        keyed = src.rdd.map(lambda r: (r["p"], r)).partitionBy(cores, lambda p: p).values()
        df = spark.createDataFrame(keyed, src.schema).drop("p").cache()
        sizes = df.rdd.glom().map(len).collect()
        if max(sizes) - min(sizes) > 1:
            raise RuntimeError(f"unbalanced partitions {sizes}")

        def job(frame):
            out = map_embeddings(frame, model_cfg, "text", pooled=True, chunks=K, sigma=SIGMA,
                                 alpha=ALPHA)
            out.write.format("noop").mode("overwrite").save()

        t0 = time.perf_counter()
        job(df.limit(16 * cores).repartition(cores))  # warm-up: every worker imports torch, loads
        warm = time.perf_counter() - t0
        jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())  # noqa: SLF001
        with CpuSampler(jvm_pid) as cpu:
            t0 = time.perf_counter()
            job(df)
            secs = time.perf_counter() - t0
        after = _probe(spark, cores)
        return {"seconds": secs, "warmup_seconds": warm, "cpu_seconds": cpu.seconds(), "partitions": sizes,
                "jvm_cpu_seconds": cpu.seconds([jvm_pid]),
                "worker_rss_mb": max(after.values()), "workers": len(after),
                "jvm_hwm_mb": vm_hwm_mb(jvm_pid)}
    finally:
        spark.stop()


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1000,
                    help="documents (the file's rows, repeated when it has fewer)")
    ap.add_argument("--model", default="embedded:all-minilm-l6-v2")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="max texts per forward pass")
    ap.add_argument("--max-batch-tokens", type=int, default=4096,
                    help="max padded tokens per forward pass (0: no limit)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                    help="tokenize/pad on a background thread (auto: on for CUDA)")
    ap.add_argument("--tokenize-group", type=int, default=None,
                    help="texts per tokenizer call when prefetching (default: the embedder's)")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also time the plain path (no thread, one group) on the same texts")
    ap.add_argument("--random-encoder", choices=["xlmr-large"], default=None,
                    help="random weights of BGE-M3's shape instead of --model (no download)")
    ap.add_argument("--random-layers", type=int, default=24, help="layers of the random encoder")
    ap.add_argument("--docs-file", default=str(DOCS), help="JSONL with a 'text' field")
    ap.add_argument("--arrow-batch", type=int, default=1000,
                    help="spark.sql.execution.arrow.maxRecordsPerBatch (texts length-sorted together)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the direct run (0: all cores)")
    ap.add_argument("--no-spark", action="store_true")
    ap.add_argument("--bf16-docs", type=int, default=300,
                    help="documents of the bfloat16 comparison run (0: skip it)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    cpu = cpu_info()
    cores = cpu["cores"]
    threads = args.threads or cores
    load_before = load_avg()
    with open(args.docs_file, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.docs), f)]
    texts = (texts * (args.docs // max(1, len(texts)) + 1))[:args.docs]
    model = args.model
    if args.random_encoder:
        model = random_encoder(args.random_layers, args.max_seq_length, args.dtype)
    opts = {"max_seq_length": args.max_seq_length, "dtype": args.dtype,
            "max_batch_tokens": args.max_batch_tokens, "device": args.device}
    if args.prefetch != "auto":
        opts["prefetch"] = args.prefetch == "on"
    if args.tokenize_group is not None:
        opts["tokenize_group"] = args.tokenize_group
    model_cfg = {"backend": "sentence_transformers", "model": model, "batch_size": args.batch_size,
                 "options": opts}
    if args.device.startswith("cuda"):
        return gpu_main(args, texts, model_cfg)

    peak_before = matmul_gflops(cores)
    peak_1t = matmul_gflops(1)
    core_fp32 = matmul_gflops_per_cpu_s()
    core_bf16 = matmul_gflops_per_cpu_s(dtype="bfloat16")

    d = run_direct(model_cfg, texts, threads)
    emb = d["embedder"]
    plain = run_plain(d, texts, threads, model_cfg) if args.compare_plain else None
    lengths = emb.token_lengths(texts)
    tokens = sum(lengths)
    per_tok_lin, flops = encoder_flops(emb._transformer.auto_model.config, lengths)  # noqa: SLF001
    mean_len = tokens / len(texts)
    padded = d["padded_tokens"]
    bf = None
    if args.bf16_docs and args.dtype != "bfloat16":
        nb = min(args.bf16_docs, len(texts))
        bf_cfg = {**model_cfg, "options": {**model_cfg["options"], "dtype": "bfloat16"}}
        bf = run_direct(bf_cfg, texts[:nb], threads)
        bf["docs"], bf["tokens"] = nb, sum(lengths[:nb])
        bf["flops"] = encoder_flops(emb._transformer.auto_model.config, lengths[:nb])[1]  # noqa: SLF001
        cos = (bf["out"] * d["out"][:nb]).sum(-1)
        bf["cos_min"], bf["cos_mean"] = float(cos.min()), float(cos.mean())
        del bf["embedder"], bf["out"]
    del d["out"]
    sp = None if args.no_spark else run_spark(model_cfg, texts, cores, args.arrow_batch)
    peak_after = matmul_gflops(cores)
    peak = max(peak_before, peak_after)

    rows = []

    def add(name, value, note=""):
        rows.append((name, value, note))

    add("machine", f"{cpu['model']}, {cores} cores", cpu["isa"])
    add("load average before / after", f"{load_before} / {load_avg()}", "1/5/15 min; shared machine")
    add("fp32 matmul, all cores", f"{peak:.1f} GFLOP/s",
        f"2048³, best of 2 s; before {peak_before:.1f}, after {peak_after:.1f}; 1 thread {peak_1t:.1f}")
    add("matmul per CPU-second, 1 thread", f"{core_fp32:.1f} GFLOP/cpu-s",
        f"fp32; bf16 {core_bf16:.1f}")
    add("model", f"{args.model}", f"{args.dtype}, max_seq_length {args.max_seq_length}, "
        f"batch <= {args.batch_size} texts and <= {args.max_batch_tokens or 'any'} tokens")
    add("encoder FLOPs/token", f"{per_tok_lin / 1e6:.2f} MFLOP + attention",
        f"{(flops / tokens) / 1e6:.2f} MFLOP/token at these lengths")
    add("documents / tokens", f"{len(texts)} / {tokens}",
        f"mean {mean_len:.0f} tokens; padding computed {padded / d['tokens'] - 1:+.1%} "
        f"(direct, {d['batches']} batches)")
    ds = d["seconds"]
    add("direct: docs/s, tokens/s", f"{len(texts) / ds:.1f} , {tokens / ds:.0f}",
        f"{ds:.1f} s, {threads} torch threads, one process")
    add("direct: achieved", f"{flops / ds / 1e9:.1f} GFLOP/s", f"{flops / ds / 1e9 / peak:.2f} of matmul rate")
    dc = d["cpu_seconds"]
    add("direct: per CPU-second", f"{flops / dc / 1e9:.1f} GFLOP/cpu-s",
        f"{flops / dc / 1e9 / core_fp32:.2f} of 1-thread matmul; {dc:.1f} cpu-s; prefetch {d['prefetch']}")
    if plain:
        pc = plain["cpu_seconds"]
        add("plain path: docs/s, tokens/s", f"{len(texts) / plain['seconds']:.1f} , "
            f"{tokens / plain['seconds']:.0f}", f"{plain['seconds']:.1f} s; {flops / pc / 1e9:.1f} "
            f"GFLOP/cpu-s; {plain['batches']} batches")
        add("plain vs direct vectors", f"max |diff| {plain['max_abs_diff']:.2g}",
            f"min cosine {plain['min_cos']:.7f}")
    if bf:
        bf_rate = bf["flops"] / bf["cpu_seconds"] / 1e9
        add("direct bf16: docs/s, tokens/s", f"{bf['docs'] / bf['seconds']:.1f} , "
            f"{bf['tokens'] / bf['seconds']:.0f}", f"first {bf['docs']} docs, {bf['seconds']:.1f} s; "
            f"{bf_rate:.1f} GFLOP/cpu-s = {bf_rate / (flops / dc / 1e9):.2f}x fp32 per CPU-second")
        add("bf16 vs fp32 vectors", f"cosine min {bf['cos_min']:.5f}", f"mean {bf['cos_mean']:.6f}")
    if sp:
        ss = sp["seconds"]
        add("spark: docs/s, tokens/s", f"{len(texts) / ss:.1f} , {tokens / ss:.0f}",
            f"{ss:.1f} s, local[{cores}] mapInPandas, arrow batch {args.arrow_batch}, "
            f"1 thread/task, rows per partition {sp['partitions']}; warm-up job {sp['warmup_seconds']:.1f} s")
        add("spark: achieved", f"{flops / ss / 1e9:.1f} GFLOP/s",
            f"{flops / ss / 1e9 / peak:.2f} of matmul rate (target >= 0.5)")
        sc = sp["cpu_seconds"]
        add("spark: per CPU-second", f"{flops / sc / 1e9:.1f} GFLOP/cpu-s",
            f"{flops / sc / 1e9 / core_fp32:.2f} of 1-thread matmul; {sc:.1f} cpu-s "
            f"(JVM {sp['jvm_cpu_seconds']:.1f})")
        add("spark / direct time", f"{ss / ds:.2f}", f"target <= 1.10; CPU time {sc / dc:.2f}")
        add("peak RSS", f"driver {rss_mb_self():.0f} MB", f"worker {sp['worker_rss_mb']:.0f} MB "
            f"(max of {sp['workers']}), JVM {sp['jvm_hwm_mb']:.0f} MB")
    else:
        add("peak RSS", f"{rss_mb_self():.0f} MB", "this process")

    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu, "matmul_gflops": peak, "matmul_gflops_1thread": peak_1t,
             "matmul_gflops_per_cpu_s": core_fp32, "tokens": tokens, "docs": len(texts),
             "flops": flops, "direct": d | {"embedder": None}, "plain": plain, "bf16": bf, "spark": sp,
             "args": vars(args)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
