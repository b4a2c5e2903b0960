#!/usr/bin/env bash
# Create .venv with CPU PyTorch and tinylm (editable, with test tools), showing pip's progress as it goes.
# The first run downloads PyTorch and the test tools (a few minutes, a venv of about 2 GB; the README gives
# the measured figures). Safe to re-run: it only reinstalls when pyproject.toml changed. Override the torch
# build with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" make setup
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.tinylm-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"

# `source .venv/bin/activate` also sets TINYLM_DATA_DIR, where tinylm reads corpora and the README's
# quickstarts find them: ../shared/datasets when it exists (as the Makefile does), else tinylm's download
# cache (tinylm.data.sources.cache_dir), where `tinylm prepare shakespeare` puts Tiny Shakespeare.
activate_data_dir() {
  local dir='${TINYLM_CACHE:-$HOME/.cache/tinylm}' mark="# added by scripts/setup.sh" activate=.venv/bin/activate
  if [ -d ../shared/datasets ]; then dir=$(cd ../shared/datasets && pwd); fi
  grep -v -F "$mark" "$activate" > "$activate.tmp" || true
  echo "export TINYLM_DATA_DIR=\"\${TINYLM_DATA_DIR:-$dir}\"  $mark" >> "$activate.tmp"
  mv "$activate.tmp" "$activate"
}

if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv ..."
  "$PY" -m venv .venv
fi
activate_data_dir
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

start=$SECONDS
pip_install() {  # pip with its progress lines, minus the "already satisfied" ones
  .venv/bin/python -m pip install --disable-pip-version-check "$@" 2>&1 \
    | { grep -v --line-buffered -E "^(Requirement already satisfied|  Using cached)" || true; }
}
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "Installing PyTorch ($TORCH_SPEC), the largest download ..."
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC
fi
echo "Installing tinylm and its dependencies (test tools included) ..."
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, tinylm; print(f'tinylm ready: torch {torch.__version__}')"
echo "Set up in $((SECONDS - start)) s; .venv holds $(du -sh .venv | cut -f1)."
echo "$want" > "$stamp"
