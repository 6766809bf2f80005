#!/usr/bin/env bash
# Several processes of one run on this machine, with CPU devices and gloo collectives: what
# the tests do (tests/train/test_multiprocess.py), and a way to try a launch before a pod.
#
#   PROCESSES=2 DEVICES=4 bash scripts/localhost.sh train.py --config configs/sft_tiny.py \
#       --workdir out/mp --set data.shards=2
set -euo pipefail
PROCESSES=${PROCESSES:-2} DEVICES=${DEVICES:-4} PORT=${PORT:-12355}
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
export JAX_COORDINATOR_ADDRESS=localhost:$PORT JAX_NUM_PROCESSES=$PROCESSES
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  JAX_PROCESS_ID=$i ${PYTHON:-.venv/bin/python} "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
