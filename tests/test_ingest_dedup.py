"""Near-duplicate clusters resolved in Spark (jobs/ingestion/dedup.py): connected components of the
MinHash pairs, each cluster keeping its earliest row, with nothing per pair collected.

The sample check recomputes the old driver-side result independently: exact word-5-gram Jaccard
over every pair of the sample's rows that share a shingle, then the old greedy rule (rows in input
order; a row is dropped when it pairs with an earlier kept row, ``kept_id`` the earliest such row).
"""

from __future__ import annotations

import collections
import itertools
import json
from importlib import resources

import pytest

from finelake.config import load_config
from finelake.jobs.ingestion.dedup import min_label_components, near_duplicates
from finelake.method.text import content_id, normalize_text, shingles

pytestmark = pytest.mark.slow

SAMPLE = resources.files("finelake.sample")
THRESHOLD = load_config("local").ingest.near_dup_threshold
HASH_TABLES = load_config("local").ingest.near_dup_hash_tables


def _df(spark, texts: list[str], src: str = "in.jsonl"):
    rows = [(src, i + 1, f"line {i + 1}", t, f"r{i + 1}", content_id(t)) for i, t in enumerate(texts)]
    return spark.createDataFrame(rows, "src string, row long, location string, text string, "
                                       "rid string, content_id string")


def _jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


def _changed(text: str, at: list[int]) -> str:
    ws = text.split(" ")
    for i in at:
        ws[i] = f"zz{i}zz"
    return " ".join(ws)


def test_components_of_a_small_graph(spark):
    # 5-4-3-2-1 chain given out of order, a star around 10, and 20-21 on their own
    edges = spark.createDataFrame([(4, 5), (3, 4), (2, 3), (1, 2), (10, 11), (12, 10), (10, 13),
                                   (20, 21)], "a long, b long")
    got = {r["node"]: r["label"] for r in min_label_components(edges).collect()}
    assert got == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 10: 10, 11: 10, 12: 10, 13: 10, 20: 20, 21: 20}


def test_a_chain_keeps_one_row_and_two_clusters_stay_apart(spark):
    docs = [json.loads(line)["text"] for line in
            SAMPLE.joinpath("documents.jsonl").read_text("utf-8").split("\n")[:40] if line.strip()]
    a = normalize_text(max(docs, key=len))
    # k changed words (far apart) cut 5k of a's ~n shingles: Jaccard (n-5k)/(n+5k). With
    # n/90 < k <= n/45, k changes stay above 0.8 and 2k changes fall below it.
    n = len(a.split(" "))
    k = n // 60
    at = [n * (i + 1) // (2 * k + 1) for i in range(2 * k)]
    b = _changed(a, at[0::2])  # k words changed
    c = _changed(b, at[1::2])  # k more, in between: 2k away from a
    assert _jaccard(a, b) >= THRESHOLD and _jaccard(b, c) >= THRESHOLD > _jaccard(a, c)
    d = normalize_text(docs[0])
    e = _changed(d, [len(d.split(" ")) // 2])
    assert _jaccard(d, e) >= THRESHOLD and _jaccard(a, d) < 0.1
    f = normalize_text(docs[1])
    # input order: c, d, a, b, e, f -> clusters {a, b, c} (earliest: c) and {d, e}
    texts = [c, d, a, b, e, f]
    plan = near_duplicates(spark, _df(spark, texts), THRESHOLD, HASH_TABLES).collect()
    got = {r["row"]: (r["kept_id"], r["reason"]) for r in plan}
    assert {row: kept for row, (kept, _) in got.items()} == {3: "r1", 4: "r1", 5: "r2"}
    # a is linked to c only through b: the reason says so, with a's best link
    assert got[3][1] == (f"near_duplicate: word-5-gram jaccard {_jaccard(a, b):.2f} with a row of "
                         "the kept row's cluster")
    assert got[4][1] == f"near_duplicate: word-5-gram jaccard {_jaccard(b, c):.2f} with the kept row"
    assert {r["location"] for r in plan} == {"line 3", "line 4", "line 5"}


def _old_greedy(texts: list[str]) -> dict[int, int]:
    """The old driver-side rule on exact Jaccard pairs: {dropped row: kept row} (1-based)."""
    sets = [set(shingles(t)) for t in texts]
    by_shingle = collections.defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            by_shingle[sh].append(i)
    pairs = set()
    for rows in by_shingle.values():
        pairs.update(itertools.combinations(rows, 2))
    earlier = collections.defaultdict(list)
    for i, j in pairs:
        if sets[i] and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= THRESHOLD:
            earlier[j].append(i)
    dropped: dict[int, int] = {}
    for j in sorted(earlier):
        kept = sorted(i for i in earlier[j] if i not in dropped)
        if kept:
            dropped[j] = kept[0]
    return {j + 1: i + 1 for j, i in dropped.items()}


@pytest.mark.parametrize("name,field,paragraphs", [("queries.jsonl", "query", False),
                                                    ("documents.jsonl", "text", True)])
def test_same_result_as_the_old_greedy_rule_on_the_shipped_sample(spark, name, field, paragraphs):
    seen, texts = set(), []
    for line in SAMPLE.joinpath(name).read_text("utf-8").split("\n"):
        if line.strip():
            t = normalize_text(json.loads(line)[field], keep_paragraphs=paragraphs)
            if content_id(t) not in seen:  # exact duplicates go first, as in ingest
                seen.add(content_id(t))
                texts.append(t)
    old = _old_greedy(texts)
    plan = near_duplicates(spark, _df(spark, texts), THRESHOLD, HASH_TABLES).collect()
    assert {r["row"]: int(r["kept_id"][1:]) for r in plan} == old
    if name == "queries.jsonl":
        assert len(old) == 5  # four clusters, one with two copies of one query (a star)
