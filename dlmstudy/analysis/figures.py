"""Figures of a study (seaborn, written as PNG beside the report)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dlmstudy.study.plan import short_count  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_vs_tokens(scalars: pd.DataFrame, path: Path) -> Path | None:
    """Validation loss against tokens seen, one line per run, one panel per data setting (U, R)."""
    if scalars.empty or "val_loss" not in scalars:
        return None
    df = scalars.dropna(subset=["val_loss"]).copy()
    df["setting"] = [f"U={short_count(u)}, R={r:g}" for u, r in zip(df["unique_tokens"], df["epochs"])]
    settings = sorted(df["setting"].unique())
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sns.lineplot(data=df[df["setting"] == setting], x="tokens_seen", y="val_loss", hue="arm", marker="o", ax=ax)
        ax.set_title(setting)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("validation loss (nats/token)")
    fig.suptitle("Validation loss: exact NLL (AR) vs ELBO upper bound (diffusion)", fontsize=10)
    return _save(fig, path)


def accuracy_by_arm(qa: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Exact-match accuracy per arm and direction (mean over runs' probes, 95% bootstrap intervals)."""
    if qa.empty:
        return None
    df = qa.merge(runs[["run_id", "unique_tokens", "epochs"]], on="run_id")
    df["setting"] = [f"U={short_count(u)}, R={r:g}" for u, r in zip(df["unique_tokens"], df["epochs"])]
    df["correct"] = df["correct"].astype(float)
    g = sns.catplot(data=df, x="direction", y="correct", hue="arm", col="setting", kind="bar",
                    errorbar=("ci", 95), height=3.2, aspect=1.0)
    g.set_axis_labels("question direction", "exact-match accuracy")
    g.set(ylim=(0, 1))
    return _save(g.figure, path)
