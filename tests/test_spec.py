"""Spec validation: bad input gets one clear line naming the key and the file, and exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlmstudy.errors import UserError
from dlmstudy.study.plan import data_settings, run_id
from dlmstudy.study.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
GRID = {"unique_tokens": [1000], "epochs": [1]}


def write(tmp_path, raw) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("raw, expected", [
    ({"name": "x", "grid": GRID, "colour": 1}, "unknown key 'colour'"),
    ({"name": "x", "grid": GRID, "data": {"pretrain": {"sourc": "a"}}}, "unknown key 'data.pretrain.sourc'"),
    ({"name": "x", "grid": GRID, "training": {"learning_rat": 1e-3}}, "unknown key 'training.learning_rat'"),
    ({"name": "x", "grid": GRID, "data": {"max_length": "long"}}, "data.max_length"),
    ({"name": "x"}, "missing key 'grid'"),
    ({"name": "x", "grid": {"unique_tokens": [1]}}, "exactly one of epochs or total_tokens"),
    ({"name": "x", "grid": GRID, "tokenizer": {"kind": "pretrained"}}, "needs tokenizer.path"),
    ({"name": "x", "grid": GRID, "data": {"pretrain": {"people": 3000}}}, "data.pretrain.people"),
    ({"name": "x", "grid": GRID, "training": {"cuda_graphs": True}}, "training.cuda_graphs needs training.compile"),
    ({"name": "x", "grid": GRID, "training": {"compile": True, "fast_head": False}}, "training.compile needs the fast"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"batch_size": [0]}}},
     "evaluation.sampler_grid.batch_size"),
])
def test_bad_spec_is_one_line_naming_key_and_file(tmp_path, raw, expected):
    path = write(tmp_path, raw)
    with pytest.raises(UserError) as err:
        load_spec(path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg


def test_training_keys_go_to_training_arguments_and_aliases_map():
    spec = parse_spec({"name": "x", "grid": GRID,
                       "training": {"learning_rate": 3e-4, "warmup_ratio": 0.1, "random_length_ratio": 0.02}})
    assert spec.training.arguments == {"learning_rate": 3e-4, "warmup_steps": 0.1}
    assert spec.training.random_length_ratio == 0.02


def test_grid_expansion_zip_product_and_total_tokens():
    zipped = parse_spec({"name": "x", "grid": {"unique_tokens": [1, 2], "epochs": [4, 1], "pairing": "zip"}})
    assert [(s.unique, s.epochs) for s in data_settings(zipped.grid)] == [(1, 4.0), (2, 1.0)]
    prod = parse_spec({"name": "x", "grid": {"unique_tokens": [1, 2], "epochs": [4, 1]}})
    assert len(data_settings(prod.grid)) == 4
    total = parse_spec({"name": "x", "grid": {"unique_tokens": [100, 400], "total_tokens": 800}})
    assert [s.epochs_for(s.unique) for s in data_settings(total.grid)] == [8.0, 2.0]


def test_speed_only_evaluation_switches_stay_out_of_run_identity():
    plain = parse_spec({"name": "x", "grid": GRID})
    fast = parse_spec({"name": "x", "grid": GRID, "evaluation": {"compiled": True, "sampler_grid": {
        "compiled": [False, True], "batch_size": [1, 8]}}})
    assert fast.evaluation.identity() == plain.evaluation.identity()
    swept = parse_spec({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"steps": [4]}}})
    assert swept.evaluation.identity() != plain.evaluation.identity()


def test_run_id_is_a_stable_hash_of_the_config():
    config = {"arm": "llada", "unique_tokens": 1000, "epochs": 2.0, "lr": 1e-3}
    assert run_id(config) == run_id(dict(reversed(list(config.items()))))
    assert run_id(config) != run_id({**config, "lr": 2e-3})
    assert run_id(config).startswith("llada_u1k_r2_")


def test_shipped_smoke_spec_is_valid_and_identical_to_package_copy():
    spec = load_spec(REPO / "studies" / "smoke.yaml")
    assert spec.name == "smoke" and set(spec.arms) == {"llada", "qwen"}
    assert (REPO / "studies" / "smoke.yaml").read_text() == (REPO / "dlmstudy" / "studies" / "smoke.yaml").read_text()


@pytest.mark.parametrize("args, expected", [
    (["plan", "does-not-exist.yaml"], "study spec not found: does-not-exist.yaml"),
    (["report", "no/such/study"], "not a study folder"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, expected):
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr


def test_cli_refuses_an_abbreviated_option(tmp_path):
    """`plan` has --device_name, not --device_n: a prefix must not be taken for the longer option."""
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", "plan", str(REPO / "studies" / "smoke.yaml"),
                           "--device_n", "cuda"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --device_n cuda" in proc.stderr


def test_cli_bad_key_exits_2(tmp_path):
    path = write(tmp_path, {"name": "x", "grid": GRID, "bogus": 1})
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", "plan", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"dlmstudy: error: {path}: unknown key 'bogus'"


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("run", "plan", "report", "params"):
        assert command in proc.stdout
