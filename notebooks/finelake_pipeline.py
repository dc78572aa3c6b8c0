# Databricks notebook source
# MAGIC %md
# MAGIC # finelake: FineInstructions on this workspace
# MAGIC Thin driver notebook: every step is a job in `finelake.jobs`; this notebook only wires the
# MAGIC profile and shows the tables. Install the wheel on the cluster first (`%pip install finelake-*.whl`).

# COMMAND ----------

from finelake.config import load_config
from finelake.runtime import StageContext

PROFILE = "databricks"  # or a path to your own YAML
cfg = load_config(PROFILE, overrides=[])  # e.g. ["run.max_documents=10000"]
ctx = StageContext(cfg, spark=spark)  # noqa: F821  (the notebook's session)

# COMMAND ----------

from finelake.jobs.pipeline import run_pipeline

stats = run_pipeline(ctx, queries=None, documents=None)

# COMMAND ----------

# MAGIC %md ## Look at the result

# COMMAND ----------

from finelake.tables import ALL_TABLES

ctx.lake.register_all(ALL_TABLES.values())
display(spark.sql(f"SELECT instruction, answer, judge_score FROM {ctx.lake.sql_name('pairs')} LIMIT 20"))  # noqa: F821
display(spark.sql(f"SELECT status, reason, count(*) n FROM {ctx.lake.sql_name('instantiations')} GROUP BY 1, 2 ORDER BY n DESC"))  # noqa: F821
