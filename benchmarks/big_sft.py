"""The tutorial at its real size on one GPU, in one command: LoRA SFT of LLaDA-8B and Qwen2.5-7B shapes.

Random weights throughout (speed and memory, never quality). In order of importance, each figure written to
OUT/big_sft.json and OUT/big_sft.md as soon as it is measured:
  1. `dlmstudy bench --config llada-8b qwen2.5-7b --measure sft` without and with gradient checkpointing
     (peak memory, tokens/s, step time, MFU, an epoch of 2,000 rows); records also in OUT/bench_sft.json;
  2. `dlmstudy init-model` for Qwen2.5-7B, loaded by plain transformers, then removed (disk), and for LLaDA-8B;
  3. `dlmstudy run` of a LoRA SFT of that LLaDA-8B folder (tutorial settings, gradient checkpointing, 32
     generated Alpaca-style rows, 2 epochs = 4 optimizer steps of 2 x 8), stopped with SIGTERM after its first
     logged step, then resumed to the end;
  4. `dlmstudy merge-lora` on its adapter; `dlmstudy generate` (128 steps, blocks of 32) and `chat` with the
     Fast-dLLM options (threshold 0.9, prefix cache) on the merged folder, with tokens/s; `dlmstudy eval` on the
     built-in bio_qa_forward and bio_mc tasks (8 items each).
Every subprocess's output goes to OUT/big_sft.log. A step that would outlast the budget is skipped and says so;
`--parts folders,run,merged` does the rest in a second command.

    python3 benchmarks/big_sft.py --out "$OUT" --work /tmp/big --budget 540
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("model data train answer question river mountain small large quickly because which their about would "
         "there could other people water number little write first between never under while story system "
         "light sound study plant world place house point again group three change great mother animal").split()


class Report:
    """The results so far, rewritten to OUT (JSON and markdown) after every step."""

    def __init__(self, out: Path, budget: float):
        self.out, self.start, self.budget = out, time.time(), budget
        self.data: dict[str, Any] = {"note": "random weights: speed and memory, not quality", "steps": {}}
        self.log = out / "big_sft.log"

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def put(self, step: str, **fields: Any) -> None:
        self.data["steps"].setdefault(step, {}).update(fields)
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        (self.out / "big_sft.json.tmp").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "big_sft.json.tmp").replace(self.out / "big_sft.json")
        (self.out / "big_sft.md").write_text(markdown(self.data))

    def run(self, step: str, args: list[str], *, cap: float, need: float = 30.0) -> subprocess.CompletedProcess | None:
        """`python -m dlmstudy.cli ARGS` with a timeout of min(cap, time left); None (and a note) when too little
        time is left for it."""
        timeout = min(cap, self.left() - 5)
        if timeout < need:
            self.put(step, skipped=f"{self.left():.0f} s left, needs about {need:.0f} s")
            return None
        started = time.time()
        with open(self.log, "a") as log:
            log.write(f"\n===== {step}: dlmstudy {' '.join(args)}\n")
            log.flush()
            try:
                done = subprocess.run([sys.executable, "-m", "dlmstudy.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as err:
                log.write((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                          else (err.stdout or ""))
                self.put(step, error=f"timed out after {timeout:.0f} s")
                return None
            log.write(done.stdout)
        self.put(step, seconds=round(time.time() - started, 1), exit=done.returncode)
        if done.returncode:
            self.put(step, error=done.stdout.strip().splitlines()[-3:])
        return done


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(data: dict[str, Any]) -> str:
    """The headline table (one row per bench record) and every other step's fields."""
    lines = ["# LoRA SFT at 8B on one GPU (random weights: speed and memory, not quality)", ""]
    records = data["steps"].get("bench", {}).get("records", [])
    if records:
        lines += ["| config | arm | checkpointing | peak GB | reserved GB | tokens/s | micro-batch s "
                  "| optimizer step s | MFU | HFU | epoch of 2,000 rows |", "|" + " --- |" * 11]
        for r in records:
            lines.append(f"| {r['config']} | {r['arm']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{r['peak_memory_gb']:.1f} | {r.get('peak_reserved_gb') or 0:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {r['optimizer_step_time_s']:.2f} | "
                         f"{percent(r['mfu'])} | {percent(r['hfu'])} | {r['epoch_s'] / 60:.1f} min |")
        lines.append("")
    for step, fields in data["steps"].items():
        shown = {k: v for k, v in fields.items() if k != "records"}
        lines.append(f"- **{step}**: " + "; ".join(f"{k} {json.dumps(v, default=str)}" for k, v in shown.items()))
    lines.append(f"\nelapsed {data.get('elapsed_s')} s")
    return "\n".join(lines) + "\n"


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-shaped rows of random words: instruction 60-240 characters, an input on half of them, an answer of
    150-650 (with the byte-level tokenizer of an init-model folder, one token per character)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        target, words = rng.randint(low, high), []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        return " ".join(words).capitalize() + "."

    return [{"instruction": text(60, 240), "input": text(40, 200) if rng.random() < 0.5 else "",
             "output": text(150, 650)} for _ in range(n)]


def bench(report: Report, a: argparse.Namespace) -> None:
    records_file = Path(a.out) / "bench_sft.json"
    done = report.run("bench", ["bench", "--device", a.device, "--config", a.llada, a.qwen, "--measure", "sft",
                                "--gradient_checkpointing", "off", "on", "--batch_size", "2",
                                "--seq_len", str(a.seq_len), "--steps", str(a.bench_steps),
                                "--warmup", str(a.bench_warmup), "--json", str(records_file)], cap=240, need=60)
    if not records_file.exists():
        return
    records = json.loads(records_file.read_text())
    report.put("bench", records=records)
    peaks = {(r["arm"], r["gradient_checkpointing"]): r["peak_memory_gb"] for r in records}
    for on in (False, True):
        if ("llada-mdm", on) in peaks and ("qwen-ar", on) in peaks:
            ratio = peaks[("llada-mdm", on)] / peaks[("qwen-ar", on)]
            report.put("bench", **{f"llada_over_qwen_peak_checkpointing_{'on' if on else 'off'}": round(ratio, 3)})
    report.put("bench", targets={
        "llada_peak_within_1.2x_of_qwen": all(report.data["steps"]["bench"].get(k, 9) <= 1.2 for k in
                                              ("llada_over_qwen_peak_checkpointing_off",
                                               "llada_over_qwen_peak_checkpointing_on")),
        "all_under_60GB": all(r["peak_memory_gb"] < 60 for r in records),
        "mfu_at_least_35%": {f"{r['arm']}-{'gc' if r['gradient_checkpointing'] else 'plain'}": r["mfu"] is not None
                             and r["mfu"] >= 0.35 for r in records}})
    if done is not None and done.returncode:
        report.put("bench", note="incomplete: see error and big_sft.log")


def folder_size_gb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 2)


def init_folders(report: Report, work: Path, a: argparse.Namespace) -> Path | None:
    qwen, llada = work / "qwen", work / "llada"
    if report.run("init_qwen", ["init-model", "--config", a.qwen, "--out", str(qwen), "--device", a.device],
                  cap=150, need=40) and qwen.is_dir():
        report.put("init_qwen", size_gb=folder_size_gb(qwen), files=sorted(p.name for p in qwen.iterdir()))
        started = time.time()
        check = subprocess.run([sys.executable, "-c", (
            "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map=sys.argv[2])\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = torch.tensor([t('Hello there')['input_ids']], device=sys.argv[2])\n"
            "with torch.no_grad(): out = m(ids).logits\n"
            "print(m.dtype, tuple(out.shape), bool(torch.isfinite(out).all()))"), str(qwen), a.device],
            capture_output=True, text=True, timeout=max(10.0, min(120.0, report.left() - 5)))
        report.put("qwen_plain_transformers", seconds=round(time.time() - started, 1), exit=check.returncode,
                   said=(check.stdout or check.stderr).strip().splitlines()[-1:])
        shutil.rmtree(qwen, ignore_errors=True)  # disk for the LLaDA folder, its run and the merged copy
    if report.run("init_llada", ["init-model", "--config", a.llada, "--out", str(llada), "--device", a.device],
                  cap=150, need=40) and llada.is_dir():
        report.put("init_llada", size_gb=folder_size_gb(llada), files=sorted(p.name for p in llada.iterdir()))
        return llada
    return None


SPEC = """\
name: big8b
seed: 0
device: {device}
runs_dir: {work}/runs
reports_dir: {work}/reports
tracking: {{report_to: none}}
tokenizer: {{kind: bpe, vocab_size: 320}}
data:
  pretrain: {{source: builtin:biographies, people: 40}}
  validation_tokens: 256
  max_length: 32
arms: [llada]
model: {{hidden_size: 32, num_layers: 1, num_heads: 2}}
grid: {{unique_people: [20], total_tokens: 1024}}
sft:
  source: "{work}/alpaca.jsonl[train:32,test:4]"
  base: {{llada: {base}}}
  epochs: [2]
  max_length: 1024
  validation_rows: 2
  lora: true
  r: 32
  lora_alpha: 64
  lora_dropout: 0.05
  target_modules: all-linear
  learning_rate: 3.0e-4
  warmup_ratio: 0.1
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 8
  gradient_checkpointing: true
evaluation: {{mc_num: 1, steps: 16, gen_length: 16, block_length: 16, batch_size: 2}}
"""


def sft_run(report: Report, work: Path, base: Path, device: str) -> Path | None:
    """Start the run, SIGTERM it once a step is logged, run it again to the end; returns the adapter folder."""
    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(36)))
    spec = work / "big8b.yaml"
    spec.write_text(SPEC.format(work=work, base=base, device=device))
    args = [sys.executable, "-m", "dlmstudy.cli", "run", str(spec), "--only", "stage=sft"]
    if report.left() < 180:
        report.put("sft_run", skipped=f"{report.left():.0f} s left")
        return None
    started = time.time()
    with open(report.log, "a") as log:
        log.write("\n===== sft_run (first, to be stopped): " + " ".join(args) + "\n")
        log.flush()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        stopped_at = None
        while proc.poll() is None and time.time() - started < min(200, report.left() - 60):
            scalars = glob.glob(str(work / "runs" / "big8b" / "sft-*" / "scalars.jsonl"))
            if scalars and any('"loss"' in line for line in Path(scalars[0]).read_text().splitlines()):
                proc.send_signal(signal.SIGTERM)
                stopped_at = round(time.time() - started, 1)
                break
            time.sleep(1)
        try:
            proc.wait(timeout=max(30.0, min(120.0, report.left() - 60)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    checkpoints = sorted(Path(p).parent.name for p in glob.glob(str(work / "runs/big8b/sft-*/checkpoints/*/COMPLETE")))
    report.put("sft_run", first_seconds=round(time.time() - started, 1), sigterm_after_s=stopped_at,
               first_exit=proc.returncode, checkpoints_after_stop=checkpoints)
    again = report.run("sft_resume", ["run", str(spec), "--only", "stage=sft"], cap=300, need=90)
    if again is None:
        return None
    report.put("sft_resume", resumed=[line for line in again.stdout.splitlines() if "resuming from" in line])
    results = glob.glob(str(work / "runs" / "big8b" / "sft-*" / "result.json"))
    if not results:
        return None
    run_dir = Path(results[0]).parent
    result = json.loads(Path(results[0]).read_text())
    keep = ("steps", "tokens_per_step", "train_runtime_s", "train_tokens_per_s", "train_rows", "final_val_loss",
            "answer_nll", "wall_time_s")
    saved = run_dir / "checkpoints"
    report.put("sft_resume", result={k: result.get(k) for k in keep},
               checkpoint_files=sorted(p.name for p in next(saved.glob("checkpoint-*"), saved).iterdir())
               if saved.is_dir() else None,
               adapter_gb=folder_size_gb(run_dir / "adapter"))
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the run's merged copy: disk for merge-lora's
    return run_dir / "adapter"


def use_merged(report: Report, work: Path, base: Path, adapter: Path, device: str) -> None:
    merged = work / "merged"
    if not report.run("merge_lora", ["merge-lora", "--lora_path", str(adapter), "--base_model_path", str(base),
                                     "--merge_path", str(merged)], cap=180, need=60) or not merged.is_dir():
        return
    report.put("merge_lora", size_gb=folder_size_gb(merged))
    prompt = "Give three tips for staying healthy."
    done = report.run("generate", ["generate", "--model_name_or_path", str(merged), "--prompt", prompt,
                                   "--max_length", "128", "--steps", "128", "--block_length", "32", "--show_speed",
                                   "--device", device], cap=120, need=40)
    if done is not None:
        report.put("generate", speed=[line for line in done.stdout.splitlines() if line.endswith("tokens/s)")])
    chat_args = [sys.executable, "-m", "dlmstudy.cli", "chat", "--model_name_or_path", str(merged), "--max_length",
                 "128", "--block_length", "32", "--threshold", "0.9", "--use_cache", "--show_speed", "--device", device]
    if report.left() > 45:
        started = time.time()
        chat = subprocess.run(chat_args, cwd=ROOT, input=f"{prompt}\nAnd one more?\n", capture_output=True, text=True,
                              timeout=min(120.0, report.left() - 5))
        with open(report.log, "a") as log:
            log.write("\n===== chat: " + " ".join(chat_args) + "\n" + chat.stdout + chat.stderr)
        report.put("chat_fast_dllm", seconds=round(time.time() - started, 1), exit=chat.returncode,
                   speed=[line for line in chat.stdout.splitlines() if line.endswith("tokens/s)")])
    else:
        report.put("chat_fast_dllm", skipped=f"{report.left():.0f} s left")
    done = report.run("eval", ["eval", "--checkpoint", str(merged), "--tasks", "bio_qa_forward,bio_mc", "--limit", "8",
                               "--model_args", "mc_num=1,steps=32,gen_length=32,block_length=32,batch_size=8",
                               "--output_path", str(work / "eval"), "--device", device], cap=150, need=50)
    if done is not None:
        report.put("eval", said=[line for line in done.stdout.splitlines() if line.startswith("bio_")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the figures go ($OUT)")
    parser.add_argument("--work", default="/tmp/big", help="local disk for the model folders (about 32 GB at peak)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--llada", default="llada-8b", help="LLaDA config (default the shipped LLaDA-8B)")
    parser.add_argument("--qwen", default="qwen2.5-7b", help="Qwen2 config (default the shipped Qwen2.5-7B)")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--bench_steps", type=int, default=16, help="timed micro-batches per bench record")
    parser.add_argument("--bench_warmup", type=int, default=8, help="untimed micro-batches first (one optimizer step)")
    parser.add_argument("--parts", default="bench,folders,run,merged",
                        help="what to do, of bench,folders,run,merged (run needs folders, merged needs run)")
    a = parser.parse_args()
    parts = set(a.parts.split(","))
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = Report(out, a.budget)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True) if shutil.which("nvidia-smi") else None
    report.put("machine", gpu=gpu.stdout.strip() if gpu else None, python=sys.version.split()[0],
               free_disk_gb=round(shutil.disk_usage(work).free / 1e9, 1))
    if "bench" in parts:
        bench(report, a)
    base = init_folders(report, work, a) if "folders" in parts else None
    adapter = sft_run(report, work, base, a.device) if base and "run" in parts else None
    if adapter is not None and base is not None and "merged" in parts:
        use_merged(report, work, base, adapter, a.device)
    report.put("machine", free_disk_gb_at_end=round(shutil.disk_usage(work).free / 1e9, 1))


if __name__ == "__main__":
    main()
