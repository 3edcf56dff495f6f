"""Training losses from the backbone's hidden states, without the full logits of the output head.

At the seed's 100M shapes (V = 126,464, d = 448, B L = 16 x 1024) the head W [V, d] is ~80% of the
FLOPs and its fp32 logits [B L, V] are 8.3 GB. Two exact levers (docs/performance.md has the numbers):
- diffusion scores masked positions only, so the head runs on hidden[masked] (about half the rows);
- `linear_cross_entropy` walks the rows in chunks; for a weighted sum of CEs it computes the gradients
  chunk by chunk in the forward pass (as Liger's fused kernel does), so no [N, V] tensor ever exists
  and no logits are recomputed in backward. On CUDA each chunk's softmax, CE and logit gradient are one
  Triton kernel (ce_kernel.py); elsewhere torch ops, optionally compiled.
`FastMDMObjective` and `FastARObjective` are the objectives of objectives.py on this path.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import unmasked_attention, unwrap_model
from dlmstudy.training import ce_kernel
from dlmstudy.training.objectives import IGNORE, ARObjective, MDMObjective, Metrics, forward_context

BACKENDS = ("chunked", "liger", "cce")
KERNELS = ("auto", "triton", "torch")
REDUCTIONS = ("none", "sum")


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The output head (lm_head): a bias-free Linear whose weight W [V, d] maps hidden states to logits."""
    head = unwrap_model(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise UserError(f"the fast head needs a plain bias-free Linear output head, got {type(head).__name__}; "
                        "set fast_head: false")
    return head


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The backbone's final (normed) hidden states [B, L, d]: what the head would see, with no logits computed.

    The call goes through `model(...)` so DDP, FSDP and peft wrappers see it; the head runs on zero
    positions (`logits_to_keep` = an empty index) and a hook on the decoder keeps its output.
    """
    captured = []
    hook = unwrap_model(model).get_decoder().register_forward_hook(
        lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        with unmasked_attention(model, attention_mask):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        hook.remove()
    return captured[0]


def _chunk_step(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, need_dh: bool, need_dw: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk of rows: CE_i = -log softmax(z_i)[t_i] with z = h W^T, and the gradients of sum_i scale_i CE_i.

    dCE_i/dz_i = softmax(z_i) - onehot(t_i), so dh = dz W and dW = dz^T h (matmuls in h's dtype, softmax in fp32).
    Eager, everything after the matmul is in place on one fp32 [chunk, V] buffer. Compiled, the onehot is a
    comparison, which inductor fuses with the softmax into one kernel from the logits to the bf16 dz (a scatter
    would make it write and reread an fp32 buffer).
    """
    logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
    ce = -logp.gather(1, t[:, None]).squeeze(1)
    if not (need_dh or need_dw):
        return ce, None, None
    dz = logp.exp_()  # softmax(z)
    if torch.compiler.is_compiling():
        dz = dz - (torch.arange(dz.shape[1], device=dz.device) == t[:, None]).to(dz.dtype)
    else:
        dz.scatter_add_(1, t[:, None], torch.full_like(ce[:, None], -1.0))
    dz = dz.mul_(scale[:, None]).to(h.dtype)
    return ce, *_backprop(dz, h, w, need_dh, need_dw)


def _backprop(dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, need_dh: bool, need_dw: bool
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From the logit gradient dz [chunk, V] to dh = dz W and dW = dz^T h, each only when needed."""
    return dz @ w if need_dh else None, dz.T @ h if need_dw else None


def _kernel_step(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, need_dh: bool, need_dw: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`_chunk_step` with everything after the matmul in one Triton kernel, which turns the logits into dz in place."""
    z = h @ w.T
    if not (need_dh or need_dw):
        return ce_kernel.softmax_ce_grad_(z, t), None, None
    ce = ce_kernel.softmax_ce_grad_(z, t, scale)  # z is dz from here on
    return ce, *_backprop(z, h, w, need_dh, need_dw)


@functools.cache
def _compiled_step():
    return torch.compile(_chunk_step, dynamic=True)


def _step_for(hidden: torch.Tensor, kernel: str, compiled: bool):
    """The chunk step: the Triton kernel (kernel "triton", or "auto" on CUDA with Triton), else torch ops,
    compiled or eager."""
    if kernel == "triton" or (kernel == "auto" and hidden.is_cuda and ce_kernel.available(hidden)):
        if not ce_kernel.available(hidden):
            raise UserError("head kernel 'triton' needs CUDA and the triton package; use kernel auto or torch")
        return _kernel_step
    return _compiled_step() if compiled else _chunk_step


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, *, chunk: int,
             dtype: torch.dtype, need_dh: bool, need_dw: bool, compiled: bool, kernel: str = "auto"
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row CE [N] and, when asked, d(sum_i scale_i CE_i)/d hidden and /d weight, `chunk` rows at a time."""
    step = _step_for(hidden, kernel, compiled)
    n = hidden.shape[0]
    ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = None
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            ce[s:e], dh_chunk, dw_chunk = step(hidden[s:e].to(dtype), w, targets[s:e], scale[s:e], need_dh, need_dw)
            if need_dh:
                dh[s:e] = dh_chunk
            if need_dw:  # summed in fp32; the first chunk is converted, not added to zeros (one pass less over dW)
                dw = dw_chunk.to(torch.float32) if dw is None else dw.add_(dw_chunk)
    if need_dw and dw is None:
        dw = torch.zeros_like(weight, dtype=torch.float32)
    return ce, dh, dw.to(weight.dtype) if need_dw else None


class _WeightedSumCE(torch.autograd.Function):
    """sum_i weights_i CE_i; the gradients are computed chunk by chunk in forward, backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk, dtype, compiled, kernel, need_dh, need_dw):
        ce, dh, dw = _chunked(hidden, weight, targets, weights, chunk=chunk, dtype=dtype, compiled=compiled,
                              kernel=kernel, need_dh=need_dh, need_dw=need_dw)
        ctx.save_for_backward(dh, dw)
        return (ce * weights).sum()

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad.to(dh.dtype), None if dw is None else dw * grad.to(dw.dtype),
                None, None, None, None, None, None, None, None)


class _PerRowCE(torch.autograd.Function):
    """CE_i per row; backward recomputes each chunk's logits (the upstream gradient is known only then)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, compiled, kernel):
        ce, _, _ = _chunked(hidden, weight, targets, hidden.new_ones(hidden.shape[0], dtype=torch.float32),
                            chunk=chunk, dtype=dtype, compiled=compiled, kernel=kernel, need_dh=False, need_dw=False)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.settings = (chunk, dtype, compiled, kernel)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, targets = ctx.saved_tensors
        chunk, dtype, compiled, kernel = ctx.settings
        _, dh, dw = _chunked(hidden, weight, targets, grad_ce.float(), chunk=chunk, dtype=dtype, compiled=compiled,
                             kernel=kernel, need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None, None


def _library_ce(backend: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE from Liger's fused linear cross-entropy or Apple's cut cross-entropy (CUDA, Triton)."""
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[backend]
    if hidden.device.type != "cuda" or importlib.util.find_spec(module) is None:
        raise UserError(f"head backend {backend!r} needs CUDA and the {module} package; use chunked")
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none").float()
    from cut_cross_entropy import linear_cross_entropy as cce
    return cce(hidden, weight, targets, reduction="none").float()


def check_head(chunk: int, backend: str, kernel: str = "auto") -> None:
    """UserError unless chunk >= 0 and backend and kernel are known (the settings of the fast objectives)."""
    if chunk < 0:
        raise UserError(f"head chunk must be 0 (plain head) or a positive number of rows, got {chunk}")
    if backend not in BACKENDS:
        raise UserError(f"unknown head backend {backend!r}; known: {', '.join(BACKENDS)}")
    if kernel not in KERNELS:
        raise UserError(f"unknown head kernel {kernel!r}; known: {', '.join(KERNELS)}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         weights: torch.Tensor | None = None, reduction: str = "none", chunk: int = 2048,
                         backend: str = "chunked", compiled: bool = False, kernel: str = "auto") -> torch.Tensor:
    """CE of the logits hidden [N, d] @ weight[V, d]^T against targets [N] (all in [0, V)), never all logits at once.

    reduction "none": CE per row [N] (backward recomputes each chunk); "sum": sum_i weights_i CE_i
    (weights default to 1; gradients made in forward, nothing recomputed). chunk: rows of logits held at
    a time, 0 = the plain head (full logits, autograd). The matmuls run in the autocast dtype when
    autocast is on, as the plain head does; softmax and CE in fp32. kernel: what runs after each chunk's
    matmul: "triton" (ce_kernel.py, one kernel), "torch" (torch ops; compiled: torch.compile'd), "auto" (the
    Triton kernel where it can run, CUDA with Triton, else torch).
    """
    if reduction not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduction!r}; use {' or '.join(REDUCTIONS)}")
    check_head(chunk, backend, kernel)
    if weights is None and reduction == "sum":
        weights = hidden.new_ones(hidden.shape[0], dtype=torch.float32)
    if backend != "chunked":
        ce = _library_ce(backend, hidden, weight, targets)
    elif chunk == 0:
        ce = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    else:
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        if reduction == "sum":
            grad = torch.is_grad_enabled()  # inside forward, autograd cannot tell whether it will be needed
            return _WeightedSumCE.apply(hidden, weight, targets, weights.float(), chunk, dtype, compiled, kernel,
                                        grad and hidden.requires_grad, grad and weight.requires_grad)
        return _PerRowCE.apply(hidden, weight, targets, chunk, dtype, compiled, kernel)
    return ce if reduction == "none" else (ce * weights.float()).sum()


def mdm_weights(masked: torch.Tensor, p_mask: torch.Tensor, *, norm: str = "batch_tokens",
                answer_len: torch.Tensor | None = None) -> torch.Tensor:
    """Weight of each masked position's CE in `mdm_loss`, [B, L]: 1/p over the normaliser that `norm` names."""
    b, l = masked.shape
    inv_p = 1.0 / p_mask.float()
    if norm == "batch_tokens":
        return inv_p / (b * l)
    if answer_len is None:
        raise ValueError(f"norm {norm!r} needs answer_len")
    answer_len = answer_len.clamp(min=1).float()
    if norm == "sequence":
        return inv_p / (answer_len[:, None] * b)
    if norm == "token":
        return inv_p / answer_len.sum()
    raise ValueError(f"unknown loss normalisation {norm!r}; use batch_tokens, sequence or token")


def mdm_loss_fast(model: torch.nn.Module, input_ids: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor,
                  p_mask: torch.Tensor, *, norm: str = "batch_tokens", answer_len: torch.Tensor | None = None,
                  chunk: int = 2048, backend: str = "chunked", compiled: bool = False, kernel: str = "auto",
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """`mdm_loss(model(noisy).logits, input_ids, masked, ...)` with the head run on masked positions only.

    rows: the flat indices of the masked positions, when the caller knows them without a device sync (the
    objective draws pretraining masks on the host). Otherwise they are found here, before the forward pass:
    a device sync, but there the GPU has little queued work to drain."""
    if rows is None:
        rows = masked.flatten().nonzero().squeeze(1)
    weights = mdm_weights(masked, p_mask, norm=norm, answer_len=answer_len).flatten().index_select(0, rows)
    targets = input_ids.flatten().index_select(0, rows)
    hidden = hidden_states(model, noisy).flatten(0, 1).index_select(0, rows)
    return linear_cross_entropy(hidden, output_head(model).weight, targets, weights=weights,
                                reduction="sum", chunk=chunk, backend=backend, compiled=compiled, kernel=kernel)


def ar_loss_fast(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, chunk: int = 2048, backend: str = "chunked",
                 compiled: bool = False, kernel: str = "auto") -> torch.Tensor:
    """`ar_loss(model(input_ids).logits, labels)`, the head run only where a label is scored (labels None: all).

    With labels, the scored rows are found before the forward pass (one device sync, as in `mdm_loss_fast`)."""
    if labels is None:
        hidden = hidden_states(model, input_ids, attention_mask)[:, :-1].flatten(0, 1)
        targets = input_ids[:, 1:].flatten()
    else:
        rows = (labels[:, 1:] != IGNORE).flatten().nonzero().squeeze(1)
        targets = labels[:, 1:].flatten().index_select(0, rows)
        hidden = hidden_states(model, input_ids, attention_mask)[:, :-1].flatten(0, 1).index_select(0, rows)
    loss = linear_cross_entropy(hidden, output_head(model).weight, targets, reduction="sum", chunk=chunk,
                                backend=backend, compiled=compiled, kernel=kernel)
    return loss / targets.numel()


@dataclass
class FastHead:
    """The fast objectives' head settings (rows per chunk, backend, compiled chunk step, kernel), checked on
    creation."""

    chunk: int = 2048
    backend: str = "chunked"
    compiled: bool = False
    kernel: str = "auto"

    def __post_init__(self):
        getattr(super(), "__post_init__", lambda: None)()  # the objective's own checks first
        check_head(self.chunk, self.backend, self.kernel)


@dataclass
class FastMDMObjective(FastHead, MDMObjective):
    """MDMObjective with the head only at masked positions, through `linear_cross_entropy` (same loss)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        input_ids, noisy, masked, p_mask, loss_mask, rows, cut = self.corrupt(batch)
        head = dict(chunk=self.chunk, backend=self.backend, compiled=self.compiled, kernel=self.kernel, rows=rows)
        with forward_context(cut):
            if loss_mask is None:
                loss = mdm_loss_fast(model, input_ids, noisy, masked, p_mask, **head)
            else:
                loss = mdm_loss_fast(model, input_ids, noisy, masked, p_mask, norm=self.sft_norm,
                                     answer_len=loss_mask.sum(1), **head)
        maskable = loss_mask.sum().clamp(min=1) if loss_mask is not None else input_ids.numel()
        return loss, {"masked_fraction": (masked.sum() / maskable).detach()}


@dataclass
class FastARObjective(FastHead, ARObjective):
    """ARObjective through `linear_cross_entropy`, the head only at scored positions (same loss)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None and batch.get("loss_mask") is not None:
            labels = input_ids.masked_fill(~batch["loss_mask"].bool(), IGNORE)
        loss = ar_loss_fast(model, input_ids, labels, batch.get("attention_mask"), chunk=self.chunk,
                            backend=self.backend, compiled=self.compiled, kernel=self.kernel)
        return loss, {}


def compile_body(model: torch.nn.Module, *, cuda_graphs: bool = False) -> torch.nn.Module:
    """torch.compile the decoder in place, whole (the head and the loss stay eager); returns the model.

    In place, so parameter names and checkpoints are unchanged. One graph per pass: with no mask built
    inside it (`unmasked_attention`) SDPA keeps its fused kernels in both directions. Measured on an H200
    at the seed's 100M shapes with CUDA graphs (docs/benchmarks.md): AR 819k tokens/s whole vs 801k per
    layer; diffusion 1.04-1.10M whole vs 0.83-1.00M per layer. Batches of a shape
    seen once (LLaDA's random-length cuts) run eagerly instead of recompiling it (`forward_context`).
    cuda_graphs: compile mode "reduce-overhead", which replays the compiled kernels as CUDA graphs (a
    training loop then calls `torch.compiler.cudagraph_mark_step_begin()` before each step;
    `DLMTrainer(cuda_graphs=True)` does). `uncompile_body` undoes it.
    """
    decoder = unwrap_model(model).get_decoder()
    decoder.forward = torch.compile(decoder.forward, mode="reduce-overhead" if cuda_graphs else None)
    return model


def uncompile_body(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `compile_body`: the decoder runs eagerly again (what runs after training, evaluation and sampling,
    then computes as a reloaded checkpoint does and compiles only where its own settings say)."""
    unwrap_model(model).get_decoder().__dict__.pop("forward", None)
    return model
