"""A deliberately plain re-implementation of LLaDA's reference `generate`, used only by the tests.

Written from the algorithm's description (one sequence position and one row at a time where that is
clearer), with no code shared with `dlmstudy.sampling`. Like the original it draws its noise from the
global RNG over the whole sequence (none at temperature 0, where sampling is an argmax) and knows
nothing of padding, caches or parallel decoding. Its EOS options are the reference's at temperature 0
(LLaDA's Appendix B.4): `logits_eos_inf` sets the EOS logit to -inf before the prediction;
`confidence_eos_eot_inf` sets the EOS and end-of-turn logits to -inf after it, before the softmax that
gives the confidence.
"""

from __future__ import annotations

import torch


def schedule(masked_count: int, steps: int) -> list[int]:
    """How many tokens to unmask at each step: an even split, the remainder one each to the first steps."""
    return [masked_count // steps + (1 if i < masked_count % steps else 0) for i in range(steps)]


@torch.no_grad()
def reference_generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id,
                       eos_id=None, eot_id=None, logits_eos_inf=False, confidence_eos_eot_inf=False):
    """LLaDA's `generate` for a batch of equal-length prompts, returning prompt + generated tokens."""
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt
    is_prompt = x != mask_id

    for block in range(num_blocks):
        block_end = prompt_len + (block + 1) * block_length
        counts = [
            schedule(int((x[row, block_end - block_length:block_end] == mask_id).sum()), steps_per_block)
            for row in range(batch)
        ]
        for step in range(steps_per_block):
            is_masked = x == mask_id
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[is_prompt] = mask_id
                both = model(torch.cat([x, unconditional], dim=0)).logits
                cond, uncond = both[:batch], both[batch:]
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x).logits

            logits64 = logits.to(torch.float64)
            if logits_eos_inf:
                logits64[:, :, eos_id] = -float("inf")
            if temperature > 0:
                uniform = torch.rand_like(logits64)
                prediction = (logits64.exp() / (-torch.log(uniform)) ** temperature).argmax(dim=-1)
            else:
                prediction = logits64.argmax(dim=-1)

            if confidence_eos_eot_inf:
                logits64[:, :, eos_id] = -float("inf")
                logits64[:, :, eot_id] = -float("inf")
            if remasking == "low_confidence":
                probs = torch.softmax(logits64, dim=-1)
                score = probs.gather(-1, prediction[..., None])[..., 0]
            elif remasking == "random":
                score = torch.rand((batch, x.shape[1]))
            else:
                raise NotImplementedError(remasking)

            score[:, block_end:] = -float("inf")
            prediction = torch.where(is_masked, prediction, x)
            score = torch.where(is_masked, score, torch.full_like(score, -float("inf")))

            for row in range(batch):
                chosen = torch.topk(score[row], k=counts[row][step]).indices
                for position in chosen.tolist():
                    x[row, position] = prediction[row, position]
    return x
