"""Exact and near-duplicate removal at ingest, in Spark (nothing per row or pair reaches the driver).

Both keep, of each group of duplicates, the row that comes first in input order (input file path,
then line/row number), so the result does not depend on partitioning and a rerun drops the same
rows:

* exact (:func:`exact_duplicates`): rows with the same normalized text (content hash), then rows
  with the same id (only possible with ``id_field``); a window per key.
* near (:func:`near_duplicates`): Spark ML ``MinHashLSH`` on hashed word 5-gram shingles proposes
  pairs with Jaccard >= ``near_dup_threshold`` (the join's distance is the exact Jaccard distance
  of the hashed shingle sets); the pairs are the edges of a graph whose connected components
  (:func:`min_label_components`) are the near-duplicate clusters. Each cluster keeps its earliest
  row and drops the others. A chain a~b~c with a and c dissimilar is one cluster: only a stays.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from finelake.method.text import SHINGLE_WORDS, shingles

log = logging.getLogger(__name__)

#: Hashed feature space of the MinHash shingle vectors (collisions are negligible below ~10^5
#: shingles per text).
NUM_FEATURES = 1 << 26
#: Seed of the MinHash functions (fixed: reruns find the same pairs).
MINHASH_SEED = 20240917
#: Label-propagation rounds after which :func:`min_label_components` gives up. With pointer jumping
#: a label's reach about doubles every round (a chain of n rows takes ~log2(n) rounds), so 40 is
#: far beyond any near-duplicate cluster.
MAX_ROUNDS = 40

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


def _persist(df):
    return df.persist()


def min_label_components(edges, keep: Optional[Callable] = None):
    """Connected components of an undirected graph as each node's smallest node (its label).

    Min-label propagation with pointer jumping, in Spark SQL: every round, each node takes the
    smallest label among its own and its neighbours', then the label of its label; it stops
    when a round changes no label (a count, the only thing that reaches the driver). Each
    round's labels are persisted (not checkpointed: a lost executor's blocks are recomputed from
    the lineage, which a local checkpoint could not do on an autoscaling cluster).

    Args:
        edges: DataFrame ``(a, b)`` of orderable node values (here ``struct(src, row)``), one row
            per undirected edge, either direction; no self-loops needed.
        keep: persists a DataFrame and registers it for the caller to unpersist when done
            (default: ``persist()`` alone).

    Returns:
        DataFrame ``(node, label)``: one row per node that has an edge; ``label`` is the smallest
        node of its component (so the result is deterministic).

    Raises:
        RuntimeError: no convergence after :data:`MAX_ROUNDS` rounds.
    """
    from pyspark.sql import functions as F

    keep = keep or _persist
    both = (edges.select(F.col("a").alias("node"), F.col("b").alias("nb"))
            .unionByName(edges.select(F.col("b").alias("node"), F.col("a").alias("nb"))))
    # first round: each node's label is the smallest of itself and its neighbours
    labels = (both.groupBy("node").agg(F.min("nb").alias("m"))
              .select("node", F.least("node", "m").alias("label")))
    labels = keep(labels)
    for rounds in range(1, MAX_ROUNDS + 1):
        seen = (both.join(labels.withColumnRenamed("node", "nb").withColumnRenamed("label", "nl"),
                          "nb")
                .groupBy("node").agg(F.min("nl").alias("m")))
        step = labels.join(seen, "node").select("node", F.least("label", "m").alias("label"))
        jump = step.alias("s").join(step.alias("t"), F.col("s.label") == F.col("t.node"))
        new = keep(jump.select(F.col("s.node").alias("node"),
                               F.least(F.col("s.label"), F.col("t.label")).alias("label")))
        changed = (new.join(labels.withColumnRenamed("label", "old"), "node")
                   .filter(F.col("label") != F.col("old")).count())
        labels = new
        if changed == 0:
            log.info("near-duplicate clusters: converged after %d rounds", rounds)
            return labels
    raise RuntimeError(f"near-duplicate clusters did not converge in {MAX_ROUNDS} rounds")


def near_duplicates(spark, df, threshold: float, hash_tables: int, keep: Optional[Callable] = None):
    """Near-duplicate drop plan for ``df``, computed and kept in Spark.

    Candidate pairs come from Spark ML ``MinHashLSH.approxSimilarityJoin`` on binary
    ``HashingTF`` vectors of :func:`~finelake.method.text.shingles` (word 5-grams); only pairs with
    Jaccard >= ``threshold`` are kept. Rows without shingles (no word characters) are skipped.
    The pairs are resolved by :func:`min_label_components` into clusters; each cluster keeps its
    earliest row in input order (``(src, row)``).

    Args:
        spark: the session.
        df: rows with ``src``, ``row``, ``location``, ``rid``, ``content_id``, ``text``.
        threshold: ``ingest.near_dup_threshold``; ``hash_tables``: ``ingest.near_dup_hash_tables``.
        keep: persists a DataFrame and registers it for the caller to unpersist once the plan is
            used (the pairs and each round's labels); default ``persist()`` alone.

    Returns:
        A lazy DataFrame of :data:`DROP_COLUMNS`: one row per dropped row, ``kept_id`` the id of
        its cluster's kept row, ``reason`` ``near_duplicate: word-5-gram jaccard J with the kept
        row`` (J its similarity to the kept row) or ``... with a row of the kept row's cluster``
        (linked to the kept row only through other rows; J its best link).
    """
    from pyspark.ml.feature import HashingTF, MinHashLSH
    from pyspark.sql import functions as F

    sh = F.udf(lambda t: shingles(t, SHINGLE_WORDS), "array<string>")
    feats = (df.select(F.struct("src", "row").alias("n"), "rid", sh("text").alias("sh"))
             .filter(F.size("sh") > 0))
    feats = HashingTF(inputCol="sh", outputCol="features", numFeatures=NUM_FEATURES,
                      binary=True).transform(feats).drop("sh")
    model = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=hash_tables,
                       seed=MINHASH_SEED).fit(feats)
    keep = keep or _persist
    hashed = keep(model.transform(feats))  # both sides of the self-join
    max_dist = 1.0 - threshold
    a, b = F.col("datasetA.n"), F.col("datasetB.n")
    edges = keep(model.approxSimilarityJoin(hashed, hashed, max_dist + 1e-9, distCol="dist")
                 .filter((a < b) & (F.col("dist") <= max_dist + 1e-12))
                 .select(a.alias("a"), b.alias("b"), (1.0 - F.col("dist")).alias("sim")))
    labels = min_label_components(edges, keep)
    dropped = labels.filter(F.col("node") != F.col("label"))
    # the similarity shown: to the kept row where they are linked, else the node's best link
    links = (edges.select(F.col("b").alias("node"), F.col("a").alias("other"), "sim")
             .unionByName(edges.select(F.col("a").alias("node"), F.col("b").alias("other"), "sim")))
    sims = (dropped.join(links, "node")
            .groupBy("node").agg(
                F.max(F.when(F.col("other") == F.col("label"), F.col("sim"))).alias("direct"),
                F.max("sim").alias("best")))
    kept = df.select(F.struct("src", "row").alias("label"), F.col("rid").alias("kept_id"))
    rows = df.select(F.struct("src", "row").alias("node"), "src", "row", "location", "content_id")
    reason = F.when(F.col("direct").isNotNull(), F.format_string(
        "near_duplicate: word-5-gram jaccard %.2f with the kept row", F.col("direct"))).otherwise(
        F.format_string("near_duplicate: word-5-gram jaccard %.2f with a row of the kept row's "
                        "cluster", F.col("best")))
    return (dropped.join(sims, "node").join(kept, "label").join(rows, "node")
            .select("src", "row", "location", "content_id", reason.alias("reason"), "kept_id"))
