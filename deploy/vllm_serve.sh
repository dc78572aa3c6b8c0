#!/bin/bash
# Start OpenAI-compatible `vllm serve` endpoints on this GPU node, for the finelake profiles whose
# generation models are called through the openai backend (conf/databricks-serving.yaml). One
# server per model, listening on 127.0.0.1:<port>, using every GPU of the node as vLLM
# data-parallel replicas (--data-parallel-size <GPUs>), so each stage's model has all of the
# node's GPUs while its stage runs; the models share GPU memory through the
# --gpu-memory-utilization each entry gives. Servers start one after the other (each waits for
# the previous one's /health, so vLLM's memory profiling sees the memory already taken) and run
# under a restart loop: a crashed server is back after 15 s, and the openai backend's retries
# (connection errors, 5xx) cover the gap.
#
# Used as:
#   * a Databricks cluster init script (resources/finelake_pipeline.yml, target `serving`, job
#     cluster gpu_serving): the entries come from the cluster's FINELAKE_VLLM_SERVE environment
#     variable; nothing starts on the driver (DB_IS_DRIVER=TRUE) or on a node without a GPU;
#   * by the EMR bootstrap action (deploy/emr/bootstrap.sh --serve SPEC), with FINELAKE_VLLM set
#     to the bootstrap virtualenv's vllm.
#
# Usage: vllm_serve.sh [--dry-run] [SPEC]
#   SPEC     entries separated by ';', each  PORT=MODEL [more vllm serve options]
#            (default: $FINELAKE_VLLM_SERVE), e.g.
#            '8001=fineinstructions/query_templatizer --max-model-len 4096 --gpu-memory-utilization 0.2'
#   --dry-run  print the vllm serve command lines (one per server) and exit; installs nothing
#
# Environment: FINELAKE_GPUS (GPUs of the node; default: counted by nvidia-smi -L),
# FINELAKE_VLLM (a vllm executable; default: vLLM installed into $FINELAKE_VLLM_VENV, default
# /local_disk0/finelake-vllm, from $FINELAKE_VLLM_SPEC, default 'vllm>=0.33'),
# FINELAKE_VLLM_HOST (127.0.0.1), FINELAKE_VLLM_LOG_DIR (/var/log/finelake-vllm),
# FINELAKE_VLLM_WAIT_S (seconds to wait for each server's /health; default 1800: the first start
# downloads the weights), HF_TOKEN / HF_HOME (read by vLLM for gated models).
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
SPEC="${1:-${FINELAKE_VLLM_SERVE:-}}"
if [ -z "$SPEC" ]; then
  echo "vllm_serve.sh: no servers: pass SPEC or set FINELAKE_VLLM_SERVE" >&2
  exit 2
fi

if [ "${DB_IS_DRIVER:-}" = "TRUE" ]; then
  echo "vllm_serve.sh: Databricks driver: no servers here (executors call their own node's)"
  exit 0
fi

if [ -n "${FINELAKE_GPUS:-}" ]; then
  GPUS="$FINELAKE_GPUS"
elif command -v nvidia-smi >/dev/null 2>&1; then
  GPUS="$(nvidia-smi -L | grep -c '^GPU ' || true)"
else
  GPUS=0
fi
case "$GPUS" in
  '' | *[!0-9]*)
    echo "vllm_serve.sh: GPU count '$GPUS' is not a number" >&2
    exit 2
    ;;
esac
if [ "$GPUS" -lt 1 ]; then
  echo "vllm_serve.sh: no GPU on this node: no servers"
  exit 0
fi

VENV="${FINELAKE_VLLM_VENV:-/local_disk0/finelake-vllm}"
VLLM="${FINELAKE_VLLM:-$VENV/bin/vllm}"
HOST="${FINELAKE_VLLM_HOST:-127.0.0.1}"
LOG_DIR="${FINELAKE_VLLM_LOG_DIR:-/var/log/finelake-vllm}"
WAIT_S="${FINELAKE_VLLM_WAIT_S:-1800}"

# Parse every entry before starting anything: a bad spec fails the node's start, not a stage.
PORTS=()
COMMANDS=()
IFS=';' read -ra ENTRIES <<<"$SPEC"
for raw in "${ENTRIES[@]}"; do
  entry="$(printf '%s' "$raw" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
  [ -n "$entry" ] || continue
  port="${entry%%=*}"
  rest="${entry#*=}"
  model="${rest%% *}"
  extra="${rest#"$model"}"
  case "$port" in
    '' | *[!0-9]*)
      echo "vllm_serve.sh: entry '$entry': PORT=MODEL expected, '$port' is not a port" >&2
      exit 2
      ;;
  esac
  if [ "$entry" = "$port" ] || [ -z "$model" ]; then
    echo "vllm_serve.sh: entry '$entry': PORT=MODEL expected, no model" >&2
    exit 2
  fi
  for p in "${PORTS[@]+"${PORTS[@]}"}"; do
    if [ "$p" = "$port" ]; then
      echo "vllm_serve.sh: port $port is given twice" >&2
      exit 2
    fi
  done
  env=""
  dp=""
  if [ "$GPUS" -gt 1 ]; then
    # Each data-parallel server coordinates its engines over ports of its own (vLLM's defaults,
    # 29550 and 29500, would collide between the servers of one node).
    env="VLLM_DP_MASTER_PORT=$((port + 22000)) "
    dp=" --data-parallel-size $GPUS --data-parallel-rpc-port $((port + 21000))"
  fi
  PORTS+=("$port")
  COMMANDS+=("$env$VLLM serve $model --host $HOST --port $port --served-model-name $model$dp$extra")
done
if [ "${#COMMANDS[@]}" -eq 0 ]; then
  echo "vllm_serve.sh: no servers in '$SPEC'" >&2
  exit 2
fi

if [ "$DRY_RUN" = 1 ]; then
  printf '%s\n' "${COMMANDS[@]}"
  exit 0
fi

if [ -z "${FINELAKE_VLLM:-}" ] && [ ! -x "$VLLM" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${FINELAKE_VLLM_SPEC:-vllm>=0.33}"
fi
mkdir -p "$LOG_DIR"

for i in "${!COMMANDS[@]}"; do
  port="${PORTS[$i]}"
  cmd="${COMMANDS[$i]}"
  log="$LOG_DIR/vllm-$port.log"
  echo "vllm_serve.sh: starting on port $port: $cmd (log $log)"
  # setsid + nohup: the server outlives this script (init scripts and bootstrap actions must end).
  nohup setsid bash -c "while true; do $cmd; echo \"vllm serve exited \$?; restarting in 15 s\"; sleep 15; done" \
    >>"$log" 2>&1 </dev/null &
  waited=0
  until curl -sf "http://$HOST:$port/health" >/dev/null 2>&1; do
    if [ "$waited" -ge "$WAIT_S" ]; then
      echo "vllm_serve.sh: port $port not healthy after ${WAIT_S}s; last log lines:" >&2
      tail -n 40 "$log" >&2 || true
      exit 1
    fi
    sleep 10
    waited=$((waited + 10))
  done
  echo "vllm_serve.sh: port $port healthy after ${waited}s"
done
