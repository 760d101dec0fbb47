#!/usr/bin/env bash
# One short device check for a machine with a GPU (or TPU): the device, the accelerator-relevant
# tests (those of CPU-only properties, and those needing the embedded-default weight packages
# where they are not installed, skip themselves with a reason),
# then the assign and train benchmarks with absolute times. No -x: one failure does not hide the
# rest.
#   bash launch/device_check.sh [OUT_DIR]
# The device image has jax, flax, optax, orbax-checkpoint, timm, torch, pyarrow, pandas; dwjax
# itself runs from this checkout (no install). tests/test_device_check.py rehearses the
# accelerator's search settings on CPU and checks this script's shape.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/dwjax-device-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DWJAX_HOME="$out/home"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy|pyarrow|ml.collections) ' || true
} 2>&1 | tee "$out/device.txt"
# Search (both methods where valid), precision, k-means, preprocessing, the decoder, the house, the
# device rehearsal, and training over every device on synthetic shards.
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_nearest.py \
  tests/test_precision.py tests/test_kmeans.py tests/test_preprocess.py tests/test_decoder.py \
  tests/test_architecture.py tests/test_device_check.py tests/test_train.py \
  2>&1 | tail -25 | tee "$out/tests.txt"
# The assign and train benchmarks (one table, absolute times on a GPU/TPU) and their JSON.
timeout 300 python3 -m dwjax.bench --parts=assign,train --train_synthetic=200000 \
  --train_epochs=5 --train_batch_size=4096 --train_repeats=1 --json="$out/bench.json" 2>&1 | tail -20 \
  | tee "$out/bench.txt"
