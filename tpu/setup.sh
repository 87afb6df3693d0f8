#!/usr/bin/env bash
# Install jax[tpu] and jsae on every host of a TPU VM / pod slice.
# Usage: tpu/setup.sh NAME ZONE GIT_URL
set -euo pipefail
NAME=${1:?name}; ZONE=${2:?zone}; REPO=${3:?git URL of your jsae clone (or fork)}
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  python3 -m pip install -U pip
  python3 -m pip install -U 'jax[tpu]'
  if [ ! -d jsae ]; then git clone $REPO jsae; fi
  cd jsae && git pull --ff-only && python3 -m pip install -e '.[demo,tfds]'
  python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'
"
