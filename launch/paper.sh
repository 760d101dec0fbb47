#!/usr/bin/env bash
# The paper's pipeline for one kernel size on its model set (needs hub access for the weights):
#   bash launch/paper.sh 7 [DATA_DIR] [WORKDIR]
# Converts configs/model_sets.py's paper_<k>x<k> set (resumable), trains, labels, assigns, reports.
set -euo pipefail
k=${1:?kernel size: 5 or 7}
data=${2:-${DWJAX_HOME:-$HOME/dwjax}/paper_data}
work=${3:-${DWJAX_HOME:-$HOME/dwjax}/runs/paper_k$k}
python -m dwjax.convert --model_set="paper_${k}x${k}" --data_dir="$data"
python -m dwjax.train --kernel_size="$k" --data_dir="$data" --workdir="$work" --config.num_epochs=30 --config.batch_size=1024
python -m dwjax.spectrum --workdir="$work"
python -m dwjax.assign --workdir="$work" --data_dir="$data"
python -m dwjax.report --workdir="$work"
