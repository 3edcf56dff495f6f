"""The `dlmstudy` command: parses arguments and calls into the packages, nothing more.

Errors in user input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path

from dlmstudy import __version__
from dlmstudy.errors import UserError

DEFAULT_SPEC = "studies/smoke.yaml"


def default_spec() -> str:
    """studies/smoke.yaml in the working directory, else the copy shipped inside the package."""
    if Path(DEFAULT_SPEC).exists():
        return DEFAULT_SPEC
    return str(resources.files("dlmstudy") / "studies" / "smoke.yaml")


def cmd_run(a: argparse.Namespace) -> None:
    from dlmstudy.reports.render import build_report
    from dlmstudy.runners.launch import is_launched, process_rank, relaunch
    from dlmstudy.runners.queue import run_queue
    from dlmstudy.runners.run import Interrupted
    from dlmstudy.study.spec import load_spec
    from dlmstudy.training.tracking import check_tracking

    spec = load_spec(a.spec or default_spec())
    check_tracking(spec.tracking)  # online without a login: one line before any data is prepared
    if a.workers is not None or a.slurm:
        return run_scheduled(a, spec)
    if a.num_processes > 1 and not is_launched():
        raise SystemExit(relaunch(a.argv, num_processes=a.num_processes, config=a.launch_config,
                                  device=a.device or spec.device))
    try:
        run_queue(spec, only=a.only, device=a.device, max_minutes=a.max_minutes)
    except Interrupted as stop:
        print(f"dlmstudy: {stop}", file=sys.stderr)
        raise SystemExit(143) from None
    if process_rank() == 0:
        out = build_report(Path(spec.runs_dir) / spec.name, Path(spec.reports_dir) / spec.name)
        print(f"report: {out} (and report.html beside it)")


SLURM_FLAGS = ("partition", "account", "qos", "time", "gpus_per_run", "cpus_per_run", "mem_gb", "constraint",
               "array_parallelism")


def run_scheduled(a: argparse.Namespace, spec) -> None:
    """`run --workers N` (processes on this machine) or `run --slurm` (jobs), through submitit; then the report."""
    from dlmstudy.reports.render import build_report
    from pydantic import ValidationError

    from dlmstudy.runners.device import resolve_device
    from dlmstudy.runners.scheduler import LocalBackend, SlurmBackend, execute_study
    from dlmstudy.study.spec import ClusterSpec

    if a.num_processes > 1:
        raise UserError("--num_processes trains one run on several devices; with --workers or --slurm each run "
                        "has its own device")
    if a.workers is not None and a.slurm:
        raise UserError("--workers and --slurm: choose one (--workers runs here, --slurm submits jobs)")
    if a.slurm:
        given = {k: getattr(a, f"slurm_{k}") for k in SLURM_FLAGS if getattr(a, f"slurm_{k}") is not None}
        try:
            cluster = ClusterSpec.model_validate({**(spec.cluster or ClusterSpec()).model_dump(), **given})
        except ValidationError as err:
            first = err.errors()[0]
            raise UserError(f"--slurm_{first['loc'][0]} {first['input']!r}: "
                            f"{first['msg'].removeprefix('Value error, ')}") from None
        backend = SlurmBackend(spec, cluster)
    else:
        try:
            devices = [int(d) for d in a.devices.split(",")] if a.devices else None
        except ValueError:
            raise UserError(f"--devices {a.devices}: give device numbers, e.g. 0,1") from None
        backend = LocalBackend(spec, device=resolve_device(a.device or spec.device), workers=a.workers,
                               runs_per_device=a.runs_per_device, devices=devices)
    try:
        outcome = execute_study(spec, backend, only=a.only, max_minutes=a.max_minutes)
    except KeyboardInterrupt:
        print("dlmstudy: interrupted; " + ("the Slurm jobs go on: run the same command again to follow them"
              if a.slurm else "each run resumes from its last complete checkpoint next time"), file=sys.stderr)
        raise SystemExit(130) from None
    if outcome.finished:
        out = build_report(Path(spec.runs_dir) / spec.name, Path(spec.reports_dir) / spec.name)
        print(f"report: {out} (and report.html beside it)")
    if outcome.interrupted:
        print("dlmstudy: stopped on a signal; the runs in flight saved a checkpoint; run again to resume",
              file=sys.stderr)
        raise SystemExit(143)
    if outcome.failed:
        print(f"dlmstudy: {len(outcome.failed)} run(s) failed (their logs are named above; dlmstudy status "
              f"{a.spec or default_spec()}); run again to retry them", file=sys.stderr)
        raise SystemExit(1)


def cmd_status(a: argparse.Namespace) -> None:
    from dlmstudy.runners.status import format_states, states_json, study_states
    from dlmstudy.study.spec import load_spec

    rows = study_states(load_spec(a.spec or default_spec()), only=a.only)
    print(states_json(rows) if a.json else format_states(rows))


def cmd_plan(a: argparse.Namespace) -> None:
    from dlmstudy.runners.planning import estimate_runs, plan_study
    from dlmstudy.study.estimate import SHIPPED_BENCH, format_duration, load_bench
    from dlmstudy.study.plan import short_count
    from dlmstudy.study.spec import load_spec

    spec = load_spec(a.spec or default_spec())
    plan = plan_study(spec)
    if a.calibrate:
        from dlmstudy.runners.calibration import cache_file, calibrate
        from dlmstudy.runners.device import device_name, resolve_device

        if a.bench:
            raise UserError("--calibrate times the runs on this machine and --bench by a file: give one of them")
        device = resolve_device(a.device or spec.device)
        records = calibrate(spec, plan.runs, device, progress=lambda m: print(m, file=sys.stderr))
        source = f"a calibration on this machine ({device_name(device)}; cached in {cache_file(device)})"
    else:
        device = a.device or "cuda"
        bench = a.bench or (SHIPPED_BENCH if SHIPPED_BENCH.is_file() else None)
        records = load_bench(bench) if bench else []
        source = bench or "no bench file (pass --bench FILE or --calibrate)"
    estimates = estimate_runs(spec, plan.runs, records, device_name=a.device_name, device=device)
    rows = [{"stage": "pretrain", "run_id": r.run_id if plan.exact_ids else None, "label": r.run_id,
             "arm": r.arm.name, "params_total": r.params.total, "params_non_embedding": r.params.non_embedding,
             "unique_tokens": r.unique_tokens, "epochs": round(r.epochs, 3), "total_tokens": r.total_tokens,
             "n_matmul": e.n_matmul, "flops": e.flops, "flops_per_token": e.flops_per_token, "est_seconds": e.seconds,
             "eval_tokens": e.eval_tokens, "est_eval_seconds": e.eval_seconds, "est_total_seconds": e.total_seconds,
             "bench_record": e.record.describe() if e.record else None} for r, e in zip(plan.runs, estimates)]
    sft_rows = [{"stage": "sft", "run_id": r.run_id if plan.exact_ids or r.parent is None else None,
                 "label": r.run_id if r.parent is None else r.run_id.rsplit("_", 1)[0], "arm": r.arm.name,
                 "base": str(r.base) if r.parent is None else f"pretraining run {r.parent}", "parent": r.parent,
                 "sft_epochs": r.epochs, "lora_r": r.sft.r if r.sft and r.sft.lora else None} for r in plan.sft_runs]
    if a.json:
        print(json.dumps(rows + sft_rows, indent=2))
        for m in plan.missing:
            print(f"missing: {m}", file=sys.stderr)
        return
    print(f"study {spec.name}: {len(rows)} pretraining runs" + (f", {len(sft_rows)} SFT runs" if sft_rows else ""))
    print(plan.vocabulary)
    for target in dict.fromkeys(r.config.get("params_target") for r in plan.runs):
        ne = [r.params.non_embedding for r in plan.runs if r.config.get("params_target") == target]
        size = f"size target {target:,}: " if target else ""
        print(f"{size}non-embedding parameters {min(ne):,} to {max(ne):,} across arms "
              f"(deviation {max(ne) / min(ne) - 1:.2%}, tolerance {spec.model.match_tolerance:.0%})")
    if rows:
        print("FLOPs = 6 N D, N = matmul weights with the output head (as dlmstudy bench counts; the report's "
              "FLOPs use non-embedding N)")
        print(f"time: training steps and validation passes on one device (no checkpoints, QA sampling or start-up), "
              f"from {source}")
        print(f"{'run':<40} {'arm':<12} {'params':>8} {'non-emb':>8} {'unique':>8} {'epochs':>7} {'total':>8} "
              f"{'FLOPs':>8} {'time':>8}")
    for r in rows:
        print(f"{r['run_id'] or r['label']:<40} {r['arm']:<12} {short_count(r['params_total']):>8} "
              f"{short_count(r['params_non_embedding']):>8} {short_count(r['unique_tokens']):>8} {r['epochs']:>7g} "
              f"{short_count(r['total_tokens']):>8} {r['flops']:>8.3g} {format_duration(r['est_total_seconds']):>8}")
    if rows and not plan.exact_ids:
        print("run ids: labels only; the hash that ends each id covers the data, fixed when they are tokenized")
    for (arm, objective, record), e in {(r.arm.name, r.arm.objective, e.record): e
                                        for r, e in zip(plan.runs, estimates)}.items():
        if record is None:
            where = f" on {a.device_name}" if a.device_name else ""
            print(f"time of {arm}: no bench record of objective {objective}{where}")
            continue
        print(f"time of {arm}: {record.describe()}; at {e.flops_per_token / 1e6:,.0f}M FLOPs/token "
              f"{e.tokens_per_s:,.0f} tokens/s")
        if e.batch < record.batch:
            print(f"  the run steps {e.batch} sequences per device, the record {record.batch}: "
                  "smaller batches run below the record's MFU, so read the time as a lower bound")
        elif e.batch > record.batch:
            print(f"  the run steps {e.batch} sequences per device, the record {record.batch}: "
                  "larger batches usually run faster, so read the time as an upper bound")
    if rows:
        known = [e.total_seconds for e in estimates if e.total_seconds is not None]
        time = f", about {format_duration(sum(known))} on one device" if len(known) == len(rows) else ""
        print(f"total: {short_count(sum(r['total_tokens'] for r in rows))} tokens, "
              f"{sum(e.flops for e in estimates):.3g} FLOPs{time}")
    for r in sft_rows:
        lora = f", LoRA r {r['lora_r']}" if r["lora_r"] else ", full fine-tuning"
        print(f"{r['run_id'] or r['label']:<40} {r['arm']:<12} SFT {r['sft_epochs']} epochs from {r['base']}{lora}; "
              "time not estimated (its rows and the base model's speed are known only once loaded)")
    for m in plan.missing:
        print(f"missing: {m}")


def cmd_report(a: argparse.Namespace) -> None:
    from dlmstudy.reports.render import build_report

    folder = Path(a.runs_dir)
    if not (folder / "study.json").exists():
        raise UserError(f"{folder}: not a study folder (no study.json); give runs/<study>")
    out = build_report(folder, Path(a.out) if a.out else Path("reports") / folder.name)
    print(f"report: {out}")


def cmd_params(a: argparse.Namespace) -> None:
    from dlmstudy.models.params import describe_config, format_counts

    counts = describe_config(a.config)
    print(json.dumps(counts.as_dict(), indent=2) if a.json else format_counts(counts))


def cmd_init_model(a: argparse.Namespace) -> None:
    from dlmstudy.runners.init_model import init_model

    out = init_model(a.config, a.out, dtype=a.dtype, shard_size=a.shard_size, device=a.device, seed=a.seed,
                     tokenizer=a.tokenizer)
    print(f"model folder: {out} (random weights: for loading, memory and speed, not quality)")


def cmd_bench(a: argparse.Namespace) -> None:
    from dlmstudy.runners.bench import format_records, run_bench, write_records

    made: list[dict] = []

    def keep(record: dict) -> None:  # each record reaches --json as soon as it is measured
        made.append(record)
        if a.json:
            write_records(made, a.json)

    records = run_bench(device=a.device, arms=a.arms, configs=a.config, steps=a.steps, warmup=a.warmup,
                        batch_size=a.batch_size, seq_len=a.seq_len, measure=a.measure, peak=a.peak_flops,
                        train_modes=a.train_modes, profile=a.profile, head_chunk=a.head_chunk,
                        head_kernel=a.head_kernel, checkpointing=[c == "on" for c in a.gradient_checkpointing],
                        accumulation=a.gradient_accumulation_steps, on_record=keep)
    print(format_records(records))
    if a.json:
        print(f"records: {write_records(records, a.json)}")


def cmd_eval(a: argparse.Namespace) -> None:
    from dlmstudy.evaluation.hub import offline_reason

    offline = offline_reason(a.offline)
    if offline and offline.startswith("no network"):
        print(f"dlmstudy: lm_eval runs offline ({offline}): hub tasks need their datasets in the local "
              "Hugging Face cache", file=sys.stderr)
    from dlmstudy.evaluation.harness import run_eval
    from dlmstudy.runners.device import resolve_device

    results = run_eval(a.checkpoint, [t for t in a.tasks.split(",") if t], model=a.model,
                       include_path=a.include_path, model_args=a.model_args, output_path=a.output_path,
                       log_samples=a.log_samples, apply_chat_template=a.apply_chat_template,
                       device=resolve_device(a.device), limit=int(a.limit) if a.limit and a.limit >= 1 else a.limit,
                       num_fewshot=a.num_fewshot, gen_kwargs=a.gen_kwargs, batch_size=a.batch_size,
                       max_batch_size=a.max_batch_size, offline=offline, allow_code=a.allow_code)
    if results is None:
        return
    for task, metrics in sorted(results.get("results", {}).items()):
        shown = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if a.output_path:
        print(f"results: {a.output_path}")


def cmd_import_dllm(a: argparse.Namespace) -> None:
    from dlmstudy.atomic import write_text_atomic
    from dlmstudy.study.dllm_import import import_dllm

    imported = import_dllm(a.config, stage=a.stage, arms=a.arms, tokens_per_document=a.tokens_per_document)
    text = imported.text(a.config)
    if a.output is None:  # the lines head the spec as comments
        print(text, end="")
        return
    write_text_atomic(Path(a.output), text)
    print("\n".join(imported.lines))
    print(f"spec: {a.output} (dlmstudy plan {a.output})")


def cmd_merge_lora(a: argparse.Namespace) -> None:
    from dlmstudy.training.merge import merge_lora

    print(f"merged: {merge_lora(a.lora_path, a.base_model_path, a.merge_path)}")


def _chatbot(a: argparse.Namespace):
    from dlmstudy.sampling.chat import Chatbot, DecodeOptions

    return Chatbot.load(a.model_name_or_path, options=DecodeOptions.from_flags(vars(a)), device=a.device,
                        seed=a.seed, chat_template=a.chat_template)


def cmd_generate(a: argparse.Namespace) -> None:
    bot = _chatbot(a)
    reply = bot.reply([{"role": "user", "content": a.prompt}])
    print(reply.text)
    if a.show_steps:
        print("\n".join(bot.step_lines(reply)))
    if a.show_speed:
        print(reply.speed_line(), file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> None:
    from dlmstudy.sampling.chat import run_chat, terminal_lines

    bot = _chatbot(a)
    print(f"chat with {a.model_name_or_path} (arm {bot.arm.name}, {bot.arm.sampler} sampler); "
          "exit, quit or EOF ends, /clear forgets the history", file=sys.stderr)
    run_chat(bot, terminal_lines(), lambda line: print(line, flush=True), show_steps=a.show_steps,
             show_speed=a.show_speed)


class Typed(argparse.Action):
    """Stores the value and remembers the flag as typed (`--max_new_tokens`), so that errors name that flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.typed = {**(getattr(namespace, "typed", None) or {}), self.dest: option_string}


# The sampler's names for the decoding flags (gen_length, cfg_scale, ...), by flag destination.
SAMPLER_NAMES = {"max_length": ("gen_length", "max_new_tokens", "max_length"), "block_length": ("block_length",),
                 "cfg": ("cfg_scale", "cfg")}


def as_typed(message: str, typed: dict[str, str]) -> str:
    """An error message with the sampler's names replaced by the flags the user typed (or their first names)."""
    for dest, names in SAMPLER_NAMES.items():
        flag = typed.get(dest, f"--{dest}")
        message = re.sub(rf"(?<![\w-])(?:--)?(?:{'|'.join(names)})(?!\w)", flag, message)
    return message


def add_decoding_flags(s: argparse.ArgumentParser) -> None:
    """Flags of generate and chat; the diffusion-only and AR-only ones default to None ("not given").

    dllm's and transformers' names are accepted beside ours: --max_new_tokens and --gen_length for
    --max_length, --block_size for --block_length, --cfg_scale for --cfg."""
    s.add_argument("--model_name_or_path", required=True,
                   help="checkpoint, finished run, LLaDA or HF Qwen2/Llama folder")
    s.add_argument("--max_length", "--gen_length", "--max_new_tokens", dest="max_length", type=int, default=128,
                   action=Typed, help="tokens to generate (default 128)")
    s.add_argument("--steps", type=int, help="diffusion: sampling steps (default max_length)")
    s.add_argument("--block_length", "--block_size", dest="block_length", type=int, action=Typed,
                   help="diffusion: block length (default min(32, max_length))")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--cfg", "--cfg_scale", dest="cfg", type=float, action=Typed,
                   help="diffusion: classifier-free guidance scale (default 0)")
    s.add_argument("--remasking", choices=["low_confidence", "random"], help="diffusion (default low_confidence)")
    s.add_argument("--threshold", type=float, help="diffusion, Fast-dLLM: commit every token at least this confident "
                   "(and never fewer than keep each block within its steps)")
    s.add_argument("--use_cache", action="store_true", default=None,
                   help="diffusion, Fast-dLLM: per-block prefix KV cache")
    s.add_argument("--logits_eos_inf", action="store_true", default=None,
                   help="diffusion, LLaDA: never generate EOS (or SFT padding); answers end at <|im_end|>")
    s.add_argument("--confidence_eos_eot_inf", action="store_true", default=None,
                   help="diffusion, LLaDA: commit EOS and <|im_end|> after every other position of a block "
                        "(default with low_confidence remasking)")
    s.add_argument("--no_confidence_eos_eot_inf", dest="confidence_eos_eot_inf", action="store_false", default=None,
                   help="diffusion: commit end tokens by their confidence like any other token")
    s.add_argument("--top_p", type=float, help="AR: nucleus sampling (default 1)")
    s.add_argument("--compiled", action="store_true",
                   help="torch.compile + CUDA graphs: the same tokens, faster on GPUs after a compile per shape "
                        "(AR: greedy only)")
    s.add_argument("--chat_template", action="store_true", default=True,
                   help="wrap the prompt in the tokenizer's chat template (default)")
    s.add_argument("--no_chat_template", dest="chat_template", action="store_false",
                   help="raw prompts; chat then answers each line alone")
    s.add_argument("--show_steps", action="store_true",
                   help="after each answer, show it step by step as it was unmasked")
    s.add_argument("--show_speed", action="store_true",
                   help="after each answer, its generated tokens, steps, seconds and tokens/s (generate: on stderr)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(decoding=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlmstudy", description="Matched studies of masked-diffusion (LLaDA) "
                                "and autoregressive (Qwen2) language models.")
    p.add_argument("--version", action="version", version=f"dlmstudy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="train and evaluate every run of a study, then write its report")
    s.add_argument("spec", nargs="?", help=f"study spec YAML (default {DEFAULT_SPEC})")
    s.add_argument("--only", action="append", help="select runs: arm=NAME, unique_tokens=N, epochs=R, stage=pretrain|sft, run_id=PREFIX")
    s.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], help="override the spec's device")
    s.add_argument("--max_minutes", type=float, help="start no new run after this many minutes (chunked work)")
    s.add_argument("--num_processes", type=int, default=1,
                   help="train each run on N devices (re-runs this command under accelerate launch)")
    s.add_argument("--launch_config", help="ddp, fsdp2, zero2, multi-npu or an accelerate config file "
                   "(default ddp; multi-npu on npu)")
    s.add_argument("--workers", type=int, help="train up to N runs at once, each in its own process pinned to a "
                   "device (submitit's local executor)")
    s.add_argument("--runs_per_device", type=int, help="with --workers: runs sharing one device (default by size)")
    s.add_argument("--devices", help="with --workers: device ids to use, e.g. 0,1 (default: every visible one)")
    s.add_argument("--slurm", action="store_true", help="submit each run as a Slurm job (submitit), with the "
                   "spec's cluster: section; waits for them, then writes the report")
    for key in SLURM_FLAGS:
        s.add_argument(f"--slurm_{key}", type=int if key in ("gpus_per_run", "cpus_per_run", "array_parallelism")
                       else float if key == "mem_gb" else str, help=f"override cluster.{key}")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="each run's state (done, diverged, running, queued, failed, waiting, pending)")
    s.add_argument("spec", nargs="?", help=f"study spec YAML (default {DEFAULT_SPEC})")
    s.add_argument("--only", action="append", help="select runs, as for run")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("plan", help="print the expanded run matrix without training")
    s.add_argument("spec", nargs="?", help=f"study spec YAML (default {DEFAULT_SPEC})")
    s.add_argument("--json", action="store_true", help="print JSON rows (missing inputs go to stderr)")
    s.add_argument("--bench", help="dlmstudy bench --json file to time the runs by (default: the shipped H200 records)")
    s.add_argument("--device_name", help="time by bench records of this device only (a substring, e.g. H200)")
    s.add_argument("--calibrate", action="store_true", help="time a few training steps of each arm and size on this "
                   "machine (cached per device) and estimate the study by them: CPU and NPU have no shipped records")
    s.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"],
                   help="the device to calibrate on (default: the spec's)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("report", help="rebuild a study's report from its run folders (never retrains)")
    s.add_argument("runs_dir", help="runs/<study>")
    s.add_argument("--out", help="output folder (default reports/<study>)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("eval", help="evaluate a checkpoint or finished run with lm_eval (online when you are)")
    s.add_argument("--checkpoint", help="checkpoint folder or finished run folder (or pretrained= in --model_args)")
    s.add_argument("--model", help="lm_eval model name: dlmstudy (the checkpoint's arm decides, default), "
                   "llada or dlmstudy_mdm (diffusion), dlmstudy_ar or hf (AR)")
    s.add_argument("--tasks", required=True, help="comma-separated lm_eval task names, e.g. bio_qa_forward,bio_mc")
    s.add_argument("--include_path", help="folder of local lm_eval task YAMLs (the built-in bio tasks need none)")
    s.add_argument("--model_args", default="", help="e.g. mc_num=1,max_length=1024,steps=256,block_size=64,cfg=0.0")
    s.add_argument("--num_fewshot", type=int, help="examples in each prompt's few-shot context (default: the task's)")
    s.add_argument("--gen_kwargs", help="generation arguments updating the tasks', e.g. temperature=0,max_gen_toks=64")
    s.add_argument("--batch_size", help="rows per forward pass: an integer, or auto (= --max_batch_size); "
                   "default: the model's (diffusion 32, AR 16)")
    s.add_argument("--max_batch_size", type=int, help="the batch size that --batch_size auto takes (given alone: "
                   "--batch_size auto)")
    s.add_argument("--output_path", help="where results.json and samples_<task>.jsonl go")
    s.add_argument("--log_samples", action="store_true")
    s.add_argument("--apply_chat_template", action="store_true")
    s.add_argument("--limit", type=float, help="at most this many items per task (a fraction if < 1)")
    s.add_argument("--allow_code", action="store_true",
                   help="let task YAMLs run their !function hooks (lm_eval imports that code from the task folder)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    s.add_argument("--offline", action="store_true", help="never reach the Hub: hub tasks need their datasets in "
                   "the local cache (also with HF_HUB_OFFLINE=1, and when there is no network)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("import-dllm", help="a dllm or tutorial training YAML as a study spec, with a line for "
                       "every key it maps or drops")
    s.add_argument("config", help="the dllm YAML, e.g. configs/llada-100M-pt-npu.yaml")
    s.add_argument("-o", "--output", help="write the spec here (default: print it, headed by the lines as comments)")
    s.add_argument("--stage", default="auto", choices=["auto", "pretrain", "sft"],
                   help="auto: sft when the file has LoRA keys, else pretrain")
    s.add_argument("--arms", nargs="+", help="the study's arms (default: the file's own model, e.g. llada; "
                   "add qwen to compare)")
    s.add_argument("--tokens_per_document", type=int, default=524,
                   help="to size the grid from dataset_args' train:N documents (default 524, the tutorial's C4)")
    s.set_defaults(func=cmd_import_dllm)

    s = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a plain checkpoint, no peft needed")
    s.add_argument("--lora_path", required=True, help="adapter folder (adapter_config.json)")
    s.add_argument("--base_model_path", required=True, help="the base model the adapter was trained on")
    s.add_argument("--merge_path", required=True, help="new folder for the merged checkpoint")
    s.set_defaults(func=cmd_merge_lora)

    s = sub.add_parser("params", help="parameter counts of a LLaDA or Qwen2 config.json, without weights")
    s.add_argument("config", help="config.json")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("init-model", help="write a model folder with a real config and random weights "
                       "(safetensors shards), to smoke-test a machine before downloading weights")
    s.add_argument("--config", required=True,
                   help="llada-8b, qwen2.5-7b (shipped configs) or a LLaDA, Qwen2 or Llama config.json")
    s.add_argument("--out", required=True, help="new folder to write")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights' dtype (default bf16)")
    s.add_argument("--shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"],
                   help="where the random weights are drawn (default: an accelerator if there is one)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizer", help="tokenizer folder to include (default: a byte-level tokenizer with the "
                   "config's special ids)")
    s.set_defaults(func=cmd_init_model)

    s = sub.add_parser("bench", help="training and sampling throughput (tokens/s, step time, MFU, memory) of the arms")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    s.add_argument("--arms", nargs="+", default=["llada", "qwen"], help="arms to measure (default llada qwen)")
    s.add_argument("--config", nargs="+", default=["tiny"],
                   help="tiny, small, seed-100m, llada-8b, qwen2.5-7b or a config.json (default tiny)")
    s.add_argument("--steps", type=int, default=10, help="timed training steps after warm-up (default 10)")
    s.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    s.add_argument("--batch_size", type=int, help="override the config's training batch")
    s.add_argument("--seq_len", type=int, help="override the config's training sequence length")
    s.add_argument("--measure", nargs="+", default=["train", "sample"], choices=["train", "sample", "sft"],
                   help="train, sample (default both) and sft: LoRA SFT at the tutorial's settings (batch 2 unless "
                   "--batch_size; a config.json's own model and arm)")
    s.add_argument("--gradient_checkpointing", nargs="+", default=["off"], choices=["off", "on"],
                   help="sft: without and/or with gradient checkpointing (default off)")
    s.add_argument("--gradient_accumulation_steps", type=int, default=8,
                   help="sft: micro-batches per optimizer step (default 8, the tutorial's)")
    s.add_argument("--peak_flops", type=float, help="peak FLOP/s for MFU (default: the device table)")
    s.add_argument("--train_modes", nargs="+", default=["plain"],
                   choices=["plain", "fast", "fast-compiled", "fast-graphs", "fast-liger"],
                   help="training paths to time (default plain)")
    s.add_argument("--head_chunk", type=int, default=2048, help="rows of logits per chunk on the fast paths (default 2048)")
    s.add_argument("--head_kernel", default="auto", choices=["auto", "triton", "torch"],
                   help="after each head chunk's matmul: the Triton kernel, torch ops, or auto (Triton on CUDA)")
    s.add_argument("--json", help="write the records to this JSON file")
    s.add_argument("--profile", help="folder: profile 5 more training steps per record with torch.profiler and "
                   "write each operator table there")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("generate", help="answer one prompt with a model (diffusion or AR), as the tutorial's generate")
    s.add_argument("--prompt", required=True)
    add_decoding_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="multi-turn terminal chat with a model; reads stdin line by line")
    add_decoding_flags(s)
    s.set_defaults(func=cmd_chat)
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = False  # `plan --device_n cuda` must not silently mean `--device_name cuda`
    for parser in sub.choices.values():
        parser.set_defaults(command_parser=parser, typed={}, decoding=bool(parser.get_default("decoding")))
    return p


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the subcommand's own usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.func is not cmd_eval:  # eval decides for itself: online when the user is (evaluation/hub.py)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        args.func(args)
    except UserError as err:
        message = as_typed(str(err), args.typed) if args.decoding else str(err)
        for line in message.splitlines():  # a spec reports every problem, one line each
            print(f"dlmstudy: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
