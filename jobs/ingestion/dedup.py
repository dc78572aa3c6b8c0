"""Exact and near-duplicate removal at ingest.

Both keep, of each group of duplicates, the row that comes first in input order (input file path,
then line/row number), so the result does not depend on partitioning and a rerun drops the same
rows:

* exact (:func:`exact_duplicates`): rows with the same normalized text (content hash), then rows
  with the same id (only possible with ``id_field``); a window per key.
* near (:func:`near_duplicates`): Spark ML ``MinHashLSH`` on hashed word 5-gram shingles proposes
  pairs with Jaccard >= ``near_dup_threshold``; the pairs are collected and resolved greedily on
  the driver.
"""

from __future__ import annotations

from finelake.method.text import SHINGLE_WORDS, shingles

#: Hashed feature space of the MinHash shingle vectors (collisions are negligible below ~10^5
#: shingles per text).
NUM_FEATURES = 1 << 26
#: Seed of the MinHash functions (fixed: reruns find the same pairs).
MINHASH_SEED = 20240917

#: Columns of a drop plan (:func:`exact_duplicates`, :func:`near_duplicates`).
DROP_COLUMNS = ("src", "row", "location", "content_id", "reason", "kept_id")


def exact_duplicates(good, by_id: bool):
    """Remove exact duplicates, keeping the first row of each key in input order.

    Args:
        good: DataFrame with ``src``, ``row``, ``location``, ``rid``, ``content_id``.
        by_id: also drop rows whose id was seen earlier (``id_field`` mapped); without it the id
            is the content hash and the first pass already removed them.

    Returns:
        ``(kept, drops)``: the kept rows (same columns) and a list of drop DataFrames
        (:data:`DROP_COLUMNS`; ``reason`` ``duplicate: ...`` / ``duplicate_id: ...``, ``kept_id``
        the id of the kept row).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    drops = []
    for col, reason in (("content_id", "duplicate: same normalized text as the kept row"),
                        ("rid", "duplicate_id: same id as the kept row")):
        if col == "rid" and not by_id:
            continue
        w = Window.partitionBy(col).orderBy("src", "row")
        ranked = (good.withColumn("__rn", F.row_number().over(w))
                  .withColumn("kept_id", F.first("rid").over(w)))
        drops.append(ranked.filter(F.col("__rn") > 1).withColumn("reason", F.lit(reason))
                     .select(*DROP_COLUMNS))
        good = ranked.filter(F.col("__rn") == 1).drop("__rn", "kept_id")
    return good, drops


def near_duplicates(spark, df, threshold: float, hash_tables: int) -> list[tuple]:
    """Greedy near-duplicate removal plan for ``df`` (columns ``src``, ``row``, ``rid``, ``text``).

    Candidate pairs come from Spark ML ``MinHashLSH.approxSimilarityJoin`` on binary
    ``HashingTF`` vectors of :func:`~finelake.method.text.shingles` (word 5-grams); the join's
    distance is the exact Jaccard distance of the hashed shingle sets, so only pairs with
    Jaccard >= ``threshold`` are kept. Rows without shingles (no word characters) are skipped.
    Only the pairs come to the driver.

    Returns:
        ``[(src, row, kept_rid, jaccard)]`` for every row to drop: visited in input order, a row
        is dropped when it pairs with an earlier row that is kept; ``kept_rid`` is the earliest
        such row.
    """
    from pyspark.ml.feature import HashingTF, MinHashLSH
    from pyspark.sql import functions as F

    sh = F.udf(lambda t: shingles(t, SHINGLE_WORDS), "array<string>")
    feats = (df.select("src", "row", "rid", sh("text").alias("sh")).filter(F.size("sh") > 0))
    feats = HashingTF(inputCol="sh", outputCol="features", numFeatures=NUM_FEATURES,
                      binary=True).transform(feats).drop("sh")
    lsh = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=hash_tables,
                     seed=MINHASH_SEED)
    model = lsh.fit(feats)
    hashed = model.transform(feats).persist()
    try:
        max_dist = 1.0 - threshold
        pairs = model.approxSimilarityJoin(hashed, hashed, max_dist + 1e-9, distCol="dist")
        a, b = F.col("datasetA"), F.col("datasetB")
        earlier = (a["src"] < b["src"]) | ((a["src"] == b["src"]) & (a["row"] < b["row"]))
        rows = (pairs.filter(earlier & (F.col("dist") <= max_dist + 1e-12))
                .select(a["src"].alias("a_src"), a["row"].alias("a_row"), a["rid"].alias("a_rid"),
                        b["src"].alias("b_src"), b["row"].alias("b_row"), "dist")
                .collect())
    finally:
        hashed.unpersist()
    earlier_of: dict[tuple, list[tuple]] = {}
    for r in rows:
        earlier_of.setdefault((r.b_src, r.b_row), []).append(((r.a_src, r.a_row), r.a_rid, 1.0 - r.dist))
    dropped: dict[tuple, tuple] = {}
    for key in sorted(earlier_of):
        kept = sorted(c for c in earlier_of[key] if c[0] not in dropped)
        if kept:
            dropped[key] = (kept[0][1], kept[0][2])
    return [(k[0], k[1], rid, sim) for k, (rid, sim) in sorted(dropped.items())]
