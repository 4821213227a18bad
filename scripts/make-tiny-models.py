#!/usr/bin/env python3
"""Generate the tiny random GGUF test models and their independent reference logits.

How to run (from the repository root):

    python3 -m venv .venv-tools && .venv-tools/bin/pip install numpy gguf
    .venv-tools/bin/python scripts/make-tiny-models.py                 # writes tests/fixtures/tiny-*
    .venv-tools/bin/python scripts/make-tiny-models.py --check         # regenerate in memory, compare with files on disk
    .venv-tools/bin/python scripts/make-tiny-models.py --check-llamacpp [--llamacpp-venv .venv-llamacpp]
            # cross-check the numpy reference against llama.cpp through llama-cpp-python, imported
            # directly or from the given venv (default .venv-llamacpp)

Everything is deterministic (fixed seeds, no timestamps): running the script twice gives
byte-identical files.

What it writes (all under tests/fixtures/):

* tiny-llama-f32.gguf      arch "llama", 2 layers, n_embd 64, 4 heads / 2 KV heads (GQA), head_dim 16,
                           SwiGLU ffn 128, vocab 512, ctx 64, rope base 1e4, rms eps 1e-5, untied output.weight
* tiny-llama-{f16,q8_0,q4_0,q4_1}.gguf
                           the same weights with every 2-D matrix (token_embd included) stored as that type;
                           norms stay F32
* tiny-qwen2-f32.gguf      arch "qwen2", same shapes, q/k/v biases, tied embeddings (no output.weight),
                           rope base 1e6 (NeoX rope)
* tiny-llama256-q4_k_m.gguf
                           arch "llama", n_embd 256, 4 heads / 2 KV heads, head_dim 64, ffn 512, vocab 512,
                           a Q4_K_M-like mix: Q6_K for output.weight, attn_v and ffn_down, Q4_K elsewhere.
                           The gguf package can only *de*quantize K-quants, so this script carries its own
                           (simple, non-optimal) Q4_K/Q6_K quantizers; their output is verified by
                           round-tripping through gguf.quants.dequantize (an independent implementation).
* tiny-hybrid-f32.gguf     arch "llama" with 3 layers: SSM, attention, SSM (docs/HYBRID.md; metadata
                           edgefusion.layer_types, edgefusion.ssm.d_state 12, edgefusion.ssm.d_conv 4);
                           SSM layers hold blk.N.ssm_* tensors instead of attn_q/k/v/output
* tiny-window-f32.gguf     arch "llama" with 3 layers: SSM beside sink + window attention, window
                           attention only, full attention (edgefusion.window 6, edgefusion.sink 2): a
                           windowed layer attends to positions < 2 and the last 6; its SSM layer holds
                           attn_q/k/v/output and blk.N.ssm_* tensors, the two outputs added
* tiny-llama3-f32.gguf     arch "llama" with Llama 3 RoPE scaling (factor 8, low/high frequency factors 1/4,
                           original context 64) stored as llama.cpp's converter stores it: the per-frequency
                           divisors in rope_freqs.weight (F32, head_dim/2)
* tiny-qwen3-f32.gguf      arch "qwen3", the shapes of tiny-llama but head_dim 32 (q width 128 != n_embd),
                           RMS norms on every q/k head before NeoX rope, tied embeddings, rope base 1e6
* tiny-gemma3-f32.gguf     arch "gemma3", 6 layers (layers 0-4 local over a sliding window of 5 positions,
                           layer 5 global: llama.cpp's default pattern of 6), n_embd 64, 4 heads / 1 KV
                           head of head_dim 32 (q width 128 != n_embd), ffn 128, tied embeddings, rope
                           base 1e6 (global) and 1e4 (local, the default of a file without
                           rope.freq_base_swa), NeoX rope; embedding x sqrt(n_embd), RMS norms on every
                           q/k head, post-norms on the attention and ffn outputs, GeGLU (tanh GELU)
* tiny-<name>.json         reference for each model above (see generate()):
                             model, arch, hparams, tensor_types   what the file holds
                             prompt, tokens                       a 12-token prompt (text and ids; the text
                                                                  encodes to exactly these ids, checked
                                                                  against llama.cpp's tokenizer)
                             logits                               [12][512], 7 significant digits
                             greedy_continuation, greedy_text     8 tokens, argmax with full recompute
                             greedy_margins                       top1 - top2 logit at each greedy step
                             logits_ggml_act_quant                (quantized files except F16) the same
                                                                  pass with ggml-style activation
                                                                  quantization, see ActQuant
                             long {prompt, tokens, logits}        (tiny-llama-f32 only) a 40-token prompt

Every model carries a byte-level BPE tokenizer (tokenizer.ggml.model "gpt2", pre "gpt-2") learned by
this script from the English text below: 256 byte tokens (GPT-2 byte-to-unicode mapping, id == byte
value), 253 merges, then <|endoftext|>, <|im_start|>, <|im_end|> as control tokens: 512 tokens in all.

The reference forward pass (forward()) is plain numpy in float64 and follows llama.cpp's semantics:
RMSNorm, "normal" RoPE (adjacent pairs) for llama and NeoX RoPE (halves) for qwen2, GQA,
causal softmax attention scaled by 1/sqrt(head_dim), SwiGLU, final norm, output head.
For quantized files it uses the dequantized weights, so the only difference an engine should show
against it is its own activation quantization / accumulation order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # pragma: no cover - message for people running it with the wrong python
    sys.exit("this script needs the `gguf` and `numpy` packages: "
             "python3 -m venv .venv-tools && .venv-tools/bin/pip install numpy gguf")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE learned from a small English text
# ---------------------------------------------------------------------------------------------

TRAINING_TEXT = """\
The little town sat at the edge of a wide green valley, where the river turned slowly toward the sea.
Every morning the baker opened his shop before the sun was up, and the smell of fresh bread moved
along the quiet streets. Children walked to school in small groups, talking about the games they
would play in the afternoon. The old teacher waited at the door and said good morning to each of them.

In the spring the fields were full of flowers, and the farmers worked from early light until the
evening. They planted wheat and corn, and they watched the sky for rain. When the weather was good,
the whole town seemed to smile. When the storms came down from the mountains, people closed their
windows and waited together in the warm kitchens, telling stories about other years and other storms.

There was a small library near the market square. It had tall wooden shelves, a long table by the
window, and a cat that slept on the warmest chair. The librarian knew every book by heart. She liked
to say that a good book is a door, and that you only have to open it to walk into another world.
Students came in the afternoon to read about history, science, music and the stars.

On the hill above the town stood a white tower with a bright light at the top. At night the light
turned around and around, and the sailors on the dark water could see it from far away. The keeper of
the tower was a quiet man who wrote letters to his sister every week. He told her about the birds, the
wind, the ships that passed, and the long winter nights when the sea was loud and cold.

Time moved on, and the town changed a little every year. New houses were built along the road, a new
bridge crossed the river, and the market grew larger. But the bread was still warm in the morning, the
cat still slept on the chair, and the light on the hill still turned through the night, showing the
way home to everyone who was out on the water.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_VOCAB = 512
N_MERGES = N_VOCAB - 256 - len(SPECIAL_TOKENS)  # 253

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GPT-2's pre-tokenizer is  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's `re` has no \p{..}; [^\W\d_] is "a Unicode letter", \d a digit. Close enough for learning
# merges from ASCII English (the real tokenizer lives in the engine / llama.cpp).
_PRETOK = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE2UNI = bytes_to_unicode()
UNI2BYTE = {u: b for b, u in BYTE2UNI.items()}


def pretokenize(text: str) -> list[str]:
    """Split text into pre-tokens, each mapped to GPT-2's byte-level unicode alphabet."""
    return ["".join(BYTE2UNI[b] for b in piece.encode("utf-8")) for piece in _PRETOK.findall(text)]


def learn_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Classic BPE training: repeatedly merge the most frequent adjacent pair.

    Ties are broken by the pair itself (lexicographically smallest wins) so the result is deterministic.
    """
    word_freq = Counter(pretokenize(text))
    words = {w: list(w) for w in word_freq}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, syms in words.items():
            f = word_freq[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += f
        if not pairs:
            raise RuntimeError("training text too small for the requested number of merges")
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        a, b = best
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return merges


class Tokenizer:
    def __init__(self) -> None:
        self.merges = learn_bpe(TRAINING_TEXT, N_MERGES)
        self.tokens: list[str] = [BYTE2UNI[b] for b in range(256)]
        for a, b in self.merges:
            self.tokens.append(a + b)
        self.tokens += SPECIAL_TOKENS
        if len(set(self.tokens)) != len(self.tokens):
            raise RuntimeError("duplicate token in vocab")
        assert len(self.tokens) == N_VOCAB
        self.types = [gguf.TokenType.NORMAL] * (N_VOCAB - len(SPECIAL_TOKENS)) + \
                     [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.rank = {m: r for r, m in enumerate(self.merges)}
        self.eot_id = self.ids["<|endoftext|>"]
        self.im_start_id = self.ids["<|im_start|>"]
        self.im_end_id = self.ids["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        """Plain-text encode (no special-token parsing): lowest-rank merge first, like llama.cpp."""
        out: list[int] = []
        for word in pretokenize(text):
            syms = list(word)
            while len(syms) > 1:
                best_rank, best_i = None, -1
                for i in range(len(syms) - 1):
                    r = self.rank.get((syms[i], syms[i + 1]))
                    if r is not None and (best_rank is None or r < best_rank):
                        best_rank, best_i = r, i
                if best_rank is None:
                    break
                a, b = self.merges[best_rank]
                i, merged = 0, []
                while i < len(syms):
                    if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                        merged.append(a + b)
                        i += 2
                    else:
                        merged.append(syms[i])
                        i += 1
                syms = merged
            out += [self.ids[s] for s in syms]
        return out

    def decode(self, ids: list[int]) -> str:
        data = bytearray()
        for i in ids:
            t = self.tokens[i]
            if i >= N_VOCAB - len(SPECIAL_TOKENS):
                data += t.encode("utf-8")
            else:
                data += bytes(UNI2BYTE[c] for c in t)
        return data.decode("utf-8", errors="replace")

    def prompt_of_length(self, sentences: list[str], n: int) -> tuple[str, list[int]]:
        """The first word-prefix of one of `sentences` that encodes to exactly n tokens.

        GPT-2 pre-tokens never span a word boundary, so a word prefix's tokens are a prefix of the
        full sentence's tokens and the text round-trips through any correct tokenizer.
        """
        for s in sentences:
            words = s.split(" ")
            for k in range(1, len(words) + 1):
                text = " ".join(words[:k])
                ids = self.encode(text)
                if len(ids) == n:
                    return text, ids
                if len(ids) > n:
                    break
        raise RuntimeError(f"no candidate prompt encodes to exactly {n} tokens")


PROMPTS_12 = [
    "The old teacher said good morning to the children at the door.",
    "The cat slept on the warm chair by the window of the old library.",
    "Every morning the baker opened his shop before the sun was up.",
    "Once upon a time there was a quiet town in a green valley near the sea.",
]
PROMPTS_40 = [
    "On the hill above the town stood a white tower with a bright light at the top, and at night "
    "the keeper climbed the stairs to watch the ships pass while the wind sang over the dark water "
    "and the stars came out one by one above the sleeping houses.",
    "The librarian liked to say that a good book is a door, and that you only have to open it to walk "
    "into another world full of strange people, old cities, long roads and music that nobody has "
    "heard before, if you are patient and quiet enough.",
]

# ---------------------------------------------------------------------------------------------
# Model configurations and random weights
# ---------------------------------------------------------------------------------------------


def config(arch: str, n_embd: int, n_ff: int, rope_base: float, name: str) -> dict:
    n_head, n_head_kv = 4, 2
    return dict(
        arch=arch, name=name, n_layer=2, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=n_embd // n_head, n_ff=n_ff, n_vocab=N_VOCAB, n_ctx=64, rms_eps=1e-5,
        rope_base=rope_base,
        rope_neox=(arch == "qwen2"),          # llama.cpp: LLAMA_ROPE_TYPE_NORM for llama, NEOX for qwen2
        qkv_bias=(arch == "qwen2"),
        tied_embeddings=(arch == "qwen2"),
    )


LLAMA = config("llama", 64, 128, 10000.0, "tiny-llama")
# Llama 3.x: RoPE frequencies divided per frequency (the three bands of Llama 3.1's scaling).
LLAMA3 = dict(config("llama", 64, 128, 10000.0, "tiny-llama3"),
              rope_llama3=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=64))
# Qwen3: QK-norm, no biases, head_dim independent of n_embd.
QWEN3 = dict(config("qwen3", 64, 128, 1000000.0, "tiny-qwen3"), head_dim=32, rope_neox=True,
             tied_embeddings=True, qk_norm=True)
# Gemma 3: every 6th layer global, the others over a window of 5; rope base 1e4 on local layers.
GEMMA3 = dict(config("gemma3", 64, 128, 1000000.0, "tiny-gemma3"), n_layer=6, n_head_kv=1,
              head_dim=32, rope_neox=True, tied_embeddings=True, gemma3=True,
              qk_norm=True, layer_types_native=["window"] * 5 + ["attention"], window=5, sink=0,
              rope_base_local=10000.0)
QWEN2 = config("qwen2", 64, 128, 1000000.0, "tiny-qwen2")
LLAMA256 = config("llama", 256, 512, 10000.0, "tiny-llama256")
# A hybrid: SSM, attention, SSM layers (docs/HYBRID.md), d_state 12, d_conv 4.
HYBRID = dict(config("llama", 64, 128, 10000.0, "tiny-hybrid"), n_layer=3,
              layer_types=["ssm", "attention", "ssm"], ssm_d_state=12, ssm_d_conv=4)
# Windowed layers: an SSM beside sink + window attention, a window-only layer, full attention.
WINDOWED = dict(config("llama", 64, 128, 10000.0, "tiny-window"), n_layer=3,
                layer_types=["ssm", "window", "attention"], ssm_d_state=12, ssm_d_conv=4,
                window=6, sink=2)


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """The divisors llama.cpp's converter writes to rope_freqs.weight for Llama 3 scaling
    (conversion/llama.py), in float32 as it computes them."""
    p, hd = cfg["rope_llama3"], cfg["head_dim"]
    freqs = 1.0 / (np.float32(cfg["rope_base"]) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / p["low_freq_factor"], old / p["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(out, dtype=np.float32)


def make_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights, numpy shape (out_features, in_features) = GGUF ne [in, out].

    Scales: every projection has std ~ gain/sqrt(in_features) so activations stay O(1); RMSNorm
    weights are 1 + small noise; q/k get a gain of 1.5 so attention is not uniform; the head is
    scaled so logits have std ~1-2.
    """
    rng = np.random.default_rng(seed)
    d, hd, nh, nkv, ff, nv = (cfg[k] for k in ("n_embd", "head_dim", "n_head", "n_head_kv", "n_ff", "n_vocab"))

    def mat(out_f: int, in_f: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) * (gain / math.sqrt(in_f))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    # tied: the head reuses token_embd, so it must also have head-like scale
    emb_std = 1.0 / math.sqrt(d) * 1.5 if cfg["tied_embeddings"] else 0.5
    w["token_embd.weight"] = (rng.standard_normal((nv, d)) * emb_std).astype(np.float32)
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(d)
        kind = cfg.get("layer_types", ["attention"] * cfg["n_layer"])[i]
        if kind == "ssm" and cfg.get("window", 0) > 0:
            w[p + "attn_q.weight"] = mat(nh * hd, d, 1.5)
            w[p + "attn_k.weight"] = mat(nkv * hd, d, 1.5)
            w[p + "attn_v.weight"] = mat(nkv * hd, d)
            w[p + "attn_output.weight"] = mat(d, nh * hd)
        if kind == "ssm":
            n, k = cfg["ssm_d_state"], cfg["ssm_d_conv"]
            channels = (nh + nkv) * n + nkv * hd
            w[p + "ssm_c.weight"] = mat(nh * n, d, 1.5)
            w[p + "ssm_b.weight"] = mat(nkv * n, d, 1.5)
            w[p + "ssm_x.weight"] = mat(nkv * hd, d)
            w[p + "ssm_dt.weight"] = mat(nkv, d, 0.5)
            # softplus(bias) spread over 0.05..0.5: decays from fast to slow
            dt0 = np.linspace(0.05, 0.5, nkv)
            w[p + "ssm_dt.bias"] = np.log(np.expm1(dt0)).astype(np.float32)
            w[p + "ssm_a_log"] = np.log(rng.uniform(1.0, 8.0, nkv)).astype(np.float32)
            w[p + "ssm_d"] = (0.5 * rng.standard_normal(nh)).astype(np.float32)
            w[p + "ssm_gate.weight"] = mat(nkv, d)
            conv = 0.3 * rng.standard_normal((channels, k))
            conv[:, -1] += 1.0
            w[p + "ssm_conv1d.weight"] = conv.astype(np.float32)
            w[p + "ssm_out.weight"] = mat(d, nh * hd)
            w[p + "ffn_norm.weight"] = norm(d)
            w[p + "ffn_gate.weight"] = mat(ff, d)
            w[p + "ffn_up.weight"] = mat(ff, d)
            w[p + "ffn_down.weight"] = mat(d, ff)
            continue
        w[p + "attn_q.weight"] = mat(nh * hd, d, 1.5)
        w[p + "attn_k.weight"] = mat(nkv * hd, d, 1.5)
        w[p + "attn_v.weight"] = mat(nkv * hd, d)
        if cfg["qkv_bias"]:
            w[p + "attn_q.bias"] = (0.2 * rng.standard_normal(nh * hd)).astype(np.float32)
            w[p + "attn_k.bias"] = (0.2 * rng.standard_normal(nkv * hd)).astype(np.float32)
            w[p + "attn_v.bias"] = (0.2 * rng.standard_normal(nkv * hd)).astype(np.float32)
        w[p + "attn_output.weight"] = mat(d, nh * hd)
        w[p + "ffn_norm.weight"] = norm(d)
        w[p + "ffn_gate.weight"] = mat(ff, d)
        w[p + "ffn_up.weight"] = mat(ff, d)
        w[p + "ffn_down.weight"] = mat(d, ff)
        if cfg.get("qk_norm"):
            w[p + "attn_q_norm.weight"] = norm(hd)
            w[p + "attn_k_norm.weight"] = norm(hd)
        if cfg.get("gemma3"):
            w[p + "post_attention_norm.weight"] = norm(d)
            w[p + "post_ffw_norm.weight"] = norm(d)
    w["output_norm.weight"] = norm(d)
    if not cfg["tied_embeddings"]:
        w["output.weight"] = mat(nv, d, 1.5)
    if "rope_llama3" in cfg:
        w["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return w


# ---------------------------------------------------------------------------------------------
# K-quant quantizers (the gguf package only dequantizes Q4_K / Q6_K)
# ---------------------------------------------------------------------------------------------

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K: super-block of 256 = 8 sub-blocks of 32; x ~ d*sc[j]*q - dmin*m[j], q in 0..15,
    sc/m 6-bit. Block bytes: d f16 | dmin f16 | 12 bytes packed scales/mins | 128 bytes nibbles."""
    rows, cols = x.shape
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    nb = blocks.shape[0]
    lo = np.minimum(blocks.min(axis=2), 0.0)              # (nb, 8) minimum, never positive
    hi = blocks.max(axis=2)
    scale = (hi - lo) / 15.0                               # float sub-block scale
    mins = -lo                                             # >= 0
    d = scale.max(axis=1) / 63.0
    dmin = mins.max(axis=1) / 63.0
    d16 = d.astype(np.float16).astype(np.float32)
    dmin16 = dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.rint(scale / d16[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin16[:, None] > 0, np.rint(mins / dmin16[:, None]), 0).clip(0, 63).astype(np.uint8)
        eff_d = d16[:, None] * sc                         # (nb, 8)
        eff_m = dmin16[:, None] * m
        q = np.where(eff_d[:, :, None] > 0,
                     np.rint((blocks + eff_m[:, :, None]) / eff_d[:, :, None]), 0).clip(0, 15).astype(np.uint8)
    # pack scales: bytes 0-3 = sc[0..3] | (sc[4..7] >> 4) << 6 ; bytes 4-7 = m[0..3] | (m[4..7] >> 4) << 6
    #              bytes 8-11 = (sc[4..7] & 15) | (m[4..7] & 15) << 4
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    # nibbles: per 64 values, 32 bytes; low nibble = value l, high nibble = value l+32
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)
    assert out.shape[1] == gguf.GGML_QUANT_SIZES[QT.Q4_K][1]
    return out.reshape(rows, cols // QK_K * out.shape[1])


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: super-block of 256 = 16 sub-blocks of 16; x ~ d*sc[j]*(q-32), q in 0..63, sc int8.
    Block bytes: ql 128 (low nibbles) | qh 64 (2 high bits) | scales 16 int8 | d f16."""
    rows, cols = x.shape
    blocks = x.astype(np.float32).reshape(-1, 16, 16)
    nb = blocks.shape[0]
    amax = np.abs(blocks).max(axis=2)                      # (nb, 16)
    scale = amax / 31.0
    d = np.abs(scale).max(axis=1) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.rint(scale / d16[:, None]), 0).clip(-128, 127).astype(np.int8)
        eff = d16[:, None] * sc.astype(np.float32)
        q = np.where(eff[:, :, None] != 0, np.rint(blocks / eff[:, :, None]), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(nb, 2, 4, 32)   # per 128 values: 4 groups of 32
    low = q & 0x0F
    high = q >> 4
    # ql: per 128 values 64 bytes: bytes 0..31 = group0 | group2<<4, bytes 32..63 = group1 | group3<<4
    ql = np.concatenate([low[:, :, 0, :] | (low[:, :, 2, :] << 4),
                         low[:, :, 1, :] | (low[:, :, 3, :] << 4)], axis=2).reshape(nb, 128)
    # qh: per 128 values 32 bytes: group g's 2 high bits at shift 2*g
    qh = (high[:, :, 0, :] | (high[:, :, 1, :] << 2) | (high[:, :, 2, :] << 4)
          | (high[:, :, 3, :] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    assert out.shape[1] == gguf.GGML_QUANT_SIZES[QT.Q6_K][1]
    return out.reshape(rows, cols // QK_K * out.shape[1])


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.Q4_K:
        data = quantize_q4_k(x)
    elif qtype == QT.Q6_K:
        data = quantize_q6_k(x)
    else:
        return gguf.quants.quantize(x, qtype)
    # verify our own K-quant packing with gguf-py's independent dequantizer
    back = gguf.quants.dequantize(data, qtype)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    limit = {QT.Q4_K: 0.15, QT.Q6_K: 0.04}[qtype]
    if back.shape != x.shape or not rel < limit:
        raise RuntimeError(f"{qtype.name} round trip error {rel:.4f} >= {limit}")
    return data


# ---------------------------------------------------------------------------------------------
# GGUF writing
# ---------------------------------------------------------------------------------------------


def write_gguf(path: str, cfg: dict, tensors: dict[str, tuple[np.ndarray, QT]], tok: Tokenizer,
               file_type: gguf.LlamaFileType) -> None:
    arch = cfg["arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(cfg["name"])
    w.add_file_type(int(file_type))
    if file_type not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg["n_ctx"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_block_count(cfg["n_layer"])
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_freq_base(cfg["rope_base"])
    w.add_layer_norm_rms_eps(cfg["rms_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["n_vocab"])
    if cfg["head_dim"] * cfg["n_head"] != cfg["n_embd"]:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("gemma3"):
        w.add_sliding_window(cfg["window"])
    if "layer_types" in cfg:
        w.add_array("edgefusion.layer_types", cfg["layer_types"])
        w.add_uint32("edgefusion.ssm.d_state", cfg["ssm_d_state"])
        w.add_uint32("edgefusion.ssm.d_conv", cfg["ssm_d_conv"])
    if cfg.get("window", 0) > 0 and not cfg.get("gemma3"):
        w.add_uint32("edgefusion.window", cfg["window"])
        w.add_uint32("edgefusion.sink", cfg["sink"])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok.tokens)
    w.add_token_types([int(t) for t in tok.types])
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.im_end_id)
    w.add_pad_token_id(tok.eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    for name, (data, qtype) in tensors.items():
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_tensors(weights: dict[str, np.ndarray], qtype_of) -> tuple[dict, dict]:
    """Returns (tensors to write, float weights the reference must use = dequantized)."""
    tensors, ref = {}, {}
    for name, x in weights.items():
        qtype = QT.F32 if x.ndim == 1 else qtype_of(name)
        data = quantize(x, qtype)
        tensors[name] = (data, qtype)
        ref[name] = x if qtype == QT.F32 else gguf.quants.dequantize(data, qtype).reshape(x.shape)
    return tensors, ref


# ---------------------------------------------------------------------------------------------
# Reference forward pass (numpy, float64), llama.cpp semantics
# ---------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, base: float, neox: bool,
         factors: np.ndarray | None = None) -> np.ndarray:
    """x: (T, n_heads, head_dim). theta_i = pos * base^(-2i/head_dim) / factors[i], i in [0, head_dim/2).

    normal (llama): rotates (x[2i], x[2i+1]);  NeoX (qwen2): rotates (x[i], x[i + head_dim/2])."""
    hd = x.shape[-1]
    inv_freq = base ** (-np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd)
    if factors is not None:
        inv_freq = inv_freq / factors
    theta = positions[:, None].astype(np.float64) * inv_freq[None, :]     # (T, hd/2)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :]
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    out = np.empty_like(x)
    if neox:
        out[..., : hd // 2], out[..., hd // 2:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def forward(cfg: dict, W: dict[str, np.ndarray], tokens: list[int], act_quant: "ActQuant | None" = None) -> np.ndarray:
    """Logits (T, n_vocab) for every position of `tokens`, computed from scratch.

    act_quant=None: exact float64 products with the (dequantized) weights. Otherwise every product
    with a weight matrix goes through act_quant, which mimics ggml's CPU activation quantization."""
    W = {k: v.astype(np.float64) for k, v in W.items()}

    def lin(name: str, h: np.ndarray) -> np.ndarray:
        return h @ W[name].T if act_quant is None else act_quant.matmul(name, h, W[name])

    T = len(tokens)
    nh, nkv, hd, eps = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"], cfg["rms_eps"]
    group = nh // nkv
    pos = np.arange(T)
    mask = np.triu(np.full((T, T), -np.inf), k=1)

    x = W["token_embd.weight"][np.asarray(tokens)]                          # (T, d)
    gemma = cfg.get("gemma3", False)
    if gemma:
        x = x * math.sqrt(cfg["n_embd"])
    layer_types = cfg.get("layer_types", cfg.get("layer_types_native", ["attention"] * cfg["n_layer"]))
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        h = rms_norm(x, W[p + "attn_norm.weight"], eps)
        window, sink = cfg.get("window", 0), cfg.get("sink", 0)
        mixed = np.zeros_like(x)
        if layer_types[i] == "ssm":
            mixed = mixed + ssm_mixer(cfg, W, p, h, lin)
        if layer_types[i] == "attention" or window > 0 and layer_types[i] in ("ssm", "window"):
            layer_mask = mask
            if layer_types[i] != "attention":
                # Position s is seen from t when s <= t and (s < sink or s > t - window).
                s_pos, t_pos = pos[None, :], pos[:, None]
                seen = (s_pos <= t_pos) & ((s_pos < sink) | (s_pos > t_pos - window))
                layer_mask = np.where(seen, 0.0, -np.inf)
            base = cfg["rope_base_local"] if gemma and layer_types[i] == "window" else cfg["rope_base"]
            mixed = mixed + attention_mixer(cfg, W, p, h, lin, pos, layer_mask, base)
        if gemma:
            mixed = rms_norm(mixed, W[p + "post_attention_norm.weight"], eps)
        x = x + mixed
        h = rms_norm(x, W[p + "ffn_norm.weight"], eps)
        g = lin(p + "ffn_gate.weight", h)
        u = lin(p + "ffn_up.weight", h)
        if gemma:
            ffn = lin(p + "ffn_down.weight", gelu_ggml(g) * u)
            x = x + rms_norm(ffn, W[p + "post_ffw_norm.weight"], eps)
        else:
            x = x + lin(p + "ffn_down.weight", (g / (1.0 + np.exp(-g))) * u)
    x = rms_norm(x, W["output_norm.weight"], eps)
    return lin("token_embd.weight" if cfg["tied_embeddings"] else "output.weight", x)


def gelu_ggml(g: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation) as llama.cpp's CPU backend applies it: 0 at or below -10, the
    identity at or above 10, and between them f16(gelu(f16(x))) (its lookup table)."""
    x16 = g.astype(np.float16).astype(np.float64)
    y = 0.5 * x16 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
    y = y.astype(np.float16).astype(np.float64)
    return np.where(g <= -10.0, 0.0, np.where(g >= 10.0, g, y))


def attention_mixer(cfg: dict, W: dict[str, np.ndarray], p: str, h: np.ndarray, lin,
                    pos: np.ndarray, mask: np.ndarray, rope_base: float | None = None) -> np.ndarray:
    """Softmax attention of normalized inputs h (T, d) under `mask` (T, T) of 0 / -inf."""
    T = h.shape[0]
    nh, nkv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
    group = nh // nkv
    q = lin(p + "attn_q.weight", h)
    k = lin(p + "attn_k.weight", h)
    v = lin(p + "attn_v.weight", h)
    if cfg["qkv_bias"]:
        q = q + W[p + "attn_q.bias"]
        k = k + W[p + "attn_k.bias"]
        v = v + W[p + "attn_v.bias"]
    q, k = q.reshape(T, nh, hd), k.reshape(T, nkv, hd)
    if cfg.get("qk_norm"):
        q = rms_norm(q, W[p + "attn_q_norm.weight"], cfg["rms_eps"])
        k = rms_norm(k, W[p + "attn_k_norm.weight"], cfg["rms_eps"])
    base = cfg["rope_base"] if rope_base is None else rope_base
    factors = W.get("rope_freqs.weight")
    q = rope(q, pos, base, cfg["rope_neox"], factors)
    k = rope(k, pos, base, cfg["rope_neox"], factors)
    v = v.reshape(T, nkv, hd)
    heads = []
    for hq in range(nh):
        hk = hq // group
        scores = q[:, hq, :] @ k[:, hk, :].T / math.sqrt(hd) + mask        # (T, T)
        scores = scores - scores.max(axis=1, keepdims=True)
        prob = np.exp(scores)
        prob /= prob.sum(axis=1, keepdims=True)
        heads.append(prob @ v[:, hk, :])
    attn = np.concatenate(heads, axis=1)                                     # (T, nh*hd)
    return lin(p + "attn_output.weight", attn)


def ssm_mixer(cfg: dict, W: dict[str, np.ndarray], p: str, h: np.ndarray, lin) -> np.ndarray:
    """The SSM mixer of docs/HYBRID.md for normalized inputs h (T, d), by its recurrence."""
    T = h.shape[0]
    nh, nkv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
    n, k = cfg["ssm_d_state"], cfg["ssm_d_conv"]
    group = nh // nkv
    xbc = np.concatenate([lin(p + "ssm_c.weight", h), lin(p + "ssm_b.weight", h),
                          lin(p + "ssm_x.weight", h)], axis=1)              # (T, channels)
    conv_w = W[p + "ssm_conv1d.weight"]                                    # (channels, k)
    padded = np.concatenate([np.zeros((k - 1, xbc.shape[1])), xbc], axis=0)
    conv = sum(conv_w[:, j] * padded[j:j + T] for j in range(k))           # causal, depthwise
    act = conv / (1.0 + np.exp(-conv))                                     # SiLU
    c = act[:, : nh * n].reshape(T, nh, n)
    b = act[:, nh * n: (nh + nkv) * n].reshape(T, nkv, n)
    u = act[:, (nh + nkv) * n:].reshape(T, nkv, hd)
    dt = np.logaddexp(0.0, lin(p + "ssm_dt.weight", h) + W[p + "ssm_dt.bias"])   # softplus (T, nkv)
    decay = np.exp(-dt * np.exp(W[p + "ssm_a_log"]))                        # (T, nkv)
    gate = 2.0 / (1.0 + np.exp(-lin(p + "ssm_gate.weight", h)))            # (T, nkv)
    state = np.zeros((nkv, n, hd))
    y = np.zeros((T, nh, hd))
    for t in range(T):
        for j in range(nkv):
            state[j] = decay[t, j] * state[j] + dt[t, j] * np.outer(b[t, j], u[t, j])
        for i in range(nh):
            j = i // group
            y[t, i] = (c[t, i] @ state[j] / math.sqrt(n) + W[p + "ssm_d"][i] * u[t, j]) * gate[t, j]
    return lin(p + "ssm_out.weight", y.reshape(T, nh * hd))


class ActQuant:
    """ggml's CPU matmul for a quantized weight first quantizes the activation row to the weight type's
    "vec_dot_type", then takes integer dot products:  Q8_0, Q4_0 -> Q8_0 (blocks of 32, d = amax/127 stored as f16);  Q4_1 -> Q8_1 (Q8_0 plus
    s = d*sum(q) stored as f16, which multiplies the weight block's min);  Q4_K, Q6_K -> Q8_K
    (blocks of 256, d = -max/127 kept in f32). (F16 weights -> activations rounded to f16 is
    implemented too, but llama.cpp's F16 path differs from it by ~3e-3, so no F16 file uses it.)

    This reproduces llama.cpp's CPU logits to ~1e-6 at most positions. But activation quantization
    is discontinuous: a 1e-7 relative change in an activation can flip one rounding and move later
    logits by up to ~0.1. So compare with it per position and expect a few positions to be off."""

    def __init__(self, tensors: dict[str, tuple[np.ndarray, QT]]) -> None:
        self.tensors = tensors

    @staticmethod
    def _q8_blocks(x: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
        b = x.astype(np.float32).reshape(-1, bs)
        amax = np.abs(b).max(axis=1)
        with np.errstate(divide="ignore"):
            iscale = np.where(amax > 0, np.float32(127.0) / amax, 0).astype(np.float32)
        q = np.rint(b * iscale[:, None])
        d = (amax / np.float32(127.0)).astype(np.float32)
        return q, d

    def matmul(self, name: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        raw, qtype = self.tensors[name]
        T, n_in = x.shape
        if qtype == QT.F32:
            return x @ w.T
        if qtype == QT.F16:
            return x.astype(np.float16).astype(np.float64) @ w.T
        if qtype in (QT.Q8_0, QT.Q4_0):
            q, d = self._q8_blocks(x, 32)
            xq = q * d.astype(np.float16).astype(np.float64)[:, None]
            return xq.reshape(T, n_in) @ w.T
        if qtype == QT.Q4_1:
            q, d = self._q8_blocks(x, 32)
            d16 = d.astype(np.float16).astype(np.float64)
            s16 = (d * q.sum(axis=1).astype(np.float32)).astype(np.float16).astype(np.float64)
            xq = q * d16[:, None]
            # weight block = d_w*qw + m_w; ggml uses m_w * s (f16) instead of m_w * sum(xq)
            m_w = raw.reshape(-1, 20)[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(w.shape[0], -1)
            corr = (s16 - xq.sum(axis=1)).reshape(T, -1)                 # (T, n_blocks)
            return xq.reshape(T, n_in) @ w.T + corr @ m_w.T
        if qtype in (QT.Q4_K, QT.Q6_K):
            b = x.astype(np.float32).reshape(-1, QK_K)
            idx = np.abs(b).argmax(axis=1)
            vmax = b[np.arange(b.shape[0]), idx]
            with np.errstate(divide="ignore"):
                iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, 0).astype(np.float32)
            q = np.minimum(np.rint(b * iscale[:, None]), 127)
            with np.errstate(divide="ignore"):
                d = np.where(iscale != 0, np.float32(1.0) / iscale, 0).astype(np.float32)
            return (q * d.astype(np.float64)[:, None]).reshape(T, n_in) @ w.T
        raise NotImplementedError(qtype.name)


def greedy(cfg: dict, W: dict, prompt: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """Greedy decoding with a full recompute each step; also returns, per step, the gap between the
    best and the second-best logit (how robust the argmax is to small numeric differences)."""
    seq, margins = list(prompt), []
    for _ in range(n_new):
        last = forward(cfg, W, seq)[-1]
        top2 = np.sort(last)[-2:]
        margins.append(float(f"{top2[1] - top2[0]:.4g}"))
        seq.append(int(np.argmax(last)))
    return seq[len(prompt):], margins


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def sig7(a: np.ndarray) -> list:
    return [[float(f"{v:.7g}") for v in row] for row in a]


def model_specs():
    """(file stem, cfg, seed, qtype_of(name) for 2-D tensors, llama file type)."""
    llama_q = lambda qt: (lambda name: qt)
    specs = [
        ("tiny-llama-f32", LLAMA, 1234, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-llama-f16", LLAMA, 1234, llama_q(QT.F16), gguf.LlamaFileType.MOSTLY_F16),
        ("tiny-llama-q8_0", LLAMA, 1234, llama_q(QT.Q8_0), gguf.LlamaFileType.MOSTLY_Q8_0),
        ("tiny-llama-q4_0", LLAMA, 1234, llama_q(QT.Q4_0), gguf.LlamaFileType.MOSTLY_Q4_0),
        ("tiny-llama-q4_1", LLAMA, 1234, llama_q(QT.Q4_1), gguf.LlamaFileType.MOSTLY_Q4_1),
        ("tiny-qwen2-f32", QWEN2, 5678, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-llama256-q4_k_m", LLAMA256, 4321,
         lambda name: QT.Q6_K if name == "output.weight" or name.endswith(("attn_v.weight", "ffn_down.weight"))
         else QT.Q4_K,
         gguf.LlamaFileType.MOSTLY_Q4_K_M),
        ("tiny-hybrid-f32", HYBRID, 2468, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-window-f32", WINDOWED, 1357, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-llama3-f32", LLAMA3, 7531, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-qwen3-f32", QWEN3, 8642, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
        ("tiny-gemma3-f32", GEMMA3, 9753, llama_q(QT.F32), gguf.LlamaFileType.ALL_F32),
    ]
    return specs


def generate(out_dir: str, only: set[str] | None = None, verbose: bool = True) -> dict[str, dict]:
    tok = Tokenizer()
    text12, ids12 = tok.prompt_of_length(PROMPTS_12, 12)
    text40, ids40 = tok.prompt_of_length(PROMPTS_40, 40)
    results = {}
    weights_cache: dict[tuple, dict] = {}
    for stem, cfg, seed, qtype_of, ftype in model_specs():
        if only and stem not in only:
            continue
        key = (cfg["name"], seed)
        if key not in weights_cache:
            weights_cache[key] = make_weights(cfg, seed)
        tensors, ref_w = build_tensors(weights_cache[key], qtype_of)
        gguf_path = os.path.join(out_dir, stem + ".gguf")
        write_gguf(gguf_path, cfg, tensors, tok, ftype)

        logits12 = forward(cfg, ref_w, ids12)
        cont, margins = greedy(cfg, ref_w, ids12, 8)
        ref = {
            "model": stem + ".gguf",
            "arch": cfg["arch"],
            "hparams": {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff",
                                            "n_vocab", "n_ctx", "rms_eps", "rope_base", "rope_neox",
                                            "qkv_bias", "tied_embeddings")}
                       | {k: cfg[k] for k in ("layer_types", "ssm_d_state", "ssm_d_conv", "window", "sink",
                                              "layer_types_native", "rope_base_local")
                          if k in cfg},
            "tensor_types": {n: t.name for n, (_, t) in tensors.items()},
            "note": "logits from a float64 numpy forward pass over the (de)quantized weights of this file",
            "prompt": text12,
            "tokens": ids12,
            "logits": sig7(logits12),
            "greedy_continuation": cont,
            "greedy_text": tok.decode(cont),
            "greedy_margins": margins,
        }
        if ftype not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16):
            ref["logits_ggml_act_quant"] = sig7(forward(cfg, ref_w, ids12, ActQuant(tensors)))
            ref["note_ggml_act_quant"] = ("same forward pass, but activations entering each weight product "
                                          "are quantized like ggml's CPU backend (see ActQuant in "
                                          "scripts/make-tiny-models.py); rounding flips make a few "
                                          "positions differ by up to ~0.1, the rest agree to ~1e-6")
        if stem in ("tiny-llama-f32", "tiny-hybrid-f32", "tiny-window-f32", "tiny-gemma3-f32",
                    "tiny-llama3-f32"):
            ref["long"] = {"prompt": text40, "tokens": ids40, "logits": sig7(forward(cfg, ref_w, ids40))}
        with open(os.path.join(out_dir, stem + ".json"), "w") as f:
            json.dump(ref, f, separators=(",", ":"))
            f.write("\n")
        results[stem] = dict(cfg=cfg, ref=ref, ref_w=ref_w, path=gguf_path)
        if verbose:
            std_pos = logits12.std(axis=1)
            print(f"{stem:24s} {os.path.getsize(gguf_path):8d} B  logits std {logits12.std():.3f} "
                  f"(per position {std_pos.min():.2f}..{std_pos.max():.2f})  "
                  f"greedy {cont} {tok.decode(cont)!r} min margin {min(margins):.3g}")
    return results


def check_llamacpp(out_dir: str, llamacpp_venv: str) -> int:
    """Evaluate the fixtures with llama.cpp (llama-cpp-python) and compare with the numpy reference."""
    try:
        import llama_cpp
    except ImportError:
        # run from .venv-tools: borrow llama-cpp-python from its own venv (appended, so our numpy/gguf win)
        import glob
        found = glob.glob(os.path.join(llamacpp_venv, "lib", "python3*", "site-packages"))
        if not found:
            sys.exit(f"llama_cpp is not importable and {llamacpp_venv} has no site-packages")
        sys.path.extend(found)
        import llama_cpp

    tok = Tokenizer()
    status = 0
    for stem, cfg, seed, qtype_of, ftype in model_specs():
        if "layer_types" in cfg:
            print(f"{stem:24s} skipped: llama.cpp does not run EdgeFusion hybrids")
            continue
        path = os.path.join(out_dir, stem + ".gguf")
        with open(os.path.join(out_dir, stem + ".json")) as f:
            ref = json.load(f)
        kwargs = dict(model_path=path, logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64,
                      n_threads=2, n_threads_batch=2, verbose=False, seed=0)
        # F32 KV cache: llama.cpp's default F16 cache would add ~1e-3 relative error
        kwargs.update(type_k=int(llama_cpp.GGML_TYPE_F32), type_v=int(llama_cpp.GGML_TYPE_F32))
        try:
            llm = llama_cpp.Llama(**kwargs, flash_attn=False)
        except TypeError:
            llm = llama_cpp.Llama(**kwargs)
        cases = [("prompt12", ref["prompt"], ref["tokens"], ref["logits"])]
        if "long" in ref:
            cases.append(("long40", ref["long"]["prompt"], ref["long"]["tokens"], ref["long"]["logits"]))
        exact = ftype in (gguf.LlamaFileType.ALL_F32,)
        for case, text, ids, logits in cases:
            lc_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            tok_ok = list(lc_ids) == list(ids) and tok.encode(text) == list(ids)
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float64)
            want = np.array(logits, dtype=np.float64)
            diff = np.abs(got - want)
            max_abs = diff.max()
            rel = max_abs / np.abs(want).max()
            argmax_ok = bool((got.argmax(axis=1) == want.argmax(axis=1)).all())
            extra = ""
            if exact:
                ok = rel < 1e-4
            elif "logits_ggml_act_quant" not in ref:    # F16: llama.cpp rounds activations to f16
                ok = rel < 2e-3
            else:
                # llama.cpp quantizes activations: compare tightly with the reference that does the same
                want_aq = np.array(ref["logits_ggml_act_quant"], dtype=np.float64)
                per_pos = np.abs(got - want_aq).max(axis=1)
                close = int((per_pos < 1e-4).sum())
                ok = close >= 0.75 * len(ids) and rel < 0.05
                extra = (f"  | vs act-quant reference: max|diff| {per_pos.max():.3e}, "
                         f"{close}/{len(ids)} positions within 1e-4 (median {np.median(per_pos):.1e})")
            ok = ok and tok_ok
            status |= 0 if ok else 1
            print(f"{stem:24s} {case:9s} max|diff| {max_abs:.3e}  rel-to-max {rel:.3e}  "
                  f"argmax-equal {argmax_ok}  tokenizer-equal {tok_ok}{extra}  {'OK' if ok else 'MISMATCH'}")
        # greedy continuation through llama.cpp (full recompute each step, like the reference)
        seq = list(ref["tokens"])
        for _ in range(len(ref["greedy_continuation"])):
            llm.reset()
            llm.eval(seq)
            seq.append(int(np.argmax(llm.scores[len(seq) - 1])))
        same = seq[len(ref["tokens"]):] == ref["greedy_continuation"]
        print(f"{stem:24s} greedy    llama.cpp {seq[len(ref['tokens']):]}  numpy {ref['greedy_continuation']}  "
              f"{'equal' if same else 'DIFFERENT'}")
        if exact and not same:
            status |= 1
        del llm
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=FIXTURES, help="output folder (default tests/fixtures)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare byte-for-byte with --out")
    ap.add_argument("--check-llamacpp", action="store_true",
                    help="compare the reference logits in --out with llama.cpp (needs llama_cpp importable)")
    ap.add_argument("--llamacpp-venv", default=os.path.join(REPO, ".venv-llamacpp"),
                    help="venv holding llama-cpp-python, used when llama_cpp is not importable directly")
    args = ap.parse_args()

    if args.check_llamacpp:
        return check_llamacpp(args.out, args.llamacpp_venv)
    if args.check:
        import filecmp
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp, verbose=False)
            bad = [n for n in sorted(os.listdir(tmp))
                   if not os.path.exists(os.path.join(args.out, n))
                   or not filecmp.cmp(os.path.join(tmp, n), os.path.join(args.out, n), shallow=False)]
        print("fixtures up to date" if not bad else f"fixtures differ: {bad}")
        return 1 if bad else 0
    os.makedirs(args.out, exist_ok=True)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
