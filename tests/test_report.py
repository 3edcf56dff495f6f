"""`dlmstudy report` on a synthetic study folder: tables, missing runs, claims, figures that exist, an offline
report.html that renders in headless Chromium with every image loaded, and SwanLab logs decoded from disk."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dlmstudy.analysis import swanlab_reader
from dlmstudy.analysis.frames import load_study
from dlmstudy.cli import main
from dlmstudy.reports.render import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SPEC = {"name": "synthetic", "arms": ["llada", "qwen"], "tokenizer": {"kind": "bpe", "vocab_size": 128},
        "data": {"pretrain": {"source": "builtin:biographies"}, "max_length": 32}}
ARMS = {"llada": ("mdm", "ELBO (upper bound on NLL)"), "qwen": ("ar", "exact NLL")}


def write_run(folder: Path, arm: str, unique: int, epochs: float, loss: float, *, qa=True) -> str:
    """A finished run folder as `execute_run` leaves it: run.json, scalars.jsonl, eval/qa_samples.jsonl, result.json."""
    objective, kind = ARMS[arm]
    run_id = f"{arm}_u{unique}_r{epochs:g}_0123456789"
    tokens = int(unique * epochs)
    run = folder / run_id
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": run_id, "arm": arm, "seed": 0,
                                              "size": {"hidden_size": 32, "num_layers": 2}}))
    steps = np.arange(1, 9)
    rows = [{"step": int(s), "loss": loss + 2.0 / s, "tokens_seen": float(s * tokens / 8)} for s in steps]
    rows += [{"step": int(s), "val_loss": loss + 1.0 / s, "val_loss_stderr": 0.01 if objective == "mdm" else 0.0,
              "tokens_seen": float(s * tokens / 8)} for s in steps[1::2]]
    (run / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if qa:
        probes = [{"person": f"p{i}", "attribute": "city", "direction": d, "question": "q", "expected": "a",
                   "answer": "a" if i % 3 == 0 else "b", "correct": i % 3 == 0}
                  for d in ("forward", "reverse") for i in range(12)]
        (run / "eval" / "qa_samples.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    result = {"run_id": run_id, "arm": arm, "backbone": arm, "objective": objective, "sampler": "x",
              "params_total": 20000, "params_non_embedding": 12000, "params_embedding": 4000,
              "params_output_head": 4000,
              "unique_tokens": unique, "unique_people": 10, "epochs": epochs, "tokens": tokens, "val_loss_kind": kind,
              "best_val_loss": loss, "final_val_loss": loss,
              "final_val_loss_stderr": 0.01 if objective == "mdm" else 0.0,
              "accuracy_forward": 1 / 3, "accuracy_reverse": 1 / 3, "n_probes": 24, "train_runtime_s": 1.0,
              "train_tokens_per_s": 1000.0, "steps": 8, "tokens_per_step": tokens // 8, "wall_time_s": 2.0,
              "device": "cpu"}
    (run / "result.json").write_text(json.dumps(result))
    return run_id


def make_study(root: Path) -> Path:
    """Four finished runs (two arms × two settings at equal tokens), one planned run never started, one run
    started without a result, and the optional outputs: lm_eval results, a sampler grid, SFT, bench records."""
    folder = root / "runs" / "synthetic"
    folder.mkdir(parents=True)
    ids = [write_run(folder, arm, u, r, loss + (0.05 if r > 1 else 0.0))
           for arm, loss in (("llada", 4.0), ("qwen", 3.0)) for u, r in ((4000, 1.0), (1000, 4.0))]
    planned = [{"run_id": i, "arm": i.split("_")[0]} for i in ids]
    planned += [{"run_id": "llada_u500_r8_never", "arm": "llada", "unique_tokens": 500, "epochs": 8.0},
                {"run_id": "qwen_u500_r8_started", "arm": "qwen", "unique_tokens": 500, "epochs": 8.0}]
    (folder / "qwen_u500_r8_started").mkdir()
    (folder / "qwen_u500_r8_started" / "run.json").write_text("{}")
    (folder / "study.json").write_text(json.dumps({"name": "synthetic", "spec": SPEC, "runs": planned}))
    first = folder / ids[0]
    lm_dir = first / "eval" / "lm_eval"
    lm_dir.mkdir()
    (lm_dir / "results.json").write_text(json.dumps({
        "results": {"bio_qa_forward": {"alias": "bio_qa_forward", "exact_match,none": 0.25,
                                       "exact_match_stderr,none": 0.05}},
        "n-samples": {"bio_qa_forward": {"original": 40, "effective": 40}}}))
    grid = [{"steps": s, "block_length": b, "threshold": t, "accuracy": 0.1 * s / b, "tokens_per_s": 100.0 * b / s,
             "same_answers": 0.9, "accuracy_diff_se": 0.01} for s in (4, 8) for b in (4, 8) for t in (np.nan, 0.9)]
    pd.DataFrame(grid).to_csv(first / "eval" / "sampler_grid.csv", index=False)
    for epoch in (1, 2):
        sft = first / "sft" / "alpaca-2ep" / f"epoch-{epoch}"
        sft.mkdir(parents=True)
        (sft / "result.json").write_text(json.dumps({"val_loss": 2.0 / epoch, "accuracy": 0.2 * epoch}))
    (first / "sft" / "alpaca-2ep" / "scalars.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s, "epoch": s / 4}) for s in range(1, 9)).replace("}{", "}\n{"))
    (folder / "bench.json").write_text(json.dumps([
        {"device": "cpu", "arm": arm, "tokens_per_s": 1000.0 + i, "mfu": 0.01, "peak_memory_gb": 0.5}
        for i, arm in enumerate(ARMS)]))
    return folder


@pytest.fixture
def study(tmp_path) -> Path:
    return make_study(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic study and its report, built once for the tests that only read them."""
    root = tmp_path_factory.mktemp("built")
    folder = make_study(root)
    build_report(folder, root / "report", bootstrap=0)
    return folder, root / "report"


def test_report_tables_missing_runs_claims_and_figures(built):
    study, out = built
    text = (out / "report.md").read_text()
    assert "## Runs" in text and "| run | arm | size |" in text
    for run_id in [p.name for p in study.iterdir() if (p / "result.json").exists()]:
        assert run_id in text
    missing = text.split("## Missing runs")[1]
    assert "llada_u500_r8_never" in missing and "not started" in missing
    assert "qwen_u500_r8_started" in missing and "started, no result" in missing
    assert "| claim | comparison | verdict | decisive number |" in text
    claims = pd.read_csv(out / "tables" / "claims.csv")
    assert len(claims) == 4 and claims["verdict"].notna().all()
    assert "ELBO" in text and "not comparable" in text
    for name in ("runs", "missing", "claims", "claims_evidence", "repetition", "arm_gaps", "qa_accuracy", "scalars",
                 "lm_eval", "sampler_grid", "sft", "throughput", "sources"):
        assert (out / "tables" / f"{name}.csv").exists(), name
    assert pd.read_csv(out / "tables" / "throughput.csv")["tokens_per_s"].tolist() == [1000.0, 1001.0]
    assert pd.read_csv(out / "tables" / "lm_eval.csv").loc[0, "value"] == 0.25
    html = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert {"figures/headline.png", "figures/loss_vs_tokens.png", "figures/loss_vs_epochs.png",
            "figures/loss_vs_flops.png", "figures/accuracy.png", "figures/sampler_accuracy.png",
            "figures/sampler_speed.png", "figures/sampler_tradeoff.png", "figures/sft.png",
            "figures/sft_objectives.png"} <= set(images)
    assert all((out / src).is_file() and (out / src).stat().st_size > 1000 for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html and "<script" not in html


def test_partial_study_and_rebuild_without_optional_outputs(tmp_path):
    """A study with one finished run, no plan file and no logged scalars still reports; a second build leaves no
    stale figures."""
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / write_run(folder, "qwen", 1000, 1.0, 3.0, qa=False) / "scalars.jsonl").unlink()
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    build_report(folder, out, bootstrap=0)
    text = (out / "report.md").read_text()
    assert "pretraining: 1 finished, 0 diverged, 0 missing" in text and "| not testable |" in text
    assert not (out / "figures" / "stale.png").exists()
    assert not (out / "tables" / "throughput.csv").exists()


def test_cli_report(tmp_path, capsys):
    folder = tmp_path / "runs" / "one"
    folder.mkdir(parents=True)
    run_id = write_run(folder, "llada", 1000, 1.0, 4.0, qa=False)
    (folder / "study.json").write_text(json.dumps({"name": "one", "runs": []}))
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 0
    (folder / "study.json").write_text(json.dumps({"name": "one", "runs": [{"run_id": "planned_only", "arm": "qwen"}]}))
    (folder / run_id / "result.json").unlink()
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 0  # nothing finished yet
    assert "pretraining: 0 finished, 0 diverged, 2 missing" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "report.html").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err


def write_swanlab_log(path: Path, scalars: list[tuple[int, str, float]], long_line: str) -> None:
    """A `.swanlab` file written by swanlab's own writer: a start record, a log line long enough to span blocks,
    then the scalars."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreWriter

    writer = DataStoreWriter()
    writer.open(path)
    start = Record(num=-1)
    start.start.name = "run"
    writer.write(start.SerializeToString())
    log = Record(num=1)
    log.log.line = long_line
    writer.write(log.SerializeToString())
    for num, (step, key, value) in enumerate(scalars, 2):
        record = Record(num=num)
        record.scalar.key, record.scalar.step = key, step
        record.scalar.value.number = value
        writer.write(record.SerializeToString())
    writer.close()


@pytest.mark.skipif(not swanlab_reader.swanlab_available(), reason="swanlab is not installed")
def test_swanlab_offline_log_decoded_and_used_without_the_mirror(study):
    run = next(p for p in study.iterdir() if p.name.startswith("qwen_u1000"))
    scalars = [(s, key, 3.0 + s / 100 + (key == "val_loss")) for s in range(1, 2000) for key in ("loss", "val_loss")]
    log_dir = run / "swanlog" / "run-20260101_000000-abc"
    log_dir.mkdir(parents=True)
    write_swanlab_log(log_dir / "run-abc.swanlab", scalars, "x" * 70000)
    decoded = swanlab_reader.read_swanlab_run(run)
    assert len(decoded) == len(scalars)
    assert decoded.set_index(["key", "step"]).loc[("val_loss", 1999), "value"] == pytest.approx(3.0 + 19.99 + 1)
    # A torn tail (a run killed mid-write) keeps every record before it.
    raw = (log_dir / "run-abc.swanlab").read_bytes()
    (log_dir / "run-abc.swanlab").write_bytes(raw[:-5])
    assert len(swanlab_reader.read_swanlab_run(run)) == len(scalars) - 1
    (log_dir / "run-abc.swanlab").write_bytes(raw)
    (run / "scalars.jsonl").unlink()
    frames = load_study(study)
    from_log = frames.scalars[frames.scalars["run_id"] == run.name]
    assert set(from_log["source"]) == {"swanlab"} and from_log["val_loss"].notna().sum() == 1999
    assert frames.sources.set_index("run_id").loc[run.name, "SwanLab scalars"] == len(scalars)


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_html_renders_offline_in_chromium(built, tmp_path):
    from PIL import Image

    out = built[1]
    html = (out / "report.html").read_text()
    n_images = len(re.findall(r"<img", html))
    probe = ('<script>addEventListener("load", () => { const ok = [...document.images].filter('
             'i => i.complete && i.naturalWidth > 0).length; document.body.dataset.loaded = ok + "/" + '
             'document.images.length; });</script></body>')
    (out / "probe.html").write_text(html.replace("</body>", probe))
    dom = chromium("--dump-dom", (out / "probe.html").as_uri(), tmp=tmp_path).stdout
    assert f'data-loaded="{n_images}/{n_images}"' in dom, dom[:300]
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri(), tmp=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and figures, not a blank page
