#!/usr/bin/env bash
# Sets up the llama.cpp reference engine used to check and benchmark Lumen.
#
#  * .cache/venv                      python venv with llama-cpp-python (pinned)
#  * .cache/llamacpp/bin/llama-server llama.cpp's own HTTP server
#
# Both come from the SAME llama.cpp source: the copy vendored inside the
# llama-cpp-python sdist from PyPI. llama.cpp is compiled only once (CPU is
# scarce): a native (-march=native) Release build with shared libraries in
# .cache/llamacpp/build; the llama-cpp-python package is installed without its
# own compile (CMAKE_ARGS=-DLLAMA_BUILD=OFF) and its llama_cpp/lib directory is
# filled with the libraries of that build. Set LLAMACPP_PY_OWN_BUILD=1 to let
# pip compile its own copy instead (second, slower build; same sources/flags).
#
# Idempotent: every step is skipped when its output is already in place.
# Env: LLAMACPP_JOBS (default 2), LLAMACPP_PY_VERSION (default below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

LLAMACPP_PY_VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
JOBS="${LLAMACPP_JOBS:-2}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

CACHE="$ROOT/.cache"
VENV="$CACHE/venv"
LC="$CACHE/llamacpp"
SRC_PARENT="$LC/src"
SRC="$SRC_PARENT/llama_cpp_python-$LLAMACPP_PY_VERSION"
VENDOR="$SRC/vendor/llama.cpp"
BUILD="$LC/build"
BIN="$LC/bin"
STAMP="$LC/build.stamp"

log() { echo "[llamacpp/setup] $*" >&2; }

# 1. venv + build tools (wheels from PyPI).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! command -v cmake >/dev/null 2>&1 && [ ! -x "$VENV/bin/cmake" ]; then
  log "installing cmake from PyPI"; "$VPY" -m pip install -q cmake
fi
if ! command -v ninja >/dev/null 2>&1 && [ ! -x "$VENV/bin/ninja" ]; then
  log "installing ninja from PyPI"; "$VPY" -m pip install -q ninja
fi
export PATH="$VENV/bin:$PATH"
# The reference scripts need these (llama-cpp-python's own deps are pinned by pip).
"$VPY" -m pip install -q "jinja2>=3.1" "numpy>=1.24" "typing-extensions>=4.5" "diskcache>=5.6.1"

# 2. llama-cpp-python sdist (only that package from source; build deps as wheels).
if [ ! -d "$VENDOR" ]; then
  mkdir -p "$SRC_PARENT"
  TARBALL="$SRC_PARENT/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
  if [ ! -f "$TARBALL" ]; then
    log "downloading llama-cpp-python==$LLAMACPP_PY_VERSION sdist"
    "$VPY" -m pip download -q --no-binary llama-cpp-python --no-deps \
      "llama-cpp-python==$LLAMACPP_PY_VERSION" -d "$SRC_PARENT"
  fi
  tar -xzf "$TARBALL" -C "$SRC_PARENT"
fi
# The sdist has no .git; the upstream commit is recorded in its CHANGELOG.
LLAMACPP_COMMIT="$(awk -v v="## [$LLAMACPP_PY_VERSION]" '
  index($0, v) == 1 {on=1; next}
  on && /^## \[/ {exit}
  on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART+10, RLENGTH-10); exit}' "$SRC/CHANGELOG.md")"
LLAMACPP_COMMIT="${LLAMACPP_COMMIT:-unknown}"

# 3. one native build of llama.cpp: shared libs + llama-server.
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=ON
  -DGGML_NATIVE=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_COMMON=ON
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  # Without this the build info would be the commit of the enclosing Lumen repo.
  -DLLAMA_BUILD_COMMIT="$LLAMACPP_COMMIT"
)
WANT_STAMP="llama-cpp-python=$LLAMACPP_PY_VERSION ${CMAKE_FLAGS[*]}"
if [ ! -x "$BIN/llama-server" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT_STAMP" ]; then
  log "configuring llama.cpp ($LLAMACPP_COMMIT) in $BUILD"
  GEN=()
  command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "CMAKE_HOME_DIRECTORY:INTERNAL=$VENDOR\$" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
  fi
  cmake -S "$VENDOR" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >"$LC/configure.log"
  log "building llama-server + libllama with -j$JOBS (log: $LC/build.log)"
  cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-server llama >"$LC/build.log" 2>&1 \
    || { tail -40 "$LC/build.log"; exit 1; }
  mkdir -p "$BIN"
  cp -f "$BUILD/bin/llama-server" "$BIN/llama-server"
  # llama-server's RUNPATH points to $BUILD/bin where the shared libs live.
  echo "$WANT_STAMP" >"$STAMP"
fi

# 4. llama-cpp-python (pinned) using the libraries of that build.
installed="$("$VPY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [ "$installed" != "$LLAMACPP_PY_VERSION" ]; then
  if [ "${LLAMACPP_PY_OWN_BUILD:-0}" = "1" ]; then
    log "pip-installing llama-cpp-python==$LLAMACPP_PY_VERSION (own native build)"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_COMMIT=$LLAMACPP_COMMIT" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
      "$VPY" -m pip install -q --no-binary llama-cpp-python "$SRC_PARENT/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
  else
    log "pip-installing llama-cpp-python==$LLAMACPP_PY_VERSION (python only; libs from $BUILD)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
      "$VPY" -m pip install -q --no-binary llama-cpp-python "$SRC_PARENT/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
  fi
fi
PKG_DIR="$("$VPY" -c 'import importlib.util as u; import os; print(os.path.dirname(u.find_spec("llama_cpp").origin))')"
if [ "${LLAMACPP_PY_OWN_BUILD:-0}" != "1" ]; then
  mkdir -p "$PKG_DIR/lib"
  for so in "$BUILD"/bin/lib*.so*; do
    [ -e "$so" ] || continue
    dst="$PKG_DIR/lib/$(basename "$so")"
    if [ ! -e "$dst" ] || ! cmp -s "$so" "$dst"; then cp -f "$so" "$dst"; fi
  done
fi

# 5. report versions.
PYVER="$("$VPY" -c 'import llama_cpp, sys; print(llama_cpp.__version__)' 2>/dev/null)" \
  || { log "ERROR: llama_cpp does not import"; "$VPY" -c 'import llama_cpp'; exit 1; }
SRV_VER="$("$BIN/llama-server" --version 2>&1 | grep -i version | head -1 || true)"
echo "llama-cpp-python $PYVER (llama.cpp $LLAMACPP_COMMIT)" | tee "$LC/VERSION"
echo "llama-server: $BIN/llama-server ($SRV_VER)"
echo "venv python: $VPY"
