"""studies/tutorial.yaml and `dlmstudy plan` without the data or weights: runs, tokens, estimates, missing inputs."""

import json
from pathlib import Path

import pytest
import yaml

from dlmstudy.cli import main
from dlmstudy.study.estimate import BenchRecord, closest_record

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = str(REPO / "studies" / "tutorial.yaml")
MISSING = ["data.pretrain.source ./data/c4-en (not found)", "tokenizer.path ./models/Qwen2.5-7B (not found)",
           "sft.source ./data/alpaca-zh (not found)", "sft.base.llada ./models/LLaDA-8B-Base (not found)",
           "sft.base.qwen ./models/Qwen2.5-7B (not found)"]
TINY = {"name": "tiny", "tokenizer": {"kind": "bpe", "vocab_size": 320}, "data": {"max_length": 32},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "grid": {"unique_tokens": [2048, 8192], "epochs": [1, 3], "pairing": "zip"}}


def bench_record(device: str, objective: str, tokens_per_s: float, flops_per_token: float, **extra) -> dict:
    arm = "llada" if objective == "mdm" else "qwen"
    return {"measurement": "train", "device_name": device, "config": "seed-100m", "arm": arm,
            "objective": objective, "mode": "plain", "batch": 16, "seq_len": 1024,
            "tokens_per_s": tokens_per_s, "mfu": 0.2, "flops_per_token": flops_per_token, **extra}


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    """A folder without the tutorial's data, tokenizer or models; the offline variables main() sets are restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def plan_json(capsys, *args: str) -> tuple[list[dict], str]:
    assert main(["plan", *args, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_plan_without_data_or_weights_lists_runs_tokens_and_missing_inputs(empty_dir, capsys):
    assert main(["plan", TUTORIAL]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for label in ("llada_u524M_r2", "qwen_u524M_r2", "llada_u105M_r10", "qwen_u105M_r10"):
        row = next(line for line in lines if line.startswith(label + " "))
        assert "1.05G" in row  # total tokens of every setting
    assert sum(line.startswith("sft-") for line in lines) == 2
    assert [line.removeprefix("missing: ") for line in lines if line.startswith("missing: ")] == MISSING
    assert "151,680 rows assumed" in out and "Traceback" not in out
    assert not (empty_dir / "runs").exists()  # a plan from the spec writes nothing


def test_two_data_settings_spend_equal_tokens(empty_dir, capsys):
    rows, err = plan_json(capsys, TUTORIAL)
    pretrain = [r for r in rows if r["stage"] == "pretrain"]
    assert len(pretrain) == 4 and {r["total_tokens"] for r in pretrain} == {1_048_576_000}
    assert {(r["unique_tokens"], r["epochs"]) for r in pretrain} == {(524_288_000, 2), (104_857_600, 10)}
    assert {r["arm"] for r in rows if r["stage"] == "sft"} == {"llada", "qwen"}
    assert err.splitlines() == [f"missing: {m}" for m in MISSING]


def test_estimate_uses_the_given_bench_file_and_scales_with_tokens(empty_dir, capsys):
    (empty_dir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    records = [bench_record("Fake GPU A", "mdm", 1e5, 4e8), bench_record("Fake GPU A", "ar", 5e4, 4e8),
               bench_record("Fake GPU B", "mdm", 2e5, 4e8),
               {"measurement": "sample", "device_name": "Fake GPU A", "tokens_per_s": 1.0}]
    (empty_dir / "bench.json").write_text(json.dumps(records))
    rows, _ = plan_json(capsys, "tiny.yaml", "--bench", "bench.json", "--device_name", "gpu a")
    for r in rows:
        speed = 1e5 if r["arm"] == "llada" else 5e4
        assert r["est_seconds"] == pytest.approx(r["total_tokens"] * r["flops_per_token"] / (speed * 4e8))
        assert r["bench_record"].startswith("Fake GPU A")
        assert r["flops"] == 6 * r["n_matmul"] * r["total_tokens"]
    llada = sorted((r for r in rows if r["arm"] == "llada"), key=lambda r: r["total_tokens"])
    assert llada[1]["total_tokens"] == 12 * llada[0]["total_tokens"]  # 8192 x 3 against 2048 x 1
    assert llada[1]["est_seconds"] == pytest.approx(12 * llada[0]["est_seconds"])
    other, _ = plan_json(capsys, "tiny.yaml", "--bench", "bench.json", "--device_name", "GPU B")
    assert [r["bench_record"][:10] for r in other if r["arm"] == "llada"] == ["Fake GPU B"] * 2
    assert all(r["est_seconds"] is None for r in other if r["arm"] == "qwen")  # GPU B has no AR record


def test_estimate_adds_the_validation_forward_passes(empty_dir, capsys):
    """TINY at L 32: 512 validation sequences (16,384 tokens); the 2,048-token run takes 4 steps of 16 sequences
    and evaluates after each on the whole set, then once more at the end: 5 x 512 x 32 positions, times 32
    Monte-Carlo draws for diffusion; forward only, so a third of a training step's time per token."""
    (empty_dir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (empty_dir / "bench.json").write_text(json.dumps([bench_record("GPU", "mdm", 1e5, 4e8),
                                                     bench_record("GPU", "ar", 1e5, 4e8)]))
    rows, _ = plan_json(capsys, "tiny.yaml", "--bench", "bench.json")
    small = {r["arm"]: r for r in rows if r["total_tokens"] == 2048}
    assert small["qwen"]["eval_tokens"] == 5 * 512 * 32
    assert small["llada"]["eval_tokens"] == 5 * 512 * 32 * 32
    for r in small.values():
        speed = 1e5 * 4e8 / r["flops_per_token"]
        assert r["est_eval_seconds"] == pytest.approx(r["eval_tokens"] / (3 * speed))
        assert r["est_total_seconds"] == pytest.approx(r["est_seconds"] + r["est_eval_seconds"])


def test_closest_record_prefers_the_training_path_then_the_shape():
    def rec(mode: str, fpt: float, batch: int = 16) -> BenchRecord:
        return BenchRecord("H200", "x", "llada", "mdm", mode, batch, 1024, 1e5, fpt)

    records = [rec("plain", 5e8), rec("fast", 1e8), rec("fast", 4.5e8), rec("fast", 5e8, batch=64)]
    picked = closest_record(records, objective="mdm", flops_per_token=5e8, seq_len=1024, batch=16, mode="fast")
    assert picked == records[2]
    assert closest_record(records, objective="ar", flops_per_token=5e8, seq_len=1024, batch=16) is None


def test_plan_takes_the_vocabulary_from_a_tokenizer_folder(empty_dir, capsys):
    from dlmstudy.data.tokenizer import train_bpe

    tok = train_bpe(["alpha beta gamma delta " * 20, "epsilon zeta eta theta " * 20], 400)
    tok.save_pretrained("tok")
    (empty_dir / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "tokenizer": {"kind": "pretrained", "path": "tok"}}))
    assert main(["plan", "tiny.yaml"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    vocab = 64 * -(-len(tok) // 64)
    assert len(tok) < 384 and line == f"vocabulary {vocab} rows from tok"  # not the assumed 151,680
    rows, _ = plan_json(capsys, "tiny.yaml")
    assert all(r["params_total"] - r["params_non_embedding"] == 2 * vocab * 32 for r in rows)  # input + output rows


def test_plan_of_a_people_grid_prepares_the_built_in_corpus_and_shows_exact_run_ids(empty_dir, capsys):
    spec = {**TINY, "data": {"pretrain": {"people": 40}, "validation_tokens": 256, "max_length": 32},
            "grid": {"unique_people": [10, 30], "total_tokens": 2048}}
    (empty_dir / "people.yaml").write_text(yaml.safe_dump(spec))
    rows, err = plan_json(capsys, "people.yaml")
    assert err == "" and len(rows) == 4
    assert all(r["run_id"] and r["run_id"].startswith(r["label"]) and len(r["run_id"].rsplit("_", 1)[1]) == 10
               for r in rows)


def test_run_with_missing_inputs_exits_2_with_one_line_naming_the_path(empty_dir, capsys):
    assert main(["run", TUTORIAL, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing input: data.pretrain.source ./data/c4-en (not found)" in err[0]
    assert not (empty_dir / "runs" / "tutorial").exists()


def test_a_bad_bench_file_is_one_line_and_exit_2(empty_dir, capsys):
    (empty_dir / "bench.json").write_text(json.dumps([{"measurement": "train", "device_name": "X"}]))
    assert main(["plan", TUTORIAL, "--bench", "bench.json"]) == 2
    assert capsys.readouterr().err.strip() == "dlmstudy: error: bench.json: record 0 has no 'config'"
