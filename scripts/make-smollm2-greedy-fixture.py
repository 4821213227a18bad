#!/usr/bin/env python3
"""Record llama.cpp's greedy decoding of SmolLM2-135M-Instruct (Q4_1) as a test fixture.

Run with the llama-cpp-python venv built by scripts/setup-llamacpp.sh:

    .venv-llamacpp/bin/python scripts/make-smollm2-greedy-fixture.py \
        [--model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out tests/fixtures/smollm2_greedy.json]

The tests pick the fixture recorded by llama.cpp built for the machine's ISA: record on an
AVX2 machine with `--out tests/fixtures/smollm2_greedy_avx2.json` (Gemma 3:
`gemma3_greedy_avx2.json`); the files without the suffix were recorded on AVX-512.

For every prompt it records:
  prompt_ids          llama.cpp's tokenization (Llama.tokenize(add_bos=True, special=False):
                      llama.cpp adds BOS only when the GGUF's tokenizer.ggml.add_bos_token
                      says so; `tokenization` in the fixture records what happened)
  top5_last_prompt    the 5 largest logits (id, value) at the last prompt position
  continuation_ids    32 greedy tokens (argmax of the raw logits, lowest id on ties; stops
                      early only at an end-of-generation token, see stop_reason)
  steps               per generated token: [top1 id, top1 logit, top2 id, top2 logit], so a
                      mismatch can be told apart from a near-tie (min_top1_top2_margin
                      gives the closest call)
  continuation        the continuation detokenized to text
The greedy loop is cross-checked against llama-cpp-python's own sampler
(Llama.generate with temp=0, top_k=1, top_p=1, min_p=0, repeat_penalty=1, fixed seed);
the script fails if the two disagree.
"""

import argparse
import hashlib
import json
import os
import platform
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(
    os.environ.get("EDGEFUSION_ASSETS", os.path.join(REPO_ROOT, "assets")),
    "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "smollm2_greedy.json")

PROMPTS = [
    "The capital of France is",
    "Once upon a time,",
    "def fibonacci(n):",
    "The Industrial Revolution began in Britain in the late eighteenth century. "
    "It moved production from homes and small workshops into large factories powered "
    "by water and later by steam. Historians still debate its causes, but most agree that",
    "Water boils at 100 degrees Celsius, which is",
    "Zürich, München und Köln sind Städte, die",
    "The first three planets from the Sun are",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef mean(values):",
    "Photosynthesis is the process by which plants",
]

N_CTX = 512
N_THREADS = 2
N_BATCH = 512
SEED = 1234
N_PREDICT = 32
TOPK = 5


def die(msg):
    sys.exit("make-smollm2-greedy-fixture: ERROR: " + msg)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top(row, k, np):
    idx = np.argsort(-row, kind="stable")[:k]
    return [[int(i), float(row[i])] for i in idx]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    try:
        import numpy as np
        import llama_cpp
        from llama_cpp import Llama
    except ImportError as e:
        die(f"{e}; run this with .venv-llamacpp/bin/python (built by scripts/setup-llamacpp.sh)")
    if not os.path.isfile(args.model):
        die(f"model {args.model} not found; run scripts/fetch-assets.sh --model")

    llm = Llama(model_path=args.model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS,
                n_threads_batch=N_THREADS, seed=SEED, logits_all=True, verbose=False)
    md = dict(llm.metadata)
    n_vocab = llm.n_vocab()
    bos, eos = llm.token_bos(), llm.token_eos()
    vocab = llm._model.vocab

    def is_eog(tok):
        return bool(llama_cpp.llama_vocab_is_eog(vocab, tok))

    records = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bos_added = len(ids) == len(plain) + 1 and ids[0] == bos and ids[1:] == plain
        if not bos_added and ids != plain:
            die(f"unexpected tokenization difference for {text!r}: {ids} vs {plain}")
        if len(ids) + N_PREDICT > N_CTX:
            die(f"prompt too long for n_ctx={N_CTX}: {text!r}")

        # --- greedy decoding on raw logits
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        if last.shape != (n_vocab,) or not np.all(np.isfinite(last)):
            die(f"bad logits at the last prompt position for {text!r}")
        top5 = top(last, TOPK, np)
        out, steps, stop = [], [], "max_tokens"
        row = last
        for _ in range(N_PREDICT):
            t2 = top(row, 2, np)
            tok = int(np.argmax(row))  # first (lowest) id on ties
            steps.append([t2[0][0], t2[0][1], t2[1][0], t2[1][1]])
            out.append(tok)
            if is_eog(tok):
                stop = "eog"
                break
            llm.eval([tok])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

        # --- cross-check with llama-cpp-python's sampler chain. reset() first: otherwise
        # generate() reuses the cached prompt and replays only its last token, a different
        # batch split whose slightly different numerics can flip a near-tie.
        llm.reset()
        llm.set_seed(SEED)
        sampled = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                                repeat_penalty=1.0, frequency_penalty=0.0,
                                presence_penalty=0.0, reset=True):
            sampled.append(int(tok))
            if is_eog(tok) or len(sampled) == len(out):
                break
        if sampled != out:
            die(f"greedy loop and llama-cpp-python sampler disagree for {text!r}:\n"
                f"  argmax : {out}\n  sampler: {sampled}")

        cont = llm.detokenize(out).decode("utf-8", errors="replace")
        margins = [s[1] - s[3] for s in steps]
        min_step = min(range(len(margins)), key=margins.__getitem__)
        records.append({
            "text": text,
            "prompt_ids": ids,
            "bos_added": bos_added,
            "top5_last_prompt": top5,
            "continuation_ids": out,
            "continuation": cont,
            "stop_reason": stop,
            "steps": steps,
            "min_top1_top2_margin": {"step": min_step, "margin": margins[min_step]},
        })
        print(f"{text[:40]!r:45} {len(ids):3d} prompt ids -> {len(out)} tokens "
              f"(min margin {margins[min_step]:.4f} at step {min_step}): {cont[:60]!r}")

    import llama_cpp as lc
    fixture = {
        "description": "llama.cpp greedy decoding reference for SmolLM2-135M-Instruct Q4_1 "
                       "(scripts/make-smollm2-greedy-fixture.py)",
        "llama_cpp_python_version": lc.__version__,
        "llama_cpp_system_info": lc.llama_print_system_info().decode().strip(),
        "machine": platform.machine(),
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "model_metadata": {k: md.get(k) for k in (
            "general.architecture", "general.name", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.add_space_prefix", "llama.context_length")},
        "n_vocab": n_vocab,
        "bos_id": bos,
        "eos_id": eos,
        "tokenization": "Llama.tokenize(text, add_bos=True, special=False): llama.cpp adds BOS "
                        "only if the GGUF says add_bos_token; per-prompt 'bos_added' records it",
        "settings": {"n_ctx": N_CTX, "n_batch": N_BATCH, "n_threads": N_THREADS, "seed": SEED,
                     "n_predict": N_PREDICT, "temperature": 0.0, "top_k": 1,
                     "repeat_penalty": 1.0, "logits_all": True,
                     "greedy": "argmax of raw logits, lowest id on ties; stop early only at an "
                               "end-of-generation token"},
        "prompts": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
