"""Tokenizers: a byte-level BPE trained on the study's text (cached by content hash) or a local HF folder.

Every tokenizer leaves here with pad, eos, mask and chat tokens and a chat template, because both
arms of a matched study share one tokenizer and the diffusion arm needs a mask token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import SpecialTokens

EOS, PAD, MASK, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|mask|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOS, PAD, MASK, IM_START, IM_END]
# ChatML, the template Qwen2 uses; applied when a tokenizer brings none.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, mask_token=MASK,
                                   additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def complete_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add what an arm needs and a local tokenizer may lack: eos, pad, mask tokens and a chat template."""
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": MASK})
    if not tok.chat_template:
        if IM_START not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tok.chat_template = CHAT_TEMPLATE
    return tok


def bpe_cache_key(texts: list[str], vocab_size: int) -> str:
    """Content hash of the training text and vocabulary size."""
    h = hashlib.sha256(f"bpe-v1:{vocab_size}:".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def get_tokenizer(kind: str, *, texts: list[str] | None = None, vocab_size: int = 1024,
                  path: str | None = None, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The study's tokenizer: trained BPE (cached under cache_dir by content hash) or a local folder."""
    if kind == "pretrained":
        if not path or not Path(path).is_dir():
            raise UserError(f"tokenizer.path: tokenizer folder not found: {path}")
        return complete_tokenizer(AutoTokenizer.from_pretrained(path))
    if texts is None:
        raise ValueError("a BPE tokenizer needs training texts")
    folder = cache_dir / f"tokenizer-{bpe_cache_key(texts, vocab_size)}" if cache_dir else None
    if folder is not None and (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    tok = train_bpe(texts, vocab_size)
    if folder is not None:
        tmp = folder.with_name(folder.name + ".tmp")
        tok.save_pretrained(tmp)
        tmp.replace(folder)
    return tok


def special_tokens(tok: PreTrainedTokenizerBase, *, multiple_of: int = 64) -> SpecialTokens:
    """Token ids for the model config; the embedding rows are rounded up to a multiple of 64."""
    n = len(tok)
    return SpecialTokens(vocab_size=multiple_of * ((n + multiple_of - 1) // multiple_of),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id)
