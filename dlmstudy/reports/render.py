"""Turning a study's run folders into reports/<study>/: report.md, report.html, figures/, tables/.

Every number comes from a run folder (via `dlmstudy.analysis.frames`); nothing is retrained. report.html
is self-contained apart from its figures, which it links relatively (figures/*.png): it opens offline.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from pathlib import Path

import markdown
import pandas as pd

from dlmstudy.analysis import claims as claims_mod
from dlmstudy.analysis import figures
from dlmstudy.analysis.frames import StudyFrames, answers_side_by_side, load_study

RUN_COLUMNS = {
    "run_id": "run", "arm": "arm", "size": "size", "params_total": "params (total)",
    "params_non_embedding": "params (non-emb.)",
    "unique_tokens": "unique tokens", "epochs": "epochs", "tokens": "tokens seen", "flops": "FLOPs (6·N·D)",
    "final_val_loss": "final val. loss", "final_val_loss_stderr": "± MC s.e.", "best_val_loss": "best val. loss",
    "val_loss_kind": "loss kind", "accuracy_forward": "acc. forward", "accuracy_reverse": "acc. reverse",
    "wall_time_s": "wall time (s)", "train_tokens_per_s": "train tokens/s",
}
THROUGHPUT_VALUES = ["tokens_per_s", "mfu", "peak_memory_gb"]
SFT_RUN_COLUMNS = ["run_id", "arm", "sft_epochs", "variant", "lora", "padding", "loss_norm", "seed",
                   "decoding_block_length", "decoding_confidence_eos_eot_inf", "decoding_logits_eos_inf", "accuracy",
                   "answer_f1", "empty_answers", "answer_tokens", "answer_nll", "content_nll", "first_token_rank",
                   "p_end_offset0", "p_end_first16"]
DECODE_KEYS = ["arm", "variant", "gen_length", "block_length", "end_tokens"]
HTML_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}}
table{{border-collapse:collapse;font-size:0.8em;margin:0.5em 0 1em}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
th{{background:#f3f3f3}}img{{max-width:100%}}code{{background:#f5f5f5}}</style></head><body>
{body}</body></html>"""


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return f"{v:,}"
    if isinstance(v, numbers.Real):
        v = float(v)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if abs(v) >= 1e7:
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("*", "\\*").replace("\n", "<br>")


def md_table(df: pd.DataFrame) -> str:
    """A pandas frame as a Markdown table (no extra dependency); newlines in cells become <br>."""
    head = "| " + " | ".join(_fmt(str(c)) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


class Report:
    """Collects Markdown lines, writes tables to tables/*.csv and figures to figures/*.png."""

    def __init__(self, out: Path):
        self.out = out
        self.lines: list[str] = []
        for sub, pattern in (("tables", "*.csv"), ("figures", "*.png")):
            (out / sub).mkdir(parents=True, exist_ok=True)
            for old in (out / sub).glob(pattern):  # a rebuilt report holds only what this build wrote
                old.unlink()

    def add(self, *lines: str) -> None:
        self.lines += [*lines, ""]

    def table(self, frame: pd.DataFrame, name: str, shown: pd.DataFrame | None = None) -> None:
        """Write the full frame to tables/<name>.csv and show `shown` (default: the frame) in the report."""
        frame.to_csv(self.out / "tables" / f"{name}.csv", index=False)
        self.add(md_table(frame if shown is None else shown), "", f"(table: `tables/{name}.csv`)")

    def figure(self, title: str, path: Path | None, caption: str = "") -> None:
        if path is not None:
            self.add(f"### {title}", f"![{title}](figures/{path.name})", *([caption] if caption else []))


def _setup(spec: dict) -> list[str]:
    tok = spec.get("tokenizer", {})
    vocab = f", vocabulary {tok.get('vocab_size')}" if tok.get("kind") == "bpe" else f", {tok.get('path')}"
    arms = ", ".join(map(str, spec.get("arms", [])))
    return [f"- Arms: {arms}; one tokenizer for all arms ({tok.get('kind')}{vocab}).",
            f"- Data: `{spec.get('data', {}).get('pretrain', {}).get('source')}`, sequence length "
            f"{spec.get('data', {}).get('max_length')}; every arm sees the same sequences in the same order.",
            "- What differs between arms: the objective (masked diffusion vs next token) and the attention direction "
            "(bidirectional vs causal), plus whatever differs between the backbones (the Qwen2 backbone has q/k/v "
            "biases). Parameter counts are given with and without embeddings."]


def _claims_section(report: Report, result: claims_mod.Claims, runs: pd.DataFrame) -> None:
    report.add("## What this study does and does not show: the data-constrained claims")
    shown = result.table[["claim", "paper", "verdict", "this study", "why", "caveat"]]
    report.table(result.table, "claims", shown)
    floor = claims_mod.NOISE_FLOOR
    report.add(
        "How to read this table:", "",
        "- **Loss levels are not comparable across arms**: diffusion losses are ELBO upper bounds on the NLL, AR "
        "losses exact NLL. Claims (a) and (b) use changes within an arm only; claim (c) compares levels and is "
        "therefore conservative toward diffusion (diffusion ahead is real, AR ahead may be the bound's slack).",
        f"- Noise: a loss difference counts only beyond 1.96 standard errors (the Monte-Carlo error of the ELBO, "
        f"`final_val_loss_stderr`, and the spread over seeds where a setting has several) and, for single-seed "
        f"settings, beyond {floor} nats/token (seed-to-seed variation, which one seed cannot measure). Accuracies "
        "use Wilson 95% intervals and Newcombe's interval for the difference between arms.",
        f"- The claims separate the arms only beyond {claims_mod.DISCRIMINATING_EPOCHS:.3g} epochs, where AR's law "
        "(R_D\\* = 15) values repeated data below 90% of fresh; the paper's critical compute is "
        "C_crit(U) = 2.12e15·(U/1e6)^2.174 FLOPs, with C = 6·N·D here (N non-embedding parameters).",
        "- A claim's verdict combines its tests: supported or contradicted when at least one test says so and none "
        "says the opposite; tests that disagree give inconclusive. Details: `docs/report.md`.")
    if len(result.evidence):
        report.add("### Evidence per test")
        report.table(result.evidence, "claims_evidence",
                     result.evidence[["claim", "test", "arms", "verdict", "numbers", "reason"]])
    if len(result.fits):
        report.add("### Fit of the data-constrained law (Muennighoff et al.)",
                   "Per arm: R_D\\* with its 95% interval (bootstrap over runs, widened to cover refits with repeated "
                   "runs' losses moved by ±1.96 MC standard errors), usable epochs (repeated data worth ≥ 90% of "
                   "fresh), R² on loss, and the fitted single-epoch constants.")
        cols = ["arm", "R_D_star", "R_D_star_lo", "R_D_star_hi", "usable_epochs", "usable_epochs_lo",
                "usable_epochs_hi", "r2", "n_runs", "n_one_epoch", "max_epochs", "method", "E", "A", "B", "alpha",
                "beta"]
        report.table(result.fits, "fits", result.fits[[c for c in cols if c in result.fits]])
    elif len(runs):
        reasons = claims_mod.fit_readiness(runs)
        report.add("### Fit of the data-constrained law", "Not fitted: " + "; ".join(
            f"{arm}: {reason or 'ready, but no fit was made'}" for arm, reason in reasons.items()) + ".")
    if len(result.penalties):
        report.add("### Repetition at equal total tokens",
                   "Loss change when a token budget is spent on repeated instead of fresh data (within each arm).")
        report.table(result.penalties, "repetition", result.penalties.drop(columns=["se", "floor"]))
    if len(result.gaps):
        report.add("### Arms at matched settings", "Diffusion ELBO minus AR NLL at the same size, U and tokens "
                   "(negative: diffusion ahead, which the ELBO bound makes conservative).")
        report.table(result.gaps, "arm_gaps")
    if len(result.frontiers):
        report.add("### Compute frontiers", "Per U, at each matched compute C: each arm's best loss over its runs with "
                   "compute ≤ C, and diffusion minus AR between them (the test of claim c).")
        report.table(result.frontiers, "compute_frontiers")
    if len(result.reversal):
        report.add("### Question answering per run and direction")
        report.table(result.reversal, "qa_accuracy")


def _throughput(bench: pd.DataFrame) -> pd.DataFrame:
    """Bench records ordered device, arm, other settings, then tokens/s, MFU, peak memory."""
    values = [c for c in THROUGHPUT_VALUES if c in bench]
    keys = ["device", "arm"] + [c for c in bench.columns if c not in ("device", "arm", "file", *values)
                                and not pd.api.types.is_float_dtype(bench[c])]
    return bench[keys + values].sort_values(keys[:2])


def _sft_runs_section(report: Report, frames: StudyFrames) -> None:
    """Each SFT run after its last epoch, some held-out answers of both arms side by side, and the decode grids."""
    if len(frames.sft_runs):
        report.add("### SFT runs after their last epoch",
                   "`empty_answers`: share of probes answered with nothing (the first generated token ends the "
                   "answer). Diagnostics on the held-out rows (docs/training.md): `content_nll` is the answer's "
                   "NLL before its end tokens (diffusion: ELBO upper bound, given the answer's length), "
                   "`first_token_rank` the median rank of the reference first answer token (1 = the model's top "
                   "choice; diffusion: on an all-mask canvas of 64), `p_end_offset0` / `p_end_first16` the "
                   "probability of an end token at the first answer position / over the first 16.")
        sft_runs = frames.sft_runs
        report.table(sft_runs, "sft_runs", sft_runs[[c for c in SFT_RUN_COLUMNS if c in sft_runs]])
    for epochs, table in answers_side_by_side(frames.sft_answers, frames.planned).items():
        report.add(f"### Held-out questions after {epochs} SFT epoch{'s' if epochs != 1 else ''}",
                   "The first questions of the held-out probes with each arm's answer (its first SFT run with this "
                   "epoch count); every answer is in the run's `eval/qa_samples.jsonl`.")
        report.table(table, f"sft_answers_e{epochs}")
    if len(frames.decode_grid):
        grid = frames.decode_grid
        values = [c for c in ("answer_f1", "empty_answers", "answer_tokens", "accuracy") if c in grid]
        keys = [c for c in DECODE_KEYS if c in grid]
        summary = grid.groupby(keys, dropna=False)[values].agg(["mean", "count"])
        summary.columns = [f"{v}_{stat}" if stat == "mean" else "runs" for v, stat in summary.columns]
        summary = summary.loc[:, ~summary.columns.duplicated()].reset_index()
        report.add("### Decoding after SFT",
                   "Each SFT run's probes decoded once per setting, one token a step; means over the runs of an arm "
                   "and variant (AR arms: block length 1). `end_tokens`: LLaDA's end-token options "
                   "(docs/sampling.md).")
        report.table(grid, "decode_grid", summary)


def build_report(study_folder: str | Path, out_dir: str | Path, *, bootstrap: int = 200) -> Path:
    """Write report.md, report.html, figures/*.png and tables/*.csv for one study folder; returns report.md."""
    frames: StudyFrames = load_study(study_folder)
    out = Path(out_dir)
    report = Report(out)
    runs = frames.runs
    report.add(f"# Study report: {frames.name}",
               f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{study_folder}` "
               f"({len(runs)} finished runs, {len(frames.missing)} missing). Rebuild with "
               f"`dlmstudy report {study_folder}`; nothing is retrained.")
    if frames.spec:
        report.add("## Set-up", *_setup(frames.spec))
    result = claims_mod.judge_claims(runs, frames.qa, bootstrap=bootstrap)
    _claims_section(report, result, runs)
    if len(runs):
        report.add("## Runs")
        report.table(runs, "runs", runs[[c for c in RUN_COLUMNS if c in runs]].rename(columns=RUN_COLUMNS))
    if len(frames.missing):
        report.add("## Missing runs", "Planned or started but without a result (run the study again to finish them); "
                   "the tables and claims above use the finished runs only.")
        report.table(frames.missing_runs, "missing")

    fig_dir = out / "figures"
    figs = [
        ("Validation loss against tokens seen",
         figures.loss_vs_tokens(frames.scalars, fig_dir / "loss_vs_tokens.png"), ""),
        ("Final and best validation loss against epochs", figures.loss_vs_epochs(runs, fig_dir / "loss_vs_epochs.png"),
         "Stars mark each AR line's lowest loss."),
        ("Best validation loss against training compute", figures.loss_vs_flops(runs, fig_dir / "loss_vs_flops.png"),
         "C = 6·N·D with N the non-embedding parameters (neither embedding nor output head) and D the tokens trained "
         "on; lines are each arm's Pareto frontier."),
        ("Final validation loss over model size and epochs",
         figures.params_epochs_heatmap(runs, fig_dir / "params_epochs.png"), ""),
        ("Question answering: exact match per arm and direction",
         figures.accuracy_by_arm(result.reversal, fig_dir / "accuracy.png"), "Error bars: Wilson 95% intervals."),
    ]
    if any(p is not None for _, p, _ in figs):
        report.add("## Figures")
        for title, path, caption in figs:
            report.figure(title, path, caption)
    if len(frames.scalars):
        frames.scalars.to_csv(out / "tables" / "scalars.csv", index=False)
    if len(frames.swanlab):
        frames.swanlab.to_csv(out / "tables" / "swanlab_scalars.csv", index=False)

    if len(frames.sampler_grid):
        report.add("## Sampler grids", "Accuracy and tokens/s over sampling steps × block length (and confidence "
                   "threshold for parallel decoding; 'off' = fixed schedule).")
        report.table(frames.sampler_grid, "sampler_grid")
        report.figure("Sampler grid: accuracy", figures.sampler_heatmaps(frames.sampler_grid, "accuracy",
                                                                          fig_dir / "sampler_accuracy.png", runs))
        report.figure("Sampler grid: tokens/s", figures.sampler_heatmaps(frames.sampler_grid, "tokens_per_s",
                                                                          fig_dir / "sampler_speed.png", runs))
        report.figure("Sampler speed against accuracy", figures.sampler_tradeoff(
            frames.sampler_grid, fig_dir / "sampler_tradeoff.png", runs),
            "Speed-up over each run's plain sampler (no threshold, eager, the most steps) against the accuracy "
            "difference measured probe by probe, with its 95% interval: a bar that crosses 0 is equal within noise.")
    if len(frames.lm_eval):
        report.add("## lm_eval results", "Each task's metrics as lm_eval reported them (stderr from lm_eval).")
        report.table(frames.lm_eval, "lm_eval", frames.lm_eval.drop(columns=["file"]))
    if len(frames.sft) or len(frames.sft_scalars):
        report.add("## Supervised fine-tuning",
                   "Per-epoch evaluations on held-out rows. `val_loss` is each arm's own SFT objective: for diffusion "
                   "arms it also scores the EOS padding LLaDA trains on, so it is not comparable with an AR arm's. "
                   "`answer_nll` scores the same answer tokens for every arm (exact NLL for AR, the ELBO upper bound "
                   "for diffusion); runs made before it existed lack it. `accuracy` is exact match of the answer's "
                   "first line, `answer_f1` SQuAD token F1 of the whole answer.")
        if len(frames.sft):
            report.table(frames.sft, "sft")
        if len(frames.sft_scalars):
            frames.sft_scalars.to_csv(out / "tables" / "sft_scalars.csv", index=False)
        report.figure("SFT curves", figures.sft_curves(frames.sft_scalars, frames.sft, fig_dir / "sft.png"))
    _sft_runs_section(report, frames)
    if len(frames.bench):
        report.add("## Throughput", "From `dlmstudy bench --json` records stored as `bench*.json` in the study folder.")
        report.table(frames.bench, "throughput", _throughput(frames.bench))
    if len(frames.sources):
        report.add("## Data read", "What each finished run folder held (the SwanLab column compares the decoded "
                   "offline log with the scalar mirror).")
        report.table(frames.sources, "sources")
    if frames.notes:
        report.add("Skipped while reading:", "", *[f"- {note}" for note in frames.notes])

    text = "\n".join(report.lines) + "\n"
    (out / "report.md").write_text(text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    (out / "report.html").write_text(HTML_PAGE.format(title=f"dlmstudy: {frames.name}", body=body))
    return out / "report.md"

