"""GGUF model files: the container reader, ggml quant types, and the loader."""
