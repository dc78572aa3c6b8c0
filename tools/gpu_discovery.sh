#!/usr/bin/env bash
# Spark resource discovery script for the simulated GPU cluster of `make cluster-test`
# (spark.worker.resource.gpu.discoveryScript): prints the `gpu` addresses this worker owns, taken
# from FINELAKE_SIM_GPU (tools/cluster.py starts each worker with its own: "0", or "0,1" for the
# two-GPU worker of the multi-gpu scenario), in the format Spark expects from a real script such as
# getGpusResources.sh: {"name":"gpu","addresses":["0","1"]}.
set -euo pipefail
addrs="${FINELAKE_SIM_GPU:?FINELAKE_SIM_GPU is not set: tools/cluster.py gives each worker its addresses}"
printf '{"name":"gpu","addresses":["%s"]}\n' "${addrs//,/\",\"}"
