"""budget: judged pairs -> ``pairs`` and ``budget_ledger`` (§4.2 and its footnote).

Per document, in a deterministic order (:func:`finelake.method.budget.budget_order_key`), a seeded
random subset of its kept (judged >= min score) pairs is taken whose total tokens — counted on the
formatted text ``Instruction: {instruction}\\n\\nAnswer: {answer}`` with the training tokenizer —
do not exceed the document's own token count plus the budget earlier documents left unused. The
walk is incremental: documents already in ``budget_ledger`` keep their rows, new ready documents
continue the walk from the last carry, so reruns change nothing and later runs extend it.

Before the walk every kept pair is checked against its own document with the tag-blind grounding
rule (:func:`finelake.method.excerpts.grounding_failure`: >= ``instantiate.min_excerpt_ratio`` of
the answer in runs of >= ``instantiate.grounding_min_run_chars`` characters copied from the
document). Instantiate applies the same rule, so this should never fire; when it does (an older
run's rows, a custom instantiator, a join gone wrong) the pair never reaches ``pairs``: it is
written to ``quarantine`` (target ``pairs``, the reason, the pair as JSON) and spends no budget,
or with ``budget.on_ungrounded: fail`` the stage stops before it writes anything.

A document is ready when every one of its matches has an instantiation and every ``ok``
instantiation has a judgment. The walk itself is sequential by nature; it runs on the driver over
(doc id, token count) integers only — texts stay in Spark.

    spark-submit jobs/budget.py --conf conf/local.yaml
"""

from __future__ import annotations

import logging
from typing import Iterator

import pandas as pd
import pyarrow as pa

from finelake.jobs.common import job_main, require
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import (BUDGET_LEDGER, DOCUMENTS, INSTANTIATIONS, JUDGMENTS, MATCH_LOG, MATCHES,
                             PAIRS, QUARANTINE)

log = logging.getLogger(__name__)

STAGE = "budget"


def count_partition(batches: Iterator[pd.DataFrame], tokenizer: str, min_ratio: float,
                    min_run_chars: int) -> Iterator[pd.DataFrame]:
    """Executor side: pairs with their document's text (``doc_text``) in; the same rows without
    it, plus ``text`` (the formatted pair), ``num_tokens`` (training tokenizer) and ``ungrounded``
    (None, or why the answer is not grounded in the document) out."""
    from finelake.method.budget import format_pair
    from finelake.method.excerpts import grounding_failure
    from finelake.models.tokenizer import count_tokens

    for pdf in batches:
        out = pdf.drop(columns=["doc_text"])
        out["text"] = [format_pair(i, a) for i, a in zip(pdf["instruction"], pdf["answer"])]
        out["num_tokens"] = count_tokens(tokenizer, out["text"])
        out["ungrounded"] = [grounding_failure(a, d, min_ratio, min_run_chars)
                             for a, d in zip(pdf["answer"], pdf["doc_text"])]
        yield out


def quarantine_rows(rows) -> list[dict]:
    """``quarantine`` rows (target ``pairs``) for pairs refused by the grounding check."""
    import json

    from finelake.jobs.common import stable_hash

    return [{"quarantine_id": stable_hash("pairs", "budget", r["pair_key"], n=20), "target": "pairs",
             "source": "budget", "location": f"doc_id={r['doc_id']} pair_key={r['pair_key']}",
             "reason": r["ungrounded"],
             "raw": json.dumps({"instruction": r["instruction"], "answer": r["answer"],
                                "template_id": r["template_id"]}, ensure_ascii=False)}
            for r in rows]


def run_budget(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Extend the budget walk over newly ready documents and write their kept pairs.

    Raises:
        FinelakeError: judgments or upstream tables missing; a judged pair not grounded in its
            document while ``budget.on_ungrounded`` is ``fail`` (nothing is written then).
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
            .join(new_docs.select("doc_id"), "doc_id", "left_semi")
            .join(lake.read(DOCUMENTS).select("doc_id", F.col("text").alias("doc_text")), "doc_id"))
    schema = T.StructType([f for f in kept.schema.fields if f.name != "doc_text"]
                          + [T.StructField("text", T.StringType()),
                             T.StructField("num_tokens", T.LongType()),
                             T.StructField("ungrounded", T.StringType())])
    import functools

    checked = kept.mapInPandas(functools.partial(
        count_partition, tokenizer=cfg.tokenizer.model, min_ratio=cfg.instantiate.min_excerpt_ratio,
        min_run_chars=cfg.instantiate.grounding_min_run_chars), schema).cache()
    stats.rows_in = checked.count()
    refused = checked.where("ungrounded IS NOT NULL").select(
        "pair_key", "doc_id", "template_id", "instruction", "answer", "ungrounded").collect()
    if refused:
        shown = "; ".join(f"{r['pair_key']} (doc {r['doc_id']}): {r['ungrounded']}" for r in refused[:3])
        if cfg.budget.on_ungrounded == "fail":
            checked.unpersist()
            raise FinelakeError(f"{len(refused)} judged pair(s) are not grounded in their own "
                                f"document, nothing written (budget.on_ungrounded: fail): {shown}")
        log.warning("budget: %d pair(s) not grounded in their document, quarantined: %s",
                    len(refused), shown)
        lake.merge(QUARANTINE, pa.Table.from_pylist(quarantine_rows(refused)), ctx.run_id)
        stats.quarantined = len(refused)
        stats.drop("ungrounded_answer", len(refused))
    counted = checked.where("ungrounded IS NULL").drop("ungrounded")

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
        lake.merge(BUDGET_LEDGER, pa.Table.from_pylist(ledger), ctx.run_id)
    checked.unpersist()
    new_docs.unpersist()
    stats.extra.update(documents=len(ledger), carry_out=state.carry)
    lake.register(PAIRS)
    lake.register(BUDGET_LEDGER)
    lake.register(QUARANTINE)
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
