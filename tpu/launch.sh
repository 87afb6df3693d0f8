#!/usr/bin/env bash
# Run `jsae train` on every host of a TPU VM / pod slice at once (multi-host SPMD).
# Each host runs the same command; `--distributed` calls jax.distributed.initialize(),
# each process reads its own share of the data, and the mesh spans all chips.
# Usage: tpu/launch.sh NAME ZONE CONFIG [--set key=value ...]
#   tpu/launch.sh jsae-pod us-central2-b configs/tpu_pod.yaml --set run_dir=gs://bucket/run1
set -euo pipefail
NAME=${1:?name}; ZONE=${2:?zone}; CONFIG=${3:?config}; shift 3
ARGS="$*"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  cd jsae && nohup python3 -m jsae train $CONFIG --distributed $ARGS > train.log 2>&1 &
  echo started on \$(hostname)
"
echo "follow progress: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f jsae/train.log'"
