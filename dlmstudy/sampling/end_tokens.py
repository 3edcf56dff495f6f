"""The tokens that end an answer, read from a tokenizer: what the samplers' EOS options and the answer cut use.

`eos`: EOS and the padding tokens an SFT scheme puts after it (`<|pad|>`, `<|pad_k|>`: data/sft_padding.py),
which all mean "the answer is over"; `eot`: the chat template's end of turn, `<|im_end|>`. The diffusion
sampler's `logits_eos_inf` and `confidence_eos_eot_inf` take them as `eos_id` and `eot_id`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dlmstudy.data.sft_padding import PAD_TOKEN, rainbow_token

END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class EndTokens:
    """EOS-like ids (EOS first, then padding tokens) and the end-of-turn id (None when the vocabulary has none)."""

    eos: tuple[int, ...]
    eot: int | None

    @property
    def ids(self) -> set[int]:
        """Every end token."""
        return set(self.eos) | ({self.eot} if self.eot is not None else set())


def end_tokens(tokenizer: PreTrainedTokenizerBase) -> EndTokens:
    """EOS, the tokenizer's pad token, the SFT padding tokens it holds, and `<|im_end|>`."""
    vocab = tokenizer.get_vocab()
    eos = [tokenizer.eos_token_id]
    pads = [tokenizer.pad_token_id, vocab.get(PAD_TOKEN)]
    k = 0
    while rainbow_token(k) in vocab:
        pads.append(vocab[rainbow_token(k)])
        k += 1
    eos += [p for p in dict.fromkeys(pads) if p is not None and p not in eos]
    return EndTokens(tuple(eos), vocab.get(END_OF_TURN))


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that end an answer: every special token (EOS, pad, end of turn, ...) and every end token."""
    return set(tokenizer.all_special_ids) | end_tokens(tokenizer).ids


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to (not including) the first stop token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)
