"""Teacher-forced diagnostics of an SFT'd model on held-out rows, to tell "cannot answer" from "answers EOS".

Diffusion arms, on an all-mask answer canvas of C positions after each prompt (where the sampler starts):
- per answer offset j: the mean probability of EOS, of the padding tokens, of the end of turn, and of all
  three (`p_end`), and the share of rows whose most likely token at j is an end token (`argmax_end`);
- the reference answer's first token at offset 0: its mean log-probability and its rank (1: the argmax).
AR arms: the same two numbers for the first token after the prompt.
Both arms: the content-only answer NLL, nats per answer token before the first end token, given the prompt:
exact for AR; for diffusion the ELBO bound (an upper bound), with the answer's end tokens left visible, so it
also knows the answer's length. One forward pass per batch and canvas, plus the bound's Monte-Carlo passes.
"""

from __future__ import annotations

import torch

from dlmstudy.evaluation.validation import answer_nll
from dlmstudy.sampling.diffusion import accepts, positions_from_mask
from dlmstudy.sampling.end_tokens import EndTokens

CANVASES = (16, 64)


def _batches(prompts: list[list[int]], batch_size: int):
    for s in range(0, len(prompts), batch_size):
        yield s, prompts[s:s + batch_size]


def _left_padded(prompts: list[list[int]], tail: int, fill: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to one width, each followed by `tail` copies of `fill`; with their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width + tail), fill, dtype=torch.long)
    mask = torch.ones_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :width - len(p)] = pad
        mask[i, :width - len(p)] = 0
        ids[i, width - len(p):width] = torch.tensor(p)
    return ids.to(device), mask.to(device)


def _last_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Float32 logits of the last `keep` positions of left-padded rows."""
    kwargs = {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **kwargs).logits
    return logits[:, -keep:].float()


def _first_token(log_p: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
    """Log-probability and rank (1 = argmax) of each row's reference token in log_p [B, V]."""
    ref = log_p.gather(1, first[:, None]).squeeze(1)
    return {"logp": ref, "rank": (log_p > ref[:, None]).sum(1) + 1}


def _summary(stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    logp, rank = torch.cat(stats["logp"]), torch.cat(stats["rank"]).float()
    return {"logp": logp.mean().item(), "rank_median": rank.median().item(), "top1": (rank == 1).float().mean().item(),
            "top10": (rank <= 10).float().mean().item()}


@torch.no_grad()
def canvas_profile(model, prompts: list[list[int]], first: list[int], canvas: int, ends: EndTokens, *, mask_id: int,
                   pad_id: int, batch_size: int = 16) -> dict:
    """Diffusion: end-token probabilities per offset of an all-mask canvas, and the reference first token there."""
    device = next(model.parameters()).device
    eos, pads = torch.tensor(ends.eos[:1]), torch.tensor(ends.eos[1:], dtype=torch.long)
    eot = torch.tensor([] if ends.eot is None else [ends.eot], dtype=torch.long)
    end_ids = torch.cat([eos, pads, eot]).to(device)
    sums = {k: torch.zeros(canvas, dtype=torch.float64) for k in ("p_eos", "p_pad", "p_eot", "p_end", "argmax_end")}
    stats = {"logp": [], "rank": []}
    for s, batch in _batches(prompts, batch_size):
        ids, mask = _left_padded(batch, canvas, mask_id, pad_id, device)
        log_p = torch.log_softmax(_last_logits(model, ids, mask, canvas), dim=-1)
        p = log_p.exp()
        parts = {"p_eos": p[..., eos.to(device)].sum(-1), "p_pad": p[..., pads.to(device)].sum(-1),
                 "p_eot": p[..., eot.to(device)].sum(-1), "p_end": p[..., end_ids].sum(-1),
                 "argmax_end": torch.isin(log_p.argmax(-1), end_ids).double()}
        for k, v in parts.items():
            sums[k] += v.double().sum(0).cpu()
        for k, v in _first_token(log_p[:, 0], torch.tensor(first[s:s + len(batch)], device=device)).items():
            stats[k].append(v.cpu())
    return {**{k: [round(x, 6) for x in (v / len(prompts)).tolist()] for k, v in sums.items()},
            "first_token": _summary(stats)}


@torch.no_grad()
def ar_first_token(model, prompts: list[list[int]], first: list[int], *, pad_id: int, batch_size: int = 16) -> dict:
    """AR: log-probability and rank of the reference first answer token after each prompt."""
    device = next(model.parameters()).device
    stats = {"logp": [], "rank": []}
    for s, batch in _batches(prompts, batch_size):
        ids, mask = _left_padded(batch, 0, pad_id, pad_id, device)
        log_p = torch.log_softmax(_last_logits(model, ids, mask, 1)[:, 0], dim=-1)
        for k, v in _first_token(log_p, torch.tensor(first[s:s + len(batch)], device=device)).items():
            stats[k].append(v.cpu())
    return _summary(stats)


def content_length(answer: list[int], ends: EndTokens) -> int:
    """Tokens of an answer before its first end token."""
    return next((i for i, t in enumerate(answer) if t in ends.ids), len(answer))


def sft_diagnostics(model, objective: str, rows: list[dict], ends: EndTokens, *, mask_id: int, pad_id: int,
                    canvases: tuple[int, ...] = CANVASES, mc_num: int = 32, batch_size: int = 16,
                    seed: int = 0) -> dict:
    """The diagnostics of the module docstring on held-out SFT rows (input_ids, prompt_len) whose answer has content."""
    rows = [r for r in rows if content_length(list(r["input_ids"][r["prompt_len"]:]), ends) > 0]
    if not rows:
        return {"rows": 0}
    prompts = [list(r["input_ids"][:r["prompt_len"]]) for r in rows]
    first = [int(r["input_ids"][r["prompt_len"]]) for r in rows]
    out: dict = {"rows": len(rows)}
    if objective == "mdm":
        out["canvas"] = {str(c): canvas_profile(model, prompts, first, c, ends, mask_id=mask_id, pad_id=pad_id,
                                                batch_size=batch_size) for c in canvases}
    else:
        out["first_token"] = ar_first_token(model, prompts, first, pad_id=pad_id, batch_size=batch_size)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n, start = len(r["input_ids"]), r["prompt_len"]
        ids[i, :n], attention[i, :n] = torch.tensor(list(r["input_ids"])), 1
        stop = start + content_length(list(r["input_ids"][start:]), ends)
        labels[i, start:stop] = ids[i, start:stop]
    nll = answer_nll(model, objective, ids, attention, labels, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                     seed=seed)
    out.update(content_nll=nll["answer_nll"], content_nll_stderr=nll["answer_nll_stderr"],
               content_tokens=int((labels != -100).sum()))
    return out


def diagnostic_scalars(diagnostics: dict) -> dict[str, float]:
    """The numbers a result.json keeps: content NLL, the first token's log-probability and rank, P(end) at offset 0
    and its mean over the first 16 offsets (largest canvas)."""
    if not diagnostics.get("rows"):
        return {}
    out = {"content_nll": diagnostics["content_nll"]}
    if "canvas" in diagnostics:
        largest = diagnostics["canvas"][max(diagnostics["canvas"], key=int)]
        first = largest["first_token"]
        out.update(p_end_offset0=largest["p_end"][0], p_end_first16=sum(largest["p_end"][:16]) / 16,
                   argmax_end_offset0=largest["argmax_end"][0])
    else:
        first = diagnostics["first_token"]
    out.update(first_token_logp=first["logp"], first_token_rank=first["rank_median"])
    return out
