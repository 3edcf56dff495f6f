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
from dlmstudy.analysis import figures, scaling
from dlmstudy.analysis.frames import StudyFrames, load_study
from dlmstudy.analysis.noise import ASSUMED_SEED_SD

RUN_COLUMNS = {
    "run_id": "run", "arm": "arm", "size": "size", "params_total": "params (total)",
    "params_non_embedding": "params (non-emb.)",
    "unique_tokens": "unique tokens", "epochs": "epochs", "tokens": "tokens seen", "flops": "FLOPs (6·N·D)",
    "learning_rate": "learning rate", "seed": "seed",
    "final_val_loss": "final val. loss", "final_val_loss_stderr": "± MC s.e.", "final_val_set": "final on",
    "best_val_loss": "best val. loss", "best_val_set": "best on", "val_loss_kind": "loss kind",
    "accuracy_forward": "acc. forward", "accuracy_reverse": "acc. reverse",
    "wall_time_s": "wall time (s)", "train_tokens_per_s": "train tokens/s",
}
THROUGHPUT_VALUES = ["tokens_per_s", "mfu", "peak_memory_gb"]
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


def _fits_shown(fits: pd.DataFrame) -> pd.DataFrame:
    """The fits table as a reviewer reads it: R_D* as its interval or the bound it has, never a degenerate
    constant (those are blank, with the flag saying why)."""
    shown = fits.assign(**{"R_D*": [claims_mod.interval_text(r, lo, hi, lo <= 0) for r, lo, hi in
                                    zip(fits["R_D_star"], fits["R_D_star_lo"], fits["R_D_star_hi"])],
                           "usable epochs": [claims_mod.interval_text(u, lo, hi, r_lo <= 0) for u, lo, hi, r_lo in
                                             zip(fits["usable_epochs"], fits["usable_epochs_lo"],
                                                 fits["usable_epochs_hi"], fits["R_D_star_lo"])]})
    cols = ["arm", "R_D*", "status", "usable epochs", "r2", "n_runs", "n_one_epoch", "max_epochs", "method",
            "interval", "E", "A", "B", "alpha", "beta", "degenerate"]
    return shown[cols]


def _noise_lines(result: claims_mod.Claims) -> list[str]:
    """What the noise floor is: measured from replicates, or assumed (and what that caps)."""
    measured = result.noise[result.noise["dof"] > 0] if len(result.noise) else result.noise
    if measured.empty:
        return [f"No setting was run with several seeds, so the seed-to-seed noise is not measured: an assumed "
                f"{ASSUMED_SEED_SD} nats/token standard deviation stands in for it, and no verdict can be stronger "
                "than \"suggested\"."]
    return ["Seed-to-seed standard deviation pooled over the replicated cells (cells: arm × size × U × tokens × "
            "learning rate); a cell's standard error combines it with the ELBO's Monte-Carlo error. Single-seed "
            "settings use it too, but alone they can at most \"suggest\"."]


def _learning_rate_lines(runs: pd.DataFrame) -> list[str]:
    """A caveat when every arm trained at one learning rate: it was tuned for neither objective."""
    rates = runs["learning_rate"].dropna().unique() if "learning_rate" in runs else []
    if len(rates) != 1 or runs["arm"].nunique() < 2:
        return []
    return [f"- Every arm and size trained at one learning rate ({rates[0]:g}), tuned for none of them: an "
            "arm's losses may reflect the rate as much as the objective (a `tune:` sweep picks one per arm and "
            "size)."]


def _claims_section(report: Report, result: claims_mod.Claims, runs: pd.DataFrame) -> None:
    report.add("## What this study does and does not show: the data-constrained claims")
    shown = result.table[["claim", "diffusion", "ar", "verdict", "decisive", "reason", "caveat"]]
    report.table(result.table, "claims", shown)
    report.add(
        "How to read this table:", "",
        "- One row per claim and comparison (diffusion arm, AR arm). **Verdicts** (rules in `docs/report.md`): "
        "*supported* needs replicated evidence beyond the measured noise in at least two settings; *suggested* "
        "points the same way from a single seed or one setting; *inconclusive* is within the noise or tests "
        "disagree; *not testable* means the grid cannot decide (the reason says why).",
        "- **Loss levels are not comparable across arms**: diffusion losses are ELBO upper bounds on the NLL, AR "
        "losses exact NLL. Claims (a) and (b) use changes within an arm only (effective data, fits); claim (c) "
        "compares levels and is therefore conservative toward diffusion.",
        "- Every loss in a claim is a final validation loss, all on one validation set (see *Runs*); diverged runs "
        "are in none of them.",
        *_learning_rate_lines(runs),
        f"- The claims separate the arms only beyond {claims_mod.DISCRIMINATING_EPOCHS:.3g} epochs, where AR's law "
        "(R_D\\* = 15) values repeated data below 90% of fresh; the paper's critical compute is "
        "C_crit(U) = 2.12e15·(U/1e6)^2.174 FLOPs, with C = 6·N·D here (N non-embedding parameters).")
    if len(result.noise):
        report.add("### Noise from replicates", *_noise_lines(result))
        if result.noise["dof"].gt(0).any():
            report.table(result.noise, "seed_noise")
    if len(result.evidence):
        report.add("### Evidence per test")
        report.table(result.evidence, "claims_evidence",
                     result.evidence[["claim", "diffusion", "ar", "test", "verdict", "decisive", "reason"]])
    if len(result.effective):
        report.add("### Effective data: what repeated tokens were worth",
                   "D_eq/D per repeated-data cell: the fresh tokens D_eq at which the arm's own one-epoch curve "
                   "(same size) reaches the cell's loss, over the tokens D it trained on, with its 95% interval "
                   "(every loss drawn from its noise). '> x' / '< x': the loss lies beyond the curve's ends, a "
                   "bound only. The last two columns are what the papers' R_D\\* (15 and 500) would give.")
        shown = result.effective.assign(**{"95%": [claims_mod.ratio_text("", lo, hi).strip() or "beyond the curve"
                                                   for lo, hi in zip(result.effective["lo"], result.effective["hi"])]})
        cols = ["arm", "size", "unique_tokens", "tokens", "epochs", "loss", "D_eq/D (reads)", "95%", "n_seeds",
                "expected at R_D* = 15", "expected at R_D* = 500", "one-epoch curve (tokens)"]
        report.table(result.effective, "effective_data", shown[cols].rename(columns={"D_eq/D (reads)": "D_eq/D"}))
    if len(result.fits):
        report.add("### Fit of the data-constrained law (Muennighoff et al.)",
                   "Per arm: R_D\\* from its profile likelihood (the other constants refitted at every R\\*) with "
                   f"its {scaling.LEVEL:.0%} interval, or the bound the runs give when they cannot bound it both "
                   "ways (not identified); usable epochs (repeated data worth ≥ 90% of fresh); R² on loss; the "
                   "fitted constants, blank where they are degenerate (the flag says why).")
        report.table(result.fits, "fits", _fits_shown(result.fits))
        report.add("Runs each fit used:", "", *[f"- {row.arm}: {row.runs}" for row in result.fits.itertuples()])
    elif len(runs):
        reasons = claims_mod.fit_readiness(runs)
        report.add("### Fit of the data-constrained law", "Not fitted: " + "; ".join(
            f"{arm}: {reason or 'ready, but no fit was made'}" for arm, reason in reasons.items()) + ".")
    if len(result.penalties):
        report.add("### Repetition at equal total tokens (context)",
                   "Loss change in nats when a token budget is spent on repeated instead of fresh data (within each "
                   "arm). Context only: claim (a) compares effective data, not nats, since the arms' losses fall "
                   "at different rates with data.")
        report.table(result.penalties, "repetition")
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


def _diverged_section(report: Report, diverged: pd.DataFrame) -> None:
    """Diverged runs under their own heading, with the step and the reason; they are in no number above."""
    report.add("## Diverged runs", "These runs blew up during training. They are in no cell, fit, frontier, "
               "figure or claim; their settings count as not run.")
    cols = {"run_id": "run", "arm": "arm", "size": "size", "unique_tokens": "unique tokens", "epochs": "epochs",
            "learning_rate": "learning rate", "diverged_step": "step", "diverged_reason": "reason",
            "best_val_loss": "best val. loss before", "best_val_set": "best on"}
    report.table(diverged, "diverged", diverged[[c for c in cols if c in diverged]].rename(columns=cols))


def _tune_section(report: Report, tune: pd.DataFrame) -> None:
    """The learning-rate sweeps: each candidate's final loss and the winner per arm and size."""
    tune = tune.assign(winner=False)
    healthy = tune[~tune["diverged"]].dropna(subset=["final_val_loss"])
    for _, group in healthy.groupby(["arm", "size"]):
        tune.loc[group.sort_values(["final_val_loss", "learning_rate"]).index[0], "winner"] = True
    cols = {"arm": "arm", "size": "size", "learning_rate": "learning rate", "tokens": "tokens",
            "final_val_loss": "final val. loss", "final_val_set": "on", "diverged": "diverged",
            "diverged_step": "diverged at step", "winner": "winner", "run_id": "run"}
    tune = tune.sort_values(["arm", "size", "learning_rate"])
    report.add("## Learning-rate sweeps", "Per arm and size, each candidate learning rate on a fraction of the "
               "tokens; the study's runs of that arm and size use the winner (lowest final validation loss; a "
               "diverged candidate never wins). Sweep runs are in no number of the claims.")
    report.table(tune, "tune", tune[[c for c in cols if c in tune]].rename(columns=cols))


def _throughput(bench: pd.DataFrame) -> pd.DataFrame:
    """Bench records ordered device, arm, other settings, then tokens/s, MFU, peak memory."""
    values = [c for c in THROUGHPUT_VALUES if c in bench]
    keys = ["device", "arm"] + [c for c in bench.columns if c not in ("device", "arm", "file", *values)
                                and not pd.api.types.is_float_dtype(bench[c])]
    return bench[keys + values].sort_values(keys[:2])


def build_report(study_folder: str | Path, out_dir: str | Path, *, bootstrap: int = 200) -> Path:
    """Write report.md, report.html, figures/*.png and tables/*.csv for one study folder; returns report.md."""
    frames: StudyFrames = load_study(study_folder)
    out = Path(out_dir)
    report = Report(out)
    runs = frames.runs
    report.add(f"# Study report: {frames.name}",
               f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{study_folder}` "
               f"({len(runs)} finished runs{f', {len(frames.diverged)} diverged' if len(frames.diverged) else ''}, "
               f"{len(frames.missing)} missing). Rebuild with "
               f"`dlmstudy report {study_folder}`; nothing is retrained.")
    if frames.spec:
        report.add("## Set-up", *_setup(frames.spec))
    result = claims_mod.judge_claims(runs, frames.qa, spec=frames.spec, bootstrap=bootstrap)
    _claims_section(report, result, runs)
    if len(runs):
        report.add("## Runs", "Finished runs that did not diverge. `final on` / `best on`: the validation sequences "
                   "each number scored; \"best\" is the lowest loss over evaluations on one set.")
        report.table(runs, "runs", runs[[c for c in RUN_COLUMNS if c in runs]].rename(columns=RUN_COLUMNS))
    if len(frames.diverged):
        _diverged_section(report, frames.diverged)
    if len(frames.tune):
        _tune_section(report, frames.tune)
    if len(frames.missing):
        report.add("## Missing runs", "Planned or started but without a result (run the study again to finish them); "
                   "the tables and claims above use the finished runs only.")
        report.table(frames.missing_runs, "missing")

    fig_dir = out / "figures"
    scalars = (frames.scalars[frames.scalars["run_id"].isin(runs["run_id"])] if len(runs) and len(frames.scalars)
               else pd.DataFrame())
    figs = [
        ("Validation loss against tokens seen",
         figures.loss_vs_tokens(scalars, fig_dir / "loss_vs_tokens.png"), ""),
        ("Final and best validation loss against epochs", figures.loss_vs_epochs(runs, fig_dir / "loss_vs_epochs.png"),
         "Stars mark each AR line's lowest loss."),
        ("Final validation loss against training compute", figures.loss_vs_flops(runs, fig_dir / "loss_vs_flops.png"),
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

