#!/usr/bin/env python3
"""Writes tests/fixtures/quant/: a small GGUF holding random blocks of every ggml type rlx reads,
and the values the `gguf` package's reference dequantizer gives for them.

    python3 tests/gen_quant_fixture.py      # needs numpy, gguf, safetensors

Random bytes make every bit pattern of the quantized values appear; the half-precision scales
are drawn as small finite floats so that the reference values are finite.
"""

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent / "fixtures" / "quant"
ROWS = 3
ROW = 512  # values per row: two K-quant super-blocks, sixteen 32-blocks
TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the f16 scales inside each block type, to keep them finite.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def random_blocks(rng, qtype: T) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * ROW // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype.name, []):
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(ROWS, -1)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(OUT / "quants.gguf", "llama")
    reference = {}
    for name in TYPES:
        qtype = T[name]
        if name == "F32":
            data = rng.standard_normal((ROWS, ROW)).astype(np.float32)
            writer.add_tensor(name, data)
            reference[name] = data
            continue
        if name == "F16":
            data = rng.standard_normal((ROWS, ROW)).astype(np.float16)
            writer.add_tensor(name, data)
            reference[name] = data.astype(np.float32)
            continue
        raw = random_blocks(rng, qtype) if name != "BF16" else (
            rng.standard_normal((ROWS, ROW)).astype(np.float32).view(np.uint32) >> 16
        ).astype(np.uint16).view(np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        reference[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, ROW)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: np.ascontiguousarray(v) for k, v in reference.items()}, OUT / "reference.safetensors")


if __name__ == "__main__":
    main()
