"""What a reader of the report relies on: the answer first, every comparison shown, numbers that do not change
on a rebuild, a rebuild that never leaves a broken report, figures that follow one set of rules, missing values
named, and a page that fits a 1400 px screen."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlmstudy.analysis import figures
from dlmstudy.analysis.scaling import effective_data
from dlmstudy.reports.render import build_report
from tests.test_report import CHROMIUM, chromium

OBJECTIVES = {"llada": "mdm", "llada-mdm": "mdm", "qwen": "ar", "llada-ar": "ar", "qwen-ar-reg": "ar"}
SIZES = {"d32×2": (32, 2, 12000), "d48×3": (48, 3, 30000)}


def write_result(folder: Path, arm: str, unique: int, epochs: float, *, size: str = "d32×2", seed: int = 0,
                 r_star: float | None = None, extra: dict | None = None) -> str:
    """A finished run whose final loss follows the data-constrained law (R_D* 500 for diffusion, 15 for AR), with
    a validation curve and a small seed effect."""
    objective = OBJECTIVES[arm]
    hidden, layers, params = SIZES[size]
    r_star = r_star or (500.0 if objective == "mdm" else 15.0)
    tokens = int(unique * epochs)
    level = 2.0 + (0.4 if objective == "mdm" else 0.0) - (0.1 if size == "d48×3" else 0.0)
    loss = level + 30.0 / float(effective_data(unique, tokens, r_star)) ** 0.3 + 0.01 * seed
    run_id = f"{arm}_u{unique}_r{epochs:g}_{size[1:3]}_s{seed}"
    run = folder / run_id
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": run_id, "arm": arm, "seed": seed,
                                              "size": {"hidden_size": hidden, "num_layers": layers},
                                              "training": {"learning_rate": 1e-3}}))
    curve = [{"step": s, "val_loss": loss + 1.0 / s, "val_loss_stderr": 0.01 if objective == "mdm" else 0.0,
              "tokens_seen": float(s * tokens / 4)} for s in (1, 2, 3, 4)]
    (run / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (run / "result.json").write_text(json.dumps({
        "run_id": run_id, "arm": arm, "backbone": arm.split("-")[0], "objective": objective, "sampler": "x",
        "params_total": params + 8000, "params_non_embedding": params, "unique_tokens": unique, "epochs": epochs,
        "tokens": tokens, "val_loss_kind": "ELBO (upper bound on NLL)" if objective == "mdm" else "exact NLL",
        "best_val_loss": loss, "final_val_loss": loss, "final_val_loss_stderr": 0.01 if objective == "mdm" else 0.0,
        "seed": seed, "wall_time_s": 1.0, **(extra or {})}))
    return run_id


def data_study(root: Path, arms=("llada", "qwen"), *, spec_extra: dict | None = None, seeds=(0,),
               name: str = "layout") -> Path:
    """Per arm: one-epoch runs at three data sizes and repeated data at 4, 16 and 64 epochs (an effective-data
    curve and a fit), with the epoch counts chosen so that their text order (1, 16, 4, 64) is not numeric."""
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    planned = []
    for arm in arms:
        for seed in seeds:
            for unique, epochs in ((1000, 1), (4000, 1), (16000, 1), (1000, 4), (1000, 16), (1000, 64)):
                run_id = write_result(folder, arm, unique, epochs, seed=seed)
                planned.append({"run_id": run_id, "stage": "pretrain", "arm": arm})
    spec = {"name": name, "arms": list(arms), "tokenizer": {"kind": "bpe", "vocab_size": 64},
            "data": {"pretrain": {"source": "builtin:biographies"}, "max_length": 32}, **(spec_extra or {})}
    (folder / "study.json").write_text(json.dumps({"name": name, "spec": spec, "runs": planned}))
    return folder


# --- the first screen -------------------------------------------------------------------------------------------


def test_summary_comes_first_with_a_sentence_per_claim_and_the_headline_figure(tmp_path):
    text = build_report(data_study(tmp_path), tmp_path / "report", bootstrap=0).read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[0] == "Summary" and headings[1] == "Claims"
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert summary.count("\n- **(") == 4  # one sentence per claim: (a) to (d)
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        line = next(line for line in summary.splitlines() if line.startswith(f"- **{claim}"))
        assert re.search(r"\*(supported|suggested|contradicted|contradiction suggested|inconclusive|not testable)\*",
                         line), line
    assert "**Scale**: 2 arms (llada, qwen)" in summary and "at 1, 4, 16, 64 epochs" in summary
    assert "one seed per setting" in summary
    assert "](figures/headline.png)" in summary and "papers' laws" in summary
    before_headline = text.split("figures/headline.png")[0]
    assert not re.search(r"^\|", before_headline, flags=re.M)  # no table before the headline figure


def test_the_header_counts_the_runs_of_every_stage(tmp_path):
    folder = data_study(tmp_path)
    index = json.loads((folder / "study.json").read_text())
    sft = folder / "sft-llada_e1_abc"
    sft.mkdir()
    (sft / "result.json").write_text(json.dumps({"run_id": sft.name, "stage": "sft", "arm": "llada", "sft_epochs": 1}))
    (sft / "scalars.jsonl").write_text(json.dumps({"step": 4, "val_loss": 1.0, "answer_f1": 0.1, "epoch": 1.0}))
    index["runs"] += [{"run_id": sft.name, "stage": "sft", "arm": "llada", "sft_epochs": 1},
                      {"run_id": "sft-qwen_e1_def", "stage": "sft", "arm": "qwen", "sft_epochs": 1},
                      {"run_id": "llada_u1000_r8_never", "stage": "pretrain", "arm": "llada"}]
    (folder / "study.json").write_text(json.dumps(index))
    text = build_report(folder, tmp_path / "report", bootstrap=0).read_text()
    assert ("- **Runs**: pretraining: 12 finished, 0 diverged, 1 missing; learning-rate sweeps: none; "
            "SFT: 1 finished, 1 missing") in text


# --- comparisons ------------------------------------------------------------------------------------------------


def _pairs(report: Path) -> list[tuple[str, str]]:
    claims = pd.read_csv(report.parent / "tables" / "claims.csv")
    return list(dict.fromkeys(zip(claims["diffusion"], claims["ar"])))


def test_an_added_arm_never_drops_a_comparison(tmp_path):
    """Every diffusion arm against every AR arm of `arms:`; a fourth arm adds its pairs and keeps the others, even
    before it has runs (its pairs say why they cannot be judged)."""
    three = build_report(data_study(tmp_path / "a", ("llada", "qwen", "llada-ar")), tmp_path / "ra", bootstrap=0)
    assert _pairs(three) == [("llada", "qwen"), ("llada", "llada-ar")]
    folder = data_study(tmp_path / "b", ("llada", "qwen", "llada-ar"))
    index = json.loads((folder / "study.json").read_text())
    index["spec"]["arms"] = ["llada", "qwen", "llada-ar", "qwen-ar-reg"]  # added, not run yet
    (folder / "study.json").write_text(json.dumps(index))
    four = build_report(folder, tmp_path / "rb", bootstrap=0)
    assert _pairs(four) == [("llada", "qwen"), ("llada", "llada-ar"), ("llada", "qwen-ar-reg")]
    claims = pd.read_csv(four.parent / "tables" / "claims.csv")
    new = claims[claims["ar"] == "qwen-ar-reg"]
    assert (new["verdict"] == "not testable").all() and new["reason"].str.contains("no finished").all()
    text = four.read_text()
    assert ("**Comparisons**: llada vs qwen, llada vs llada-ar, llada vs qwen-ar-reg (every diffusion arm against "
            "every AR arm)") in text
    for d, a in _pairs(four):
        assert f"**{d} vs {a}: " in text  # each comparison has its evidence section


def test_listed_comparisons_are_the_ones_compared_and_named_in_the_header(tmp_path):
    folder = data_study(tmp_path, ("llada", "qwen", "llada-ar"),
                        spec_extra={"comparisons": [["llada", "llada-ar"]]})
    report = build_report(folder, tmp_path / "report", bootstrap=0)
    assert _pairs(report) == [("llada", "llada-ar")]
    assert "**Comparisons**: llada vs llada-ar (from the spec's `comparisons`)" in report.read_text()


# --- determinism and safety -------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_runs_give_the_same_report_byte_for_byte(tmp_path):
    """Seeded resampling (effective-data draws, the fit's bootstrap), no timestamps, no absolute paths: built twice,
    and once more from a copy of the study folder elsewhere, every file is identical."""
    folder = data_study(tmp_path / "one", seeds=(0, 1))
    (folder / "broken_run").mkdir()
    (folder / "broken_run" / "result.json").write_text("{not json")  # named in the notes, by a relative path
    first = build_report(folder, tmp_path / "r1", bootstrap=5).parent
    second = build_report(folder, tmp_path / "r2", bootstrap=5).parent
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "runs" / "layout")
    third = build_report(copy, tmp_path / "r3", bootstrap=5).parent
    files = _files(first)
    assert "tables/effective_data.csv" in files and "tables/fits.csv" in files and "figures/headline.png" in files
    assert files == _files(second) == _files(third)
    text = files["report.md"].decode()
    assert str(tmp_path) not in text and "broken_run" in text
    assert not re.search(r"20\d\d-\d\d-\d\d", text)


def _report_then(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    folder = data_study(tmp_path)
    out = tmp_path / "reports" / "layout"
    build_report(folder, out, bootstrap=0)
    return folder, out, _files(out)


def test_a_failing_rebuild_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    folder, out, before = _report_then(tmp_path)
    (folder / "qwen_u1000_r4_32_s0" / "result.json").unlink()  # a rebuild would change the report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "loss_vs_flops", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(folder, out, bootstrap=0)
    assert _files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["layout"]  # no half-built folder left behind
    monkeypatch.undo()
    build_report(folder, out, bootstrap=0)
    assert _files(out) != before and "qwen_u1000_r4_32_s0" in (out / "report.md").read_text()


def test_a_killed_rebuild_leaves_the_previous_report_whole(tmp_path):
    """`dlmstudy report` killed (SIGKILL) halfway through its figures: the report folder is the old one, whole;
    the next build clears the dead build's folder and replaces the report."""
    folder, out, before = _report_then(tmp_path)
    script = ("import os, signal, sys\n"
              "from dlmstudy.analysis import figures\n"
              "from dlmstudy.cli import main\n"
              "figures.loss_vs_flops = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "sys.exit(main(['report', sys.argv[1], '--out', sys.argv[2]]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(out)], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert _files(out) == before
    leftovers = [p for p in out.parent.iterdir() if p.name != "layout"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".layout.building-")
    build_report(folder, out, bootstrap=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["layout"]


def test_a_swap_killed_between_its_renames_is_undone_on_the_next_build(tmp_path, monkeypatch):
    """Where the system cannot exchange two folders in one step, the old report waits beside the new one until the
    new one is in place; a build after a kill between the two renames puts the old one back first."""
    from dlmstudy import atomic

    folder, out, before = _report_then(tmp_path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    build_report(folder, out, bootstrap=0)
    assert _files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["layout"]
    os.replace(out, out.with_name(".layout.old"))  # killed after the first rename
    atomic.restore_folder(out)
    assert _files(out) == before


def test_a_folder_that_is_not_a_report_is_refused(tmp_path):
    from dlmstudy.errors import UserError

    folder = data_study(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="notes.txt"):
        build_report(folder, tmp_path / "mine", bootstrap=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- figures ----------------------------------------------------------------------------------------------------


@pytest.fixture
def drawn(tmp_path, monkeypatch) -> dict[str, Figure]:
    """Every figure of a two-size study with a diverged run and SFT, by file name, as drawn."""
    saved: dict[str, Figure] = {}
    real = Figure.savefig

    def keep(fig, fname, *args, **kwargs):
        saved[Path(fname).name] = fig
        return real(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    folder = data_study(tmp_path)
    for unique, epochs in ((1000, 1), (4000, 1), (16000, 1), (1000, 4), (1000, 16)):
        for arm in ("llada", "qwen"):
            write_result(folder, arm, unique, epochs, size="d48×3")
    write_result(folder, "llada", 1000, 64, size="d48×3",
                 extra={"diverged": True, "diverged_step": 30, "diverged_reason": "validation loss nan"})
    for arm, objective_loss in (("llada", 1.2), ("qwen", 3.5)):
        for k in (1, 2):
            sft = folder / f"sft-{arm}_e{k}_x"
            sft.mkdir()
            (sft / "result.json").write_text(json.dumps({"run_id": sft.name, "stage": "sft", "arm": arm,
                                                         "sft_epochs": k}))
            rows = [{"step": s, "loss": objective_loss + 1 / s, "epoch": s / 4} for s in range(1, 4 * k + 1)]
            rows += [{"step": 4 * e, "val_loss": objective_loss + 0.2 / e, "answer_f1": 0.1 * e, "accuracy": 0.0,
                      "answer_nll": 2.0 + (arm == "llada") - 0.1 * e, "epoch": e / k} for e in range(1, k + 1)]
            (sft / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_report(folder, tmp_path / "report", bootstrap=0)
    return saved


def _legends(fig: Figure) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_every_figure_has_one_legend_outside_its_panels(drawn):
    assert {"headline.png", "loss_vs_tokens.png", "loss_vs_epochs.png", "loss_vs_flops.png", "params_epochs.png",
            "sft.png", "sft_objectives.png"} <= set(drawn)
    for name, fig in drawn.items():
        if name == "params_epochs.png":
            continue  # a colour bar, no legend
        legends = _legends(fig)
        assert len(legends) == 1, name
        canvas = FigureCanvasAgg(fig)  # the figure was closed after saving; draw it again to measure it
        canvas.draw()
        renderer = canvas.get_renderer()
        box = legends[0].get_window_extent(renderer)
        assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in fig.axes if ax.get_visible()), name


def test_panels_run_in_numeric_order_and_sizes_differ_in_style(drawn):
    titles = [ax.get_title() for ax in drawn["loss_vs_tokens.png"].axes if ax.get_visible()]
    settings = [tuple(float(v.rstrip("kM")) * (1000 if v.endswith("k") else 1)
                      for v in re.findall(r"[UR]=([\d.]+[kM]?)", t)) for t in titles]
    assert settings == sorted(settings) and [r for u, r in settings if u == 1000] == [1, 4, 16, 64]
    ax = drawn["loss_vs_tokens.png"].axes[1]  # U=1k, R=4: both arms at both sizes
    styles = {(tuple(np.round(line.get_color(), 3)) if not isinstance(line.get_color(), str) else line.get_color(),
               line.get_linestyle()) for line in ax.get_lines()}
    assert len(styles) == 4  # arm by colour × size by line style: no two lines look alike


def test_epoch_axes_tick_at_the_epochs_trained(drawn):
    for name in ("headline.png", "loss_vs_epochs.png"):
        ax = drawn[name].axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"\d+", label) for label in labels), (name, labels)
    sft = drawn["sft.png"].axes[0]
    assert all(float(t).is_integer() for t in sft.get_xticks() if sft.get_xlim()[0] <= t <= sft.get_xlim()[1])


def test_heatmaps_share_one_colour_scale_with_one_colour_bar(drawn):
    fig = drawn["params_epochs.png"]
    meshes = [c for ax in fig.axes for c in ax.collections if isinstance(c, matplotlib.collections.QuadMesh)]
    assert len(meshes) >= 2 and len({(m.norm.vmin, m.norm.vmax) for m in meshes}) == 1
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 1
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "diverged" in texts  # the diverged run's cell says so


def test_sft_objectives_never_share_an_axis_across_arms(drawn):
    """Each arm's own SFT loss on its own panel: llada's losses are 1.2-2.2 in this study, qwen's 3.5-4.5."""
    panels = {ax.get_title().split(":")[0]: ax for ax in drawn["sft_objectives.png"].axes if ax.get_visible()}
    assert set(panels) == {"llada", "qwen"}
    for arm, (low, high) in (("llada", (1.0, 3.0)), ("qwen", (3.0, 5.0))):
        values = np.concatenate([line.get_ydata() for line in panels[arm].get_lines()])
        assert len(values) and ((values > low) & (values < high)).all(), arm
        assert len({matplotlib.colors.to_hex(line.get_color()) for line in panels[arm].get_lines()}) == 1
    shared = [ax.get_title() for ax in drawn["sft.png"].axes if ax.get_visible()]
    assert shared == ["answer_nll", "answer_f1", "accuracy"]  # only what the arms share, together


# --- missing values and the page --------------------------------------------------------------------------------


def test_missing_and_diverged_values_are_named_never_a_bare_dash(tmp_path):
    from tests.test_report import make_study

    folder = make_study(tmp_path)
    write_result(folder, "llada", 1000, 64, extra={"diverged": True, "diverged_step": 30,
                                                    "diverged_reason": "validation loss nan from step 30"})
    text = build_report(folder, tmp_path / "report", bootstrap=0).read_text()
    cells = [cell.strip() for line in text.splitlines() if line.startswith("|")
             for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
    assert cells and not {"", "-", "–", "nan", "NaN", "None"} & set(cells)
    assert "validation loss nan from step 30" in text.split("## Diverged runs")[1]
    assert "Not drawn (diverged): llada d32×2, U=1k, R=64." in text


def test_html_tables_scroll_in_their_own_box_and_images_fit(tmp_path):
    build_report(data_study(tmp_path), tmp_path / "report", bootstrap=0)
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("<table>") == html.count('<div class="table"><table>') > 0
    assert ".table{overflow-x:auto" in html and "img{max-width:100%" in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_first_screen_fits_1400_px_without_scrolling_sideways(tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    folder = data_study(tmp_path)  # six data settings: a figure four panels wide
    settings = {f"setting_{i}": f"torch.compile-max-autotune-{i}" for i in range(12)}  # a table of long cells
    (folder / "bench.json").write_text(json.dumps([{"device": "cpu", "arm": arm, "tokens_per_s": 1.0, **settings}
                                                   for arm in ("llada", "qwen")]))
    build_report(folder, out, bootstrap=0)
    probe = ('<script>addEventListener("load", () => { const d = document.documentElement; '
             'const img = document.images[0].getBoundingClientRect(); document.body.dataset.layout = '
             '[d.scrollWidth, d.clientWidth, Math.round(img.top), Math.round(img.right)].join(","); });'
             '</script></body>')
    (out / "probe.html").write_text((out / "report.html").read_text().replace("</body>", probe))
    dom = chromium("--window-size=1400,1000", "--dump-dom", (out / "probe.html").as_uri(), tmp=tmp_path).stdout
    scroll, width, top, right = map(int, re.search(r'data-layout="([\d,]+)"', dom).group(1).split(","))
    assert scroll <= width <= 1400 and right <= width  # nothing wider than the window, the headline included
    assert top < 1000  # the headline figure starts on the first screen
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1000", (out / "report.html").as_uri(), tmp=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[1] == 1400 and pixels.std() > 10


def test_sft_answers_of_both_arms_side_by_side(tmp_path):
    """The held-out questions after an SFT epoch count with each arm's answer in one row; an arm that answers only
    an end token shows as an empty answer, not as a blank."""
    folder = data_study(tmp_path)
    index = json.loads((folder / "study.json").read_text())
    for arm, answer in (("llada", ""), ("qwen", "Paris, I think")):
        run_id = f"sft-{arm}_e2_x"
        (folder / run_id / "eval").mkdir(parents=True)
        (folder / run_id / "result.json").write_text(json.dumps({"run_id": run_id, "stage": "sft", "arm": arm,
                                                                 "sft_epochs": 2}))
        probes = [{"question": f"Q{i}: capital of France?", "expected": "Paris", "text": answer} for i in range(8)]
        (folder / run_id / "eval" / "qa_samples.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
        index["runs"].append({"run_id": run_id, "stage": "sft", "arm": arm, "sft_epochs": 2})
    (folder / "study.json").write_text(json.dumps(index))
    text = build_report(folder, tmp_path / "report", bootstrap=0).read_text()
    section = text.split("### Held-out questions, both arms' answers")[1].split("\n## ")[0]
    assert "After 2 SFT epochs" in section and "| question | expected | llada | qwen |" in section
    assert "| Q0: capital of France? | Paris | (empty answer) | Paris, I think |" in section
    assert section.count("| Q") == 5  # a few questions, not all of them
