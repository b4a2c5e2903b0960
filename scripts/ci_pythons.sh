#!/usr/bin/env bash
# CI step: a quick subset of the tests (CLI smoke, server, generate) on the oldest and newest Python that
# pyproject.toml's requires-python admits and this machine has (pyenv: 3.10 and 3.13), each in its own
# cached virtualenv (.venv-py310, .venv-py313; gitignored). Safe to re-run: a venv is rebuilt only when
# pyproject.toml, the torch spec or the interpreter changed, so later runs only run the tests.
# CI_PYTHONS="3.10 3.13" picks the versions; TORCH_SPEC as in scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SUBSET=(tests/test_cli.py::test_prepare_train_generate_eval_info tests/test_serve.py tests/test_generate.py)

find_python() {  # the newest installed X.Y.* interpreter: pyenv's, else pythonX.Y on PATH
  local root found
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  found=$(ls -d "$root/versions/$1".* 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$found" ] && [ -x "$found/bin/python" ]; then echo "$found/bin/python"; else command -v "python$1" || true; fi
}

for version in ${CI_PYTHONS:-3.10 3.13}; do
  python=$(find_python "$version")
  if [ -z "$python" ]; then
    echo "Python $version: not installed here, skipped" >&2
    continue
  fi
  venv=.venv-py${version/./}
  want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC $("$python" -V 2>&1)"
  if [ ! -f "$venv/.tinylm-installed" ] || [ "$(cat "$venv/.tinylm-installed")" != "$want" ]; then
    echo "Python $version: setting up $venv (PyTorch $TORCH_SPEC, tinylm[serve], pytest) ..."
    rm -rf "$venv"
    "$python" -m venv "$venv"
    log=$(mktemp)
    # shellcheck disable=SC2086
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip && "$venv/bin/python" -m pip install -q $TORCH_SPEC \
        && "$venv/bin/python" -m pip install -q -e ".[serve]" pytest openai httpx; } >"$log" 2>&1; then
      cat "$log"
      exit 1
    fi
    echo "$want" > "$venv/.tinylm-installed"
  fi
  echo "Python $version ($("$venv/bin/python" -V 2>&1)): ${SUBSET[*]}"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SUBSET[@]}" -k "not compile"
done
