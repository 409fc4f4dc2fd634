"""The torch backend: CPU or CUDA, our compact decoder on packed int4 weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edge_infer.backends.base import check_batch
from edge_infer.backends.torch.decoder import TorchDecoder
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.errors import BackendUnavailableError
from edge_infer.models.spec import LoadedModel


class TorchBackend:
    """Backend protocol over :class:`TorchDecoder`."""

    name = "torch"

    def __init__(
        self,
        model: LoadedModel,
        device: str | None = None,
        kv_bits: int = 4,
        kv_group_size: int = 64,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' requested but torch sees no CUDA device")
        self.torch_device = torch.device(device)
        self.device = self.torch_device.type
        self.config = model.config
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.decoder = TorchDecoder(model, self.torch_device)

    def new_cache(self) -> TorchKVCache:
        return self.decoder.new_cache(self.kv_bits, self.kv_group_size)

    def forward(
        self, inputs: np.ndarray, cache: TorchKVCache, *, all_logits: bool = False
    ) -> np.ndarray:
        inputs = np.asarray(inputs)
        if inputs.dtype.kind in "iu":
            h = self.decoder.embed(inputs.reshape(-1))
        else:
            h = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(
                self.torch_device
            )
        outs, pos = [], 0
        while pos < h.shape[0]:  # one call per KV block touched
            n = min(h.shape[0] - pos, cache.max_tokens_in_one_call())
            last = pos + n >= h.shape[0]
            if all_logits or last:
                outs.append(self.decoder.forward(h[pos : pos + n], cache, all_logits))
            else:
                self.decoder.extend(h[pos : pos + n], cache)
            pos += n
        logits = torch.cat(outs) if len(outs) > 1 else outs[0]
        return logits.cpu().numpy()

    def forward_batch(self, tokens: Sequence[int], caches: Sequence[TorchKVCache]) -> np.ndarray:
        """Logits [B, vocab] after feeding ``tokens[b]`` to ``caches[b]`` (one step each)."""
        check_batch(tokens, caches)
        h = self.decoder.embed(np.asarray(tokens, dtype=np.int64))
        return self.decoder.forward_batch(h, list(caches)).cpu().numpy()
