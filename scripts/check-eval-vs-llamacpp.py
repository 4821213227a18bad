#!/usr/bin/env python3
"""Check `edgefusion evaluate` against an independent implementation: llama.cpp's
log-likelihoods (through llama-cpp-python) of the same continuations after the same prompts,
on the same GGUF file.

1. `edgefusion evaluate --tasks hellaswag,arc_challenge --limit N --samples S` scores the
   first N items of each task and logs every item's context, continuations and
   log-likelihoods (WinoGrande: one context per choice, `contexts`, and the one shared
   continuation).
2. This script tokenizes each (context, continuation) with llama.cpp's tokenizer the way the
   harness does (the continuation's tokens are those of context + continuation after the
   context's own; BOS when the model adds one), evaluates context + continuation once per
   continuation from an empty cache, and sums the continuation tokens' log-probabilities.
3. It compares, per item, the choice by raw log-likelihood (acc) and, for the tasks where
   the harness reports it, by log-likelihood per character of the choice (acc_norm), and
   the accuracies.

`--tasks all-mc` checks every multiple-choice task (MMLU included, which is slow).

Passes when the choices agree on at least 98% of the items and the accuracies are within
1 point, per task and metric (exit status 1 otherwise).

Usage (llama-cpp-python from scripts/setup-llamacpp.sh):
  .venv-llamacpp/bin/python scripts/check-eval-vs-llamacpp.py [--model M] [--limit 200] [-t 2]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "edgefusion")
DEFAULT_MODEL = os.path.join(ROOT, "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def die(message):
    sys.exit(f"check-eval-vs-llamacpp: {message}")


def log_softmax_at(np, row, token):
    m = float(np.max(row))
    return float(row[token]) - m - math.log(float(np.sum(np.exp(row.astype(np.float64) - m))))


def argmax_first(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


# Every multiple-choice task of `edgefusion evaluate`, and those whose harness YAML lists
# acc_norm beside acc (the others report acc alone).
MC_TASKS = ["hellaswag", "arc_challenge", "arc_easy", "mmlu", "piqa", "winogrande", "boolq",
            "openbookqa", "sciq", "copa", "commonsense_qa", "social_iqa"]
ACC_NORM_TASKS = {"hellaswag", "arc_challenge", "arc_easy", "piqa", "openbookqa", "sciq"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--tasks", default="hellaswag,arc_challenge",
                    help="comma-separated multiple-choice tasks, or all-mc: " + ",".join(MC_TASKS))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "check-eval"))
    args = ap.parse_args()
    if args.tasks == "all-mc":
        args.tasks = ",".join(MC_TASKS)
    unknown = [t for t in args.tasks.split(",") if t not in MC_TASKS]
    if unknown:
        die(f"not a multiple-choice task: {', '.join(unknown)} (known: {', '.join(MC_TASKS)})")
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError as e:
        die(f"{e}; run this with .venv-llamacpp/bin/python (built by scripts/setup-llamacpp.sh)")
    if not os.path.isfile(args.model):
        die(f"model {args.model} not found; run scripts/fetch-assets.sh --model")
    if not os.access(BIN, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "edgefusion-cli"], cwd=ROOT, check=True)
    os.makedirs(args.out, exist_ok=True)
    samples_path = os.path.join(args.out, "samples.jsonl")

    start = time.time()
    subprocess.run([BIN, "evaluate", "-m", args.model, "--tasks", args.tasks, "--limit", str(args.limit),
                    "--no-cache", "-t", str(args.threads), "--samples", samples_path,
                    "-o", os.path.join(args.out, "edgefusion.md")], check=True, cwd=ROOT)
    ours_seconds = time.time() - start
    samples = [json.loads(line) for line in open(samples_path)]

    llm = Llama(model_path=args.model, n_ctx=2048, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False)

    def loglik(context, continuation):
        ctx = llm.tokenize(context.encode("utf-8"), add_bos=True, special=False)
        whole = llm.tokenize((context + continuation).encode("utf-8"), add_bos=True, special=False)
        cont = whole[len(ctx):]
        if not cont:
            die(f"empty continuation {continuation!r}")
        tokens = ctx + cont[:-1]
        llm.reset()
        llm.eval(tokens)
        total = 0.0
        for i, t in enumerate(cont):
            row = np.array(llm.scores[len(ctx) - 1 + i], dtype=np.float32)
            total += log_softmax_at(np, row, t)
        return total

    start = time.time()
    rows = {}
    max_diff = 0.0
    for s in samples:
        # Multiple-input tasks (WinoGrande) log each choice's own context.
        contexts = s.get("contexts") or [s["context"]] * len(s["continuations"])
        theirs = [loglik(ctx, c) for ctx, c in zip(contexts, s["continuations"])]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(theirs, s["logliks"])))
        # acc_norm divides by the choice's length in characters, without the leading " ".
        chars = [len(c[1:] if c.startswith(" ") else c) for c in s["continuations"]]
        gold = int(s["gold"])
        ours = (int(s["pred"]), int(s["pred_norm"]))
        ref = (argmax_first(theirs), argmax_first([ll / n for ll, n in zip(theirs, chars)]))
        r = rows.setdefault(s["task"], {"n": 0, "agree": [0, 0], "ours": [0, 0], "ref": [0, 0]})
        r["n"] += 1
        for m in range(2):
            r["agree"][m] += ours[m] == ref[m]
            r["ours"][m] += ours[m] == gold
            r["ref"][m] += ref[m] == gold
    ref_seconds = time.time() - start

    ok = True
    print(f"edgefusion evaluate vs llama.cpp (llama-cpp-python) on {os.path.basename(args.model)}, "
          f"first {args.limit} items per task; max |Δ log-likelihood| {max_diff:.4f} nats")
    print(f"edgefusion: {ours_seconds:.0f} s; llama-cpp-python: {ref_seconds:.0f} s (no prefix reuse)")
    print()
    print("| task | metric | items | same choice | edgefusion | llama.cpp | Δ points |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, r in rows.items():
        metrics = ["acc", "acc_norm"] if task in ACC_NORM_TASKS else ["acc"]
        for m, name in enumerate(metrics):
            agree = r["agree"][m] / r["n"]
            a, b = r["ours"][m] / r["n"], r["ref"][m] / r["n"]
            delta = 100 * (a - b)
            ok &= agree >= 0.98 and abs(delta) <= 1.0
            print(f"| {task} | {name} | {r['n']} | {100 * agree:.1f}% | {a:.4f} | {b:.4f} | {delta:+.1f} |")
    print()
    print("PASS" if ok else "FAIL: choices agree on fewer than 98% of items or accuracies differ by more than 1 point")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
