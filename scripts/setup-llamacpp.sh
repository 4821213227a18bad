#!/usr/bin/env bash
# Build the llama.cpp reference used by EdgeFusion's comparison scripts:
#
#   .venv-llamacpp/                      python venv with llama-cpp-python (pinned) + numpy
#   .venv-llamacpp/llama.cpp-build/bin/  llama-bench, llama-perplexity, llama-quantize,
#                                        llama-imatrix, llama-completion (the classic CLI),
#                                        llama-simple, llama-tokenize, llama-server
#
# Both are compiled from the SAME llama-cpp-python sdist (vendor/llama.cpp), with
# -march=native but AMX disabled (the AMX code path crashes on our CI machines).
# The sdist comes from PyPI through `pip download` (no URLs). Idempotent: a finished
# build that still imports and runs is left alone. Set FORCE=1 to rebuild.
#
# Takes ~30 min on 2 busy cores the first time (python package ~11 min, tools ~20 min);
# run it in the background:
#   nohup scripts/setup-llamacpp.sh > /tmp/setup-llamacpp.log 2>&1 &
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEFUSION_LLAMACPP_VENV:-$REPO_ROOT/.venv-llamacpp}"
ASSETS="${EDGEFUSION_ASSETS:-$REPO_ROOT/assets}"
CACHE="$ASSETS/.cache/sdist"   # shared with scripts/fetch-assets.sh
SRC_PARENT="$VENV/src"
SRC="$SRC_PARENT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
TOOLS_BUILD="$VENV/llama.cpp-build"
JOBS="${JOBS:-2}"
TOOLS=(llama-bench llama-perplexity llama-quantize llama-imatrix llama-completion llama-simple llama-tokenize llama-server)
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

die() { echo "setup-llamacpp: ERROR: $*" >&2; exit 1; }
log() { echo "setup-llamacpp: $*"; }
stamp() { date +%s; }

# ---------------------------------------------------------------- already done?
python_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY' >/dev/null 2>&1
import sys, llama_cpp, numpy
assert llama_cpp.__version__ == sys.argv[1], llama_cpp.__version__
info = llama_cpp.llama_print_system_info().decode()
assert "AMX_INT8 = 1" not in info, info
PY
}
tools_ok() {
    local t
    for t in "${TOOLS[@]}"; do
        [[ -x "$TOOLS_BUILD/bin/$t" ]] || return 1
    done
    # must actually start (shared libs resolvable)
    "$TOOLS_BUILD/bin/llama-quantize" --help >/dev/null 2>&1 || [[ $? -eq 1 ]] || return 1
    [[ -f "$TOOLS_BUILD/.edgefusion-version" ]] &&
        [[ "$(cat "$TOOLS_BUILD/.edgefusion-version")" == "$LLAMA_CPP_PYTHON_VERSION" ]]
}

# no AMX instructions may have been emitted into either CPU backend
amx_scan() {
    local lib n
    if command -v objdump >/dev/null; then
        for lib in "$TOOLS_BUILD/bin/libggml-cpu.so" \
            "$("$VENV/bin/python" -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))')"; do
            [[ -f "$lib" ]] || die "expected CPU backend library $lib"
            n=$(objdump -d "$lib" | grep -c -E '\b(tdpb[a-z0-9]*|tileloadd[a-z0-9]*|ldtilecfg|sttilecfg|tilestored|tilezero|tilerelease)\b' || true)
            [[ "$n" == 0 ]] || die "$lib contains $n AMX instructions"
        done
        log "checked: no AMX instructions in the CPU backends"
    else
        log "objdump not found: skipping the AMX instruction scan"
    fi
}

if [[ "${FORCE:-0}" != "1" ]] && python_ok && tools_ok; then
    amx_scan
    log "already built: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION in $VENV, tools in $TOOLS_BUILD/bin (FORCE=1 rebuilds)"
    exit 0
fi

# ---------------------------------------------------------------- prerequisites
command -v python3 >/dev/null || die "python3 not found"
command -v c++ >/dev/null || die "no C++ compiler (c++) found; install g++"
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ccache >/dev/null || need_apt+=(ccache)
if ((${#need_apt[@]})); then
    if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
        log "installing ${need_apt[*]} with apt-get"
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq "${need_apt[@]}" >/dev/null || die "apt-get install ${need_apt[*]} failed"
    fi
fi
# cmake >= 3.21 is required by llama-cpp-python; fall back to the PyPI cmake wheel.
cmake_recent() {
    command -v cmake >/dev/null || return 1
    local v; v=$(cmake --version | head -1 | awk '{print $3}')
    python3 -c "import sys; v=tuple(int(x) for x in sys.argv[1].split('.')[:2]); sys.exit(0 if v>=(3,21) else 1)" "$v"
}

# ---------------------------------------------------------------- venv + sdist
T0=$(stamp)
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || log "warning: could not upgrade pip in venv (continuing)"
"$PY" -m pip install -q numpy || die "pip install numpy failed"
if ! cmake_recent; then
    log "system cmake missing or older than 3.21: installing the cmake wheel into the venv"
    "$PY" -m pip install -q "cmake>=3.21" || die "pip install cmake failed"
    export PATH="$VENV/bin:$PATH"
    cmake_recent || die "cmake >= 3.21 still not available"
fi
log "cmake: $(cmake --version | head -1)"

SDIST="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    mkdir -p "$CACHE"
    log "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist)"
    # --no-binary only for this package: its build deps may come as wheels
    # (with ':all:' pip would compile cmake itself from source).
    python3 -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE" ||
        die "pip download of the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist failed"
fi
[[ -f "$SDIST" ]] || die "expected sdist $SDIST after pip download"

if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "extracting sdist into $SRC_PARENT"
    rm -rf "$SRC"
    mkdir -p "$SRC_PARENT"
    tar xzf "$SDIST" -C "$SRC_PARENT" || die "cannot extract $SDIST"
fi
[[ -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]] || die "sdist has no vendor/llama.cpp/CMakeLists.txt"

# ccache (if installed) makes a FORCE=1 rebuild or a re-run after a failed build quick.
# (The python build compiles "unity" sources in a temporary dir, so the two builds
# below do not share objects.)
export CCACHE_DIR="${CCACHE_DIR:-$VENV/.ccache}"
export CCACHE_BASEDIR="$VENV"
export CCACHE_NOHASHDIR=1
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"

# ---------------------------------------------------------------- python package
if [[ "${FORCE:-0}" == "1" ]] || ! python_ok; then
    T1=$(stamp)
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (log: $VENV/build-python.log)"
    # LLAVA_BUILD=OFF: the multimodal helper library is not needed (imported lazily).
    export CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
    if ! "$PY" -m pip install -v --no-cache-dir --force-reinstall --no-deps "$SRC" \
        >"$VENV/build-python.log" 2>&1; then
        tail -40 "$VENV/build-python.log" >&2
        die "building llama-cpp-python failed; full log in $VENV/build-python.log"
    fi
    unset CMAKE_ARGS
    # runtime deps of llama_cpp (installed separately so we never pull another llama build)
    "$PY" -m pip install -q "typing-extensions>=4.5.0" "diskcache>=5.6.1" "jinja2>=2.11.3" ||
        die "pip install of llama-cpp-python runtime deps failed"
    python_ok || die "llama_cpp does not import after the build (or AMX got enabled); see $VENV/build-python.log"
    log "llama-cpp-python built in $(( $(stamp) - T1 ))s"
fi

# verify flags of the python build: -march=native and AMX off
grep -q -- "-mno-amx-int8" "$VENV/build-python.log" || die "python build log shows no -mno-amx-int8; CMAKE_ARGS did not reach the compiler"
grep -q -- "-march=native" "$VENV/build-python.log" || die "python build log shows no -march=native"
log "llama_cpp system info: $("$PY" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())')"

# ---------------------------------------------------------------- llama.cpp tools
if [[ "${FORCE:-0}" == "1" ]] || ! tools_ok; then
    T2=$(stamp)
    log "building llama.cpp tools ${TOOLS[*]} into $TOOLS_BUILD (log: $TOOLS_BUILD/build.log)"
    mkdir -p "$TOOLS_BUILD"
    if ! cmake -S "$SRC/vendor/llama.cpp" -B "$TOOLS_BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON \
        -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
        >"$TOOLS_BUILD/configure.log" 2>&1; then
        tail -40 "$TOOLS_BUILD/configure.log" >&2
        die "cmake configure of llama.cpp failed; see $TOOLS_BUILD/configure.log"
    fi
    if ! cmake --build "$TOOLS_BUILD" --config Release -j "$JOBS" --target "${TOOLS[@]}" \
        >"$TOOLS_BUILD/build.log" 2>&1; then
        tail -40 "$TOOLS_BUILD/build.log" >&2
        die "building llama.cpp tools failed; see $TOOLS_BUILD/build.log"
    fi
    for t in "${TOOLS[@]}"; do
        [[ -x "$TOOLS_BUILD/bin/$t" ]] || die "tool $t missing from $TOOLS_BUILD/bin after build"
    done
    echo "$LLAMA_CPP_PYTHON_VERSION" >"$TOOLS_BUILD/.edgefusion-version"
    log "llama.cpp tools built in $(( $(stamp) - T2 ))s"
fi

# verify flags of the tools build
CC_JSON="$TOOLS_BUILD/compile_commands.json"
[[ -f "$CC_JSON" ]] || die "missing $CC_JSON"
grep -q -- "-mno-amx-int8" "$CC_JSON" || die "tools build compile commands lack -mno-amx-int8"
grep -q -- "-march=native" "$CC_JSON" || die "tools build compile commands lack -march=native"
if grep -q "GGML_AMX_INT8" "$CC_JSON"; then die "tools build defines GGML_AMX_INT8 (AMX enabled)"; fi
tools_ok || die "tools were built but do not run"

amx_scan

log "done in $(( $(stamp) - T0 ))s"
log "  python : $PY  (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION)"
log "  tools  : $TOOLS_BUILD/bin: ${TOOLS[*]}"
