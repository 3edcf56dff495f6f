"""`dlmstudy plan --calibrate`: time a few training steps of each arm and size of a study on this machine, cache
the figures, and time the study's runs by them (the shipped records are an H200's; CPUs and NPUs have none).

Each (arm, model shape, vocabulary, sequence length, training path) of the plan is built with random weights
and trained on random tokens for a few steps, timed as `dlmstudy bench` times them (runners/bench.py), the
fastest of three timings of about a second each: on CPU at most CPU_TOKENS_PER_STEP tokens a step (seconds to
a few minutes per shape), on an accelerator at the run's own batch. The records are cached per device in
<cache>/calibration/<device>.json (DLMSTUDY_CACHE, else ~/.cache/dlmstudy) under a key of everything that
sets the speed, torch's version included, so a second plan measures nothing; a damaged cache file is set
aside and measured again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from dlmstudy.atomic import write_json_atomic
from dlmstudy.evaluation.tasks import cache_root
from dlmstudy.models.backbones import SpecialTokens, build_config, build_model
from dlmstudy.runners.bench import BenchConfig, bench_training
from dlmstudy.runners.device import device_name
from dlmstudy.runners.run import default_arguments
from dlmstudy.runners.study import Run
from dlmstudy.study.estimate import BenchRecord, bench_record
from dlmstudy.study.spec import StudySpec

CPU_TOKENS_PER_STEP = 2048
REPEATS, SECONDS_PER_REPEAT, MAX_STEPS = 3, 1.0, 50
COMPILED_STEPS = (3, 5)  # (warm-up, timed) of the compiled paths: compiling again per timing would cost minutes


def training_mode(spec: StudySpec, device: str) -> str:
    """The `dlmstudy bench` training path a study's runs take on `device`."""
    ts = spec.training
    if ts.compile:
        return "fast-graphs" if ts.cuda_graphs and device == "cuda" else "fast-compiled"
    return "fast" if ts.fast_head else "plain"


def cache_file(device: str) -> Path:
    """This device's calibration cache: <cache>/calibration/<device name>.json."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name(device)).strip("-") or device
    return cache_root() / "calibration" / f"{slug}.json"


def _load_cache(path: Path) -> list[dict]:
    """The cached records; a damaged file is renamed to <name>.damaged and the cache starts empty."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        if isinstance(records, list) and all(isinstance(r, dict) and "calibration_key" in r for r in records):
            return records
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    path.replace(path.with_name(path.name + ".damaged"))
    return []


def calibration_batch(run: Run, device: str) -> int:
    """Sequences per calibration step: the run's batch on an accelerator, at most CPU_TOKENS_PER_STEP tokens on CPU."""
    L = run.config["max_length"]
    batch = default_arguments(run.config, run.total_tokens // L, device)["per_device_train_batch_size"]
    return batch if device != "cpu" else max(1, min(batch, CPU_TOKENS_PER_STEP // L))


def _measure(model: torch.nn.Module, run: Run, cfg: BenchConfig, device: str, mode: str, head_chunk: int) -> dict:
    """The fastest of REPEATS timings of about SECONDS_PER_REPEAT each, after one warm-up step (a shared machine's
    noise only slows a timing down); the compiled paths warm up and time once."""
    def timed(steps: int, warmup: int) -> dict:
        return bench_training(model, run.arm, cfg, device, steps=steps, warmup=warmup, mode=mode, head_chunk=head_chunk)

    if mode.endswith(("compiled", "graphs")):
        return timed(COMPILED_STEPS[1], COMPILED_STEPS[0])
    first = timed(1, 1)
    steps = max(1, min(MAX_STEPS, int(SECONDS_PER_REPEAT / first["step_time_s"])))
    return max((timed(steps, 0) for _ in range(REPEATS)), key=lambda r: r["tokens_per_s"])


def calibrate(spec: StudySpec, runs: list[Run], device: str, *,
              progress: Callable[[str], None] = print) -> list[BenchRecord]:
    """One training record per distinct shape of `runs` on `device`, from the cache or measured now (and cached)."""
    path = cache_file(device)
    cached = _load_cache(path)
    by_key = {r["calibration_key"]: r for r in cached}
    mode = training_mode(spec, device)
    out: dict[str, BenchRecord] = {}
    for run in runs:
        tokens = SpecialTokens(**run.config["tokens"])
        L, batch = run.config["max_length"], calibration_batch(run, device)
        key = "|".join(map(str, (device_name(device), run.arm.name, mode, spec.training.head_chunk,
                                 sorted(vars(run.size).items()), tokens.vocab_size, L, batch, torch.__version__)))
        if key in out:
            continue
        if key not in by_key:
            progress(f"calibrating {run.arm.name} ({run.size.hidden_size}d x {run.size.num_layers} layers, "
                     f"batch {batch} x {L}, {mode}) on {device_name(device)}")
            cfg = BenchConfig(f"calibration-{run.arm.name}-d{run.size.hidden_size}", run.size, tokens.vocab_size,
                              L, batch, mask_token_id=tokens.mask_token_id)
            model = build_model(build_config(run.arm.backbone, run.size, tokens, causal=run.arm.causal), seed=0)
            record = _measure(model.to(device), run, cfg, device, mode, spec.training.head_chunk)
            by_key[key] = {**record, "calibration_key": key}
            cached.append(by_key[key])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, cached)
        out[key] = bench_record(by_key[key])
    return list(out.values())
