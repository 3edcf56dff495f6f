"""What fills an SFT row after its answer (the padding up to the batch's longest row), one entry per scheme.

A row is the prompt, the answer and one EOS (data/sft.py). The diffusion arm trains on the padding too:
it has to learn where an answer ends, since at inference it fills a canvas of fixed length. LLaDA pads
with EOS, so EOS is both the end and the padding; a model trained that way piles probability on EOS at
late positions, and decoding that commits confident tokens first fills the canvas with EOS from the back
("EOS overflow", Rainbow Padding: Kim et al. 2025). The schemes:

| name | tail after the answer's EOS | masked | scored |
| --- | --- | --- | --- |
| `eos` | EOS (LLaDA) | like answer tokens | yes |
| `pad` | a distinct `<|pad|>` token | like answer tokens | yes |
| `rainbow` | a cycle of `pad_tokens` distinct tokens `<|pad_0|>`, `<|pad_1|>`, ... | like answer tokens | yes |
| `masked_pad` | `<|pad|>` | always (never visible) | yes, weight 1 (p = 1) |

`masked_pad` never shows the model a pad token, so the answer's length is never given away, while it still
learns to predict where the answer has ended. Pure Python (the spec validates names against `PADDINGS`).
"""

from __future__ import annotations

from dataclasses import dataclass

PAD_TOKEN = "<|pad|>"


def rainbow_token(k: int) -> str:
    """The k-th token of the rainbow cycle."""
    return f"<|pad_{k}|>"


@dataclass(frozen=True)
class Padding:
    """A padding scheme: the tokens its tail cycles through (none: EOS) and whether the tail is always masked."""

    name: str
    description: str
    distinct: bool  # the tail uses tokens of its own, not EOS
    rainbow: bool = False
    always_masked: bool = False

    def tail_tokens(self, pad_tokens: int) -> list[str]:
        """Names of the tail's tokens in cycle order; [] means EOS."""
        if not self.distinct:
            return []
        return [rainbow_token(k) for k in range(pad_tokens)] if self.rainbow else [PAD_TOKEN]


PADDINGS: dict[str, Padding] = {}


def register_padding(padding: Padding) -> Padding:
    """Add a padding scheme (names are unique)."""
    if padding.name in PADDINGS:
        raise ValueError(f"padding {padding.name!r} is already registered")
    PADDINGS[padding.name] = padding
    return padding


register_padding(Padding("eos", "EOS after the answer, masked and scored like answer tokens (LLaDA)", distinct=False))
register_padding(Padding("pad", "one EOS ends the answer; a distinct <|pad|> token after it, masked and scored",
                         distinct=True))
register_padding(Padding("rainbow", "one EOS ends the answer; a cycle of distinct pad tokens after it, masked and "
                         "scored (Rainbow Padding)", distinct=True, rainbow=True))
register_padding(Padding("masked_pad", "one EOS ends the answer; every position after it is masked in every draw "
                         "and scored as <|pad|> with weight 1", distinct=True, always_masked=True))


def tail(tail_ids: list[int], length: int) -> list[int]:
    """The `length` ids after a row's EOS: the tail tokens in a cycle that starts right after the EOS."""
    return [tail_ids[i % len(tail_ids)] for i in range(length)]
