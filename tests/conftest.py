"""Shared test settings: CPU only, few threads, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

# Tiny models on a shared 2-core machine run far faster on one thread (measured ~30x for tiny forwards).
torch.set_num_threads(1)
