#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every host. E.g. v5p-64 is 64
# TensorCores = 32 chips on 8 hosts x 4 chips, and JAX counts a v5p chip (2 cores, one
# megacore) as one device: 32 devices, so a mesh of data x fsdp x tensor = 32. JAX finds
# the slice's hosts from the metadata server (--cluster-detection auto, which
# ppllava_jax.distributed passes on as jax.distributed.initialize() without arguments), so
# no coordinator flags are needed.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/runs/sft7b bash scripts/tpu_pod.sh \
#       --config configs/sft_vicuna7b.py --set train.mesh.data=1 --set train.mesh.fsdp=32
#
# WORKDIR must be one folder every host sees (Filestore / NFS, or a GCS bucket mounted with
# gcsfuse): Orbax writes each host's shards of the state there, process 0 the metrics.
# REPO is the checkout on every host, at the same path: absolute, or relative to the home
# folder (no ~: it is quoted). Plan the memory first, on a laptop:
# python -m ppllava_jax.plan --config ... --mesh ...
set -euo pipefail
: "${TPU:?name of the TPU VM slice}" "${ZONE:?its zone}" "${WORKDIR:?a folder all hosts share}"
REPO=${REPO:-ppllava-jax}
# The remote shell (bash) reads one string: every value in it quoted.
COMMAND=$(printf 'cd %q && .venv/bin/python train.py --cluster-detection auto --workdir %q' \
  "$REPO" "$WORKDIR")
if (($#)); then COMMAND+=$(printf ' %q' "$@"); fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$COMMAND"
