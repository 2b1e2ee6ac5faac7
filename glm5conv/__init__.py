"""glm5conv: make Quark-quantized GLM-5 checkpoints serve with MTP speculative decoding."""

__version__ = "0.1.0"
