#!/usr/bin/env bash
# Create .venv with CPU PyTorch and tinylm (editable, with test tools). Safe to re-run: it only
# reinstalls when pyproject.toml changed. Override the torch build with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" make setup
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.tinylm-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
pip_quiet() {  # pip, showing its output only when it fails
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then cat "$log"; exit 1; fi
}
pip_quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "Installing PyTorch ($TORCH_SPEC) ..."
  # shellcheck disable=SC2086
  pip_quiet $TORCH_SPEC
fi
echo "Installing tinylm and its dependencies ..."
pip_quiet -e ".[dev]"
.venv/bin/python -c "import torch, tinylm; print(f'tinylm ready: torch {torch.__version__}')"
echo "$want" > "$stamp"
