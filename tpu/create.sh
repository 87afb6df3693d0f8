#!/usr/bin/env bash
# Create a TPU VM or pod slice.  Usage: tpu/create.sh NAME ZONE ACCELERATOR [VERSION]
#   tpu/create.sh jsae-v3 europe-west4-a v3-8
#   tpu/create.sh jsae-pod us-central2-b v4-32 tpu-ubuntu2204-base
set -euo pipefail
NAME=${1:?name}; ZONE=${2:?zone}; ACC=${3:?accelerator type, e.g. v3-8, v5litepod-8, v4-32}
VERSION=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
  --accelerator-type "$ACC" --version "$VERSION"
