"""`dlmstudy bench`: training and sampling throughput of the arms on one device, with MFU.

Training: forward + backward + optimizer step of the arm's own objective (bf16 autocast on
accelerators, fused AdamW on cuda, gradient clipping at 1.0 as the Trainer does) on random tokens;
the step time is the mean of the timed steps after warm-up, run back to back with one device sync
at the end (as a training loop runs: the host may queue work ahead of the device). MFU counts
every matmul and the attention scores and values:

    MFU = tokens/s x (6 N_matmul + 12 n_layers d L) / peak FLOP/s

N_matmul counts the weights of every matmul (output head included, embedding lookup not), L is the
sequence length. Sampling: tokens/s of LLaDA's sampler (plain, parallel decoding at threshold 0.9,
prefix cache, each eager and compiled) across steps and block lengths for diffusion arms; for AR arms
transformers' `generate`, our KV-cached loop and compiled static-cache decoding.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch
import transformers

from dlmstudy.atomic import write_json_atomic
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import (
    ModelSize,
    SpecialTokens,
    build_config,
    build_model,
)
from dlmstudy.models.params import ParamCounts, config_from_json, count_model
from dlmstudy.models.random_init import MODEL_CONFIGS, model_config_path
from dlmstudy.models.registry import Arm, get_arm
from dlmstudy.runners.device import (
    autocast,
    device_name,
    supports_bf16,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    synchronize,
)
from dlmstudy.training.clipping import clip_grad_norm
from dlmstudy.training.registry import build_objective

PARALLEL_THRESHOLD = 0.9
MEASUREMENTS = ("train", "sample", "sft")
DEFAULT_MEASUREMENTS = ("train", "sample")

# bf16 dense peaks (FLOP/s), matched by a substring of the device name; first match wins.
PEAK_FLOPS: list[tuple[str, float, str]] = [
    ("H200", 788e12, "measured bf16 matmul peak of one H200 (datasheet 989e12)"),
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet, bf16 dense"),
    ("H100 NVL", 835e12, "NVIDIA H100 NVL datasheet, bf16 dense"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet, bf16 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet, bf16 dense"),
    ("910B", 313e12, "Ascend 910B: approximate, ~313e12 as quoted for the 910B3 (third-party figures 256e12-320e12, "
                     "no official bf16 datasheet; see docs/benchmarks.md); pass --peak_flops to override"),
]


@dataclass(frozen=True)
class BenchConfig:
    """Model shape, training batch and sampling grid of one benchmark setting (every arm gets the same shape)."""

    name: str
    size: ModelSize
    vocab_size: int
    seq_len: int
    batch_size: int
    mask_token_id: int | None = None  # default: the last id of the vocabulary
    sample_batch: int = 8
    prompt_len: int = 32
    gen_length: int = 128
    sample_steps: tuple[int, ...] = (128, 32)
    block_lengths: tuple[int, ...] = (128, 32)
    source: str | None = None  # the config.json this setting was read from (SFT then measures that very model)

    @property
    def tokens(self) -> SpecialTokens:
        mask = self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id
        return SpecialTokens(vocab_size=self.vocab_size, pad_token_id=0, eos_token_id=1, mask_token_id=mask)


BENCH_CONFIGS: dict[str, BenchConfig] = {
    # seconds on a laptop CPU: checks the machinery, says nothing about speed
    "tiny": BenchConfig("tiny", ModelSize(hidden_size=32, num_layers=2, num_heads=4), vocab_size=64, seq_len=32,
                        batch_size=4, sample_batch=2, prompt_len=8, gen_length=8, sample_steps=(8, 2),
                        block_lengths=(8, 2)),
    # a small study model: 3.2M non-embedding parameters, vocab 32,768, seq 512, batch 64
    "small": BenchConfig("small", ModelSize(hidden_size=256, num_layers=4, num_heads=4), vocab_size=32768,
                         seq_len=512, batch_size=64),
    # the LLaDA training tutorial's 100M config (llada-100M.config.json) at the tutorial's sequence length
    "seed-100m": BenchConfig("seed-100m", ModelSize(hidden_size=448, num_layers=6, num_heads=7, intermediate_size=768),
                             vocab_size=126464, seq_len=1024, batch_size=16, mask_token_id=126336),
}


def config_from_path(path: str | Path) -> BenchConfig:
    """A benchmark setting with the shape of a LLaDA, Qwen2 or Llama config.json (batch 16, seq up to 1024)."""
    hf = config_from_json(path)
    heads = hf.num_attention_heads
    if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // heads):
        raise UserError(f"{path}: head_dim {hf.head_dim} != hidden_size / heads; dlmstudy sizes cannot express it")
    rope = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    size = ModelSize(hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=heads,
                     num_kv_heads=hf.num_key_value_heads, intermediate_size=hf.intermediate_size,
                     max_position_embeddings=hf.max_position_embeddings, rope_theta=float(rope),
                     rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings))
    name = Path(path).parent.name if Path(path).name == "config.json" else Path(path).name
    return BenchConfig(name, size, vocab_size=hf.vocab_size, seq_len=min(1024, hf.max_position_embeddings),
                       batch_size=16, mask_token_id=getattr(hf, "mask_token_id", None), source=str(path))


def bench_config(name_or_path: str, *, batch_size: int | None = None, seq_len: int | None = None) -> BenchConfig:
    """A named setting (tiny, small, seed-100m), a shipped model config (llada-8b, qwen2.5-7b) or a config.json
    path, with optional batch/sequence overrides."""
    if name_or_path in BENCH_CONFIGS:
        cfg = BENCH_CONFIGS[name_or_path]
    elif name_or_path in MODEL_CONFIGS:
        cfg = dataclasses.replace(config_from_path(model_config_path(name_or_path)), name=name_or_path)
    elif Path(name_or_path).exists():
        cfg = config_from_path(name_or_path)
    else:
        raise UserError(f"bench config {name_or_path!r}: use one of {', '.join([*BENCH_CONFIGS, *MODEL_CONFIGS])} "
                        "or a config.json path")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise UserError(f"--{key} must be at least 1, got {value}")
    cfg = dataclasses.replace(cfg, batch_size=batch_size or cfg.batch_size, seq_len=seq_len or cfg.seq_len)
    longest = max(cfg.seq_len, cfg.prompt_len + cfg.gen_length)
    if longest > cfg.size.max_position_embeddings:
        cfg = dataclasses.replace(cfg, size=dataclasses.replace(cfg.size, max_position_embeddings=longest))
    return cfg


def peak_flops(name: str) -> tuple[float | None, str]:
    """(bf16 dense peak FLOP/s, source) for a device name; (None, reason) when unknown (every CPU)."""
    for key, flops, source in PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops, source
    return None, f"no peak known for {name!r}; pass --peak_flops"


def matmul_params(model: torch.nn.Module) -> int:
    """Weights used in a matmul: every nn.Linear (the output head too, even when tied), not the embedding lookup."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(n_matmul: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_matmul (forward + backward) + 12 n_layers d L (attention scores and values)."""
    return 6 * n_matmul + 12 * n_layers * d_model * seq_len


def lora_flops(*, tokens: int, n_frozen: int, n_lora: int, n_layers: int, d_attention: int, seq_len: int,
               causal: bool, head_rows: float, d_model: int, vocab: int) -> float:
    """FLOPs of one LoRA SFT batch as done: the frozen matmuls' forward and input gradient, no weight gradient
    (4 N_frozen per token); the adapters' forward and both gradients (6 N_lora); attention scores and values
    (12 n_layers d L, forward and backward; 6 for a causal kernel, which skips the masked half); the frozen head
    only on the scored rows (4 d V per row: answer tokens for AR, masked answer tokens for diffusion)."""
    attention = (6 if causal else 12) * n_layers * d_attention * seq_len
    return tokens * (4 * n_frozen + 6 * n_lora + attention) + 4 * d_model * vocab * head_rows


def mfu(tokens_per_s: float, flops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak)."""
    return None if not peak else tokens_per_s * flops / peak


def _record(measurement: str, arm: Arm, cfg: BenchConfig, device: str, model: torch.nn.Module,
            counts: ParamCounts | None = None, **fields) -> dict:
    counts = counts or count_model(model)
    return {"measurement": measurement, "device": device, "device_name": device_name(device), "config": cfg.name,
            "arm": arm.name, "objective": arm.objective, "sampler": arm.sampler, **fields,
            "params_total": counts.total, "params_non_embedding": counts.non_embedding,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _timed(device: str, fn: Callable[[], object]) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


# Training paths: the plain objective; the exact fast head (heads.py) eager, compiled (also with CUDA-graphed
# layers), or through liger's kernel.
TRAIN_MODES = {"plain": {}, "fast": {"fast_head": True}, "fast-compiled": {"fast_head": True, "compiled": True},
               "fast-graphs": {"fast_head": True, "compiled": True, "cuda_graphs": True},
               "fast-liger": {"fast_head": True, "backend": "liger"}}


def profile_steps(step: Callable[[], None], device: str, path: Path, steps: int = 5) -> float | None:
    """Run `steps` more steps under torch.profiler; write the operator table (sorted by self device time on an
    accelerator, self CPU time on CPU) to `path`; return the device's busy seconds per step (CPU: None)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    table = prof.key_averages()
    busy = None
    if device == "cuda":  # the union of the kernels' time ranges: operators and their kernels both carry device time
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
        busy, reach = 0.0, float("-inf")
        for start, end in spans:
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        busy = busy / 1e6 / steps
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} profiled steps; device busy {busy} s per step\n"
                    + table.table(sort_by=sort, row_limit=40, max_name_column_width=70) + "\n")
    return busy


def bench_training(model: torch.nn.Module, arm: Arm, cfg: BenchConfig, device: str, *, steps: int = 10,
                   warmup: int = 3, peak: float | None = None, mode: str = "plain",
                   profile: Path | None = None, head_chunk: int = 2048, head_kernel: str = "auto") -> dict:
    """Mean step time and tokens/s of the arm's training step on random tokens (the model is trained in place):
    `steps` steps after `warmup`, timed together with one device sync at the end, as a training loop runs.

    With `profile` (a folder), a few more steps run under torch.profiler and its table is written there.
    head_kernel: what runs after each head chunk's matmul on the fast paths (heads.KERNELS)."""
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown training mode {mode!r}; use {', '.join(TRAIN_MODES)}")
    options = dict(TRAIN_MODES[mode])
    if options.get("fast_head"):
        options.update(chunk=head_chunk, kernel=head_kernel)
    cuda_graphs = options.pop("cuda_graphs", False)
    if options.pop("compiled", False):
        from dlmstudy.training.heads import compile_body

        compile_body(model, cuda_graphs=cuda_graphs)
        options["compiled"] = True
    objective = build_objective(arm.objective, seed=0, **options,
                                **({"mask_id": cfg.tokens.mask_token_id} if arm.objective == "mdm" else {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    B, L = cfg.batch_size, cfg.seq_len
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are consumed
        with autocast(device):
            loss, _ = objective(model, batch)
        loss.backward()
        clip_grad_norm(optimizer, model.parameters(), 1.0)  # as the Trainer clips (inside the fused step on cuda)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def batch(i: int) -> dict[str, torch.Tensor]:  # the index stays on the host, as the run's collator leaves it
        return {"input_ids": torch.randint(0, cfg.tokens.mask_token_id, (B, L), device=device),
                "index": torch.arange(i * B, (i + 1) * B)}

    reset_peak_memory(device)
    for i in range(warmup):
        step(batch(i))
    batches = [batch(warmup + i) for i in range(steps)]  # drawn before the clock starts
    seconds, _ = _timed(device, lambda: [step(b) for b in batches])  # one sync at the end, as a training loop runs
    step_time = seconds / steps
    tokens_per_s = B * L / step_time
    flops = flops_per_token(matmul_params(model), cfg.size.num_layers, cfg.size.hidden_size, L)
    extra = {"head_chunk": head_chunk, "head_kernel": head_kernel} if options.get("fast_head") else {}
    if profile is not None:
        head = f"-chunk{head_chunk}" + ("" if head_kernel == "auto" else f"-{head_kernel}") if extra else ""
        path = Path(profile) / f"{cfg.name}-{arm.name}-{mode}{head}.txt"
        extra.update(profile=str(path), device_busy_s=profile_steps(lambda: step(batches[-1]), device, path))
    model.eval()
    return _record("train", arm, cfg, device, model, mode=mode, batch=B, seq_len=L, tokens_per_s=tokens_per_s,
                   step_time_s=step_time, mfu=mfu(tokens_per_s, flops, peak), flops_per_token=flops,
                   peak_flops=peak, peak_memory_gb=peak_memory(device) / 1e9, timed_steps=steps, **extra)


SAMPLE_MODES = {"plain": {}, "cached": {"use_cache": True}, "parallel": {"threshold": PARALLEL_THRESHOLD},
                "compiled": {"compiled": True}, "parallel-compiled": {"threshold": PARALLEL_THRESHOLD, "compiled": True}}


def sampling_grid(cfg: BenchConfig) -> list[tuple[str, int, int]]:
    """(mode, steps, block_length) settings the sampler accepts; parallel decoding once per block, at
    steps = gen_length (one token per step at least: Fast-dLLM's rule)."""
    grid = []
    for block in cfg.block_lengths:
        if cfg.gen_length % block:
            continue
        blocks = cfg.gen_length // block
        grid += [(mode, s, block) for s in cfg.sample_steps if s % blocks == 0 and s <= cfg.gen_length
                 for mode in ("plain", "cached", "compiled")]
        grid += [("parallel", cfg.gen_length, block), ("parallel-compiled", cfg.gen_length, block)]
    return grid


def _agreement(tokens: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    """Share of generated tokens equal to the eager sampler's for the same settings (None: nothing to compare)."""
    if reference is None or reference.shape != tokens.shape:
        return None
    return float((tokens == reference).float().mean())


def _hf_generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """transformers' `generate` as it comes (greedy, dynamic KV cache), for the AR reference figure."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=[], pad_token_id=0)


@torch.no_grad()
def bench_sampling(model: torch.nn.Module, arm: Arm, cfg: BenchConfig, device: str) -> list[dict]:
    """Generated tokens/s of the arm's sampler: LLaDA's over `sampling_grid` (diffusion), or for AR transformers'
    `generate`, our KV-cached loop and compiled static-cache decoding. Each setting runs twice and the second
    run is timed (the first compiles and warms caches); compiled modes report their agreement with eager."""
    from dlmstudy.sampling import ar_generate, generate

    model.eval()
    if supports_bf16(device):  # bf16 weights, as a model is served (a static KV cache takes the weights' dtype)
        model = model.to(torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, cfg.tokens.mask_token_id, (cfg.sample_batch, cfg.prompt_len), generator=g).to(device)
    common = dict(batch=cfg.sample_batch, seq_len=cfg.prompt_len + cfg.gen_length, prompt_len=cfg.prompt_len,
                  gen_length=cfg.gen_length, mfu=None)
    new_tokens = cfg.sample_batch * cfg.gen_length

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        fn()
        reset_peak_memory(device)
        return _timed(device, fn)

    records = []
    if arm.sampler == "ar":
        runs = {"hf_generate": lambda: _hf_generate(model, prompt, cfg.gen_length),
                "kv_cache": lambda: ar_generate(model, prompt, max_new_tokens=cfg.gen_length),
                "static_compiled": lambda: ar_generate(model, prompt, max_new_tokens=cfg.gen_length, compiled=True)}
        eager = None
        for mode, fn in runs.items():
            seconds, out = timed(fn)
            eager = out if mode == "kv_cache" else eager
            records.append(_record("ar_decode", arm, cfg, device, model, mode=mode, steps=cfg.gen_length,
                                   block_length=1, forward_passes=cfg.gen_length, tokens_per_s=new_tokens / seconds,
                                   step_time_s=seconds, peak_memory_gb=peak_memory(device) / 1e9,
                                   same_tokens_as_eager=_agreement(out, eager) if mode == "static_compiled" else None,
                                   **common))
        return records
    grid = sampling_grid(cfg)
    if not grid:
        raise UserError(f"bench config {cfg.name}: no valid (steps, block_length) for gen_length {cfg.gen_length}")
    eager: dict[tuple, torch.Tensor] = {}
    for mode, steps, block in grid:
        options = SAMPLE_MODES[mode]
        seconds, (out, history) = timed(lambda: generate(
            model, prompt, steps=steps, gen_length=cfg.gen_length, block_length=block,
            mask_id=cfg.tokens.mask_token_id, return_history=True, **options))
        key = (steps, block, options.get("threshold"))
        if not options.get("compiled"):
            eager.setdefault(key, out)
        records.append(_record("sample", arm, cfg, device, model, mode=mode,
                               steps=None if "parallel" in mode else steps, block_length=block,
                               forward_passes=int(history.max()) + 1, tokens_per_s=new_tokens / seconds,
                               step_time_s=seconds, peak_memory_gb=peak_memory(device) / 1e9,
                               same_tokens_as_eager=_agreement(out, eager.get(key)) if options.get("compiled")
                               else None, **common))
    return records


def run_bench(*, device: str = "auto", arms: Iterable[str] = ("llada", "qwen"), configs: Iterable[str] = ("tiny",),
              steps: int = 10, warmup: int = 3, batch_size: int | None = None, seq_len: int | None = None,
              measure: Iterable[str] = DEFAULT_MEASUREMENTS, peak: float | None = None,
              train_modes: Iterable[str] = ("plain",), profile: str | Path | None = None, head_chunk: int = 2048,
              head_kernel: str = "auto", checkpointing: Iterable[bool] = (False,), accumulation: int = 8,
              progress: Callable[[str], None] = print, on_record: Callable[[dict], None] = lambda r: None
              ) -> list[dict]:
    """Benchmark every (config, arm): training, sampling and LoRA SFT records as asked; returns them all.

    SFT measures a config.json's own model (a LLaDA config as LLaDA, a Qwen2 config as Qwen2 AR), a named setting
    once per arm; `batch_size` defaults to the tutorial's 2 there. `on_record` sees each record as it is made."""
    if steps < 1 or warmup < 0 or accumulation < 1:
        raise UserError(f"need --steps >= 1, --warmup >= 0 and --gradient_accumulation_steps >= 1, got {steps}, "
                        f"{warmup} and {accumulation}")
    unknown = set(measure) - set(MEASUREMENTS)
    if unknown:
        raise UserError(f"unknown measurement {sorted(unknown)[0]!r}; use {', '.join(MEASUREMENTS)}")
    device = resolve_device(device)
    arm_list = [get_arm(a) for a in arms]
    settings = [bench_config(c, batch_size=batch_size, seq_len=seq_len) for c in configs]
    if peak is None:
        peak, source = peak_flops(device_name(device)) if device != "cpu" else (None, "no MFU on CPU")
    else:
        source = "--peak_flops"
    progress(f"bench on {device} ({device_name(device)}); MFU peak: {peak or 'none'} ({source})")
    records: list[dict] = []

    def add(*made: dict) -> None:
        for record in made:
            records.append(record)
            on_record(record)

    for cfg in settings:
        for arm in arm_list if {"train", "sample"} & set(measure) else []:
            def fresh() -> torch.nn.Module:
                return build_model(build_config(arm.backbone, cfg.size, cfg.tokens, causal=arm.causal), seed=0).to(device)

            if "train" in measure:
                for mode in train_modes:
                    progress(f"{cfg.name} {arm.name}: training ({mode}), batch {cfg.batch_size} x {cfg.seq_len}")
                    add(bench_training(fresh(), arm, cfg, device, steps=steps, warmup=warmup, peak=peak, mode=mode,
                                       profile=profile, head_chunk=head_chunk, head_kernel=head_kernel))
                    if device == "cuda":
                        torch.cuda.empty_cache()
            model = fresh()
            if "sample" in measure:
                progress(f"{cfg.name} {arm.name}: sampling, batch {cfg.sample_batch}, {cfg.gen_length} new tokens")
                add(*bench_sampling(model, arm, cfg, device))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        if "sft" in measure:
            from dlmstudy.runners.bench_sft import SFT_BATCH, bench_sft, sft_models

            sft_cfg = dataclasses.replace(cfg, batch_size=batch_size or SFT_BATCH)
            for make, arm in sft_models(sft_cfg, arm_list, device):
                for checkpointing_on in checkpointing:
                    progress(f"{cfg.name} {arm.name}: LoRA SFT, batch {sft_cfg.batch_size} x {sft_cfg.seq_len}, "
                             f"gradient checkpointing {'on' if checkpointing_on else 'off'}")
                    add(bench_sft(make(), arm, sft_cfg, device, steps=steps, warmup=warmup, peak=peak,
                                  checkpointing=checkpointing_on, accumulation=accumulation, head_chunk=head_chunk,
                                  head_kernel=head_kernel))
                    gc.collect()  # the model and its optimizer state gone before the next record measures its peak
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return records


def format_records(records: list[dict]) -> str:
    """An aligned text table of benchmark records."""
    head = f"{'config':<12} {'arm':<10} {'measure':<10} {'mode':<17} {'steps':>5} {'passes':>6} {'block':>5} " \
           f"{'batch':>5} {'seq':>5} {'tokens/s':>11} {'step s':>9} {'MFU':>6} {'peak GB':>8} {'same':>5}"
    lines = [head]
    for r in records:
        mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        same = f"{r['same_tokens_as_eager']:.0%}" if r.get("same_tokens_as_eager") is not None else "-"
        lines.append(f"{r['config'][:12]:<12} {r['arm']:<10} {r['measurement']:<10} {r.get('mode', '-'):<17} "
                     f"{r.get('steps') or '-':>5} {r.get('forward_passes', '-'):>6} {r.get('block_length', '-'):>5} "
                     f"{r['batch']:>5} {r['seq_len']:>5} "
                     f"{r['tokens_per_s']:>11,.0f} {r['step_time_s']:>9.4f} {mfu_text:>6} {r['peak_memory_gb']:>8.2f} "
                     f"{same:>5}")
    return "\n".join(lines)


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write the records as a JSON list (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, records)
