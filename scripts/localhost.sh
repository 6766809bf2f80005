#!/usr/bin/env bash
# Several processes of one run on this machine, with CPU devices and gloo collectives: what
# the tests do (tests/train/test_multiprocess.py), and a way to try a launch before a pod.
#
#   PROCESSES=2 DEVICES=4 bash scripts/localhost.sh train.py --config configs/sft_tiny.py \
#       --workdir out/mp --set data.shards=2
#
# When one process fails, the others would wait for it in their next collective: the script
# stops them (SIGTERM, then SIGKILL after GRACE seconds) and exits with the failed one's
# status. A Ctrl-C or SIGTERM to the script reaches every process once (each runs in its own
# process group, set -m, so the terminal's Ctrl-C goes to the script alone), and the script
# waits for them to save and stop; a second one stops them at once.
set -euo pipefail
PROCESSES=${PROCESSES:-2} DEVICES=${DEVICES:-4} PORT=${PORT:-12355} GRACE=${GRACE:-10}
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
export JAX_COORDINATOR_ADDRESS=localhost:$PORT JAX_NUM_PROCESSES=$PROCESSES
pids=()
signal_all() { kill -"$1" ${pids[@]+"${pids[@]}"} 2>/dev/null || true; }
stopping=0  # a signal to the script, passed on: the processes stop together by themselves
on_signal() { stopping=1; signal_all "$1"; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
set -m
for ((i = 0; i < PROCESSES; i++)); do
  JAX_PROCESS_ID=$i ${PYTHON:-.venv/bin/python} "$@" &
  pids+=($!)
done
set +m  # the process groups stay; no job notices
# Polled, not wait -n: bash forgets a job killed by a signal (an OOM kill) before wait -n sees it.
reap() {  # drops the exited processes from pids; the first failure's status goes to status
  local live=() pid rc
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then live+=("$pid"); continue; fi
    wait "$pid" && rc=0 || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      ((stopping)) ||
        echo "localhost.sh: process $pid exited with status $rc: stopping the others" >&2
    fi
  done
  pids=(${live[@]+"${live[@]}"})
}
status=0
while ((${#pids[@]} > 0 && (status == 0 || stopping))); do
  sleep 1 || true  # a signal to the script kills its sleep too: the trap passes it on
  reap
done
if ((${#pids[@]} > 0)); then
  signal_all TERM
  for ((t = 0; t < GRACE && ${#pids[@]} > 0; t++)); do sleep 1 || true; reap; done
  signal_all KILL
  wait || true
fi
exit $status
