"""The vision side in torch: CLIP/SigLIP towers and VLM projectors."""
