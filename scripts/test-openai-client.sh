#!/usr/bin/env bash
# `edgefusion serve` against the official `openai` Python client (scripts/openai-client-test.py).
#
#   scripts/test-openai-client.sh [--model M] [--bin path/to/edgefusion]
#
# Makes .venv-openai (pip: openai, jsonschema) on first use, starts the server on the model
# (default: SmolLM2-135M-Instruct Q4_1 from scripts/fetch-assets.sh --model) with an API key
# on a free port, runs the client checks, and stops the server. The binary defaults to
# target/release/edgefusion, built here when missing. Exit status: the checks'.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${EDGEFUSION_ASSETS:-assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
bin=target/release/edgefusion
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "test-openai-client: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -f "$model" ]] || { echo "test-openai-client: model '$model' not found (scripts/fetch-assets.sh --model)" >&2; exit 1; }
if [[ ! -x "$bin" ]]; then
  cargo build --release -p edgefusion-cli
fi

venv=.venv-openai
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import openai, jsonschema" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40" "jsonschema>=4"
fi

port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key="test-$RANDOM$RANDOM"
log=$(mktemp)
"$bin" serve --model "$model" --port "$port" --slots 2 --ctx 1024 --threads 2 --api-key "$key" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  if "$venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "test-openai-client: the server stopped:" >&2; cat "$log" >&2; exit 1
  fi
  sleep 0.1
done
"$venv/bin/python" scripts/openai-client-test.py --base "http://127.0.0.1:$port" --api-key "$key"
