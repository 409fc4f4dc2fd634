"""Byte layouts shared by model loading and the cache store (affine 4-bit, safetensors)."""
