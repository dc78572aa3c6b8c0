"""budget: judged pairs -> ``pairs`` and ``budget_ledger`` (§4.2 and its footnote).

Per document, in a deterministic order (:func:`finelake.method.budget.budget_order_key`), a seeded
random subset of its kept (judged >= min score) pairs is taken whose total tokens — counted on the
formatted text ``Instruction: {instruction}\\n\\nAnswer: {answer}`` with the training tokenizer —
do not exceed the document's own token count plus the budget earlier documents left unused. The
walk is incremental: documents already in ``budget_ledger`` keep their rows, new ready documents
continue the walk from the last carry, so reruns change nothing and later runs extend it.

A document is ready when every one of its matches has an instantiation and every ``ok``
instantiation has a judgment. The walk itself is sequential by nature; it runs on the driver over
(doc id, token count) integers only — texts stay in Spark.

    spark-submit jobs/budget.py --conf conf/local.yaml
"""

from __future__ import annotations

from typing import Iterator

import pandas as pd

from finelake.jobs.common import job_main, require
from finelake.runtime import StageContext, StageStats
from finelake.tables import (BUDGET_LEDGER, DOCUMENTS, INSTANTIATIONS, JUDGMENTS, MATCH_LOG, MATCHES,
                             PAIRS)

STAGE = "budget"


def count_partition(batches: Iterator[pd.DataFrame], tokenizer: str) -> Iterator[pd.DataFrame]:
    """Executor side: add ``text`` (the formatted pair) and ``num_tokens`` (training tokenizer)."""
    from finelake.method.budget import format_pair
    from finelake.models.tokenizer import count_tokens

    for pdf in batches:
        out = pdf.copy()
        out["text"] = [format_pair(i, a) for i, a in zip(pdf["instruction"], pdf["answer"])]
        out["num_tokens"] = count_tokens(tokenizer, out["text"])
        yield out


def run_budget(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Extend the budget walk over newly ready documents and write their kept pairs.

    Raises:
        FinelakeError: judgments or upstream tables missing.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from finelake.method.budget import BudgetState, budget_order_key

    cfg, lake = ctx.cfg, ctx.lake
    stats = StageStats(STAGE)
    judged = require(ctx, JUDGMENTS, "judge")
    inst = lake.read(INSTANTIATIONS)
    processed = require(ctx, MATCH_LOG, "match").select("doc_id")
    # Documents with unfinished work upstream are not ready.
    unfinished = (lake.read(MATCHES).select("doc_id", "template_id")
                  .join(inst.select("doc_id", "template_id"), ["doc_id", "template_id"], "left_anti")
                  .select("doc_id")
                  .union(inst.where("status = 'ok'").select("pair_key", "doc_id")
                         .join(judged.select("pair_key"), "pair_key", "left_anti").select("doc_id")))
    ready = processed.join(unfinished, "doc_id", "left_anti")
    done = lake.read(BUDGET_LEDGER).select("doc_id") if lake.exists(BUDGET_LEDGER) else None
    new_docs = ready.join(done, "doc_id", "left_anti") if done is not None else ready
    new_docs = new_docs.join(lake.read(DOCUMENTS).select("doc_id", "num_tokens"), "doc_id").cache()

    kept = (judged.where("kept").select("pair_key", "judge_score", "judge_model")
            .join(inst.where("status = 'ok'").select("pair_key", "doc_id", "template_id", "instruction",
                                                     "answer", "excerpt_ratio", "model_id"), "pair_key")
            .join(new_docs.select("doc_id"), "doc_id", "left_semi"))
    schema = T.StructType(kept.schema.fields + [T.StructField("text", T.StringType()),
                                                T.StructField("num_tokens", T.LongType())])
    import functools

    counted = kept.mapInPandas(functools.partial(count_partition, tokenizer=cfg.tokenizer.model),
                               schema).cache()
    stats.rows_in = counted.count()

    # Driver: integers only.
    doc_tokens = {r["doc_id"]: int(r["num_tokens"] or 0) for r in new_docs.collect()}
    pair_tokens: dict[str, list[tuple[str, int]]] = {d: [] for d in doc_tokens}
    for r in counted.select("doc_id", "pair_key", "num_tokens").collect():
        pair_tokens[r["doc_id"]].append((r["pair_key"], int(r["num_tokens"])))
    carry, position = 0, 0
    if done is not None:
        last = (lake.read(BUDGET_LEDGER).orderBy(F.desc("budget_order")).limit(1).collect())
        if last:
            carry, position = int(last[0]["carry_out"]), int(last[0]["budget_order"]) + 1
    state = BudgetState(seed=cfg.budget.seed, carry=carry, position=position)
    order = sorted(doc_tokens, key=lambda d: (budget_order_key(d, cfg.budget.seed), d))
    kept_ids: list[str] = []
    ledger = []
    for d in order:
        k, row = state.step(d, doc_tokens[d], pair_tokens[d])
        kept_ids.extend(k)
        ledger.append(row.as_dict())
    stats.rows_out = len(kept_ids)
    stats.drop("over_token_budget", sum(r["dropped_over_budget"] for r in ledger))

    if ledger:
        orders = {r["doc_id"]: r["budget_order"] for r in ledger}
        keep_df = ctx.spark.createDataFrame(
            [(p,) for p in kept_ids], T.StructType([T.StructField("pair_key", T.StringType())]))
        order_df = ctx.spark.createDataFrame(list(orders.items()), "doc_id string, budget_order long")
        pairs = (counted.join(keep_df, "pair_key", "left_semi").join(order_df, "doc_id")
                 .select(F.col("pair_key").alias("pair_id"), "doc_id", "template_id", "instruction",
                         "answer", "text", "excerpt_ratio", F.col("judge_score").cast("int"),
                         "num_tokens", "budget_order", F.col("model_id").alias("generator_model"),
                         "judge_model"))
        lake.merge(PAIRS, pairs, ctx.run_id)
        import pyarrow as pa

        lake.merge(BUDGET_LEDGER, pa.Table.from_pylist(ledger), ctx.run_id)
    counted.unpersist()
    new_docs.unpersist()
    stats.extra.update(documents=len(ledger), carry_out=state.carry)
    lake.register(PAIRS)
    lake.register(BUDGET_LEDGER)
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
