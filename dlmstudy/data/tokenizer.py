"""Tokenizers: a byte-level BPE trained on the study's text (cached by content hash) or a local HF folder.

A BPE is trained on a bounded sample: the first `sample_bytes` (UTF-8) of the training documents in
source order, so a corpus larger than memory still trains its tokenizer in bounded time and memory.

Every tokenizer leaves here with pad, eos, mask and chat tokens and a chat template, because both
arms of a matched study share one tokenizer and the diffusion arm needs a mask token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dlmstudy.damaged import set_aside
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import SpecialTokens
from dlmstudy.models.checkpoints import checkpoint_problem, refuse_tokenizer_code

EOS, PAD, MASK, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|mask|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOS, PAD, MASK, IM_START, IM_END]
SAMPLE_BYTES = 32 << 20  # BPE training text: ~30 s on one busy core of this machine (docs/data.md)
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


def byte_tokenizer(vocab_size: int, *, eos_token_id: int, pad_token_id: int | None = None,
                   mask_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer for a model of any vocabulary: one token per UTF-8 byte (ids 0-255, no merges), EOS, pad and
    mask at the given ids, ChatML's <|im_start|> and <|im_end|> at the two highest free ids, and a reserved token
    at every other id. It fits a model folder of random weights; its texts are longer than a trained BPE's.
    pad_token_id None or equal to eos: EOS pads; mask_token_id None: no mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    wanted = [(eos_token_id, EOS)] + ([(pad_token_id, PAD)] if pad_token_id not in (None, eos_token_id) else []) \
        + ([(mask_token_id, MASK)] if mask_token_id is not None else [])
    specials = dict(wanted)
    free = [i for i in range(vocab_size - 1, 255, -1) if i not in specials]
    if len(specials) < len(wanted) or len(free) < 2 or any(not 256 <= i < vocab_size for i in specials):
        raise UserError(f"a byte-level tokenizer needs distinct special ids in [256, {vocab_size}) and room for two "
                        f"chat tokens; got eos {eos_token_id}, pad {pad_token_id}, mask {mask_token_id}")
    specials |= {free[1]: IM_START, free[0]: IM_END}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab |= {specials.get(i, f"<|reserved_{i}|>"): i for i in range(256, vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=specials.get(pad_token_id, EOS),
                                   additional_special_tokens=[IM_START, IM_END],
                                   **({"mask_token": MASK} if mask_token_id is not None else {}))
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


def bounded_sample(texts: Iterable[str], max_bytes: int) -> list[str]:
    """The first documents of `texts` up to `max_bytes` of UTF-8 (the document that crosses the bound included)."""
    sample, total = [], 0
    for t in texts:
        if total >= max_bytes:
            break
        sample.append(t)
        total += len(t.encode())
    return sample


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Hash of everything that decides the ids: the fast backend's full JSON (vocab, merges, added tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tok).__name__}:{len(tok)}:{text}".encode()).hexdigest()[:16]


def get_tokenizer(kind: str, *, texts: Iterable[str] | None = None, vocab_size: int = 1024,
                  path: str | None = None, cache_dir: Path | None = None,
                  sample_bytes: int = SAMPLE_BYTES) -> PreTrainedTokenizerBase:
    """The study's tokenizer: a BPE trained on the first `sample_bytes` of `texts` (cached under cache_dir by
    content hash) or a local folder completed with the tokens an arm needs."""
    if kind == "pretrained":
        if not path or not Path(path).is_dir():
            raise UserError(f"tokenizer.path: tokenizer folder not found: {path}")
        refuse_tokenizer_code(path)
        try:
            return complete_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
        except (OSError, ValueError) as err:
            raise UserError(f"tokenizer.path: {path} is not a loadable tokenizer folder ({err})") from None
    if texts is None:
        raise ValueError("a BPE tokenizer needs training texts")
    sample = bounded_sample(texts, sample_bytes)
    if not any(sample):
        raise UserError("the corpus holds no text to train a BPE tokenizer on")
    folder = cache_dir / f"tokenizer-{bpe_cache_key(sample, vocab_size)}" if cache_dir else None
    if folder is not None and (folder / "tokenizer.json").exists():
        problem = checkpoint_problem(folder)
        if problem is None:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        moved = set_aside(folder)
        print(f"{folder}: damaged ({problem}); set aside as {moved.name}, training it again", flush=True)
    tok = train_bpe(sample, vocab_size)
    if folder is not None:
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            tmp.replace(folder)
        except OSError:  # another process saved the same tokenizer first
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def special_tokens(tok: PreTrainedTokenizerBase, *, multiple_of: int = 64) -> SpecialTokens:
    """Token ids for the model config; the embedding rows (every id, added tokens included) rounded up to 64."""
    ids = {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "mask": tok.mask_token_id}
    if None in ids.values():
        raise UserError(f"the tokenizer lacks a {next(k for k, v in ids.items() if v is None)} token")
    if ids["mask"] in (ids["pad"], ids["eos"]):
        raise UserError(f"the tokenizer's mask token (id {ids['mask']}) must differ from its pad and eos tokens")
    n = max(len(tok), max(tok.all_special_ids) + 1)
    return SpecialTokens(vocab_size=multiple_of * ((n + multiple_of - 1) // multiple_of),
                         pad_token_id=ids["pad"], eos_token_id=ids["eos"],
                         mask_token_id=ids["mask"], bos_token_id=tok.bos_token_id)
