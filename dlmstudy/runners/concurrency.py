"""How many small runs should share one device: study throughput with K = 1, 2, 4, 8 runs at once.

    python -m dlmstudy.runners.concurrency --corpus .gpu/en-docs.jsonl.xz --out $OUT

For each model size (non-embedding parameter targets, matched as a study matches them) and each K,
a study of K equal short runs (`training.max_steps`; the runs differ only in their unique-token
prefix, so their ids differ) goes through the scheduler with `--workers K --runs_per_device K` on
one device, the data-constrained study's shapes otherwise: vocabulary 8192, sequence 512, batch
64, its learning rate and schedule. The shared data are prepared once and every study reads them.

Study throughput is the sum over runs of each run's steady training speed, the median of the
tokens/s its trainer logged over the middle half of its steps (when all K train together); the
gain is that over K = 1. The wall-clock figure (all training tokens over the study's wall time,
start-up and evaluation included) is given beside it. Results go to OUT/concurrency.json and
OUT/concurrency.md after every study, so a cut-short measurement keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dlmstudy.atomic import write_json_atomic, write_text_atomic
from dlmstudy.runners.device import device_name, resolve_device
from dlmstudy.study.plan import short_count
from dlmstudy.study.spec import parse_spec
from dlmstudy.training.tracking import read_scalars


def study_raw(name: str, *, corpus: str, runs_dir: str, arm: str, params: int, runs: int, steps: int) -> dict:
    """A study of `runs` equal runs of `steps` steps at one size (the data-constrained study's settings)."""
    L, batch = 512, 64
    unique = [(1 << 20) - i * L for i in range(runs)]  # distinct prefixes: distinct run ids, the same work
    return {
        "name": name, "seed": 0, "device": "auto", "runs_dir": runs_dir, "tracking": {"report_to": "none"},
        "tokenizer": {"kind": "bpe", "vocab_size": 8192, "sample_bytes": 8 << 20},
        "data": {"pretrain": {"source": f"{corpus}[train:4000]", "text_field": "text"},
                 "validation_tokens": 16384, "max_length": L, "num_proc": 8},
        "arms": [arm], "model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4},
        "grid": {"params": [params], "unique_tokens": unique, "epochs": [64] * runs, "pairing": "zip"},
        "training": {"per_device_train_batch_size": batch, "learning_rate": 2e-3, "warmup_steps": 0.05,
                     "lr_scheduler_type": "cosine", "weight_decay": 0.1, "max_steps": steps, "eval_every": steps,
                     "eval_batches": 1, "save_steps": steps, "logging_steps": max(1, steps // 30)},
        "evaluation": {"mc_num": 1, "qa_people": 0, "batch_size": 64},
    }


def steady_tokens_per_s(run_dir: Path) -> float:
    """Median logged training tokens/s over the middle half of a run's steps."""
    rows = [r for r in read_scalars(run_dir) if "tokens_per_s" in r]
    last = max(r["step"] for r in rows)
    middle = [r["tokens_per_s"] for r in rows if last / 4 <= r["step"] <= 3 * last / 4] or [r["tokens_per_s"]
                                                                                           for r in rows]
    return statistics.median(middle)


def measure(args: argparse.Namespace) -> list[dict]:
    from dlmstudy.runners.scheduler import LocalBackend, execute_study
    from dlmstudy.runners.study import study_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    runs_dir = str(Path(args.runs_dir).resolve())
    shared = None
    rows = []
    for params in args.sizes:
        for k in args.workers:
            name = f"concurrency-{args.arm}-{short_count(params)}-k{k}"
            spec = parse_spec(study_raw(name, corpus=str(Path(args.corpus).resolve()), runs_dir=runs_dir,
                                        arm=args.arm, params=params, runs=k, steps=args.steps))
            cache = study_dir(spec) / "_cache"
            if shared is not None and not cache.exists():  # the first study prepared the data; the others read them
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.symlink_to(shared, target_is_directory=True)
            shared = shared or cache
            backend = LocalBackend(spec, device=device, workers=k, runs_per_device=k,
                                   devices=None if device == "cpu" else [args.device_id])
            started = time.time()
            outcome = execute_study(spec, backend, progress=print)
            wall = time.time() - started
            results = outcome.finished
            if outcome.failed or len(results) != k:
                print(f"{name}: {len(outcome.failed)} runs failed; see their logs")
                continue
            steady = sum(steady_tokens_per_s(study_dir(spec) / r["run_id"]) for r in results)
            base = next((r["study_tokens_per_s"] for r in rows if r["params_target"] == params and r["runs"] == 1),
                        None)
            rows.append({"device_name": device_name(device), "arm": args.arm, "params_target": params,
                         "params_non_embedding": results[0]["params_non_embedding"], "runs": k, "steps": args.steps,
                         "batch": 64, "seq_len": 512, "study_tokens_per_s": steady,
                         "gain_over_one": steady / base if base else (1.0 if k == 1 else None),
                         "per_run_tokens_per_s": steady / k, "wall_s": wall,
                         "wall_tokens_per_s": sum(r["steps"] * r["tokens_per_step"] for r in results) / wall,
                         "date": time.strftime("%Y-%m-%d")})
            write_json_atomic(out / "concurrency.json", rows)
            write_text_atomic(out / "concurrency.md", table(rows))
            print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    """The measurements as a markdown table."""
    lines = ["| device | arm | non-emb params | runs at once | study tokens/s (steady) | gain over 1 | "
             "per run | wall-clock tokens/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gain = f"{r['gain_over_one']:.2f}x" if r["gain_over_one"] else "-"
        lines.append(f"| {r['device_name']} | {r['arm']} | {short_count(r['params_non_embedding'])} | {r['runs']} | "
                     f"{r['study_tokens_per_s']:,.0f} | {gain} | {r['per_run_tokens_per_s']:,.0f} | "
                     f"{r['wall_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dlmstudy.runners.concurrency", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="the en-docs corpus (.jsonl.xz)")
    p.add_argument("--out", required=True, help="folder for concurrency.json and concurrency.md")
    p.add_argument("--runs_dir", default="runs", help="where the short studies' runs go (default runs)")
    p.add_argument("--sizes", type=int, nargs="+", default=[3_000_000, 10_000_000],
                   help="non-embedding parameter targets (default 3M and 10M, the data-constrained study's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="runs at once (default 1 2 4 8)")
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument("--arm", default="llada", help="the arm every run trains (default llada)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    p.add_argument("--device_id", type=int, default=0, help="the one device every run shares (default 0)")
    measure(p.parse_args(argv))


if __name__ == "__main__":
    main()
