#!/usr/bin/env bash
# A TPU pod slice (v4-16, v5e-32, ...): every worker runs this same script, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
#     --command="cd dwjax && bash launch/tpu_pod.sh 7 /mnt/shared/shards /mnt/shared/runs/k7"
# Arguments: K (kernel size), DATA (kernel shards, converted beforehand: `python -m dwjax.convert
# --model_set=paper_7x7 --data_dir=DATA` anywhere, then copied), WORKDIR. DATA and WORKDIR must be
# one shared filesystem (NFS, Filestore, a gcsfuse mount) seen by every worker at the same path.
# `--distributed` calls jax.distributed.initialize(), which finds the pod's workers itself; the
# global batch is split over every core of every worker, each worker reads its slice of each
# batch; process 0 writes the checkpoints and metrics. Then assign: each process takes its parts
# of the shards, and after a barrier process 0 writes the summary. A killed run resumes when the
# same command is run again (training from its last checkpoint; assign skips finished parts).
set -euo pipefail
K=${1:-7}
DATA=${2:?kernel shards directory (shared)}
WORK=${3:?run directory (shared)}
BATCH=${BATCH:-4096}  # global: divisible by the pod's core count
# torch is not needed on the workers: dwjax, jax[tpu] and the shards are.
python3 -c "import dwjax" 2>/dev/null || pip install -q "${DWJAX_SPEC:-dwjax}"
python3 -m dwjax.train --distributed --kernel_size="$K" --data_dir="$DATA" --workdir="$WORK" \
  --config.batch_size="$BATCH" "${@:4}"
python3 -m dwjax.assign --distributed --workdir="$WORK" --data_dir="$DATA"
# The spectrum and report need no pod: run them once anywhere that sees WORK, e.g.
#   python -m dwjax.spectrum --workdir=WORK && python -m dwjax.report --workdir=WORK
