#!/usr/bin/env python3
"""Write tests/fixtures/smollm2_tokenizer.json: SmolLM2's token ids as llama.cpp makes them.

For a set of varied strings (English, code, numbers, whitespace runs, non-Latin scripts,
emoji, ChatML markup) this records what llama.cpp, through llama-cpp-python, makes of
them with the SmolLM2-135M-Instruct GGUF vocabulary:

  ids              tokenize(text, add_bos=False, special=True)   (special tokens parsed)
  ids_add_special  tokenize(text, add_bos=True,  special=True)   (BOS/EOS as the model wants)
  decoded          detokenize(ids, special=True)                 (control tokens written out)
  decoded_plain    detokenize(ids, special=False)                (control tokens left out)

and, for RANDOM_CASES seeded random strings stitched from PIECES (special tokens, contractions,
digits, odd whitespace, combining marks, emoji, scripts), `ids` alone;
plus the vocabulary facts the Rust test checks: size, BOS/EOS ids, add_bos/add_eos and the
full set of end-of-generation ids (llama_vocab_is_eog over the whole vocabulary).
The Rust test (crates/edgefusion-runtime/tests/tokenizer_vectors.rs) compares our
tokenizer against every field.

Usage (from the repository root; the venv comes from scripts/setup-llamacpp.sh, the model
from scripts/fetch-assets.sh --model):
    .venv-llamacpp/bin/python scripts/make-tokenizer-fixture.py [MODEL.gguf] [OUT.json]
"""

import json
import os
import pathlib
import random
import sys

import llama_cpp
from llama_cpp import Llama

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path(os.environ.get("EDGEFUSION_ASSETS", REPO_ROOT / "assets"))
DEFAULT_MODEL = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "smollm2_tokenizer.json"

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)

TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "Hello, how are you doing today? I'm fine, thanks!",
    "The quick brown fox jumps over the lazy dog.",
    "I'll say they've won't, can't; she'd. I'LL DON'T WE'VE",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'fn main() {\n\tprintln!("{}", 1 + 2);\n}\n',
    "12345",
    "3.14159 and 2,718,281 and 1e-10 and 0123456789012345678901234567890",
    "a  b   c    d     e",
    "\n\n\n",
    "   leading and trailing   ",
    "\t\ttabs\tand\nnewlines\r\n\r\nCRLF",
    "Café naïve résumé, Straße, ½ ¼ ™",
    "日本語のテキストと中文文本",
    "Привет, мир! Ελληνικά. مرحبا بالعالم",
    "emoji 🚀🔥 and a family 👨\u200d👩\u200d👧\u200d👦 and flags 🇫🇷",
    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8",
    CHAT_PROMPT,
    "text<|im_end|>more<|endoftext|>",
    "<|im_start|><|im_start|>",
    "<|not_a_token|> <im_start> <|im_start",
    "<filename>src/main.rs<file_sep><gh_stars>42",
]

RANDOM_CASES = 200
RANDOM_SEED = 20241122
PIECES = [
    "Hello", " world", "  ", "\n", "\n\n", "\t", " ", "'s", "'LL", "'re", "don't", "123",
    "4567890", "3.14", "é", "ñ", "日本", "中文", "한국어", "Привет", "مرحبا", "🚀", "👨\u200d👩\u200d👧",
    "🇫🇷", "\u200d", "\r\n", "   \n  ", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>",
    "<|eot_id|>", "<", "|", ">", "def ", "():", "{", "}", "==", "->", "...", "—", "“", "”", "’", "½",
    "ſ", "\u212a", "ﬁ", "Ⅻ", "①", "٣", "३", "\u00a0", "\u2028", "\u3000", "\x0b", "\x0c", "ǅ",
    "ß", "İ", "ı", "µ", "\u0301", "e\u0301", "ゴ", "ｶ", "𝔘", "\U0001F600", "<filename>",
]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 24)):
        if rng.random() < 0.8:
            parts.append(rng.choice(PIECES))
        else:
            parts.append(chr(rng.randint(0x20, 0x2FFF)))
    return "".join(parts)


def to_json(fixture: dict) -> str:
    """Pretty JSON with one case per line, so a diff shows which case changed."""

    def compact(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    lists = ("cases", "random_cases")
    lines = [f" {compact(key)}: {compact(value)}" for key, value in fixture.items() if key not in lists]
    for key in lists:
        items = ",\n".join(f"  {compact(item)}" for item in fixture[key])
        lines.append(f" {compact(key)}: [\n{items}\n ]")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    model_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    out_path = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT
    if not model_path.exists():
        sys.exit(f"{model_path}: not found (run scripts/fetch-assets.sh --model)")

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    cases = []
    for text in TEXTS:
        data = text.encode("utf-8")
        ids = llm.tokenize(data, add_bos=False, special=True)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_add_special": llm.tokenize(data, add_bos=True, special=True),
                "decoded": llm.detokenize(ids, special=True).decode("utf-8"),
                "decoded_plain": llm.detokenize(ids, special=False).decode("utf-8"),
            }
        )

    rng = random.Random(RANDOM_SEED)
    random_cases = []
    for _ in range(RANDOM_CASES):
        text = random_text(rng)
        random_cases.append({"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)})

    fixture = {
        "generator": f"scripts/make-tokenizer-fixture.py with llama-cpp-python {llama_cpp.__version__}",
        "model": model_path.name,
        "vocab_size": n_vocab,
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "cases": cases,
        "random_cases": random_cases,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(to_json(fixture), encoding="utf-8")
    print(f"wrote {out_path}: {len(cases)} cases, {len(random_cases)} random cases")


if __name__ == "__main__":
    main()
