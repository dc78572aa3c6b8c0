#!/bin/bash
# EMR bootstrap action for finelake: runs on every node (primary, core, task) before the cluster
# starts its applications. It makes the virtualenv and the launcher that the steps of
# `finelake emr-steps` use:
#
#   /opt/finelake/venv/             Python 3.11 virtualenv with the finelake wheel, its
#                                   dependencies and the extras named below
#   /opt/finelake/finelake_job.py   launcher: spark-submit /opt/finelake/finelake_job.py <task> ...
#
# Arguments (Args of the bootstrap action):
#   $1  the wheel, an s3:// URI (or a local path / https URL pip can install)
#   $2  optional: the wheel's extras, comma-separated (default "cluster": transformers,
#       sentence-transformers, FAISS, vLLM, matplotlib; see setup.py); "" installs the wheel and
#       its base requirements only.
#
#   aws emr create-cluster ... --bootstrap-actions \
#     Path=s3://BUCKET/finelake/bootstrap.sh,Args=[s3://BUCKET/finelake/finelake-0.1.0-py3-none-any.whl]
#
# Environment: FINELAKE_PYTHON (default python3.11), FINELAKE_HOME (default /opt/finelake),
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (a private mirror) are honoured.
set -euo pipefail

WHEEL="${1:?usage: bootstrap.sh s3://.../finelake-<version>-py3-none-any.whl [extras]}"
EXTRAS="${2-cluster}"
PY="${FINELAKE_PYTHON:-python3.11}"
HOME_DIR="${FINELAKE_HOME:-/opt/finelake}"

# finelake needs Python >= 3.10; Amazon Linux 2023 (EMR 7 and later) packages 3.11 beside 3.9.
if ! command -v "$PY" >/dev/null 2>&1; then
  sudo dnf install -y -q python3.11 python3.11-pip python3.11-devel
fi

# /opt needs root on EMR (bootstrap actions run as the hadoop user, with sudo).
if ! mkdir -p "$HOME_DIR" 2>/dev/null; then
  sudo mkdir -p "$HOME_DIR"
  sudo chown "$(id -u):$(id -g)" "$HOME_DIR"
fi

# The wheel: copy it from S3 with the instance profile's credentials, keeping its file name
# (pip reads the version from it).
case "$WHEEL" in
  s3://*)
    LOCAL_WHEEL="$HOME_DIR/$(basename "$WHEEL")"
    aws s3 cp --only-show-errors "$WHEEL" "$LOCAL_WHEEL"
    ;;
  *)
    LOCAL_WHEEL="$WHEEL"
    ;;
esac

"$PY" -m venv "$HOME_DIR/venv"
# pyspark and delta-spark are not installed: the cluster's Spark puts its own pyspark and py4j on
# the driver's and executors' PYTHONPATH, and the steps put EMR's delta-spark.jar on --py-files.
"$HOME_DIR/venv/bin/pip" install -q "${LOCAL_WHEEL}${EXTRAS:+[$EXTRAS]}"

cat > "$HOME_DIR/finelake_job.py" <<'PY'
"""spark-submit /opt/finelake/finelake_job.py <task> [options]: the finelake command line."""
from finelake.cli import main

main()
PY

# Fail the bootstrap (and so the cluster start) now rather than at the first step.
# (-I: not the current directory's or PYTHONPATH's modules, only the virtualenv's)
"$HOME_DIR/venv/bin/python" -I -c "import finelake.cli, finelake.jobs.pipeline"
echo "finelake installed in $HOME_DIR/venv from $WHEEL [$EXTRAS]"
