"""Shared test settings: CPU only, few threads, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The head's Triton kernel runs on CPU under Triton's interpreter (tests/test_ce_kernel.py). It has to be on before
# Triton is first imported (transformers imports it), and only an explicit kernel="triton" uses it on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Tiny models on a shared 2-core machine run far faster on one thread (measured ~30x for tiny forwards).
torch.set_num_threads(1)
