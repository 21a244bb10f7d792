#!/usr/bin/env bash
# Build llama.cpp's llama-server for the CPU it will run on, prove that it runs, and install it with
# llama.cpp's converter scripts into a Python environment (make install, the Dockerfile and the KubeRay
# image all run this script).
#
#   cluster/install_llamacpp.sh [--build-only] PREFIX [LLAMA_CPP_PYTHON_VERSION]
#
#   PREFIX                 a Python environment with memo installed (.venv; /home/ray/anaconda3 in images)
#   --build-only           download and compile only (needs pip, cmake and a C/C++ compiler, not memo):
#                          the build is staged in PREFIX/share/memo, and the next run without the flag
#                          smoke-tests and installs it instead of compiling. `make install` runs this
#                          beside the pip installs, so the ~5-10 min compile overlaps them.
#   MEMO_LLAMACPP_CPU      native (default): every feature of this CPU (GGML_NATIVE); build where you serve.
#                          portable: AVX2/FMA/F16C only, no AVX-512 or AMX, for images that run on other
#                          machines (any x86-64 server CPU since 2015)
#   MEMO_LLAMACPP_AMX      auto (default): AMX kernels only where cluster/amx_probe.c shows this process can
#                          run the tile instructions; off: never
#
# The llama.cpp tree comes from the llama-cpp-python sdist on PyPI (it vendors the whole tree it builds
# against), so a machine that reaches only PyPI can build it (~5 min on 2 idle cores).
#
# Why the AMX probe: GGML_NATIVE compiles llama.cpp's AMX kernels wherever the CPU advertises AMX, and a
# VM can advertise it (and grant the kernel permission) yet fault on the first tile instruction: the
# server then dies with SIGSEGV on its first matrix product. The probe runs those instructions in a
# child process first. Whatever the build, the install ends with a smoke test (load a small GGUF, answer
# one question, check the answer): a binary that fails it is never installed. If an AMX build fails it,
# the script rebuilds without AMX once. Re-running with a binary in place only re-runs the smoke test.
#
# A build that passed its smoke test is kept in MEMO_BUILD_CACHE (default ~/.cache/memo), keyed by the
# llama-cpp-python version, the target, the AMX decision, the compiler and this CPU's model and flags: a
# new environment on the same machine (rm -rf .venv, a CI run after a session) reuses it after its own
# smoke test instead of compiling for ~5-10 min again.
set -euo pipefail
build_only=0
if [ "${1:-}" = --build-only ]; then build_only=1; shift; fi
prefix="${1:?usage: $0 [--build-only] PREFIX [LLAMA_CPP_PYTHON_VERSION]}"
version="${2:-0.3.36}"
cpu="${MEMO_LLAMACPP_CPU:-native}"
amx="${MEMO_LLAMACPP_AMX:-auto}"
case "$cpu" in native|portable) ;; *) echo "[install] MEMO_LLAMACPP_CPU=$cpu: use native or portable" >&2; exit 2;; esac
case "$amx" in auto|off) ;; *) echo "[install] MEMO_LLAMACPP_AMX=$amx: use auto or off" >&2; exit 2;; esac
here="$(cd "$(dirname "$0")" && pwd)"
py="$prefix/bin/python"
bin="$prefix/bin/llama-server"
share="$prefix/share/memo/llama.cpp"
record="$share/build.json"

smoke() {  # one line on stdout; exit status 0 when the binary loads a model and answers correctly
  timeout 300 "$py" -m memo.engines.llamacpp smoke "$1" || return 1
}

if [ -x "$bin" ] && [ -f "$share/convert_hf_to_gguf.py" ] && [ -d "$share/gguf-py" ] && [ -f "$record" ]; then
  [ "$build_only" = 1 ] && exit 0  # the run without the flag smoke-tests it
  if line="$(smoke "$bin")"; then echo "[install] $bin in place; $line"; exit 0; fi
  echo "[install] the installed $bin fails on this machine ($line); rebuilding"
fi

work="$(mktemp -d /tmp/memo-llamacpp-XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$share"

# AMX: usable here, or not (and why).
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "$cpu" = portable ]; then
  amx_verdict="amx: off: portable build"
elif [ "$amx" = off ]; then
  amx_verdict="amx: off: MEMO_LLAMACPP_AMX=off"
elif ! cc -O1 -o "$work/amx_probe" "$here/amx_probe.c" 2>"$work/probe.log"; then
  amx_verdict="amx: unusable: the C compiler cannot build the AMX probe ($(tail -1 "$work/probe.log"))"
else
  amx_verdict="$("$work/amx_probe" || true)"
fi
echo "[install] $amx_verdict"
# Without AMX, say so to the compiler (explicit -mno-* flags win over -march=native, whatever their
# order); a compiler that does not know the flags cannot build AMX kernels anyway.
if echo 'int x;' | cc $noamx -x c -c - -o /dev/null 2>/dev/null; then amx_off_flags="$noamx"; else amx_off_flags=""; fi

install_from() {  # DIR holding llama-server, the converter scripts and build.json -> the environment
  mkdir -p "$share"
  cp "$1/convert_hf_to_gguf.py" "$1/build.json" "$share/"
  rm -rf "$share/conversion" "$share/gguf-py" && cp -r "$1/conversion" "$1/gguf-py" "$share/"
  cp "$1/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin"
  echo "[install] $bin: $("$bin" --version 2>&1 | grep -m1 version); $record"
}

key="$(printf '%s\n' "$version" "$cpu" "$amx" "$amx_verdict" "$(cc --version 2>&1 | head -1)" \
        "$(grep -m1 '^model name' /proc/cpuinfo)" "$(grep -m1 '^flags' /proc/cpuinfo)" | sha256sum | cut -c1-16)"
cache="${MEMO_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/memo}/llama.cpp-$version-$key"
if [ -x "$cache/llama-server" ] && [ -f "$cache/build.json" ]; then
  [ "$build_only" = 1 ] && exit 0  # the run without the flag smoke-tests the cached build
  if line="$(smoke "$cache/llama-server")"; then
    echo "[install] reusing the build in $cache; $line"
    install_from "$cache"
    exit 0
  fi
  echo "[install] the cached build in $cache fails here ($line); building again"
fi

build() {  # build DIR EXTRA_C_FLAGS: llama-server into DIR/bin; compiler output to a log shown on failure
  local dir="$1" flags="$2" target
  if [ "$cpu" = portable ]; then
    target=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
            -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  else
    target=(-DGGML_NATIVE=ON)
  fi
  { cmake -S "$src" -B "$dir" "${target[@]}" -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
      -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$dir" --target llama-server -j "$(nproc)"; } >"$dir.log" 2>&1 \
    || { tail -40 "$dir.log"; echo "[install] llama.cpp build failed (last lines above; flags: '$flags')"; exit 1; }
}

# A build staged by --build-only for this key: the source and the compiled tree, smoke-tested below.
staged="$share/staged-$key"
src="$staged/llama_cpp_python-$version/vendor/llama.cpp"
case "$amx_verdict" in "amx: usable") flags="" ;; *) flags="$amx_off_flags" ;; esac
built="$staged/build"
if [ ! -f "$staged/done" ] || [ ! -x "$built/bin/llama-server" ]; then
  echo "[install] llama.cpp from llama-cpp-python==$version (sdist): download, then build llama-server (~5-10 min)"
  rm -rf "$staged" && mkdir -p "$staged"
  "$prefix/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$staged" \
    2> >(grep -v "^WARNING: Location" >&2)
  tar xzf "$staged"/llama_cpp_python-"$version".tar.gz -C "$staged"
  build "$built" "$flags"
  touch "$staged/done"
  if [ "$build_only" = 1 ]; then echo "[install] llama-server compiled in $built; the install smoke-tests it"; exit 0; fi
else
  [ "$build_only" = 1 ] && exit 0
  echo "[install] taking the llama-server compiled in $built"
fi
if ! line="$(smoke "$built/bin/llama-server")"; then
  if [ -n "$flags" ] || [ -z "$amx_off_flags" ]; then
    echo "[install] llama-server fails its smoke test on this machine: ${line#smoke test failed: }" >&2
    exit 1
  fi
  echo "[install] the AMX build fails its smoke test ($line); rebuilding without AMX"
  amx_verdict="amx: unusable: the AMX build failed its smoke test"
  flags="$amx_off_flags"
  built="$work/build-noamx"
  build "$built" "$flags"
  line="$(smoke "$built/bin/llama-server")" \
    || { echo "[install] llama-server fails its smoke test on this machine: ${line#smoke test failed: }" >&2; exit 1; }
fi
echo "[install] $line"

out="$work/out"
mkdir -p "$out"
cp "$src/convert_hf_to_gguf.py" "$built/bin/llama-server" "$out/"
cp -r "$src/conversion" "$src/gguf-py" "$out/"
# What was built, for the README's "which CPU features" and for whoever debugs a crash later.
"$py" - "$out/build.json" "$version" "$cpu" "$amx_verdict" "$flags" "$line" <<'PY'
import json, sys
path, version, cpu, amx, flags, smoke = sys.argv[1:]
features = smoke.split("CPU features: ", 1)[-1].split() if "CPU features: " in smoke else []
json.dump({"llama_cpp_python": version, "cpu": cpu, "amx": amx, "extra_flags": flags,
           "cpu_features": features, "smoke_test": smoke}, open(path, "w"), indent=2)
PY
# Into the cache atomically (a half-copied folder is never taken for a build), best effort.
if mkdir -p "$(dirname "$cache")" 2>/dev/null && cp -r "$out" "$cache.tmp.$$" 2>/dev/null; then
  rm -rf "$cache" && mv "$cache.tmp.$$" "$cache" || rm -rf "$cache.tmp.$$"
fi
install_from "$out"
rm -rf "$staged"  # installed and cached: the source and build tree (~300 MB) are not needed
