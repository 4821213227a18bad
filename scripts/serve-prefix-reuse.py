#!/usr/bin/env python3
"""Time to first token of chats that share a long system prompt, with and without prefix reuse.

For each model, starts `edgefusion serve` twice: with saved states (`--state-cache-mib`,
default) and with none (`--state-cache-mib 0`). Each time it sends, one after another,
chats that share a system prompt of about `--system-tokens` tokens (a stretch of the text)
and ask different questions, then each conversation's next turn. A dense model cuts its
KV cache back to the shared prefix either way; a hybrid's SSM and window states do not
rewind, so without saved states it prefills every prompt whole. Prints the median time to
first token of the later chats and the prompt tokens the server reused.

    python3 scripts/serve-prefix-reuse.py MODEL.gguf [MODEL2.gguf ...] [--system-tokens 1500]
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time

from serve_common import free_port, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    "Summarize the passage in one sentence.",
    "Who speaks first in the passage?",
    "What is the mood of the passage?",
    "Name one place the passage mentions.",
    "What happens at the end of the passage?",
    "Which word would you use to describe the narrator?",
]


def post(port, path, body, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def stream_chat(port, messages, max_tokens):
    """(time to first token, reply text) of a streamed greedy chat."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    started = time.time()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"chat answered {response.status}: {response.read()[:300]!r}")
    first, text = None, ""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
        if delta and first is None:
            first = time.time() - started
        text += delta or ""
    return (first if first is not None else time.time() - started), text


def metric(port, name):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def run(args, model, system, state_mib):
    port = free_port()
    server = subprocess.Popen(
        [args.binary, "serve", "--model", model, "--port", str(port), "--slots", str(args.slots),
         "--ctx", str(args.ctx), "-t", str(args.threads), "--state-cache-mib", str(state_mib)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(server, port, model)
        conversations = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                         for q in QUESTIONS[:args.chats]]
        first_turn, next_turn = [], []
        for messages in conversations:
            ttft, reply = stream_chat(port, messages, args.max_tokens)
            first_turn.append(ttft)
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": "Say more."})
        for messages in conversations:
            next_turn.append(stream_chat(port, messages, args.max_tokens)[0])
        return {
            "first": first_turn[0],
            "later_first_turns": statistics.median(first_turn[1:]),
            "next_turns": statistics.median(next_turn),
            "prompt": metric(port, "edgefusion_prompt_tokens_total"),
            "cached": metric(port, "edgefusion_prompt_tokens_cached_total"),
            "states": metric(port, "edgefusion_saved_states"),
            "state_mib": metric(port, "edgefusion_saved_state_bytes") / 2**20,
        }
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--system-tokens", type=int, default=1500,
                        help="about this many tokens of shared system prompt")
    parser.add_argument("--chats", type=int, default=4, help="conversations (at most 6)")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--text", default=os.path.join(ROOT, "assets/text/moby-dick.txt"))
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/edgefusion"))
    args = parser.parse_args()
    if not 2 <= args.chats <= len(QUESTIONS):
        sys.exit(f"--chats must be 2 to {len(QUESTIONS)}")
    for path in [args.binary, args.text, *args.models]:
        if not os.path.exists(path):
            sys.exit(f"{path}: not found (build with `cargo build --release`, fetch with scripts/fetch-assets.sh)")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    # About 4.2 characters a token in this prose.
    system = "Answer questions about this passage.\n\n" + text[200_000:200_000 + args.system_tokens * 4]
    with os.popen("uptime") as f:
        print(f"load: {f.read().strip()}")
    print(f"{args.chats} chats sharing a system prompt of ~{args.system_tokens} tokens, then each "
          f"one's next turn; {args.slots} slots, greedy, {args.max_tokens} tokens each\n")
    print("| model | saved states | TTFT first chat | TTFT later chats (median) | TTFT next turns (median) "
          "| prompt tokens reused | states held |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        for state_mib in (256, 0):
            r = run(args, model, system, state_mib)
            label = f"{state_mib} MiB" if state_mib else "none"
            print(f"| {os.path.basename(model)} | {label} | {r['first']:.2f} s | {r['later_first_turns']:.2f} s "
                  f"| {r['next_turns']:.2f} s | {r['cached']:.0f} of {r['prompt']:.0f} "
                  f"| {r['states']:.0f} ({r['state_mib']:.1f} MiB) |", flush=True)


if __name__ == "__main__":
    main()
