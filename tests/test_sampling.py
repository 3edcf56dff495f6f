"""The samplers: LLaDA's diffusion sampler against an independent reference, its schedule and block
discipline, Fast-dLLM's threshold and prefix cache, AR decoding, and the `sample` entry point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.sampling import SAMPLERS, SamplerArgumentError, ar_generate, generate, sample
from dlmstudy.sampling.autoregressive import next_token
from dlmstudy.sampling import diffusion
from dlmstudy.sampling.diffusion import cache_kwargs, crop_cache, num_transfer_tokens
from reference_llada_generate import reference_generate, schedule

PAD, EOS, MASK, VOCAB = 0, 1, 2, 64


def tiny_model(causal: bool, backbone: str = "llada"):
    """A random 2-layer model; a wide init (0.5) makes its predictions differ from position to position."""
    tokens = SpecialTokens(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, mask_token_id=MASK)
    config = build_config(backbone, ModelSize(hidden_size=32, num_layers=2, num_heads=4), tokens, causal=causal)
    config.initializer_range = 0.5
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module")
def mdm():
    return tiny_model(causal=False)


@pytest.fixture(scope="module")
def ar():
    return tiny_model(causal=True)


def prompts(lengths: list[int], seed: int = 1):
    """Random prompts, each alone and left-padded into one batch with its attention mask."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    batch = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return rows, batch, mask


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits at position j are table[j] whatever the input: confidences known in advance."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1).clone())


class NeverPredictsMask(torch.nn.Module):
    """Like a trained model, gives the mask token no weight (a large finite penalty keeps CFG free of NaN).

    The reference would "commit" a predicted mask token; `generate` excludes it by design, so the
    token-for-token comparisons use models on which the two cannot differ for that reason.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        out.logits[..., MASK] = -1e4
        return out


class Recorder(torch.nn.Module):
    """Wraps a model and keeps a copy of every input it is called with and of the logits it returned."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs, self.logits = model, [], []

    def forward(self, input_ids, cache=None, **kwargs):
        self.inputs.append(input_ids.clone())
        out = self.model(input_ids, **kwargs, **({"cache": cache} if cache is not None else {}))
        self.logits.append(out.logits.clone())
        return out


# --- LLaDA's sampler, token for token --------------------------------------------------------------

GRID = [(8, 8, 8), (4, 8, 8), (6, 12, 4), (12, 12, 3), (4, 16, 4), (16, 8, 8)]  # steps, gen_length, block_length


@pytest.mark.parametrize("steps,gen_length,block_length", GRID)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_generate_equals_reference(mdm, steps, gen_length, block_length, cfg_scale, remasking):
    _, prompt, _ = prompts([5, 5, 5])
    options = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=0.0,
                   cfg_scale=cfg_scale, remasking=remasking, mask_id=MASK)
    model = NeverPredictsMask(mdm)
    torch.manual_seed(7)
    expected = reference_generate(model, prompt, **options)
    torch.manual_seed(7)
    got = generate(model, prompt, **options)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (6, 12, 4)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_left_padded_batch_equals_each_row_alone(backbone, steps, gen_length, block_length, cfg_scale):
    model = NeverPredictsMask(tiny_model(causal=False, backbone=backbone))
    rows, batch, mask = prompts([3, 7, 5, 1])
    options = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale, mask_id=MASK)
    got = generate(model, batch, attention_mask=mask, **options)
    assert torch.equal(got[:, : batch.shape[1]], batch)
    for i, row in enumerate(rows):
        alone = reference_generate(model, row[None], temperature=0.0, remasking="low_confidence", **options)
        assert torch.equal(got[i, batch.shape[1]:], alone[0, len(row):])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_samples_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 0.0, 5.0, 1.0, 0.5, -1.0, 1.5, 0.0]])  # one position; id 2 is the mask
    torch.manual_seed(0)
    n = 20000
    out = generate(FixedLogits(logits), torch.zeros(n, 0, dtype=torch.long), steps=1, gen_length=1, block_length=1,
                   temperature=temperature, mask_id=MASK)
    freq = torch.bincount(out[:, 0], minlength=8).double() / n
    allowed = logits[0].double().clone()
    allowed[MASK] = float("-inf")
    expected = torch.softmax(allowed / temperature, dim=-1)
    assert freq[MASK] == 0
    assert torch.allclose(freq, expected, atol=4 * (0.25 / n) ** 0.5)


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_the_mask_token_is_never_generated(threshold):
    table = torch.zeros(6, 8)
    table[:, MASK] = 10.0  # a model that prefers the mask token everywhere
    table[:, 4] = 1.0
    out = generate(FixedLogits(table), torch.full((2, 2), 5), steps=4, gen_length=4, block_length=4, mask_id=MASK,
                   threshold=threshold)
    assert (out[:, 2:] == 4).all()


# --- schedule and block discipline ---------------------------------------------------------------

@pytest.mark.parametrize("steps,gen_length,block_length", [(6, 12, 4), (3, 9, 9), (8, 8, 2)])
def test_each_step_commits_the_scheduled_count_inside_the_current_block(mdm, steps, gen_length, block_length):
    _, batch, mask = prompts([4, 6])
    out, unmask_step = generate(mdm, batch, steps=steps, gen_length=gen_length, block_length=block_length,
                                mask_id=MASK, attention_mask=mask, return_history=True)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    expected = schedule(block_length, per_block)
    assert (unmask_step >= 0).all() and not (out == MASK).any()
    for t in range(steps):
        block, i = divmod(t, per_block)
        committed = unmask_step == t
        assert committed.sum(dim=1).tolist() == [expected[i]] * batch.shape[0]
        inside = torch.zeros(gen_length, dtype=torch.bool)
        inside[block * block_length:(block + 1) * block_length] = True
        assert not committed[:, ~inside].any()


def test_no_token_right_of_the_current_block_is_ever_committed(mdm):
    _, prompt, _ = prompts([5, 5])
    recorder = Recorder(mdm)
    steps, gen_length, block_length = 6, 12, 4
    generate(recorder, prompt, steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=1.0,
             mask_id=MASK)
    assert len(recorder.inputs) == steps
    for t, inputs in enumerate(recorder.inputs):
        conditional = inputs[: prompt.shape[0]]
        block_end = prompt.shape[1] + (t // (steps // (gen_length // block_length)) + 1) * block_length
        block_start = block_end - block_length
        assert (conditional[:, block_end:] == MASK).all()
        assert not (conditional[:, :block_start] == MASK).any()
        assert (inputs[prompt.shape[0]:, : prompt.shape[1]] == MASK).all()  # the unconditional pass has no prompt


def test_num_transfer_tokens_splits_evenly_remainder_first():
    masked = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    assert num_transfer_tokens(masked, 3).tolist() == [[3, 3, 2], [2, 2, 1]]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(gen_length=10, block_length=4), "not divisible by block_length"),
        (dict(steps=5, gen_length=12, block_length=4), "not divisible by the number of blocks"),
        (dict(remasking="entropy"), "unknown remasking"),
        (dict(threshold=0.9, remasking="random"), "threshold"),
        (dict(min_new_tokens=2), "need eos_id"),
        (dict(logits_eos_inf=True), "need eos_id"),
        (dict(confidence_eos_eot_inf=True, eos_id=[]), "need eos_id"),
        (dict(confidence_eos_eot_inf=True, eos_id=EOS, remasking="random"), "low_confidence"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_invalid_options_raise_a_clear_error(mdm, options, message):
    _, prompt, _ = prompts([3])
    kwargs = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK) | options
    with pytest.raises(SamplerArgumentError, match=message) as error:
        generate(mdm, prompt, **kwargs)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)


def test_right_padding_is_rejected(mdm):
    prompt = torch.tensor([[5, 6, PAD]])
    with pytest.raises(SamplerArgumentError, match="left-padded"):
        generate(mdm, prompt, attention_mask=torch.tensor([[1, 1, 0]]), steps=4, gen_length=4, block_length=4,
                 mask_id=MASK)


def test_mask_id_defaults_to_the_model_config(mdm):
    _, prompt, _ = prompts([4])
    options = dict(steps=4, gen_length=8, block_length=4)
    assert torch.equal(generate(mdm, prompt, **options), generate(mdm, prompt, mask_id=MASK, **options))


# --- EOS options ---------------------------------------------------------------------------------

def eos_table(length: int) -> torch.Tensor:
    """EOS is every position's most likely token, most confidently at the last positions."""
    table = torch.zeros(length, 8)
    table[:, 3] = 2.0
    table[:, EOS] = 3.0 + torch.arange(length, dtype=torch.float)
    return table


def test_min_new_tokens_keeps_eos_out_of_the_first_positions():
    prompt = torch.full((1, 2), 5)
    model = FixedLogits(eos_table(10))
    plain = generate(model, prompt, steps=8, gen_length=8, block_length=8, mask_id=MASK)
    assert (plain[0, 2:] == EOS).all()
    held = generate(model, prompt, steps=8, gen_length=8, block_length=8, mask_id=MASK, eos_id=EOS, min_new_tokens=3)
    assert held[0, 2:5].tolist() == [3, 3, 3] and (held[0, 5:] == EOS).all()


def test_confidence_eos_eot_inf_commits_end_tokens_last():
    """Positions predicting EOS, a second EOS-like id or the end-of-turn token are committed after all others."""
    table = eos_table(10)
    table[2:6, EOS] = -5.0  # the first four generated positions predict token 3, less confidently than EOS
    table[7, 5] = 30.0  # one position predicts the end-of-turn token 5, another the EOS-like (pad) token 6
    table[8, 6] = 30.0
    prompt = torch.full((1, 2), 4)
    options = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK, return_history=True)
    out, plain = generate(FixedLogits(table), prompt, **options)
    deferred_out, deferred = generate(FixedLogits(table), prompt, eos_id=[EOS, 6], eot_id=5, confidence_eos_eot_inf=True,
                                      **options)
    assert torch.equal(deferred_out, out)  # the same tokens, committed in another order
    ends = torch.isin(out[0, 2:], torch.tensor([EOS, 5, 6]))
    assert ends.sum() == 4 and out[0, 7] == 5 and out[0, 8] == 6
    assert plain[0, ends].max() < plain[0, ~ends].min()  # confident end tokens first without the option
    assert deferred[0, ends].min() > deferred[0, ~ends].max()


def test_logits_eos_inf_never_generates_eos_but_keeps_end_of_turn():
    table = eos_table(10)
    table[9, 5] = 40.0  # the last position predicts the end-of-turn token above EOS
    prompt = torch.full((1, 2), 4)
    out = generate(FixedLogits(table), prompt, steps=8, gen_length=8, block_length=8, mask_id=MASK, eos_id=EOS,
                   eot_id=5, logits_eos_inf=True)
    assert out[0, 2:].tolist() == [3] * 7 + [5]


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (8, 8, 1), (6, 12, 4)])
@pytest.mark.parametrize("logits_eos_inf,confidence_eos_eot_inf", [(True, False), (False, True), (True, True)])
def test_eos_options_equal_the_reference(mdm, steps, gen_length, block_length, logits_eos_inf, confidence_eos_eot_inf):
    """EOS and end of turn are the tokens rows 0 and 1 commit first without the options, so both options change
    what is committed or when (except the order within blocks of one position)."""
    _, prompt, _ = prompts([5, 5, 5])
    model = NeverPredictsMask(mdm)
    options = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", mask_id=MASK)
    plain, plain_steps = generate(model, prompt, return_history=True, **options)
    eos, eot = (int(plain[row, 5:][plain_steps[row] == 0][0]) for row in (0, 1))
    ends = dict(eos_id=eos, eot_id=eot, logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf)
    got, got_steps = generate(model, prompt, return_history=True, **options, **ends)
    assert torch.equal(got, reference_generate(model, prompt, **options, **ends))
    same = torch.equal(got, plain) and torch.equal(got_steps, plain_steps)
    assert same == (not logits_eos_inf and block_length == 1)
    if logits_eos_inf:
        assert not (got[:, 5:] == eos).any()


# --- Fast-dLLM parallel decoding ---------------------------------------------------------------------

def confidence_table(length: int, strengths: list[float]) -> torch.Tensor:
    """Position j predicts token 3 with logit strengths[j] against seven zeros (mask excluded: six)."""
    table = torch.zeros(length, 8)
    table[-len(strengths):, 3] = torch.tensor(strengths)
    return table


def test_threshold_commits_every_confident_token_then_at_least_one_per_step():
    strengths = [4.0, 0.5, 3.0, 1.0, 5.0, 0.2]
    probs = [torch.tensor(s).exp() / (torch.tensor(s).exp() + 6) for s in strengths]
    tau = 0.7
    model = FixedLogits(confidence_table(8, strengths))
    out, unmask_step = generate(model, torch.full((1, 2), 5), steps=6, gen_length=6, block_length=6, mask_id=MASK,
                                threshold=tau, return_history=True)
    first = [p >= tau for p in probs]
    assert sum(first) == 3
    assert (unmask_step[0] == 0).tolist() == first
    rest = sorted(range(6), key=lambda j: -probs[j])[3:]
    assert [int(unmask_step[0, j]) for j in rest] == [1, 2, 3]
    assert (out[0, 2:] == 3).all()


@pytest.mark.parametrize("steps", [3, 6, 12])
def test_threshold_above_one_is_the_plain_schedule(mdm, steps):
    _, batch, mask = prompts([4, 6, 2])
    options = dict(gen_length=12, block_length=4, mask_id=MASK, attention_mask=mask)
    parallel, history = generate(mdm, batch, steps=steps, threshold=1.5, return_history=True, **options)
    assert torch.equal(parallel, generate(mdm, batch, steps=steps, **options))
    assert history.max() == steps - 1


@pytest.mark.parametrize("steps", [3, 6, 12])
def test_threshold_commits_at_least_the_schedules_floor_and_ends_within_the_steps(mdm, steps):
    _, batch, mask = prompts([4, 6, 2])
    out, history = generate(mdm, batch, steps=steps, gen_length=12, block_length=4, mask_id=MASK, attention_mask=mask,
                            threshold=0.3, return_history=True)
    assert not (out == MASK).any()
    per_block = steps // 3
    for row in history:
        for block in row.view(3, 4):
            counts = torch.bincount(block - block.min())
            assert (counts >= 1).all() and len(counts) <= per_block
            left = 4
            for i, count in enumerate(counts.tolist()):
                assert count >= -(-left // (per_block - i))  # ceil(masks left / steps left)
                left -= count


# --- Fast-dLLM prefix cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["llada", "qwen"])
@pytest.mark.parametrize("cfg_scale,threshold", [(0.0, None), (1.0, None), (0.0, 0.5)])
def test_cache_is_exact_for_a_causal_model(backbone, cfg_scale, threshold):
    model = tiny_model(causal=True, backbone=backbone)
    _, batch, mask = prompts([3, 7, 5])
    options = dict(steps=6, gen_length=12, block_length=4, cfg_scale=cfg_scale, threshold=threshold,
                   mask_id=MASK, attention_mask=mask)
    assert torch.equal(generate(model, batch, use_cache=True, **options), generate(model, batch, **options))


def test_cached_block_step_attends_bidirectionally_to_cache_and_itself(mdm):
    _, batch, mask = prompts([3, 6])
    x = torch.cat([batch, torch.full((2, 8), MASK)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    start = batch.shape[1] + 4
    with torch.no_grad():
        cache = DynamicCache()
        full = mdm(x, attention_mask=full_mask, position_ids=positions, **cache_kwargs(mdm, cache)).logits
        crop_cache(cache, start)
        assert cache.get_seq_length() == start
        block = mdm(x[:, start:], attention_mask=full_mask, position_ids=positions[:, start:],
                    **cache_kwargs(mdm, cache)).logits
    assert torch.allclose(block, full[:, start:], atol=1e-5)


def test_cache_first_step_of_a_block_is_exact_and_later_steps_use_the_cache(mdm):
    _, prompt, _ = prompts([5])
    runs = {}
    for use_cache in (False, True):
        recorder = Recorder(mdm)
        out, history = generate(recorder, prompt, steps=4, gen_length=8, block_length=8, mask_id=MASK,
                                use_cache=use_cache, return_history=True)
        runs[use_cache] = out, history, recorder
    _, plain_history, plain = runs[False]
    cached_out, cached_history, cached = runs[True]
    assert torch.equal(cached.logits[0], plain.logits[0])  # step 0 of the block: the full sequence, exact
    assert torch.equal(cached_history == 0, plain_history == 0)
    assert [i.shape[1] for i in cached.inputs] == [13, 8, 8, 8]  # later steps run only the block
    assert torch.equal(cached.inputs[1], plain.inputs[1][:, 5:])  # same tokens in, but a stale prefix K/V:
    assert not torch.allclose(cached.logits[1], plain.logits[1][:, 5:], atol=1e-4)  # the approximation is real
    assert not (cached_out == MASK).any()


def test_cache_with_one_step_per_block_equals_no_cache(mdm):
    _, batch, mask = prompts([3, 5])
    options = dict(steps=3, gen_length=12, block_length=4, mask_id=MASK, attention_mask=mask)
    assert torch.equal(generate(mdm, batch, use_cache=True, **options), generate(mdm, batch, **options))


# --- AR decoding ------------------------------------------------------------------------------------

def naive_greedy(model, row: torch.Tensor, n: int) -> torch.Tensor:
    """Argmax decoding that reruns the whole sequence every step (no cache, no padding)."""
    x = row[None]
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(row):]


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_ar_greedy_equals_naive_argmax_loop(backbone):
    model = tiny_model(causal=True, backbone=backbone)
    rows, batch, mask = prompts([3, 7, 5])
    out = ar_generate(model, batch, max_new_tokens=6, attention_mask=mask)
    assert out.shape == (3, 7 + 6) and torch.equal(out[:, :7], batch)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, 7:], naive_greedy(model, row, 6))


def test_ar_eos_fills_finished_rows_and_stops_early(ar):
    rows, batch, mask = prompts([3, 7, 5])
    free = ar_generate(ar, batch, max_new_tokens=8, attention_mask=mask)
    eos = int(free[0, 7 + 1])
    out = ar_generate(ar, batch, max_new_tokens=8, attention_mask=mask, eos_id=eos)
    for i in range(3):
        new, ref = out[i, 7:].tolist(), free[i, 7:].tolist()
        cut = ref.index(eos) + 1 if eos in ref[: len(new)] else len(new)
        assert new[:cut] == ref[:cut] and all(t == eos for t in new[cut:])
    assert out.shape[1] <= free.shape[1]


def test_ar_sampling_is_reproducible_with_a_generator(ar):
    _, batch, mask = prompts([3, 7])
    draw = lambda seed: ar_generate(ar, batch, max_new_tokens=6, attention_mask=mask, temperature=1.0, top_p=0.9,
                                    generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert torch.equal(ar_generate(ar, batch, max_new_tokens=6, attention_mask=mask, temperature=1.0, top_p=1e-6),
                       ar_generate(ar, batch, max_new_tokens=6, attention_mask=mask))


def test_top_p_samples_only_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = next_token(logits.expand(20000, -1), temperature=1.0, top_p=0.75, generator=g)
    freq = torch.bincount(picks, minlength=4).double() / 20000
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.02)


# --- one entry point ------------------------------------------------------------------------------

def test_sample_dispatches_to_each_sampler(mdm, ar):
    _, batch, mask = prompts([3, 5])
    assert set(SAMPLERS) == {"diffusion", "ar"}
    diffusion = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert torch.equal(sample(mdm, batch, sampler="diffusion", attention_mask=mask, **diffusion),
                       generate(mdm, batch, attention_mask=mask, **diffusion))
    assert torch.equal(sample(ar, batch, sampler="ar", attention_mask=mask, max_new_tokens=4),
                       ar_generate(ar, batch, attention_mask=mask, max_new_tokens=4))


@pytest.mark.parametrize(
    "sampler,options,message",
    [
        ("ar", dict(max_new_tokens=4, steps=4), "does not take steps"),
        ("diffusion", dict(steps=4, gen_length=8, block_length=4, top_p=0.9), "does not take top_p"),
        ("beam", dict(), "unknown sampler"),
    ],
)
def test_sample_rejects_options_the_sampler_does_not_take(mdm, sampler, options, message):
    _, batch, _ = prompts([3])
    with pytest.raises(SamplerArgumentError, match=message):
        sample(mdm, batch, sampler=sampler, **options)


def test_a_lora_model_runs_the_head_on_the_current_block_only():
    """peft's forward takes **kwargs, yet the sampler still asks for the block's logits only: full logits of a
    LoRA model's long SFT prompts ran a 100M model out of memory on an H200."""
    from dlmstudy.training.lora import apply_lora

    model = apply_lora(tiny_model(causal=False), r=2, lora_alpha=4, lora_dropout=0.0)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        out = generate(model, prompts([6, 6])[1], steps=4, gen_length=8, block_length=4, mask_id=MASK)
    finally:
        hook.remove()
    assert out.shape == (2, 14) and rows and set(rows) == {4}


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_compiled_ar_decoding_gives_the_eager_loops_tokens(backbone):
    """Static-cache decoding through transformers' generate: the same greedy tokens, left padding, end tokens
    and early stop as our loop; nothing ends early without an end token, even the model config's."""
    model = tiny_model(causal=True, backbone=backbone)
    _, batch, mask = prompts([3, 7, 5])
    free = ar_generate(model, batch, max_new_tokens=8, attention_mask=mask)
    for eos in (None, int(free[0, 7 + 1]), model.config.eos_token_id):
        eager = ar_generate(model, batch, max_new_tokens=8, attention_mask=mask, eos_id=eos)
        assert torch.equal(ar_generate(model, batch, max_new_tokens=8, attention_mask=mask, eos_id=eos, compiled=True),
                           eager)
    with pytest.raises(SamplerArgumentError, match="greedy only"):
        ar_generate(model, batch, max_new_tokens=4, temperature=1.0, compiled=True)


@pytest.mark.parametrize("threshold", [None, 0.05])
def test_compiled_diffusion_sampler_gives_the_eager_samplers_tokens(mdm, threshold):
    _, batch, mask = prompts([3, 6])
    options = dict(steps=8, gen_length=8, block_length=4, threshold=threshold, attention_mask=mask,
                   return_history=True)
    eager, eager_steps = generate(mdm, batch, **options)
    compiled, compiled_steps = generate(mdm, batch, compiled=True, **options)
    assert torch.equal(compiled, eager) and torch.equal(compiled_steps, eager_steps)
    assert diffusion._last_compiled[0][0] is mdm  # the compiled path ran
