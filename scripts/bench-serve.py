#!/usr/bin/env python3
"""Serving throughput: `edgefusion serve` against llama.cpp's `llama-server` on one GGUF.

For each client count (default 1, 4, 16, 64), each server is started with as many slots as
clients (at most --max-slots; llama-server's `--parallel`), the same threads and the same
context per slot, and every client sends streaming chat requests from a fixed prompt set,
one after another, --requests each. The engines alternate (edgefusion first in even
rounds, llama.cpp first in odd ones) so both see the same machine. Printed per run:

  agg tok/s   completion tokens of all requests / wall time from the first request to
              the last answer (what the machine delivers to its clients together)
  ttft p50/p99  time to the first streamed text, over all requests
  peak RSS    the server process's VmHWM at the end

Usage:
  scripts/bench-serve.py [--model M] [--clients 1,4,16,64] [--requests 2] [--max-tokens 64]
                         [-t 2] [--ctx 1024] [--rounds 1] [--engines edgefusion,llama]

llama-server comes from scripts/setup-llamacpp.sh (.venv-llamacpp/llama.cpp-build/bin) or
LLAMACPP_BIN=DIR; edgefusion from target/release (cargo build --release -p edgefusion-cli).
Standard library only.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
EDGEFUSION = os.path.join(ROOT, "target", "release", "edgefusion")
LLAMA_BIN = os.environ.get("LLAMACPP_BIN", os.path.join(ROOT, ".venv-llamacpp", "llama.cpp-build", "bin"))

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "What are three good habits for learning a new language? Explain each.",
    "Describe a walk through a forest in autumn.",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "List some differences between cats and dogs as pets.",
    "Write a polite email asking a colleague to review a document.",
]


def die(message):
    sys.exit(f"bench-serve: {message}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(engine, args, slots, port):
    if engine == "edgefusion":
        cmd = [EDGEFUSION, "serve", "--model", args.model, "--port", str(port),
               "--slots", str(slots), "-t", str(args.threads), "--ctx", str(args.ctx),
               "--queue", str(max(64, slots))]
    else:
        cmd = [os.path.join(LLAMA_BIN, "llama-server"), "-m", args.model, "--port", str(port),
               "--parallel", str(slots), "-t", str(args.threads), "-tb", str(args.threads),
               # llama-server's context is shared by its slots: each gets ctx.
               "-c", str(args.ctx * slots), "--no-webui"]
    log = open(os.path.join(args.out, f"{engine}-{slots}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            die(f"{engine} exited with {proc.returncode}; see {log.name}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    die(f"{engine} did not answer /health within 120 s; see {log.name}")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(port, prompt, max_tokens):
    """(ttft seconds or None, completion tokens, error or None) of one streamed chat request."""
    body = json.dumps({
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return None, 0, f"HTTP {response.status}: {response.read()[:200]!r}"
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except (OSError, ValueError) as e:
        return None, 0, str(e)
    return ttft, usage if usage is not None else chunks, None


def run_load(port, clients, requests, max_tokens):
    results, lock = [], threading.Lock()

    def client(c):
        for r in range(requests):
            prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
            out = one_request(port, prompt, max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [e for _, _, e in results if e]
    ttfts = sorted(t for t, _, e in results if t is not None)
    tokens = sum(n for _, n, _ in results)
    return wall, tokens, ttfts, errors


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, in turn")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--engines", default="edgefusion,llama")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-serve"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    engines = args.engines.split(",")
    if "edgefusion" in engines and not os.access(EDGEFUSION, os.X_OK):
        die(f"{EDGEFUSION} missing: cargo build --release -p edgefusion-cli")
    if "llama" in engines and not os.access(os.path.join(LLAMA_BIN, "llama-server"), os.X_OK):
        die(f"{LLAMA_BIN}/llama-server missing: scripts/setup-llamacpp.sh or LLAMACPP_BIN=DIR")
    if not os.path.isfile(args.model):
        die(f"{args.model}: no such file (scripts/fetch-assets.sh --model)")
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, ctx {args.ctx} per slot, "
          f"{args.requests} requests per client, max_tokens {args.max_tokens}, load {os.getloadavg()[0]:.2f}")
    print(f"{'engine':<11}{'clients':>8}{'slots':>6}{'agg tok/s':>11}{'ttft p50':>10}{'ttft p99':>10}"
          f"{'peak RSS':>10}{'errors':>8}")
    summary = {}
    for clients in [int(c) for c in args.clients.split(",")]:
        slots = min(clients, args.max_slots)
        for rnd in range(args.rounds):
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            for engine in order:
                port = free_port()
                proc = start_server(engine, args, slots, port)
                # One short request first: page in the weights, start the threads.
                one_request(port, PROMPTS[0], 4)
                wall, tokens, ttfts, errors = run_load(port, clients, args.requests, args.max_tokens)
                rss = peak_rss_mib(proc.pid)
                stop_server(proc)
                rate = tokens / wall
                summary.setdefault((engine, clients), []).append((rate, percentile(ttfts, 99)))
                print(f"{engine:<11}{clients:>8}{slots:>6}{rate:>11.1f}{percentile(ttfts, 50):>9.2f}s"
                      f"{percentile(ttfts, 99):>9.2f}s{rss:>8.0f}Mi{len(errors):>8}", flush=True)
                for e in errors[:3]:
                    print(f"  error: {e}")
    if set(engines) >= {"edgefusion", "llama"}:
        print("\nratios (edgefusion / llama.cpp, medians over rounds):")
        for clients in [int(c) for c in args.clients.split(",")]:
            ours = summary.get(("edgefusion", clients))
            theirs = summary.get(("llama", clients))
            if ours and theirs:
                rate = statistics.median(r for r, _ in ours) / statistics.median(r for r, _ in theirs)
                ttft = statistics.median(t for _, t in ours) / statistics.median(t for _, t in theirs)
                print(f"  {clients:>3} clients: aggregate tok/s {rate:.2f}x, ttft p99 {ttft:.2f}x")


if __name__ == "__main__":
    main()
