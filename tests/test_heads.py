"""The fast training head: same losses and gradients as the plain path, without [N, V] logits."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dlmstudy.errors import UserError
from dlmstudy.training import heads
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.training.heads import (FastARObjective, FastMDMObjective, compile_body, hidden_states,
                                     linear_cross_entropy, mdm_loss_fast, output_head, uncompile_body)
from dlmstudy.training.lora import apply_lora
from dlmstudy.training.objectives import IGNORE, ARObjective, MDMObjective, mask_positions, mask_tokens, mdm_loss

V, MASK = 128, 2


def tiny(backbone: str = "llada", causal: bool = False):
    cfg = build_config(backbone, ModelSize(hidden_size=32, num_layers=2, num_heads=4),
                       SpecialTokens(vocab_size=V, pad_token_id=0, eos_token_id=1, mask_token_id=MASK), causal=causal)
    return build_model(cfg, seed=0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, atol=atol, rtol=1e-5), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=atol, rtol=1e-4), n


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates, views aside (forward and CPU backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func.is_view else tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_hidden_states_are_what_the_head_sees(backbone, causal):
    torch.manual_seed(0)
    model = tiny(backbone, causal=causal).eval()
    ids = torch.randint(3, V, (2, 12))
    logits = output_head(model)(hidden_states(model, ids))
    assert torch.allclose(logits, model(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_hidden_states_build_no_attention_mask_without_padding(monkeypatch, backbone, causal):
    """transformers' mask builders check the position ids for packed sequences on the host (a device sync per
    step) and build a mask tensor while compiling (before torch 2.14 always, as if exporting): without a padding
    mask none of them runs, attention keeps its direction, and the model's attention implementation is restored."""
    import transformers.masking_utils as masking

    model = tiny(backbone, causal=causal).eval()
    ids = torch.randint(3, V, (2, 12))
    reference = model(input_ids=ids, use_cache=False).logits
    monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)
    monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                        lambda *a, **k: pytest.fail("mask built"))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **k: pytest.fail("device sync"))
    assert torch.allclose(output_head(model)(hidden_states(model, ids)), reference, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("causal", [False, True])
def test_hidden_states_honour_a_padding_mask(causal):
    """With a padding mask the mask is built as usual: padded keys are ignored (dropping it would change them)."""
    torch.manual_seed(0)
    model = tiny("qwen", causal=causal).eval()
    ids = torch.randint(3, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the causal rows see it too
    expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ours = output_head(model)(hidden_states(model, ids, mask))
    assert torch.allclose(ours[0, 4:], expected[0, 4:], atol=1e-6) and torch.allclose(ours[1], expected[1], atol=1e-6)
    unpadded = output_head(model)(hidden_states(model, ids))
    assert not torch.allclose(ours[0, 4:], unpadded[0, 4:], atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 1, 8, 64])
def test_linear_cross_entropy_equals_plain_values_and_gradients(chunk):
    torch.manual_seed(0)
    n, d = 37, 16
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (n,))
    row_w = torch.rand(n)

    def plain(reduction):
        ce = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
        return ce if reduction == "none" else (ce * row_w).sum()

    upstream = torch.randn(n)
    for reduction, grad_out in (("none", upstream), ("sum", torch.tensor(0.7))):
        ours = linear_cross_entropy(hidden, weight, targets, weights=row_w if reduction == "sum" else None,
                                    reduction=reduction, chunk=chunk)
        ref = plain(reduction)
        assert torch.allclose(ours, ref, atol=1e-5)
        g_ours = torch.autograd.grad(ours, (hidden, weight), grad_out)
        g_ref = torch.autograd.grad(ref, (hidden, weight), grad_out)
        for a, b in zip(g_ours, g_ref):
            assert torch.allclose(a, b, atol=1e-5)


def test_chunked_head_never_creates_full_logits():
    torch.manual_seed(0)
    n, d, chunk = 64, 16, 8
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (n,))
    seen = {}
    for c in (0, chunk):
        for reduction in ("sum", "none"):
            with LargestTensor() as mode:
                linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk=c).sum().backward()
            seen[c, reduction] = mode.largest
    assert seen[0, "sum"] >= n * V and seen[0, "none"] >= n * V  # the probe sees the plain head's logits
    assert max(seen[chunk, "sum"], seen[chunk, "none"]) <= max(chunk * V, V * d)


def test_no_gradients_are_made_without_autograd():
    torch.manual_seed(0)
    hidden, weight = torch.randn(16, 8, requires_grad=True), torch.randn(V, 8, requires_grad=True)
    targets = torch.randint(0, V, (16,))
    with torch.no_grad(), LargestTensor() as mode:
        loss = linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk=4)
    assert loss.grad_fn is None
    assert mode.largest <= 4 * V  # no [V, d] weight gradient was accumulated


@pytest.mark.parametrize("norm", ["batch_tokens", "sequence", "token"])
def test_mdm_loss_fast_equals_mdm_loss(norm):
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(3, V, (3, 16))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :5] = False
    t, u = torch.tensor([0.2, 0.5, 0.9]), torch.rand(3, 16)
    masked, p_mask = mask_positions(t, u, eps=1e-3)
    masked = masked if norm == "batch_tokens" else masked & maskable
    noisy = mask_tokens(ids, masked, MASK)
    answer_len = None if norm == "batch_tokens" else maskable.sum(1)
    plain = loss_and_grads(model, lambda: mdm_loss(model(input_ids=noisy).logits, ids, masked, p_mask, norm=norm,
                                                   answer_len=answer_len))
    for chunk in (0, 5):
        fast = loss_and_grads(model, lambda: mdm_loss_fast(model, ids, noisy, masked, p_mask, norm=norm,
                                                           answer_len=answer_len, chunk=chunk))
        assert_same(fast, plain)


def test_mdm_loss_fast_with_nothing_masked_is_zero():
    model = tiny()
    ids = torch.randint(3, V, (2, 8))
    masked = torch.zeros_like(ids, dtype=torch.bool)
    loss = mdm_loss_fast(model, ids, ids, masked, torch.full((2, 8), 0.5), chunk=4)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def batch(sft: bool = False, labels: bool = False, always_masked: bool = False):
    g = torch.Generator().manual_seed(1)
    out = {"input_ids": torch.randint(3, V, (4, 16), generator=g), "index": torch.arange(10, 14)}
    if sft:
        out["loss_mask"] = torch.arange(16)[None, :].expand(4, 16) >= torch.tensor([[3], [5], [8], [12]])
    if always_masked:
        out["always_masked"] = torch.arange(16)[None, :].expand(4, 16) >= torch.tensor([[14], [9], [16], [13]])
    if labels:
        out["labels"] = out["input_ids"].masked_fill(torch.rand(4, 16, generator=g) < 0.3, IGNORE)
    return out


@pytest.mark.parametrize("case", [dict(), dict(random_length_ratio=1.0), dict(sft=True),
                                  dict(sft=True, sft_norm="token"), dict(sft=True, always_masked=True)])
def test_fast_mdm_objective_equals_mdm_objective(case):
    torch.manual_seed(0)
    model = tiny()
    settings = {k: v for k, v in case.items() if k not in ("sft", "always_masked")}
    b = batch(sft=case.get("sft", False), always_masked=case.get("always_masked", False))
    plain_obj = MDMObjective(mask_id=MASK, seed=3, **settings)
    fast_obj = FastMDMObjective(mask_id=MASK, seed=3, chunk=7, **settings)
    plain = loss_and_grads(model, lambda: plain_obj(model, b)[0])
    fast = loss_and_grads(model, lambda: fast_obj(model, b)[0])
    assert_same(fast, plain)
    assert torch.equal(fast_obj(model, b)[1]["masked_fraction"], plain_obj(model, b)[1]["masked_fraction"])


@pytest.mark.parametrize("case", [dict(), dict(sft=True), dict(labels=True)])
def test_fast_ar_objective_equals_ar_objective(case):
    torch.manual_seed(0)
    model = tiny("qwen", causal=True)
    b = batch(**case)
    plain = loss_and_grads(model, lambda: ARObjective()(model, b)[0])
    fast = loss_and_grads(model, lambda: FastARObjective(chunk=9)(model, b)[0])
    assert_same(fast, plain)


def test_fast_objective_trains_lora_adapters_like_the_plain_one():
    torch.manual_seed(0)
    model = apply_lora(tiny(), r=4, lora_alpha=8, lora_dropout=0.0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # LoRA B starts at zero: make the adapters matter
    b = batch(sft=True)
    plain = loss_and_grads(model, lambda: MDMObjective(mask_id=MASK)(model, b)[0])
    fast = loss_and_grads(model, lambda: FastMDMObjective(mask_id=MASK, chunk=5)(model, b)[0])
    assert_same(fast, plain)
    assert all("lora_" in n for n in fast[1])


def test_bf16_autocast_matches_plain_within_bf16_noise():
    torch.manual_seed(0)
    model = tiny("qwen", causal=True)
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ARObjective()(model, b)[0]
        fast = FastARObjective(chunk=16)(model, b)[0]
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, plain, rtol=2e-2)


def test_bad_head_settings_are_user_errors():
    with pytest.raises(UserError, match="chunk"):
        FastARObjective(chunk=-1)
    with pytest.raises(UserError, match="backend"):
        FastMDMObjective(mask_id=MASK, backend="triton")
    with pytest.raises(UserError, match="CUDA"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(V, 8), torch.zeros(4, dtype=torch.long), backend="liger")


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["mdm", "ar"])
def test_compiled_body_and_head_give_the_same_loss(monkeypatch, arm):
    """Dynamo capture and AOT autograd of our code (aot_eager: inductor's CPU codegen alone takes minutes here):
    the decoder compiled whole in either direction; `uncompile_body` makes it eager again."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    heads._compiled_step.cache_clear()
    torch.manual_seed(0)
    model = tiny("qwen", causal=True) if arm == "ar" else tiny()
    b = batch()
    plain_obj = ARObjective() if arm == "ar" else MDMObjective(mask_id=MASK)
    fast_obj = (FastARObjective(chunk=16, compiled=True) if arm == "ar"
                else FastMDMObjective(mask_id=MASK, chunk=16, compiled=True))
    plain = loss_and_grads(model, lambda: plain_obj(model, b)[0])
    compile_body(model)
    fast = loss_and_grads(model, lambda: fast_obj(model, b)[0])
    heads._compiled_step.cache_clear()
    assert_same(fast, plain)
    decoder = model.model
    assert "forward" in decoder.__dict__
    uncompile_body(model)
    assert "forward" not in decoder.__dict__
    assert_same(loss_and_grads(model, lambda: fast_obj(model, b)[0]), plain)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [MDMObjective, FastMDMObjective])
def test_batches_cut_to_a_random_length_do_not_recompile_the_decoder(objective):
    """LLaDA cuts 1% of pretraining batches to a random length; each would compile the whole decoder again (30 s
    on an H200), so those forward passes run eagerly and the compiled graph stays the training shape's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny()
    decoder = model.model
    decoder.forward = torch.compile(decoder.forward, backend=backend)  # what compile_body does, counting graphs
    ids = torch.randint(3, V, (2, 16))
    objective(mask_id=MASK, random_length_ratio=0.0)(model, {"input_ids": ids, "index": [0, 1]})[0].backward()
    compiled = len(graphs)
    cut = objective(mask_id=MASK, random_length_ratio=1.0)
    assert cut.corrupt({"input_ids": ids, "index": [0, 1]}).cut
    loss, _ = cut(model, {"input_ids": ids, "index": [0, 1]})
    loss.backward()
    assert compiled >= 1 and len(graphs) == compiled
    objective(mask_id=MASK, random_length_ratio=0.0)(model, {"input_ids": ids, "index": [2, 3]})[0].backward()
    assert len(graphs) == compiled
    torch._dynamo.reset()