"""Validation loss for either objective, labelled honestly.

AR arms: the exact next-token NLL. Diffusion arms: the ELBO, an UPPER bound on the NLL, estimated
with stratified Monte-Carlo mask counts (its standard error is reported beside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlmstudy.evaluation.likelihood import ar_nll, model_device, mdm_nll_bound

LOSS_KIND = {"ar": "exact NLL", "mdm": "ELBO (upper bound on NLL)"}


def validation_loss(model: torch.nn.Module, objective: str, input_ids: torch.Tensor, *, mask_id: int,
                    mc_num: int = 32, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """{"val_loss", "val_loss_stderr"} in nats per token; the MC draws are seeded so evaluations are comparable."""
    if objective == "ar":
        return {"val_loss": ar_nll(model, input_ids, batch_size=batch_size), "val_loss_stderr": 0.0}
    if objective == "mdm":
        g = torch.Generator().manual_seed(seed)
        nll, stderr = mdm_nll_bound(model, input_ids, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size, generator=g)
        return {"val_loss": nll, "val_loss_stderr": stderr}
    raise ValueError(f"no validation loss for objective {objective!r}")


@torch.no_grad()
def answer_nll(model: torch.nn.Module, objective: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor, *, mask_id: int, mc_num: int = 32, batch_size: int = 32,
               seed: int = 0) -> dict[str, float]:
    """{"answer_nll", "answer_nll_stderr"}: nats per answer token (labels != -100) given the rest of the row.

    Exact for AR, the ELBO upper bound for diffusion (only answer tokens masked and counted), so both arms
    are scored on the same tokens; their SFT training losses are not comparable (LLaDA's also scores the
    EOS padding). Rows are right-padded (`attention_mask` 0 on padding)."""
    scored = labels != -100
    if objective == "ar":
        device, total, count = model_device(model), 0.0, 0
        for s in range(0, len(input_ids), batch_size):
            ids, am = input_ids[s:s + batch_size].to(device), attention_mask[s:s + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
            keep = scored[s:s + batch_size, 1:].to(device)
            total += F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum").item()
            count += int(keep.sum())
        return {"answer_nll": total / count, "answer_nll_stderr": 0.0}
    if objective == "mdm":
        g = torch.Generator().manual_seed(seed)
        nll, stderr = mdm_nll_bound(model, input_ids, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                                    attention_mask=attention_mask, scored=scored, generator=g)
        return {"answer_nll": nll, "answer_nll_stderr": stderr}
    raise ValueError(f"no answer NLL for objective {objective!r}")
