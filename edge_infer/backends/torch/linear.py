"""Linear layers over our quantized weights, using torch's packed int4/int8 matmul kernels.

4-bit weights run on the int4 "tinygemm" kernels (``_weight_int4pack_mm_for_cpu`` on CPU,
``_weight_int4pack_mm`` on CUDA) with bfloat16 activations, the dtype those kernels are fast
in. 8-bit weights run on ``_weight_int8pack_mm`` with per-output-channel scales. Anything the
kernels cannot take falls back to a dense bfloat16 matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.spec import Weight

COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)


class DenseLinear:
    """y = x @ W.T with W held densely (bfloat16)."""

    def __init__(self, weight: np.ndarray, device: torch.device) -> None:
        self.weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(
            device=device, dtype=COMPUTE_DTYPE
        )
        self.out_features = self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int4Linear:
    """4-bit affine weights packed for torch's int4 kernels (value = (q - 8) * scale + zero)."""

    def __init__(self, weight: QuantizedWeight, device: torch.device) -> None:
        rows, cols = weight.shape
        q = torch.from_numpy(weight.unpack().astype(np.int32))
        scales = weight.scales.astype(np.float32)
        zeros = weight.biases.astype(np.float32) + 8.0 * scales
        sz = np.stack([scales, zeros], axis=-1).transpose(1, 0, 2)  # [groups, rows, 2]
        self.scales_and_zeros = torch.from_numpy(np.ascontiguousarray(sz)).to(
            device=device, dtype=COMPUTE_DTYPE
        )
        self.group_size = weight.group_size
        self.out_features = rows
        self.cuda = device.type == "cuda"
        if self.cuda:
            q = q.to(torch.uint8)
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(device)
            inner_k_tiles = next(t for t in (8, 4, 2) if cols % (t * 16) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            return torch.ops.aten._weight_int4pack_mm(
                x, self.packed, self.group_size, self.scales_and_zeros
            )
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + (
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        )


class Int8Linear:
    """8-bit weights re-expressed per output channel (symmetric) for ``_weight_int8pack_mm``."""

    def __init__(self, weight: np.ndarray, device: torch.device) -> None:
        w = np.asarray(weight, dtype=np.float32)
        scale = np.abs(w).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        self.weight = torch.from_numpy(q).to(device)
        self.scales = torch.from_numpy(scale).to(device=device, dtype=COMPUTE_DTYPE)
        self.out_features = q.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 2


def concat_weights(weights: Sequence[Weight]) -> Weight:
    """Stack several weights along the output dimension (to fuse q/k/v or gate/up)."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, QuantizedWeight) for w in weights):
        first = weights[0]
        if all(w.bits == first.bits and w.group_size == first.group_size for w in weights):
            return QuantizedWeight(
                packed=np.concatenate([w.packed for w in weights]),
                scales=np.concatenate([w.scales for w in weights]),
                biases=np.concatenate([w.biases for w in weights]),
                bits=first.bits,
                group_size=first.group_size,
            )
    return np.concatenate([_dense(w) for w in weights])


def _dense(w: Weight) -> np.ndarray:
    return w if isinstance(w, np.ndarray) else w.dequantize()


def make_linear(weight: Weight, device: torch.device) -> DenseLinear | Int4Linear | Int8Linear:
    """The fastest layer our kernels support for this weight on ``device``."""
    if isinstance(weight, QuantizedWeight):
        rows, cols = weight.shape
        if weight.bits == 4 and weight.group_size in INT4_GROUP_SIZES:
            if device.type != "cuda" or (rows % 8 == 0 and cols % 32 == 0):
                try:
                    return Int4Linear(weight, device)
                except RuntimeError:
                    pass  # shape the kernel rejects: use the dense fallback
        if weight.bits == 8 and device.type == "cpu":
            return Int8Linear(weight.dequantize(), device)
    return DenseLinear(_dense(weight), device)
