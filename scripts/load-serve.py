#!/usr/bin/env python3
"""Load held: `edgefusion serve` under many clients for a long time, with faults mixed in.

    scripts/load-serve.py [--model M] [--clients 64] [--duration 600] [--slots 16] [-t 2]
                          [--ctx 1024] [--seed 1]

Starts the server (target/release/edgefusion) with `--slots` slots and a queue that holds
every client, then runs `--clients` clients for `--duration` seconds. Each client loops over
a random mix:
  60 %  a valid streamed chat request (max_tokens 8-64, temperature 0.7) that must end
        with [DONE] and a finish_reason;
  10 %  a valid non-streamed request with a JSON-schema response_format whose reply must
        parse;
  12 %  a valid streamed request abandoned after its first chunk (the client hangs up);
  18 %  a malformed request (broken JSON, wrong types, negative or absurd max_tokens, n > 1,
        an invalid schema, a 3 MiB body, a wrong path) that must get a 4xx with an
        OpenAI-shaped error.
The server's RSS is sampled every 5 s. Printed at the end, and the exit status fails if any
is broken: valid requests answered with an error (must be 0), malformed requests not
answered 4xx (must be 0), the server alive, its RSS after warm-up (max over the first fifth
of the run vs the last fifth: flat means within 5 %), and /metrics back to 0 active slots
and an empty queue. Standard library only.
"""

import argparse
import http.client
import json
import os
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from serve_common import free_port, status_mib, tail, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
EDGEFUSION = os.path.join(ROOT, "target", "release", "edgefusion")

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What are three good habits for learning a language?",
    "Describe a walk through a forest in autumn.",
    "Give me a recipe for vegetable soup.",
    "Why is the sky blue?",
]
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "rating": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["title", "rating"], "additionalProperties": False}

MALFORMED = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),
    ("/v1/chat/completions", json.dumps({"messages": "hello"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 4}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}}).encode()),
    ("/v1/completions", json.dumps({"prompt": 42}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x" * (3 << 20)}).encode()),
    ("/v1/completions", b"\xff\xfe not json"),
    ("/v1/nonexistent", b"{}"),
]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, kind, failure=None):
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if failure is not None:
                self.failures.append(f"{kind}: {failure}")


def post(port, path, body, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def valid_stream(port, rng, tally, abandon):
    body = json.dumps({"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                       "max_tokens": rng.randint(8, 64), "temperature": 0.7, "stream": True})
    kind = "abandoned" if abandon else "stream"
    try:
        conn, response = post(port, "/v1/chat/completions", body)
        if response.status != 200:
            return tally.add(kind, f"HTTP {response.status}: {response.read()[:200]!r}")
        finish, done = None, False
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            if abandon:
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return tally.add(kind)
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return tally.add(kind, f"error event {event}")
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
        conn.close()
        if not done or finish not in ("stop", "length"):
            return tally.add(kind, f"stream ended without [DONE]/finish ({done}, {finish})")
        tally.add(kind)
    except (OSError, http.client.HTTPException, ValueError) as e:
        tally.add(kind, f"{type(e).__name__}: {e}")


def valid_json(port, rng, tally):
    body = json.dumps({"messages": [{"role": "user", "content": "Review a film as JSON."}],
                       "max_tokens": 200, "temperature": 0.7, "seed": rng.randint(0, 1 << 30),
                       "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
    try:
        conn, response = post(port, "/v1/chat/completions", body)
        payload = response.read()
        conn.close()
        if response.status != 200:
            return tally.add("json", f"HTTP {response.status}: {payload[:200]!r}")
        choice = json.loads(payload)["choices"][0]
        if choice["finish_reason"] == "stop":
            value = json.loads(choice["message"]["content"])
            if not (isinstance(value, dict) and "title" in value and "rating" in value):
                return tally.add("json", f"not the schema's shape: {value}")
        tally.add("json")
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        tally.add("json", f"{type(e).__name__}: {e}")


def malformed(port, rng, tally):
    path, body = rng.choice(MALFORMED)
    try:
        conn, response = post(port, path, body, timeout=60)
        payload = response.read()
        conn.close()
        if not 400 <= response.status < 500:
            return tally.add("malformed", f"{path} {body[:80]!r}: HTTP {response.status}")
        if path != "/v1/nonexistent":
            error = json.loads(payload).get("error", {})
            if not error.get("message") or "type" not in error:
                return tally.add("malformed", f"not OpenAI-shaped: {payload[:200]!r}")
        tally.add("malformed")
    except (OSError, http.client.HTTPException, ValueError) as e:
        # The server may close a 3 MiB upload early after answering 413.
        if len(body) > (2 << 20):
            return tally.add("malformed")
        tally.add("malformed", f"{type(e).__name__}: {e}")


def metrics(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not os.path.exists(EDGEFUSION):
        sys.exit("load-serve: build first: cargo build --release -p edgefusion-cli")
    port = free_port()
    cmd = [EDGEFUSION, "serve", "--model", args.model, "--port", str(port), "--slots", str(args.slots),
           "--queue", str(args.clients), "-t", str(args.threads), "--ctx", str(args.ctx)]
    # The server's output goes to a file (a pipe nobody reads could fill and stall it).
    log = os.path.join(tempfile.gettempdir(), f"load-serve-{port}.log")
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    wait_healthy(server, port, "load-serve", timeout=120, log=log)

    try:
        run(args, port, server, log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def run(args, port, server, log):
    tally = Tally()
    start = time.time()
    end = start + args.duration
    samples = []  # (seconds since start, RSS MiB)

    def client(c):
        rng = random.Random(args.seed * 1000 + c)
        while time.time() < end:
            r = rng.random()
            if r < 0.60:
                valid_stream(port, rng, tally, abandon=False)
            elif r < 0.70:
                valid_json(port, rng, tally)
            elif r < 0.82:
                valid_stream(port, rng, tally, abandon=True)
            else:
                malformed(port, rng, tally)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    while time.time() < end:
        rss = status_mib(server.pid, "VmRSS:")
        if not math.isnan(rss):
            samples.append((time.time() - start, rss))
        if server.poll() is not None:
            break
        elapsed = int(time.time() - start)
        if elapsed % 60 < 5:
            print(f"  {elapsed:4d} s: RSS {rss:.0f} MiB, {dict(sorted(tally.counts.items()))}", flush=True)
        time.sleep(5)
    join_by = time.time() + 900
    for t in threads:
        t.join(timeout=max(0.0, join_by - time.time()))
    alive = server.poll() is None
    problems = []
    if alive:
        time.sleep(1)
        m = metrics(port)
        idle = m.get("edgefusion_active_slots") == 0 and m.get("edgefusion_queue_depth") == 0
        if not idle:
            problems.append(f"not idle after the run: active {m.get('edgefusion_active_slots')}, queue {m.get('edgefusion_queue_depth')}")
        print(f"metrics: requests {m.get('edgefusion_requests_total'):.0f}, cancelled "
              f"{m.get('edgefusion_requests_cancelled_total'):.0f}, tokens "
              f"{m.get('edgefusion_tokens_generated_total'):.0f}, rejected {m.get('edgefusion_requests_rejected_total'):.0f}")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            problems.append("SIGTERM did not stop the server within 60 s")
            server.kill()
    else:
        problems.append(f"the server died (exit {server.returncode}){tail(log)}")
    fifth = args.duration / 5
    early = [r for t, r in samples if t <= fifth]
    late = [r for t, r in samples if t >= args.duration - fifth]
    if early and late:
        growth = max(late) / max(early) - 1
        print(f"RSS: max {max(early):.0f} MiB in the first fifth, {max(late):.0f} MiB in the last "
              f"({growth * 100:+.1f} %), samples {len(samples)}")
        if growth > 0.05:
            problems.append(f"RSS grew {growth * 100:.1f} % after warm-up")
    print(f"requests: {dict(sorted(tally.counts.items()))} in {time.time() - start:.0f} s, "
          f"{args.clients} clients, {args.slots} slots")
    for failure in tally.failures[:20]:
        problems.append(failure)
    if tally.failures:
        problems.append(f"{len(tally.failures)} requests answered wrongly")
    if problems:
        print("load-serve: FAILED\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("load-serve: held: no valid request failed, every malformed one got a 4xx, the server lived, RSS flat")


if __name__ == "__main__":
    main()
