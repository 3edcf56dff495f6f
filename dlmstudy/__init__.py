"""dlmstudy: matched studies of masked-diffusion (LLaDA) and autoregressive (Qwen2) language models."""

__version__ = "0.1.0"
