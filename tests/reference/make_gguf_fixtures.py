#!/usr/bin/env python3
"""Regenerates tests/fixtures/gguf/quant_blocks.gguf: blocks of every GGML type switchyard
dequantizes, and their dequantization by the `gguf` package (gguf.quants), written by the
package's own GGUFWriter.

Run from the repository root (any Python 3.10+):

    python3 -m venv .cache/gguf-venv && .cache/gguf-venv/bin/pip install gguf numpy
    .cache/gguf-venv/bin/python tests/reference/make_gguf_fixtures.py

Everything is seeded: a second run rewrites the same bytes. The C++ tests (tests/runtime/formats/
test_gguf.cc, tests/kernels/test_quant.cc) only read the file.

For each type T of F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K the file holds:
  T.raw   [4, 256] of type T: 1024 elements as the type stores them
  T.want  [4, 256] F32: gguf.quants.dequantize of T.raw
Q8_0 and Q4_0 blocks are quantized from seeded normal values (row 0 all zero, row 3 scaled by
1e4); Q4_K and Q6_K blocks are seeded random bytes whose f16 scales are set to finite values of
either sign. Metadata of every value type (scalars and arrays) is written too, for the reader's
tests.
"""

import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "quant_blocks.gguf")
ROWS, COLS = 4, 256


def values(rng):
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    x[0] = 0
    x[3] *= 1e4
    return x


def random_k_blocks(rng, qtype):
    """Random bytes of ROWS x (COLS / 256) K-quant blocks, with finite f16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal(n_blocks * 2) * 0.05).astype(np.float16).view(np.uint8)
    scales = scales.reshape(n_blocks, 2, 2)
    if qtype == T.Q4_K:  # d at bytes 0-1, dmin at 2-3
        raw[:, 0:2] = scales[:, 0]
        raw[:, 2:4] = scales[:, 1]
    else:  # Q6_K: d in the last two bytes
        raw[:, -2:] = scales[:, 0]
    return raw.reshape(ROWS, -1)


def main():
    rng = np.random.default_rng(20261207)
    w = gguf.GGUFWriter(OUT, arch="llama")
    w.add_uint32("test.u32", 7)
    w.add_int32("test.i32", -3)
    w.add_float32("test.f32", 0.5)
    w.add_uint64("test.u64", 1 << 40)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "blocks")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.floats", [0.25, -1.5])
    w.add_array("test.ints", [1, -2, 3])
    for qtype in (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K):
        if qtype in (T.Q4_K, T.Q6_K):
            raw = random_k_blocks(rng, qtype)
        else:
            raw = quants.quantize(values(rng), qtype)
        want = quants.dequantize(raw, qtype).astype(np.float32)
        assert want.shape == (ROWS, COLS), want.shape
        assert np.isfinite(want).all()
        name = qtype.name
        if qtype == T.F16:
            w.add_tensor(name + ".raw", raw.view(np.float16))
        else:
            w.add_tensor(name + ".raw", raw.view(np.uint8), raw_shape=raw.shape, raw_dtype=qtype)
        w.add_tensor(name + ".want", want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", os.path.relpath(OUT, ROOT), os.path.getsize(OUT), "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
