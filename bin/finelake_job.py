"""spark-submit entry point: the ``finelake`` command line under ``spark-submit``.

    spark-submit bin/finelake_job.py run --conf conf/databricks.yaml
    spark-submit bin/finelake_job.py instantiate --conf conf/emr.yaml --max-documents 100000

Every ``finelake`` command and option works the same way; the stage modules under ``jobs/`` hold no
entry point of their own (they sit below the command line: imports run one way). EMR's bootstrap
action installs the same launcher as ``/opt/finelake/finelake_job.py``.
"""

from finelake.cli import main

if __name__ == "__main__":
    main()
