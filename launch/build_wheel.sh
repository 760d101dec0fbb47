#!/usr/bin/env bash
# Builds dwjax's wheel for the Colab notebook, which installs from a wheel or a git URL only (no
# package of ours is on the public index):   launch/build_wheel.sh [OUT_DIR]   (default dist/)
# Upload dist/dwjax-*.whl next to launch/colab_tpu.ipynb (Colab's Files pane) or to MyDrive/dwjax.
# PIP_WHEEL_ARGS adds pip options (e.g. --no-build-isolation to build with the installed setuptools).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
# shellcheck disable=SC2086
python3 -m pip wheel -q --no-deps ${PIP_WHEEL_ARGS:-} --wheel-dir "$out" .
ls -t "$out"/dwjax-*.whl | head -1
