#!/usr/bin/env bash
# Spark resource discovery script for the simulated GPU cluster of `make cluster-test`
# (spark.worker.resource.gpu.discoveryScript): prints the one `gpu` address this worker owns,
# taken from FINELAKE_SIM_GPU (tools/cluster.py starts each worker with its own), in the format
# Spark expects from a real script such as getGpusResources.sh: {"name":"gpu","addresses":["0"]}.
set -euo pipefail
addr="${FINELAKE_SIM_GPU:?FINELAKE_SIM_GPU is not set: tools/cluster.py gives each worker one address}"
printf '{"name":"gpu","addresses":["%s"]}\n' "$addr"
