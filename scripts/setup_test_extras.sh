#!/usr/bin/env bash
# What the real-peer tests need beyond `make setup`, installed only when missing (safe to re-run):
# Debian's Chromium and ChromeDriver (web playground test); llama.cpp through llama-cpp-python, built from
# source with the system compiler (GGUF tests; pip caches the built wheel); and llama.cpp's own command line,
# `llama-simple`, built from the llama.cpp sources that llama-cpp-python's sdist vendors (the README's GGUF
# quickstart runs it). Without them those tests and that step skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium and chromium-driver (apt) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "chromium/chromedriver missing and not root: the browser test will skip" >&2
  fi
fi
bash scripts/setup.sh
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "Building llama-cpp-python (llama.cpp from source; a few minutes the first time) ..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" .venv/bin/python -m pip install -q "llama-cpp-python>=0.3" || echo "llama-cpp-python did not build: the GGUF tests will skip" >&2
fi
if [ ! -x .venv/bin/llama-simple ] && .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  bash scripts/build_llama_simple.sh .venv || echo "llama-simple did not build: the README's llama.cpp step will skip" >&2
fi
