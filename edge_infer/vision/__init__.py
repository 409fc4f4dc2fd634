"""Vision-language models: image preprocessing, vision towers and early visual-token dropping."""
