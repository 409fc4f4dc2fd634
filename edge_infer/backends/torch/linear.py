"""Linear layers over our quantized weights: float32 rows in, float32 rows out.

On CPU, 4- and 8-bit weights are repacked for our own kernel (:mod:`edge_infer.kernels.cpu`:
activations rounded to int8 in one or two passes times the packed weights, read once per
call), which also fuses the step before the product (RMSNorm, or the gated MLP's SiLU /
GELU-tanh) and the residual add after it. Without the kernel (and on CUDA), 4-bit weights
run on torch's int4 "tinygemm" kernels (``_weight_int4pack_mm_for_cpu`` /
``_weight_int4pack_mm``) in bfloat16, 8-bit ones on ``_weight_int8pack_mm``, anything else on
a dense bfloat16 matrix; the fused steps are then plain torch ops.

Every layer is called as ``layer(x, prep=..., norm=..., eps=..., out=...)``: ``x`` float32
[N, in] (``[N, 2*in]`` for the gated ``SWIGLU`` and ``GEGLU``), the result ``prep(x) @ W.T``
float32 [N, out], added into ``out`` in place when it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edge_infer.formats.affine import QuantizedWeight, pack
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.kernels.cpu.packing import pack_weight, packable
from edge_infer.models.spec import Weight

COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)
PLAIN, RMS_NORM = cpu_kernels.PREP_PLAIN, cpu_kernels.PREP_RMS_NORM
SWIGLU, GEGLU = cpu_kernels.PREP_SWIGLU, cpu_kernels.PREP_GEGLU


def prepare(x: torch.Tensor, prep: int, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The fused step before a product, in plain torch."""
    if prep == RMS_NORM:
        return F.rms_norm(x, (x.shape[-1],), norm, eps)
    if prep in (SWIGLU, GEGLU):
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate) if prep == SWIGLU else F.gelu(gate, approximate="tanh")
        return act * up
    return x


class _TorchLinear:
    """The call convention over a product ``_product(x)`` that takes bfloat16 rows."""

    def __call__(
        self,
        x: torch.Tensor,
        prep: int = PLAIN,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self._product(prepare(x, prep, norm, eps).to(COMPUTE_DTYPE)).float()
        if out is None:
            return y
        return out.add_(y)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PackedLinear:
    """4/8-bit affine weights in our CPU kernel's tiles. ``passes``: the activations are
    rounded to int8 once per block of 32 (1) or, with the remainder rounded again, to about
    16 bits (2, twice the integer work on the same weight bytes)."""

    def __init__(
        self,
        kernel,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        biases: torch.Tensor,
        rows: int,
        bits: int,
        group_size: int,
        passes: int = 2,
    ) -> None:
        self.kernel = kernel
        self.qweight, self.scales, self.biases = qweight, scales, biases
        self.out_features = rows
        self.bits, self.group_size = bits, group_size
        self.passes = passes

    @classmethod
    def pack(cls, weight: QuantizedWeight, kernel, passes: int = 2) -> PackedLinear:
        """``weight`` repacked into the kernel's tiles."""
        p = pack_weight(weight)
        tensors = (torch.from_numpy(a) for a in (p.qweight, p.scales, p.biases))
        return cls(kernel, *tensors, p.rows, p.bits, p.group_size, passes)

    def __call__(
        self,
        x: torch.Tensor,
        prep: int = PLAIN,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.kernel.quant_linear(
            x.contiguous(),
            self.qweight,
            self.scales,
            self.biases,
            self.out_features,
            self.bits,
            self.group_size,
            prep,
            norm,
            eps,
            out,
            self.passes,
        )

    def rescore_top(self, logits: torch.Tensor, h: torch.Tensor, k: int) -> None:
        """Replace the k largest logits of each row by exact float32 products with ``h``."""
        self.kernel.rescore_top(
            logits,
            h.contiguous(),
            self.qweight,
            self.scales,
            self.biases,
            self.out_features,
            self.bits,
            self.group_size,
            k,
        )

    def coarse_copy(self) -> PackedLinear:
        """A 4-bit copy of these weights (groups of 32, the same tiles) for a first pass whose
        best candidates are then rescored from these rows (:meth:`rescore_top`)."""
        parts = self.kernel.requantize4(
            self.qweight, self.scales, self.biases, self.out_features, self.bits, self.group_size
        )
        return PackedLinear(self.kernel, *parts, self.out_features, 4, 32, passes=1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64) of the weight, dequantized: float32 [n, in] (embeddings)."""
        return self.kernel.weight_rows(
            ids,
            self.qweight,
            self.scales,
            self.biases,
            self.out_features,
            self.bits,
            self.group_size,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.biases))


class DenseLinear(_TorchLinear):
    """y = x @ W.T with W held densely (bfloat16)."""

    def __init__(self, weight: np.ndarray, device: torch.device) -> None:
        w = np.ascontiguousarray(weight, dtype=np.float32)
        if not w.flags.writeable:  # a file mapping: torch refuses to wrap it without a copy
            w = w.copy()
        self.weight = torch.from_numpy(w).to(device=device, dtype=COMPUTE_DTYPE)
        self.out_features = self.weight.shape[0]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int4Linear(_TorchLinear):
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

    def _product(self, x: torch.Tensor) -> torch.Tensor:
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


class Int8Linear(_TorchLinear):
    """8-bit weights re-expressed per output channel (symmetric) for ``_weight_int8pack_mm``."""

    def __init__(self, weight: np.ndarray, device: torch.device) -> None:
        w = np.asarray(weight, dtype=np.float32)
        scale = np.abs(w).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        self.weight = torch.from_numpy(q).to(device)
        self.scales = torch.from_numpy(scale).to(device=device, dtype=COMPUTE_DTYPE)
        self.out_features = q.shape[0]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 2


def concat_weights(weights: Sequence[Weight]) -> Weight:
    """Stack several weights along the output dimension (to fuse q/k/v or gate/up)."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, QuantizedWeight) for w in weights):
        group = weights[0].group_size
        if all(w.group_size == group for w in weights):
            # 4 and 8 bits together (a Q4_K_M file's 4-bit q/k beside its 8-bit v) take 8:
            # the 4-bit codes are the same values at that width, scales and biases kept
            bits = max(w.bits for w in weights)
            return QuantizedWeight(
                packed=np.concatenate([_widened(w, bits).packed for w in weights]),
                scales=np.concatenate([w.scales for w in weights]),
                biases=np.concatenate([w.biases for w in weights]),
                bits=bits,
                group_size=group,
            )
    return np.concatenate([_dense(w) for w in weights])


def _widened(w: QuantizedWeight, bits: int) -> QuantizedWeight:
    """``w`` with its codes held in ``bits`` bits (the same values)."""
    if w.bits == bits:
        return w
    return QuantizedWeight(
        packed=pack(w.unpack(), bits),
        scales=w.scales,
        biases=w.biases,
        bits=bits,
        group_size=w.group_size,
    )


def _dense(w: Weight) -> np.ndarray:
    return w if isinstance(w, np.ndarray) else w.dequantize()


Linear = PackedLinear | DenseLinear | Int4Linear | Int8Linear


def make_linear(weight: Weight, device: torch.device, passes: int = 2) -> Linear:
    """The fastest layer our kernels support for this weight on ``device``; ``passes``: the
    activations' int8 passes where our CPU kernel runs it (see :class:`PackedLinear`)."""
    if isinstance(weight, QuantizedWeight) and device.type == "cpu" and packable(weight):
        kernel = cpu_kernels.load()
        if kernel is not None:
            return PackedLinear.pack(weight, kernel, passes)
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
