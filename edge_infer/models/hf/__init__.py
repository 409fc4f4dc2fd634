"""Hugging Face / MLX model folders: safetensors files, config and tokenizer files."""
