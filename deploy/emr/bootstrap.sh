#!/bin/bash
# EMR bootstrap action for finelake: runs on every node (primary, core, task) before the cluster
# starts its applications. For release emr-spark-8.0.0 (Spark 4.0.2, Delta 4.0.0, Amazon Linux
# 2023, Python 3.11). It makes the virtualenv and the launcher that the steps of
# `finelake emr-steps` use:
#
#   /opt/finelake/venv/             Python 3.11 virtualenv with the finelake wheel, its
#                                   dependencies and the extras named below
#   /opt/finelake/finelake_job.py   launcher: spark-submit /opt/finelake/finelake_job.py <task> ...
#   /opt/finelake/hf/               Hugging Face cache (HF_HOME of the driver and the executors,
#                                   writable by the YARN containers' user) and, with $3, its token
#
# and mounts the cgroup v1 devices hierarchy that YARN's GPU isolation needs on Amazon Linux 2023
# (/spark-rapids-cgroup, the path deploy/emr/configurations.json gives YARN; EMR release guide,
# "Use the Nvidia RAPIDS Accelerator for Apache Spark", bootstrap action for 7.x releases).
#
# Options (before the arguments):
#   --no-yarn-gpu   do not mount the cgroup (a cluster created without configurations.json)
#   --serve SPEC    also start `vllm serve` endpoints on this node for the openai-backend
#                   profiles: runs vllm_serve.sh (taken from the wheel's folder, so upload it next
#                   to the wheel) with the virtualenv's vllm; SPEC as in that script
#                   ('8001=MODEL [vllm serve options];8002=...'). Nodes without a GPU start none.
#
# Arguments (Args of the bootstrap action):
#   $1  the wheel, an s3:// URI (or a local path / https URL pip can install)
#   $2  optional: the wheel's extras, comma-separated (default "cluster": transformers,
#       sentence-transformers, FAISS, vLLM, matplotlib, datatrove and spaCy for ingest.filters;
#       see setup.py); "" installs the wheel and
#       its base requirements only.
#   $3  optional: a Secrets Manager secret id whose string is a Hugging Face token, for the gated
#       models of the emr profile (meta-llama tokenizer, Flow Judge); the instance profile must be
#       allowed secretsmanager:GetSecretValue on it. The token is written to $HOME_DIR/hf/token,
#       readable by the node's users (the YARN containers run as another user than this script).
#
#   aws emr create-cluster --release-label emr-spark-8.0.0 ... \
#     --configurations file://deploy/emr/configurations.json --bootstrap-actions \
#     Path=s3://BUCKET/finelake/bootstrap.sh,Args=[s3://BUCKET/finelake/finelake-0.1.0-py3-none-any.whl]
#
# Environment: FINELAKE_PYTHON (default python3.11), FINELAKE_HOME (default /opt/finelake),
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (a private mirror) are honoured.
set -euo pipefail

YARN_GPU=1
SERVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-yarn-gpu) YARN_GPU=0; shift ;;
    --serve) SERVE="${2:?--serve needs a SPEC}"; shift 2 ;;
    --) shift; break ;;
    -*) echo "bootstrap.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done

WHEEL="${1:?usage: bootstrap.sh [--no-yarn-gpu] [--serve SPEC] s3://.../finelake-<version>-py3-none-any.whl [extras [hf-secret-id]]}"
EXTRAS="${2-cluster}"
HF_SECRET="${3:-}"
PY="${FINELAKE_PYTHON:-python3.11}"
HOME_DIR="${FINELAKE_HOME:-/opt/finelake}"

# YARN's GPU isolation (LinuxContainerExecutor with cgroups, configurations.json) needs a cgroup
# v1 devices hierarchy, which Amazon Linux 2023 does not mount; every NodeManager reads the same
# yarn-site, so every node gets it, with or without a GPU.
if [ "$YARN_GPU" = 1 ] && ! mountpoint -q /spark-rapids-cgroup/devices; then
  sudo mkdir -p /spark-rapids-cgroup/devices
  sudo mount -t cgroup -o devices cgroupv1-devices /spark-rapids-cgroup/devices
  sudo chmod a+rwx -R /spark-rapids-cgroup
fi

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

mkdir -p "$HOME_DIR/hf"
chmod 1777 "$HOME_DIR/hf"
if [ -n "$HF_SECRET" ]; then
  ( umask 022 && aws secretsmanager get-secret-value --secret-id "$HF_SECRET" \
      --query SecretString --output text > "$HOME_DIR/hf/token" )
fi

cat > "$HOME_DIR/finelake_job.py" <<PY
"""spark-submit $HOME_DIR/finelake_job.py <task> [options]: the finelake command line."""
import os

# The driver's Hugging Face cache and token; models come from the hub (the command line's default
# is offline). The executors get the same through spark.executorEnv (finelake emr-steps).
os.environ.setdefault("HF_HOME", "$HOME_DIR/hf")
os.environ.setdefault("HF_HUB_OFFLINE", "0")

from finelake.cli import main  # noqa: E402

main()
PY

# Fail the bootstrap (and so the cluster start) now rather than at the first step.
# (-I: not the current directory's or PYTHONPATH's modules, only the virtualenv's)
"$HOME_DIR/venv/bin/python" -I -c "import finelake.cli, finelake.jobs.pipeline"
echo "finelake installed in $HOME_DIR/venv from $WHEEL [$EXTRAS]"

if [ -n "$SERVE" ]; then
  SERVE_SCRIPT="$HOME_DIR/vllm_serve.sh"
  case "$WHEEL" in
    s3://*) aws s3 cp --only-show-errors "$(dirname "$WHEEL")/vllm_serve.sh" "$SERVE_SCRIPT" ;;
    *) cp "$(dirname "$WHEEL")/vllm_serve.sh" "$SERVE_SCRIPT" ;;
  esac
  FINELAKE_VLLM="$HOME_DIR/venv/bin/vllm" HF_HOME="$HOME_DIR/hf" \
    FINELAKE_VLLM_LOG_DIR="$HOME_DIR/logs" bash "$SERVE_SCRIPT" "$SERVE"
fi
