#!/usr/bin/env python3
"""Write tests/fixtures/kquants_dequant.json: random k-quant blocks and their floats.

Each k-quant type (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K) gets a few super-blocks of random
bytes whose f16 (Q8_K: f32) scale fields are overwritten with sane values, so every float
is finite. The expected floats come from gguf-py's `gguf.quants.dequantize`, an
implementation independent of ours; gguf-py has no Q8_K dequantizer, so Q8_K's floats are
computed here with numpy (`d * qs`).

Usage (from the repository root):
    python3 -m venv .venv-tools && .venv-tools/bin/pip install numpy gguf
    .venv-tools/bin/python scripts/make-kquant-fixture.py

The output is deterministic for a given numpy and gguf-py version; both are recorded in
the file. Floats are stored as little-endian f32 bit patterns in hex so the Rust test can
compare them exactly.
"""

import json
import pathlib
import sys
from importlib import metadata

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

QK_K = 256
SEED = 0x6B71_7561  # "kqua"
BLOCKS_PER_TYPE = 4

# name, type, bytes per block, byte offsets of the f16 scale fields.
K_TYPES = [
    ("Q2_K", GGMLQuantizationType.Q2_K, 84, [80, 82]),
    ("Q3_K", GGMLQuantizationType.Q3_K, 110, [108]),
    ("Q4_K", GGMLQuantizationType.Q4_K, 144, [0, 2]),
    ("Q5_K", GGMLQuantizationType.Q5_K, 176, [0, 2]),
    ("Q6_K", GGMLQuantizationType.Q6_K, 210, [208]),
]
Q8K_BYTES = 292


def sane_scale(rng: np.random.Generator) -> float:
    """A magnitude between 1e-4 and 1, negative a quarter of the time."""
    magnitude = 10.0 ** rng.uniform(-4.0, 0.0)
    return -magnitude if rng.random() < 0.25 else magnitude


def k_quant_case(rng, name, qtype, type_size, scale_offsets):
    blocks = rng.integers(0, 256, size=(BLOCKS_PER_TYPE, type_size), dtype=np.uint8)
    for block in blocks:
        for offset in scale_offsets:
            block[offset : offset + 2] = np.frombuffer(
                np.float16(sane_scale(rng)).tobytes(), dtype=np.uint8
            )
    expected = dequantize(blocks.reshape(-1), qtype).astype(np.float32).reshape(-1)
    return blocks, expected


def q8k_case(rng):
    blocks = np.zeros((BLOCKS_PER_TYPE, Q8K_BYTES), dtype=np.uint8)
    expected = []
    for block in blocks:
        d = np.float32(sane_scale(rng) * 0.05)
        qs = rng.integers(-127, 128, size=QK_K, dtype=np.int8)
        bsums = qs.astype(np.int16).reshape(16, 16).sum(axis=1).astype("<i2")
        block[0:4] = np.frombuffer(np.array([d], dtype="<f4").tobytes(), dtype=np.uint8)
        block[4 : 4 + QK_K] = qs.view(np.uint8)
        block[4 + QK_K :] = np.frombuffer(bsums.tobytes(), dtype=np.uint8)
        expected.append(d * qs.astype(np.float32))
    return blocks, np.concatenate(expected).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(SEED)
    cases = []
    for name, qtype, type_size, scale_offsets in K_TYPES:
        blocks, expected = k_quant_case(rng, name, qtype, type_size, scale_offsets)
        assert expected.shape == (BLOCKS_PER_TYPE * QK_K,)
        assert np.all(np.isfinite(expected)), name
        cases.append((name, blocks, expected))
    blocks, expected = q8k_case(rng)
    cases.append(("Q8_K", blocks, expected))

    document = {
        "generator": "scripts/make-kquant-fixture.py",
        "reference": "gguf-py gguf.quants.dequantize (Q8_K: numpy d * qs)",
        "gguf_version": metadata.version("gguf"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "cases": [
            {
                "type": name,
                "n_blocks": BLOCKS_PER_TYPE,
                "blocks_hex": blocks.tobytes().hex(),
                "expected_f32_le_hex": expected.astype("<f4").tobytes().hex(),
            }
            for name, blocks, expected in cases
        ],
    }
    root = pathlib.Path(__file__).resolve().parent.parent
    out = root / "tests" / "fixtures" / "kquants_dequant.json"
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
