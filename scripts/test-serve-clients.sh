#!/usr/bin/env bash
# `edgefusion serve` driven by real clients, on the default model:
#   - the official `openai` Python client over every endpoint (scripts/openai-client-test.py);
#   - the chat page at / in headless Chromium through its WebDriver (scripts/chat-page-test.py).
#
#   scripts/test-serve-clients.sh [--model M] [--bin path/to/edgefusion] [--skip-browser]
#
# Makes .venv-serve-tests (pip: openai, jsonschema, selenium) on first use; the browser test
# needs Debian's `chromium` and `chromium-driver`, installed with apt-get when missing and
# running as root (else it fails, unless --skip-browser or EDGEFUSION_SKIP_BROWSER=1). The
# server gets an API key and a free port. The binary defaults to target/release/edgefusion,
# built when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${EDGEFUSION_ASSETS:-assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
bin=target/release/edgefusion
browser=1
[[ "${EDGEFUSION_SKIP_BROWSER:-0}" == 1 ]] && browser=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --skip-browser) browser=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "test-serve-clients: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "test-serve-clients: $*" >&2; exit 1; }
[[ -f "$model" ]] || die "model '$model' not found (scripts/fetch-assets.sh --model)"
if [[ "$bin" == target/release/edgefusion ]]; then
  cargo build --release -p edgefusion-cli   # nothing to do when up to date (the page is built in)
fi
[[ -x "$bin" ]] || die "no binary at '$bin'"

venv=.venv-serve-tests
if ! "$venv/bin/python" -c "import openai, jsonschema, selenium" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40" "jsonschema>=4" "selenium>=4.10"
fi
if [[ $browser == 1 ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true; } \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
      || die "apt-get install chromium chromium-driver failed (--skip-browser skips the page test)"
  else
    die "the chat-page test needs chromium and chromedriver (apt-get install chromium chromium-driver), or --skip-browser"
  fi
fi

port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key="test-$RANDOM$RANDOM"
log=$(mktemp)
"$bin" serve --model "$model" --port "$port" --slots 2 --ctx 1024 --threads 2 --api-key "$key" >"$log" 2>&1 &
server=$!
# On failure the server's log is shown: it is the evidence of what went wrong.
trap 'status=$?; kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; if [[ $status != 0 ]]; then echo "--- edgefusion serve log:" >&2; tail -50 "$log" >&2; fi; rm -f "$log"' EXIT
deadline=$((SECONDS + 180))
until "$venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || die "the server stopped"
  (( SECONDS < deadline )) || die "the server did not answer /health within 180 s"
  sleep 0.2
done
base="http://127.0.0.1:$port"
"$venv/bin/python" scripts/openai-client-test.py --base "$base" --api-key "$key"
if [[ $browser == 1 ]]; then
  "$venv/bin/python" scripts/chat-page-test.py --base "$base" --api-key "$key" \
    --chromedriver "$(command -v chromedriver)"
fi
