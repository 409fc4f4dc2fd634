"""The local REST daemon (``edge-infer serve``): OpenAI-compatible, with agents."""
