#!/usr/bin/env python3
"""Find the first operation where EdgeFusion and llama.cpp part, on one prompt.

Runs llama.cpp (llama-cpp-python, 2 threads, no flash attention, f16 KV cache) with an
eval callback that saves every f32 tensor it computes, and EdgeFusion's
`dump_activations` example, which saves every linear layer's input; then compares, layer by
layer, the tensors both name (attn_norm, kqv_out, ffn_norm, the FFN's down input, result_norm,
logits) and reports how many values differ and where the first one is. On an AVX2 machine
SmolLM2 Q4_1 agrees to the bit everywhere.

    .venv-llamacpp/bin/python scripts/compare-activations-llamacpp.py \\
        [--model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--prompt "Once upon a time,"] [--all]

--all keeps going past the first tensor that differs.
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np
import llama_cpp
from llama_cpp import Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (the fields up to `name`)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64)]


def llama_tensors(model, text):
    """Every contiguous f32 tensor llama.cpp computes for `text`, by name (first of each)."""
    saved = {}

    def callback(t, ask, _user):
        if ask:
            return True
        tensor = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
        name = tensor.name.decode()
        ne, nb = list(tensor.ne), list(tensor.nb)
        if tensor.type != 0 or nb[0] != 4 or nb[1] != 4 * ne[0] or name in saved:
            return True
        n = ne[0] * ne[1] * ne[2] * ne[3]
        data = (ctypes.c_char * (4 * n)).from_address(tensor.data)
        saved[name] = np.frombuffer(bytes(data), dtype=np.float32).reshape(-1, ne[0])
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    default_params = llama_cpp.llama_context_default_params

    def with_callback():
        params = default_params()
        params.cb_eval = cb
        return params

    llama_cpp.llama_context_default_params = with_callback
    llama_cpp.llama.llama_cpp.llama_context_default_params = with_callback
    llm = Llama(model_path=model, n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.eval(ids)
    saved["logits"] = np.array(llm.scores[len(ids) - 1], dtype=np.float32).reshape(1, -1)
    return ids, saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(
        REPO, "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prompt", default="Zürich, München und Köln sind Städte, die")
    ap.add_argument("--all", action="store_true", help="compare every layer, not up to the first difference")
    args = ap.parse_args()

    ids, ref = llama_tensors(args.model, args.prompt)
    out = tempfile.mkdtemp(prefix="edgefusion-activations-")
    subprocess.run(["cargo", "run", "--release", "-q", "-p", "edgefusion-runtime", "--example",
                    "dump_activations", "--", args.model, out, ",".join(map(str, ids))],
                   cwd=REPO, check=True)
    ffn_down = "ffn_geglu" if any(k.startswith("ffn_geglu") for k in ref) else "ffn_swiglu"
    layers = sorted({int(k.split("-")[1]) for k in ref if k.startswith("attn_norm-")})
    names = [f"{n}-{l}" for l in layers for n in ("attn_norm", "kqv_out", "ffn_norm", ffn_down)]
    names += ["result_norm", "logits"]
    for name in names:
        ours_name = name.replace("ffn_geglu", "ffn_swiglu")
        path = os.path.join(out, ours_name + ".f32")
        if name not in ref or not os.path.exists(path):
            print(f"{name:16s} (not in both)")
            continue
        want = ref[name]
        got = np.fromfile(path, dtype=np.float32).reshape(-1, want.shape[1])[-want.shape[0]:]
        differ = np.argwhere(got != want)
        line = f"{name:16s} max|diff| {np.abs(got - want).max():.3g}, {len(differ)} of {want.size} differ"
        if len(differ):
            line += f", first at (token, index) {tuple(differ[0])}"
        print(line)
        if len(differ) and not args.all:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
