"""jobs/ingest.py end to end on tiny inputs: real rows cut from the shipped sample plus hand-made
malformed lines, through local Spark into Delta (delta-rs engine)."""

from __future__ import annotations

import json
import os
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from finelake.config import load_config
from finelake.jobs.ingest import (
    RAW_MAX_CHARS,
    IngestInvariantError,
    RowOptions,
    check_invariant,
    read_prepared,
    resolve_input,
    run_ingest,
)
from finelake.method.text import content_id, normalize_text
from finelake.runtime import FinelakeError, StageContext
from finelake.tables import DOCUMENTS, INGEST_DROPS, QUARANTINE, QUERIES

pytestmark = pytest.mark.slow

SAMPLE = resources.files("finelake.sample")


def _sample(name: str, n: int) -> list[dict]:
    lines = SAMPLE.joinpath(name).read_text("utf-8").split("\n")
    return [json.loads(line) for line in lines[:n]]


QUERIES_SAMPLE = _sample("queries.jsonl", 40)
DOCS_SAMPLE = _sample("documents.jsonl", 8)
IFEVAL_PROMPT = _sample("eval_ifeval.jsonl", 1)[0]["prompt"]


def _jl(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _one_word_changed(text: str) -> str:
    ws = text.split(" ")
    mid = len(ws) // 2
    ws[mid] = "zzzchanged"
    return " ".join(ws)


def _ctx(spark, tmp_path, name: str) -> StageContext:
    """The local profile on a fresh lake, its tables registered under their own SQL database."""
    cfg = load_config("local", [f"catalog.database=ingest_{name}"], lake=str(tmp_path / "lake"))
    return StageContext(cfg, run_id=f"test-{name}", spark=spark)


def _table(ctx, tdef) -> list[dict]:
    return DeltaTable(ctx.lake.path(tdef)).to_pyarrow_table().to_pylist()


def _check_invariant(s):
    assert s.rows_in == s.rows_out + sum(s.dropped.values()) + s.quarantined
    assert s.extra["check"].startswith(f"{s.rows_in}={s.rows_out}+")


# ----------------------------------------------------------------------------- JSONL, end to end

Q = QUERIES_SAMPLE
LONG_Q = Q[1]["query"]  # 99 words: one changed word keeps word-5-gram Jaccard ~0.9
QUERY_LINES: list[bytes] = [
    _jl(Q[0]),                                                   # 1 ok
    _jl(Q[1]),                                                   # 2 ok (near-dup kept)
    b'{"query": "unterminated string, "source": "hand"}',        # 3 bad_json
    _jl({"source": "hand", "id": "no-text"}),                    # 4 missing
    _jl({"query": " \t \u200b ", "source": "hand"}),            # 5 empty
    _jl({"query": "y" * 25000, "source": "hand"}),              # 6 too_long (max_chars 20000)
    _jl({"query": 42, "source": "hand"}),                        # 7 wrong_type
    b'{"query": "caf\xe9 au lait \xff\xfe", "source": "hand"}',  # 8 wrong_encoding (not UTF-8)
    _jl({"query": "  " + Q[0]["query"].replace(" ", "   ") + "\n"}),  # 9 duplicate of line 1
    _jl({**Q[1], "query": _one_word_changed(LONG_Q)}),          # 10 near_duplicate of line 2
    _jl({"query": IFEVAL_PROMPT.upper(), "source": "hand"}),     # 11 contaminated
    b"   ",                                                      # 12 blank: not a row
    _jl(Q[9]) + b"\r",                                           # 13 ok, raw U+2028 inside, CRLF
    _jl(Q[3]),                                                   # 14 ok, math-bold letters (NFKC)
    b"[1, 2, 3]",                                                # 15 not_an_object
]
Q_QUARANTINE = {3: "bad_json", 4: "missing", 5: "empty", 6: "too_long", 7: "wrong_type",
                8: "wrong_encoding", 15: "not_an_object"}
Q_DROPS = {9: ("duplicate", 1), 10: ("near_duplicate", 2), 11: ("contaminated", None)}
Q_ACCEPTED = [1, 2, 13, 14]

D = DOCS_SAMPLE
DOC_LINES: list[bytes] = [
    _jl(D[0]),                                                    # 1 ok
    _jl(D[3]),                                                    # 2 ok
    _jl({**D[0], "text": D[0]["text"] + "\n\n\n"}),               # 3 duplicate of 1
    _jl({**D[4], "text": _one_word_changed(D[4]["text"])}),       # 4 ok (first of the pair)
    _jl(D[4]),                                                    # 5 near_duplicate of 4
    _jl({"text": ["not", "a", "string"], "source": "hand"}),      # 6 wrong_type
]


@pytest.fixture(scope="module")
def jsonl_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest_jsonl")
    qpath, dpath = tmp / "queries.jsonl", tmp / "docs.jsonl"
    qpath.write_bytes(b"\n".join(QUERY_LINES) + b"\n")
    dpath.write_bytes(b"\n".join(DOC_LINES) + b"\n")
    ctx = _ctx(spark, tmp, "jsonl")
    stats = run_ingest(ctx, queries=str(qpath), documents=str(dpath))
    return ctx, stats, str(qpath), str(dpath)


def _qid(line: int) -> str:
    obj = json.loads(QUERY_LINES[line - 1].decode("utf-8").rstrip("\r"))
    return content_id(normalize_text(obj["query"], keep_paragraphs=False))


def test_jsonl_counts_add_up(jsonl_run):
    _, (qs, ds), _, _ = jsonl_run
    for s in (qs, ds):
        _check_invariant(s)
    assert (qs.rows_in, qs.rows_out, qs.quarantined) == (14, 4, 7)  # 15 lines, one blank
    assert qs.dropped == {"duplicate": 1, "near_duplicate": 1, "contaminated": 1}
    assert qs.extra["blank_lines"] == 1 and qs.extra["check"].startswith("14=4+2+1+7")
    assert (ds.rows_in, ds.rows_out, ds.quarantined) == (6, 3, 1)
    assert ds.dropped == {"duplicate": 1, "near_duplicate": 1}
    assert qs.extra["inserted"] == 4 and ds.extra["inserted"] == 3


def test_jsonl_every_bad_line_is_quarantined_with_reason_and_line(jsonl_run):
    ctx, _, qpath, dpath = jsonl_run
    rows = _table(ctx, QUARANTINE)
    q = {r["location"]: r for r in rows if r["target"] == "queries"}
    assert {loc: r["reason"].split(":")[0] for loc, r in q.items()} == \
        {f"line {n}": code for n, code in Q_QUARANTINE.items()}
    assert all(r["source"] == qpath and r["run_id"] == "test-jsonl" for r in q.values())
    assert len(q["line 6"]["raw"]) == RAW_MAX_CHARS  # truncated raw text
    assert "\ufffd" in q["line 8"]["raw"] and "caf" in q["line 8"]["raw"]
    assert q["line 7"]["raw"] == QUERY_LINES[6].decode()
    assert "25000 chars > max_chars 20000" in q["line 6"]["reason"]
    d = [r for r in rows if r["target"] == "documents"]
    assert [(r["location"], r["reason"].split(":")[0], r["source"]) for r in d] == \
        [("line 6", "wrong_type", dpath)]


def test_jsonl_duplicates_near_duplicates_and_contamination_are_dropped(jsonl_run):
    ctx, _, qpath, _ = jsonl_run
    drops = _table(ctx, INGEST_DROPS)
    q = {r["location"]: r for r in drops if r["target"] == "queries"}
    assert set(q) == {f"line {n}" for n in Q_DROPS}
    for n, (code, kept_line) in Q_DROPS.items():
        r = q[f"line {n}"]
        assert r["reason"].split(":")[0] == code and r["source"] == qpath
        assert r["kept_id"] == (_qid(kept_line) if kept_line else None)
    assert "ifeval:" in q["line 11"]["reason"]
    d = {r["location"]: (r["reason"].split(":")[0], r["kept_id"])
         for r in drops if r["target"] == "documents"}
    kept = {r["text"]: r["doc_id"] for r in _table(ctx, DOCUMENTS)}
    d0 = content_id(normalize_text(D[0]["text"]))
    d4 = content_id(normalize_text(_one_word_changed(D[4]["text"])))
    assert d == {"line 3": ("duplicate", d0), "line 5": ("near_duplicate", d4)}
    assert set(kept.values()) == {d0, d4, content_id(normalize_text(D[3]["text"]))}


def test_jsonl_accepted_rows(jsonl_run):
    ctx, _, _, _ = jsonl_run
    rows = {r["query_id"]: r for r in _table(ctx, QUERIES)}
    assert set(rows) == {_qid(n) for n in Q_ACCEPTED}
    sep = rows[_qid(13)]  # U+2028 stayed inside one row; queries collapse whitespace
    assert "\u2028" not in sep["query"] and sep["query"].startswith("아래 책 내용을 요약해줘 - 저자")
    assert rows[_qid(14)]["query"].startswith("def calc(arr: int = [3]) -> list: return arr.append(2)")
    first = rows[_qid(1)]
    assert first["source"] == "sharegpt_v3" and json.loads(first["metadata"]) == {"id": Q[0]["id"]}
    assert all(isinstance(r["num_tokens"], int) and r["num_tokens"] > 0
               for r in rows.values())
    assert rows[_qid(2)]["num_tokens"] > 3 * rows[_qid(1)]["num_tokens"]  # 566 vs 182 chars
    docs = _table(ctx, DOCUMENTS)
    meta = {json.loads(r["metadata"] or "{}").get("title") for r in docs}
    assert "Wild boar" in meta and all(r["source"] for r in docs)


def test_tables_readable_by_deltalake_and_spark_sql(jsonl_run, spark):
    ctx, _, _, _ = jsonl_run
    for tdef, n in ((QUERIES, 4), (DOCUMENTS, 3), (QUARANTINE, 8), (INGEST_DROPS, 5)):
        assert DeltaTable(ctx.lake.path(tdef)).to_pyarrow_table().num_rows == n
        got = spark.sql(f"SELECT count(*) AS n FROM {ctx.lake.sql_name(tdef)}").collect()[0]["n"]
        assert got == n, tdef.name
    reasons = spark.sql(f"SELECT reason FROM {ctx.lake.sql_name(QUARANTINE)} "
                        f"WHERE target = 'queries' AND location = 'line 3'").collect()
    assert reasons[0]["reason"].startswith("bad_json")


def test_rerun_adds_nothing(jsonl_run, spark):
    ctx, first, qpath, dpath = jsonl_run
    tables = (QUERIES, DOCUMENTS, QUARANTINE, INGEST_DROPS)
    before = {t.name: DeltaTable(ctx.lake.path(t)).to_pyarrow_table() for t in tables}
    again = StageContext(ctx.cfg, run_id="test-jsonl-rerun", spark=spark)
    stats = run_ingest(again, queries=qpath, documents=dpath)
    for s, f in zip(stats, first):
        _check_invariant(s)
        assert (s.rows_in, s.rows_out, s.quarantined, s.dropped) == \
            (f.rows_in, f.rows_out, f.quarantined, f.dropped)
        assert s.extra["inserted"] == 0
    for t in tables:
        after = DeltaTable(ctx.lake.path(t)).to_pyarrow_table()
        assert after.num_rows == before[t.name].num_rows, t.name
        keys = after.select(list(t.key)).to_pylist()
        assert len(keys) == len({tuple(k.values()) for k in keys}), t.name
        assert set(after.column("run_id").to_pylist()) == {"test-jsonl"}


# ----------------------------------------------------------------------------- other formats


def test_csv_queries_and_text_folder_documents(spark, tmp_path):
    qs = [q["query"] for q in QUERIES_SAMPLE[20:25]]
    csv = tmp_path / "q.csv"
    lines = ["qid,prompt,origin,lang"]
    for i, q in enumerate(qs):
        lines.append(f'q{i},"{q.replace(chr(34), chr(34) * 2)}",forum,en')
    lines.append('q0,"A different question that reuses the id q0 for no good reason",forum,en')  # row 6
    lines.append("q9,,forum,en")  # row 7: empty field -> missing
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS_SAMPLE[1]["text"], encoding="utf-8")
    (folder / "b.md").write_text("  " + DOCS_SAMPLE[2]["text"].replace(". ", ".\n\n\n"), encoding="utf-8")
    (folder / "empty.txt").write_text("\n \n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("Café crème brûlée".encode("latin-1"))
    (folder / ".hidden").write_text("not a document", encoding="utf-8")
    ctx = _ctx(spark, tmp_path, "csv")
    qs_stats, ds_stats = run_ingest(ctx, queries=str(csv), documents=str(folder), query_field="prompt",
                                    id_field="qid", source_field="origin")
    _check_invariant(qs_stats)
    _check_invariant(ds_stats)
    assert (qs_stats.rows_in, qs_stats.rows_out, qs_stats.quarantined) == (7, 5, 1)
    assert qs_stats.dropped == {"duplicate_id": 1}
    rows = {r["query_id"]: r for r in _table(ctx, QUERIES)}
    assert set(rows) == {f"q{i}" for i in range(5)}
    assert rows["q0"]["query"] == normalize_text(qs[0], keep_paragraphs=False)
    assert rows["q0"]["source"] == "forum" and json.loads(rows["q0"]["metadata"]) == {"lang": "en"}
    drops = [r for r in _table(ctx, INGEST_DROPS) if r["target"] == "queries"]
    assert [(r["location"], r["kept_id"], r["reason"].split(":")[0]) for r in drops] == \
        [("row 6", "q0", "duplicate_id")]
    quarantine = {(r["target"], r["location"], r["source"]): r["reason"].split(":")[0]
                  for r in _table(ctx, QUARANTINE)}
    assert quarantine == {("queries", "row 7", str(csv)): "missing",
                          ("documents", "file", str(folder / "empty.txt")): "empty",
                          ("documents", "file", str(folder / "latin1.txt")): "wrong_encoding"}
    assert (ds_stats.rows_in, ds_stats.rows_out, ds_stats.quarantined) == (4, 2, 2)
    docs = {json.loads(r["metadata"])["file"]: r for r in _table(ctx, DOCUMENTS)}
    assert set(docs) == {"a.txt", "b.md"} and docs["a.txt"]["source"] == "docs"
    assert "\n\n" in docs["b.md"]["text"] and "\n\n\n" not in docs["b.md"]["text"]


def _opts(target, text_field, id_field=None, source_field="source", default_source="input"):
    return RowOptions(target=target, text_field=text_field, id_field=id_field,
                      source_field=source_field, default_source=default_source, min_chars=1,
                      max_chars=20000, keep_paragraphs=target == "documents")


def test_parquet_and_delta_inputs_with_field_mapping(spark, tmp_path):
    """The reading layer for Parquet and Delta (the rest of the pipeline is format-blind)."""
    qs = [q["query"] for q in QUERIES_SAMPLE[30:34]]
    qfile = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question": qs + [None], "n": list(range(5)), "key": ["a", "b", "c", "d", "e"]}),
                   qfile, row_group_size=2)
    delta_path = str(tmp_path / "docs_delta")
    docs = [d["text"] for d in DOCS_SAMPLE[5:8]]
    write_deltalake(delta_path, pa.table({"body": docs, "doc": ["d5", "d6", "d7"],
                                          "site": ["multirc", "wiki", "wiki"]}))
    ctx = _ctx(spark, tmp_path, "parquet")

    spec = resolve_input(spark, str(qfile), "queries")
    assert (spec.fmt, spec.default_source) == ("parquet", "q")
    got = sorted(read_prepared(spark, ctx.lake, spec, _opts("queries", "question", "key", "site", "q"))
                 .collect(), key=lambda r: r["row"])
    assert [(r["location"], r["src"]) for r in got] == [(f"row {i}", str(qfile)) for i in range(1, 6)]
    assert [r["rid"] for r in got[:4]] == ["a", "b", "c", "d"]
    assert [r["text"] for r in got[:4]] == [normalize_text(q, keep_paragraphs=False) for q in qs]
    assert {r["source"] for r in got[:4]} == {"q"}  # no 'site' column: the file name
    assert [json.loads(r["metadata"]) for r in got[:4]] == [{"n": i} for i in range(4)]
    assert got[4]["reason"].startswith("missing") and json.loads(got[4]["raw"])["n"] == 4
    assert got[4]["quarantine_id"] and got[4]["text"] is None

    spec = resolve_input(spark, delta_path, "documents")
    assert spec.fmt == "delta"
    got = read_prepared(spark, ctx.lake, spec, _opts("documents", "body", "doc", "site")).collect()
    assert sorted((r["rid"], r["source"], r["text"]) for r in got) == \
        [("d5", "multirc", normalize_text(docs[0])), ("d6", "wiki", normalize_text(docs[1])),
         ("d7", "wiki", normalize_text(docs[2]))]
    assert sorted(r["location"] for r in got) == ["row 1", "row 2", "row 3"]
    assert {r["src"] for r in got} == {delta_path} and all(r["reason"] is None for r in got)


# ----------------------------------------------------------------------------- document filters

FILTER_DOCS = _sample("documents.jsonl", 506)


def test_document_filters_drop_documents_with_their_reasons(spark, tmp_path):
    """ingest.filters (datatrove's filters): rejected documents go to ingest_drops with the
    filter's own reason, before dedup (a copy of a rejected document is counted as rejected, not
    as a duplicate); the invariant holds; queries are never filtered."""
    pytest.importorskip("datatrove", reason="the 'filters' extra is not installed")
    D = FILTER_DOCS
    lines = [_jl(D[0]),    # 1 kept
             _jl(D[4]),    # 2 gopher_quality:gopher_below_alpha_threshold (figures and units)
             _jl(D[505]),  # 3 gopher_repetition:duplicated_6_n_grams (census boilerplate)
             _jl(D[31]),   # 4 fineweb_quality:line_punct_ratio (one line, no end punctuation)
             _jl(D[4]),    # 5 the same as line 2: rejected again, not a duplicate
             _jl(D[1])]    # 6 kept
    dpath, qpath = tmp_path / "docs.jsonl", tmp_path / "q.jsonl"
    dpath.write_bytes(b"\n".join(lines) + b"\n")
    qpath.write_bytes(_jl(Q[0]) + b"\n")  # 34 words: gopher_short_doc if it were a document
    cfg = load_config("local", ["catalog.database=ingest_filters", "ingest.filters=[gopher_repetition, "
                                "gopher_quality, fineweb_quality]"], lake=str(tmp_path / "lake"))
    ctx = StageContext(cfg, run_id="test-filters", spark=spark)
    qs, ds = run_ingest(ctx, queries=str(qpath), documents=str(dpath))
    assert (qs.rows_in, qs.rows_out, qs.dropped) == (1, 1, {})
    _check_invariant(ds)
    assert (ds.rows_in, ds.rows_out) == (6, 2)
    assert ds.dropped == {"gopher_quality:gopher_below_alpha_threshold": 2,
                          "gopher_repetition:duplicated_6_n_grams": 1,
                          "fineweb_quality:line_punct_ratio": 1}
    assert ds.extra["check"].startswith("6=2+0+0+0+4 ")
    drops = {r["location"]: (r["reason"], r["kept_id"]) for r in _table(ctx, INGEST_DROPS)}
    assert drops == {"line 2": ("gopher_quality:gopher_below_alpha_threshold", None),
                     "line 3": ("gopher_repetition:duplicated_6_n_grams", None),
                     "line 4": ("fineweb_quality:line_punct_ratio", None),
                     "line 5": ("gopher_quality:gopher_below_alpha_threshold", None)}
    counts = spark.sql(f"SELECT reason, count(*) AS n FROM {ctx.lake.sql_name(INGEST_DROPS)} "
                       "GROUP BY reason").collect()
    assert {r["reason"]: r["n"] for r in counts} == ds.dropped
    assert sorted(r["text"] for r in _table(ctx, DOCUMENTS)) == \
        sorted(normalize_text(D[i]["text"]) for i in (0, 1))  # kept texts as ingested


# ----------------------------------------------------------------------------- errors and entry point


def test_bad_inputs_raise_clear_errors(spark, tmp_path):
    ctx = _ctx(spark, tmp_path, "errors")
    with pytest.raises(FinelakeError, match="queries input not found: .*nope.jsonl"):
        run_ingest(ctx, queries=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FinelakeError, match="documents input not found"):
        run_ingest(ctx, documents=str(tmp_path / "missing_dir"))
    assert not os.path.exists(ctx.lake.path(QUERIES))  # nothing written before the check
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("{}\n")
    pq.write_table(pa.table({"x": [1]}), mixed / "b.parquet")
    with pytest.raises(FinelakeError, match="mixes formats"):
        resolve_input(spark, str(mixed), "queries")
    (tmp_path / "d.csv").write_text("body\nhello\n")
    good_queries = tmp_path / "q.jsonl"
    good_queries.write_bytes(b"\n".join(QUERY_LINES) + b"\n")
    with pytest.raises(FinelakeError, match="text field 'text' is not a column .*columns: body"):
        run_ingest(ctx, queries=str(good_queries), documents=str(tmp_path / "d.csv"))
    assert not os.path.exists(ctx.lake.path(QUERIES))  # the mapping is checked before any write
    with pytest.raises(FinelakeError, match="needs --queries and/or --documents"):
        run_ingest(ctx)
    with pytest.raises(FinelakeError, match="unsupported file type"):
        (tmp_path / "x.xlsx").write_bytes(b"PK")
        resolve_input(spark, str(tmp_path / "x.xlsx"), "queries")
    assert resolve_input(spark, None, "queries").path.endswith("queries.jsonl")


def test_ingest_reads_only_the_inputs_named(spark, tmp_path):
    """`finelake ingest --documents X` must not also ingest the shipped sample queries (issue 14)."""
    ctx = _ctx(spark, tmp_path, "only_documents")
    dpath = tmp_path / "docs.jsonl"
    dpath.write_bytes(b"\n".join(DOC_LINES) + b"\n")
    stats = run_ingest(ctx, documents=str(dpath))
    assert [s.stage for s in stats] == ["ingest:documents"]
    assert not ctx.lake.exists(QUERIES)
    assert ctx.lake.read_arrow(DOCUMENTS).num_rows == stats[0].rows_out > 0


def test_invariant_is_checked():
    eq = check_invariant("queries", 10, 5, {"duplicate": 2, "near_duplicate": 1, "contaminated": 1}, 1)
    assert eq.startswith("10=5+3+1+1")
    with pytest.raises(IngestInvariantError, match="rows do not add up: 10=5\\+2\\+1\\+1"):
        check_invariant("queries", 10, 5, {"duplicate": 2, "contaminated": 1}, 1)


def test_the_spark_submit_entry_point_is_the_cli():
    """spark-submit runs bin/finelake_job.py: the finelake command line, ingest's options included."""
    import subprocess
    import sys
    from pathlib import Path

    entry = Path(__file__).resolve().parents[1] / "bin" / "finelake_job.py"
    r = subprocess.run([sys.executable, str(entry), "ingest", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--queries" in r.stdout and "--query-field" in r.stdout


def test_run_stops_after_ingest_when_no_query_is_accepted_and_takes_the_field_options(
        spark, tmp_path, monkeypatch):
    """`finelake run` on queries whose text is in another field: every row is quarantined as
    missing, and the run stops there with the reason and the option to use, instead of failing
    later in genericize on a table that was never written; with the option, ingest takes them."""
    from finelake.jobs import pipeline

    qs = tmp_path / "qs.jsonl"
    qs.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in (
        "How do I list hidden files in a directory?", "How can I change a git remote url?")),
        encoding="utf-8")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": DOCS_SAMPLE[1]["text"]}) + "\n", encoding="utf-8")
    ctx = _ctx(spark, tmp_path, "run_fields")
    monkeypatch.setattr(pipeline, "run_order", lambda: (pipeline.INGEST,))  # ingest and the stop after it
    with pytest.raises(FinelakeError, match=r"table queries .* has no row: this ingest read 2 rows "
                                            r"and quarantined 2 \(missing=2\).*--query-field"):
        pipeline.run_pipeline(ctx, queries=str(qs), documents=str(docs), report=False)
    assert [r["reason"].split(":")[0] for r in _table(ctx, QUARANTINE)] == ["missing", "missing"]
    stats = pipeline.run_pipeline(ctx, queries=str(qs), documents=str(docs), report=False,
                                  fields={"query_field": "prompt"})
    assert [s.extra["inserted"] for s in stats] == [2, 0]  # the document came in the first run
    assert len(_table(ctx, QUERIES)) == 2


def test_run_command_takes_the_ingest_field_options():
    from click.testing import CliRunner

    from finelake.cli import cli

    out = CliRunner().invoke(cli, ["run", "--help"]).output
    assert all(f in out for f in ("--query-field", "--text-field", "--id-field", "--source-field"))
