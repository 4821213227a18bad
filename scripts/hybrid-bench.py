#!/usr/bin/env python3
"""Decode speed, resident memory and KV cache + SSM state of a hybrid against dense models,
deep in a context (issue 4's acceptance: 512 / 2K / 4K / 8K positions).

Each (model, context) is its own `edgefusion bench --ctx C` process, so its peak RSS is its
own; the models take turns at every context and every round (A B A B), so that the noise of
a shared machine falls on all of them alike. Ratios are against the first --dense model.

Usage:
  scripts/hybrid-bench.py --hybrid runs/smollm2/checkpoint_quantized/model.gguf \\
      --dense dense-efq31.gguf --dense assets/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      [--ctx 512,2048,4096,8192] [-n 32] [--rounds 2] [-t 2]
Prints a markdown table (and --json FILE writes every sample).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "edgefusion")


def bench(model, ctx, n_gen, threads):
    """One bench process: (tokens/s, peak RSS bytes, KV + SSM state bytes)."""
    cmd = [BIN, "bench", "-m", model, "-p", "0", "-n", str(n_gen), "--ctx", str(ctx),
           "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [r for r in json.loads(out) if r.get("ctx") == ctx]
    if not rows:
        sys.exit(f"no ctx {ctx} row from: {' '.join(cmd)}")
    row = rows[0]
    return row["avg_ts"], row["peak_rss_bytes"], row["state_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hybrid", required=True, action="append", help="hybrid model(s)")
    p.add_argument("--dense", required=True, action="append", help="dense model(s); the first is the reference")
    p.add_argument("--ctx", default="512,2048,4096,8192")
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--json", help="write every sample here")
    args = p.parse_args()
    if not os.access(BIN, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "edgefusion-cli"], cwd=ROOT, check=True)
    models = args.dense + args.hybrid
    for m in models:
        if not os.path.exists(m):
            sys.exit(f"{m}: no such model file")
    contexts = [int(c) for c in args.ctx.split(",")]
    samples = {(m, c): [] for m in models for c in contexts}
    for c in contexts:
        for r in range(args.rounds):
            for m in models:
                tps, rss, state = bench(m, c, args.n_gen, args.threads)
                samples[(m, c)].append({"tps": tps, "rss": rss, "state": state})
                print(f"round {r + 1} ctx {c}: {os.path.basename(os.path.dirname(m)) + '/' if 'checkpoint' in m else ''}"
                      f"{os.path.basename(m)} {tps:.1f} t/s", file=sys.stderr)
    ref = args.dense[0]
    print(f"decode tg{args.n_gen} ending at each context, {args.threads} threads, "
          f"{args.rounds} rounds (mean), one process per run; ratios against {ref}")
    print()
    print("| model | ctx | t/s | × t/s | peak RSS | KV + SSM state | × state |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    for c in contexts:
        ref_tps = statistics.mean(s["tps"] for s in samples[(ref, c)])
        ref_state = samples[(ref, c)][0]["state"]
        for m in models:
            s = samples[(m, c)]
            tps = statistics.mean(x["tps"] for x in s)
            rss = max(x["rss"] for x in s)
            state = s[0]["state"]
            print(f"| {m} | {c} | {tps:.1f} | {tps / ref_tps:.2f} | {mib(rss)} | {mib(state)} | {state / ref_state:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}@{c}": v for (m, c), v in samples.items()}, f, indent=1)


if __name__ == "__main__":
    main()
