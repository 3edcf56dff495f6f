"""Turning a study's run folders into reports/<study>/: report.md, report.html, figures/, tables/.

Every number comes from a run folder (via `dlmstudy.analysis.frames`); nothing is retrained.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import markdown
import pandas as pd

from dlmstudy.analysis import figures
from dlmstudy.analysis.frames import StudyFrames, load_study
from dlmstudy.study.plan import short_count

RUN_COLUMNS = {
    "arm": "arm", "params_total": "params (total)", "params_non_embedding": "params (non-emb.)",
    "unique_tokens": "unique tokens", "epochs": "epochs", "tokens": "tokens seen",
    "final_val_loss": "final val. loss", "best_val_loss": "best val. loss", "val_loss_kind": "loss kind",
    "accuracy_forward": "acc. forward", "accuracy_reverse": "acc. reverse", "wall_time_s": "wall time (s)",
    "train_tokens_per_s": "train tokens/s",
}
HTML_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}code{{background:#f5f5f5}}</style></head><body>
{body}</body></html>"""


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(df: pd.DataFrame) -> str:
    """A pandas frame as a Markdown table (no extra dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def repetition_evidence(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm and total-token budget: loss when the budget is spent on repeated vs fresh data."""
    rows = []
    for (arm, tokens), group in runs.groupby(["arm", "tokens"]):
        if group["epochs"].nunique() < 2:
            continue
        fresh = group.loc[group["epochs"].idxmin()]
        repeated = group.loc[group["epochs"].idxmax()]
        rows.append({"arm": arm, "objective": fresh["objective"], "tokens": int(tokens),
                     "fresh (U, R)": f"{short_count(fresh['unique_tokens'])}, {fresh['epochs']:g}",
                     "repeated (U, R)": f"{short_count(repeated['unique_tokens'])}, {repeated['epochs']:g}",
                     "loss fresh": fresh["final_val_loss"], "loss repeated": repeated["final_val_loss"],
                     "repetition penalty": repeated["final_val_loss"] - fresh["final_val_loss"]})
    return pd.DataFrame(rows)


def claim_section(evidence: pd.DataFrame) -> list[str]:
    """What this study shows about 'diffusion beats AR when data is scarce', and what it cannot."""
    out = ["## What this study does and does not show", ""]
    if evidence.empty:
        out.append("The grid holds no pair of data settings with equal total tokens for one arm, so the "
                   "cost of repetition cannot be read off this study.")
        return out
    out += [md_table(evidence), ""]
    by_obj = evidence.groupby("objective")["repetition penalty"].mean()
    if {"ar", "mdm"} <= set(by_obj.index):
        ar, mdm = by_obj["ar"], by_obj["mdm"]
        verdict = ("smaller for diffusion than for AR, which is the direction the data-constrained claim predicts"
                   if mdm < ar else "not smaller for diffusion than for AR, so this study does not support the claim")
        out.append(f"Spending the same tokens on repeated rather than fresh data changed validation loss by "
                   f"{mdm:+.4f} nats/token for the diffusion arms and {ar:+.4f} for the AR arms: the repetition "
                   f"penalty is {verdict} at this scale.")
    out += ["", "Read this with its limits:",
            "- Diffusion losses are ELBO upper bounds on the NLL, AR losses exact NLL: compare the change "
            "within an arm, not the levels across arms.",
            "- One seed, few data settings and a small model: differences of the order of the Monte-Carlo "
            "standard error (see `final_val_loss_stderr` in tables/runs.csv) are noise.",
            "- The papers' crossover appears far beyond compute-optimal single-epoch training (tens to "
            "hundreds of epochs); a study with fewer epochs can show the trend but not R_D* itself."]
    return out


def build_report(study_folder: str | Path, out_dir: str | Path) -> Path:
    """Write report.md, report.html, figures/*.png and tables/*.csv for one study folder."""
    frames: StudyFrames = load_study(study_folder)
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = frames.runs
    lines = [f"# Study report: {frames.name}", "",
             f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{study_folder}` "
             f"({len(runs)} finished runs, {len(frames.missing)} missing).", ""]
    spec = frames.spec
    if spec:
        tok = spec.get("tokenizer", {})
        lines += ["## Set-up", "",
                  f"- Arms: {', '.join(spec.get('arms', []))}; one tokenizer for all arms "
                  f"({tok.get('kind')}{', vocabulary ' + str(tok.get('vocab_size')) if tok.get('kind') == 'bpe' else ', ' + str(tok.get('path'))}).",
                  f"- Data: `{spec.get('data', {}).get('pretrain', {}).get('source')}`, sequence length "
                  f"{spec.get('data', {}).get('max_length')}; every arm sees the same sequences in the same order.",
                  "- What differs between arms: the objective (masked diffusion vs next token) and the attention "
                  "direction (bidirectional vs causal); the Qwen2 backbone also has q/k/v biases. Parameter counts "
                  "are given with and without embeddings.", ""]
    if len(runs):
        table = runs[[c for c in RUN_COLUMNS if c in runs]].rename(columns=RUN_COLUMNS)
        runs.to_csv(out / "tables" / "runs.csv", index=False)
        lines += ["## Runs", "", md_table(table), ""]
    if frames.missing:
        lines += ["## Missing runs", "", "Planned but without a result yet (run the study again to finish them):", ""]
        lines += [f"- `{r}`" for r in frames.missing] + [""]
    figs = [("Validation loss against tokens seen", figures.loss_vs_tokens(frames.scalars, out / "figures" / "loss_vs_tokens.png")),
            ("Question answering: exact match per arm and direction", figures.accuracy_by_arm(frames.qa, runs, out / "figures" / "accuracy.png"))]
    figs = [(title, p) for title, p in figs if p is not None]
    if figs:
        lines += ["## Figures", ""]
        lines += [f"### {title}\n\n![{title}](figures/{p.name})\n" for title, p in figs]
    if len(frames.scalars):
        frames.scalars.to_csv(out / "tables" / "scalars.csv", index=False)
    if len(runs):
        evidence = repetition_evidence(runs)
        evidence.to_csv(out / "tables" / "repetition.csv", index=False)
        lines += claim_section(evidence)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    (out / "report.html").write_text(HTML_PAGE.format(title=f"dlmstudy: {frames.name}", body=body))
    return out / "report.md"
