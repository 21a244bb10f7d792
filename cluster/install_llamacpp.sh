#!/usr/bin/env bash
# Build llama.cpp's llama-server for this machine and install it with llama.cpp's converter scripts into
# a Python environment (make install runs it; the Dockerfile can too).
#
#   cluster/install_llamacpp.sh VENV [LLAMA_CPP_PYTHON_VERSION]
#
# The llama.cpp tree comes from the llama-cpp-python sdist on PyPI (it vendors the whole tree it builds
# against), so a machine that reaches only PyPI can build it. GGML_NATIVE=ON compiles for this CPU's
# own flags (AVX2, AVX-512, AVX-512-BF16...): build on the machine that serves, not elsewhere.
# ~5 min on 2 idle cores; re-running with the binary in place does nothing.
set -euo pipefail
venv="${1:?usage: $0 VENV [VERSION]}"
version="${2:-0.3.36}"
bin="$venv/bin/llama-server"
share="$venv/share/memo/llama.cpp"
if [ -x "$bin" ] && [ -f "$share/convert_hf_to_gguf.py" ] && [ -d "$share/gguf-py" ]; then exit 0; fi
work="$(mktemp -d /tmp/memo-llamacpp-XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "[install] llama.cpp from llama-cpp-python==$version (sdist): download, then build llama-server (~5 min)"
"$venv/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" \
  2> >(grep -v "^WARNING: Location" >&2)
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# Compiler output (thousands of lines of harmless intrinsics warnings) goes to a log, shown on failure only.
build_log="$work/build.log"
{ cmake -S "$src" -B "$work/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release &&
  cmake --build "$work/build" --target llama-server -j "$(nproc)"; } >"$build_log" 2>&1 \
  || { tail -40 "$build_log"; echo "[install] llama.cpp build failed (full log above)"; exit 1; }
mkdir -p "$share"
cp "$src/convert_hf_to_gguf.py" "$share/"
rm -rf "$share/conversion" "$share/gguf-py" && cp -r "$src/conversion" "$src/gguf-py" "$share/"
cp "$work/build/bin/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin"
echo "[install] $bin: $("$bin" --version 2>&1 | head -1)"
