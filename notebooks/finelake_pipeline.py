# Databricks notebook source
# MAGIC %md
# MAGIC # finelake: FineInstructions on this workspace
# MAGIC Thin driver notebook: every step is a job in `finelake.jobs`; this notebook only wires the
# MAGIC profile and the inputs, and shows the tables. Install the wheel on the cluster first
# MAGIC (`%pip install finelake-*.whl`).
# MAGIC
# MAGIC The inputs are explicit: set the `queries` and/or `documents` widget to the files or
# MAGIC folders to ingest (e.g. `/Volumes/main/finelake/inputs/documents`), or set `ingest` to
# MAGIC `no` to run the stages over what the lake already holds. Nothing runs with neither: the
# MAGIC pipeline's own default, the shipped sample, has no place in a production lake.

# COMMAND ----------

dbutils.widgets.text("profile", "databricks", "profile")  # noqa: F821  (the notebook's dbutils)
dbutils.widgets.text("queries", "", "queries (file or folder)")  # noqa: F821
dbutils.widgets.text("documents", "", "documents (file or folder)")  # noqa: F821
dbutils.widgets.dropdown("ingest", "yes", ["yes", "no"], "ingest the inputs")  # noqa: F821
dbutils.widgets.text("max_documents", "", "max documents (empty: no limit)")  # noqa: F821
dbutils.widgets.text("run_id", "", "run id (empty: a new run; the same id resumes)")  # noqa: F821

# COMMAND ----------

from finelake.config import load_config
from finelake.notebook import notebook_inputs
from finelake.runtime import StageContext

args = notebook_inputs({k: dbutils.widgets.get(k) for k in  # noqa: F821
                        ("profile", "queries", "documents", "ingest", "max_documents", "run_id")})
cfg = load_config(args.profile, overrides=[])
ctx = StageContext(cfg, spark=spark, run_id=args.run_id)  # noqa: F821  (the notebook's session)

# COMMAND ----------

if args.ingest:
    from finelake.jobs.pipeline import run_pipeline

    stats = run_pipeline(ctx, queries=args.queries, documents=args.documents,
                         max_documents=args.max_documents)
else:
    from finelake.jobs.pipeline import run_stages

    stats = []
    run_stages(ctx, stats, max_documents=args.max_documents)

# COMMAND ----------

# MAGIC %md ## Look at the result

# COMMAND ----------

from finelake.tables import ALL_TABLES

ctx.lake.register_all(ALL_TABLES.values())
display(spark.sql(f"SELECT instruction, answer, judge_score FROM {ctx.lake.sql_name('pairs')} LIMIT 20"))  # noqa: F821
display(spark.sql(f"SELECT status, reason, count(*) n FROM {ctx.lake.sql_name('instantiations')} GROUP BY 1, 2 ORDER BY n DESC"))  # noqa: F821
