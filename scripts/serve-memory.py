#!/usr/bin/env python3
"""Peak memory of `edgefusion serve` with every slot's context full.

For each model: starts `edgefusion serve --slots S --ctx C`, sends one warm-up request, then
S concurrent completions whose prompts (Moby-Dick, a different stretch each) fill all but a
few positions of the context, and reads the server's peak resident memory (VmHWM) once they
are answered. Prints a table: weights file, peak RSS, peak minus the file, and each model's
ratio to the first model's.

    python3 scripts/serve-memory.py DENSE.gguf HYBRID.gguf [--slots 16] [--ctx 4096]
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time

from serve_common import free_port, status_mib, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def request(port, method, path, body=None, timeout=3600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    return response.status, (json.loads(data) if data else None)


def prompts(port, text, n, target):
    """`n` stretches of `text`, each cut to at most `target` tokens by the server's tokenizer."""
    out = []
    for i in range(n):
        start = 50_000 + i * 40_000
        chars = target * 5
        while True:
            chunk = text[start:start + chars]
            status, body = request(port, "POST", "/tokenize", {"content": chunk})
            if status != 200:
                sys.exit(f"/tokenize answered {status}: {body}")
            count = len(body["tokens"])
            if count <= target:
                break
            chars = int(chars * target / count * 0.995)
        out.append((chunk, count))
    return out


def measure(binary, model, args, text):
    port = free_port()
    log = open(os.path.join(args.out, os.path.basename(model) + ".serve.log"), "w")
    server = subprocess.Popen(
        [binary, "serve", "--model", model, "--port", str(port), "--slots", str(args.slots),
         "--ctx", str(args.ctx), "-t", str(args.threads), "--queue", str(args.slots)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(server, port, model, log=log.name)
        request(port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        # Room for the generated tokens: the context's last positions stay free.
        work = prompts(port, text, args.slots, args.ctx - args.max_tokens - 1)
        after_warmup = status_mib(server.pid, "VmRSS:")
        results = [None] * args.slots

        def client(i):
            results[i] = request(port, "POST", "/v1/completions",
                                 {"prompt": work[i][0], "max_tokens": args.max_tokens, "temperature": 0})

        started = time.time()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [r for r in results if r is None or r[0] != 200]
        if failed:
            sys.exit(f"{model}: {len(failed)} of {args.slots} requests failed: {failed[0]}")
        peak = status_mib(server.pid, "VmHWM:")
        tokens = [r[1]["usage"]["prompt_tokens"] for r in results]
        return {
            "model": model,
            "file_mib": os.path.getsize(model) / 2**20,
            "warm_mib": after_warmup,
            "peak_mib": peak,
            "prompt_tokens": (min(tokens), max(tokens)),
            "seconds": time.time() - started,
        }
    finally:
        server.terminate()
        server.wait()
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="GGUF files or folders; ratios are to the first")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--text", default=os.path.join(ROOT, "assets/text/moby-dick.txt"))
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/edgefusion"))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs/serve-memory"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for path in [args.binary, args.text, *args.models]:
        if not os.path.exists(path):
            sys.exit(f"{path}: not found (build with `cargo build --release`, fetch with scripts/fetch-assets.sh)")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    need = 50_000 + args.slots * 40_000
    if len(text) < need:
        sys.exit(f"{args.text}: {len(text)} characters, {need} needed for {args.slots} prompts")
    with os.popen("uptime") as f:
        print(f"load: {f.read().strip()}")
    rows = []
    for model in args.models:
        row = measure(args.binary, model, args, text)
        rows.append(row)
        print(f"{model}: peak {row['peak_mib']:.0f} MiB after {row['seconds']:.0f} s "
              f"(prompts of {row['prompt_tokens'][0]}-{row['prompt_tokens'][1]} tokens)", flush=True)
    base = rows[0]
    print(f"\n{args.slots} slots x {args.ctx} positions, every slot full at once (VmHWM)\n")
    print("| model | file MiB | after warm-up MiB | peak MiB | peak - file MiB | peak ratio | ratio beside the file |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        beside = r["peak_mib"] - r["file_mib"]
        base_beside = base["peak_mib"] - base["file_mib"]
        print(f"| {os.path.relpath(r['model'])} | {r['file_mib']:.0f} | {r['warm_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {beside:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} | "
              f"{beside / base_beside:.2f} |")


if __name__ == "__main__":
    main()
