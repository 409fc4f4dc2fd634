"""The offload benchmark's count of the block-file pages a selection of KV pages lies on."""

from __future__ import annotations

import mmap

import numpy as np

from benchmarks.offload import file_pages_touched
from edge_infer.cache_store.block_codec import block_from_bytes, block_to_bytes
from edge_infer.cache_store.blocks import KVBlock, buffer_root, compute_abstract
from edge_infer.cache_store.kv_format import KVFormat, LayerKV, QuantizedKV

N_KV, D, BS, PAGE, N_LAYERS = 2, 64, 256, 32, 3


def _mapped_blocks(tmp_path, n: int) -> list[KVBlock]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        layers = [
            LayerKV(*(QuantizedKV.quantize(rng.standard_normal((N_KV, BS, D), np.float32)),) * 2)
            for _ in range(N_LAYERS)
        ]
        block = KVBlock(i * BS, BS, layers, sealed=True, abstract=compute_abstract(layers))
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(block_to_bytes(block, KVFormat(4, 64, BS)))
        with open(path, "rb") as f:
            out.append(block_from_bytes(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)))
    return out


def test_file_pages_under_a_selection(tmp_path):
    blocks = _mapped_blocks(tmp_path, 2)
    pages = 2 * BS // PAGE
    everything = {1: np.ones((N_KV, pages), bool), 2: np.ones((N_KV, pages), bool)}
    touched, total = file_pages_touched(blocks, everything, PAGE)
    assert touched == total > 0
    nothing = {1: np.zeros((N_KV, pages), bool)}
    assert file_pages_touched(blocks, nothing, PAGE)[0] == 0
    # one page of one head: 32 rows of each of its six parts
    one = np.zeros((N_KV, pages), bool)
    one[1, 9] = True  # the second block's second page
    touched, _ = file_pages_touched(blocks, {1: one}, PAGE)
    kv = blocks[1].layers[1]
    parts = [p for q in (kv.keys, kv.values) for p in (q.packed, q.scales, q.biases)]
    start = np.frombuffer(buffer_root(kv.keys.packed), np.uint8).__array_interface__["data"][0]
    want = set()
    for p in parts:  # the head's rows of that page, by the arrays' own addresses
        rows = p[1, PAGE : 2 * PAGE]
        a = rows.__array_interface__["data"][0] - start
        want.update(range(a // 4096, (a + rows.nbytes - 1) // 4096 + 1))
    assert touched == len(want) > 0
