#!/usr/bin/env bash
# Train on a TPU pod slice (e.g. v5p-64: 8 hosts x 4 chips): the same command on every host.
# JAX finds the slice's hosts itself (jax.distributed.initialize() without arguments:
# ppllava_jax.distributed), so no coordinator flags are needed.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/runs/sft7b bash scripts/tpu_pod.sh \
#       --config configs/sft_vicuna7b.py --set train.mesh.data=8 --set train.mesh.fsdp=8
#
# WORKDIR must be one folder every host sees (Filestore / NFS, or a GCS bucket mounted with
# gcsfuse): Orbax writes each host's shards of the state there, process 0 the metrics.
# Plan the memory first, on a laptop: python -m ppllava_jax.plan --config ... --mesh ...
set -euo pipefail
: "${TPU:?name of the TPU VM slice}" "${ZONE:?its zone}" "${WORKDIR:?a folder all hosts share}"
REPO=${REPO:-ppllava-jax}  # the checkout on every host (same path)
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && .venv/bin/python train.py --workdir $WORKDIR$ARGS"
