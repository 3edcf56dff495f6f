"""Validation loss for either objective, labelled honestly.

AR arms: the exact next-token NLL. Diffusion arms: the ELBO, an UPPER bound on the NLL, estimated
with stratified Monte-Carlo mask counts (its standard error is reported beside it).
"""

from __future__ import annotations

import torch

from dlmstudy.evaluation.likelihood import ar_nll, mdm_nll_bound

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
