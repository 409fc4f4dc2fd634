"""The vision side in MLX: CLIP/SigLIP towers and VLM projectors."""
