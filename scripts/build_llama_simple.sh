#!/usr/bin/env bash
# Build llama.cpp's `llama-simple` (examples/simple/simple.cpp) into VENV/bin, from the llama.cpp sources
# vendored in the sdist of the llama-cpp-python that VENV has installed, linked against that package's own
# libllama, so the command line and the Python binding are the same llama.cpp. One compile of one file.
set -euo pipefail
venv=$(cd "${1:-.venv}" && pwd)
py="$venv/bin/python"
version=$("$py" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
lib=$("$py" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "Building llama-simple from llama-cpp-python $version's llama.cpp sources (downloads its sdist once) ..."
"$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards \
  '*/vendor/llama.cpp/include/*' '*/vendor/llama.cpp/ggml/include/*' '*/vendor/llama.cpp/examples/simple/*'
src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
libs=(-lllama)
for name in ggml ggml-base; do
  if [ -e "$lib/lib$name.so" ]; then libs+=("-l$name"); fi
done
c++ -O2 -std=c++17 "$src/examples/simple/simple.cpp" -I"$src/include" -I"$src/ggml/include" \
  -L"$lib" "${libs[@]}" -Wl,-rpath,"$lib" -o "$venv/bin/llama-simple"
echo "llama-simple is in $venv/bin"
