"""Spec validation: bad input gets one clear line naming the key and the file, and exit status 2."""

import json
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
    # numbers a run would fail on (or silently misuse) after training started
    ({"name": "x", "grid": GRID, "training": {"per_device_train_batch_size": 0}},
     "training.per_device_train_batch_size: must be at least 1"),
    ({"name": "x", "grid": GRID, "training": {"gradient_accumulation_steps": -2}}, "training.gradient_accumulation"),
    ({"name": "x", "grid": GRID, "evaluation": {"batch_size": 0}}, "evaluation.batch_size"),
    ({"name": "x", "grid": GRID, "training": {"learning_rate": "fast"}}, "training.learning_rate: input should be"),
    ({"name": "x", "grid": GRID, "training": {"warmup_steps": -1}}, "training.warmup_steps: must be at least 0"),
    ({"name": "x", "grid": GRID, "training": {"learning_rate": float("inf")}}, "training.learning_rate"),
    ({"name": "x", "grid": GRID, "training": {"max_grad_norm": float("nan")}}, "training.max_grad_norm"),
    ({"name": "x", "grid": GRID, "training": {"lr_scheduler_type": "fastest"}}, "training.lr_scheduler_type"),
    ({"name": "x", "grid": GRID, "training": {"max_steps": 0}}, "training.max_steps"),
    ({"name": "x", "grid": GRID, "sft": {"learning_rate": "slow"}}, "sft.learning_rate"),
    ({"name": "x", "grid": {"unique_tokens": [1000], "epochs": [float("nan")]}}, "grid.epochs[0]"),
    ({"name": "x", "grid": {"unique_tokens": [1000], "epochs": [0]}}, "grid.epochs[0]"),
    ({"name": "x", "grid": GRID, "model": {"rope_theta": float("inf")}}, "model.rope_theta"),
    ({"name": "x", "grid": {"unique_tokens": [], "epochs": [1]}}, "grid.unique_tokens"),
    ({"name": "x", "grid": {"unique_tokens": [1000], "epochs": []}}, "grid.epochs"),
    ({"name": "x", "grid": {"unique_tokens": [-5], "epochs": [1]}}, "grid.unique_tokens[0]"),
    ({"name": "x", "grid": {"unique_tokens": [100], "epochs": [1]}}, "grid.unique_tokens: 100 is less than one"),
    ({"name": "x", "grid": {"unique_people": [90], "epochs": [1]}, "data": {"pretrain": {"people": 50}}},
     "grid.unique_people: 90 exceeds data.pretrain.people"),
    ({"name": "x", "grid": {"unique_people": [9], "epochs": [1]}, "data": {"pretrain": {"source": "c.jsonl"}}},
     "grid.unique_people: counts people of the built-in"),
    ({"name": "x", "grid": GRID, "data": {"validation_tokens": 64}}, "data.validation_tokens"),
    ({"name": "x", "grid": {"unique_tokens": [1024], "total_tokens": 64}}, "grid.total_tokens: 64 is less than one"),
    ({"name": "x", "grid": {"unique_tokens": [1024], "epochs": [0.05]}}, "for 0.05 epochs is less than one sequence"),
    ({"name": "x", "grid": GRID, "training": {"learning_rate": True}}, "training.learning_rate: a number, not true"),
    ({"name": "x", "grid": GRID, "training": {"eval_every": 5, "eval_steps": 3}}, "training.eval_every and"),
    ({"name": "x", "grid": GRID, "sft": {"epochs": [0]}}, "sft.epochs[0]"),
    # keys that the rest of the spec makes unused
    ({"name": "x", "grid": GRID, "tokenizer": {"kind": "pretrained", "path": "/t", "vocab_size": 4096}},
     "tokenizer.vocab_size: not used with tokenizer.kind pretrained"),
    ({"name": "x", "grid": GRID, "tokenizer": {"path": "/t"}}, "tokenizer.path: used only with"),
    ({"name": "x", "grid": GRID, "data": {"pretrain": {"source": "c.jsonl", "people": 100}}}, "data.pretrain.people"),
    ({"name": "x", "grid": GRID, "data": {"pretrain": {"text_field": "body"}}}, "data.pretrain.text_field: not used"),
    ({"name": "x", "grid": {"unique_tokens": [1024], "total_tokens": 4096, "pairing": "zip"}}, "grid.pairing"),
    ({"name": "x", "grid": {**GRID, "params_kind": "total"}}, "grid.params_kind: not used without grid.params"),
    ({"name": "x", "grid": GRID, "training": {"fast_head": False, "head_chunk": 512}}, "training.head_chunk"),
    ({"name": "x", "grid": GRID, "arms": ["qwen"], "training": {"mask_eps": 0.01}}, "training.mask_eps"),
    ({"name": "x", "grid": GRID, "evaluation": {"lm_eval": {"limit": 5}}}, "evaluation.lm_eval.limit: not used"),
    ({"name": "x", "grid": GRID, "sft": {"r": 8}}, "sft.r: a LoRA setting, and sft.lora is false"),
    # sizes that cannot be built
    ({"name": "x", "grid": GRID, "model": {"hidden_size": 66, "num_heads": 4}}, "model.hidden_size: 66 is not"),
    ({"name": "x", "grid": GRID, "model": {"num_heads": 4, "num_kv_heads": 3}}, "model.num_kv_heads: 3 does not"),
    ({"name": "x", "grid": GRID, "model": {"hidden_size": 36, "num_heads": 4}}, "head width"),
    ({"name": "x", "grid": GRID, "model": {"num_layers": 0}}, "model.num_layers"),
    ({"name": "x", "grid": {**GRID, "params": [10**6]}, "model": {"hidden_size": 128}}, "model.hidden_size: not used"),
    # evaluation and sampler-grid settings that do not combine
    ({"name": "x", "grid": GRID, "evaluation": {"gen_length": 16, "block_length": 5}}, "evaluation.block_length"),
    ({"name": "x", "grid": GRID, "evaluation": {"gen_length": 16, "block_length": 4, "steps": 6}},
     "evaluation.steps: 6 is not divisible by the number of blocks 4"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"steps": [8], "block_length": [5]}}},
     "evaluation.sampler_grid.block_length: 5 does not divide"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"steps": [3], "block_length": [8]}}},
     "evaluation.sampler_grid.steps: 3 is not divisible"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"steps": [8], "block_length": []}}},
     "evaluation.sampler_grid.block_length: empty"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"block_length": [8]}}},
     "evaluation.sampler_grid.block_length: given without sampler_grid.steps"),
    ({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {"steps": [8], "block_length": [8],
                                                                 "threshold": [1.5]}}}, "sampler_grid.threshold[0]"),
    # names
    ({"name": "../up", "grid": GRID}, "name: a plain identifier"),
    ({"name": "a/b", "grid": GRID}, "name: a plain identifier"),
    ({"name": "x" * 65, "grid": GRID}, "name: a plain identifier"),
    ({"name": "", "grid": GRID}, "name: a plain identifier"),
    # collisions
    ({"name": "x", "grid": GRID, "arms": ["llada", "qwen", "llada"]}, "arms: 'llada' listed twice"),
    ({"name": "x", "grid": GRID, "arms": ["llada", "llada-mdm"]}, "arms: 'llada' and 'llada-mdm' are one arm"),
    ({"name": "x", "grid": GRID, "arms": ["llada", "nope"]}, "arms: unknown arm 'nope'"),
    ({"name": "x", "grid": {"unique_tokens": [1000, 1000], "epochs": [1]}}, "grid.unique_tokens: 1000 listed twice"),
    ({"name": "x", "grid": {"unique_tokens": [1000], "epochs": [2, 2.0]}}, "grid.epochs: 2"),
    ({"name": "x", "grid": {"unique_tokens": [1000, 1010], "epochs": [1]}}, "1000 and 1010 make the same runs"),
    ({"name": "x", "grid": {"unique_tokens": [1024, 1024], "epochs": [2, 2], "pairing": "zip"}}, "listed twice"),
    ({"name": "x", "grid": {**GRID, "params": [10**6, 10**6]}}, "grid.params"),
    ({"name": "x", "grid": GRID, "sft": {"epochs": [1, 1]}}, "sft.epochs: 1 listed twice"),
    ({"name": "x", "grid": GRID, "sft": {"base": {"qwen-ar": "/models/q"}}}, "sft.base.qwen-ar: not an arm"),
    # keys the study decides itself, refused with where the spec sets them
    ({"name": "x", "grid": GRID, "training": {"num_train_epochs": 3}}, "training.num_train_epochs: not settable here: "
     "set by the data grid: give grid.epochs"),
    ({"name": "x", "grid": GRID, "training": {"report_to": "wandb"}}, "tracking.report_to"),
    ({"name": "x", "grid": GRID, "training": {"eval_strategy": "steps"}}, "training.eval_every"),
    ({"name": "x", "grid": GRID, "training": {"seed": 3}}, "top-level seed"),
    ({"name": "x", "grid": GRID, "training": {"dataloader_num_workers": 4}}, "training.dataloader_num_workers: not"),
    ({"name": "x", "grid": GRID, "training": {"per_device_eval_batch_size": 4}}, "evaluation.batch_size"),
    ({"name": "x", "grid": GRID, "training": {"output_dir": "out"}}, "training.output_dir: not settable"),
    ({"name": "x", "grid": GRID, "sft": {"num_train_epochs": 2}},
     "sft.num_train_epochs: not settable here: set sft.epochs"),
    ({"name": "x", "grid": GRID, "sft": {"eval_steps": 10}}, "sft.eval_steps: not settable"),
    ({"name": "x", "grid": GRID, "training": {"dataset_args": "c4"}}, "data.pretrain.source"),
    ({"name": "x", "grid": GRID, "learning_rate": 1e-3},
     "unknown key 'learning_rate' (write it as training.learning_rate"),
    ({"name": "x", "grid": GRID, "device": "cpu", "training": {"fp16": True}}, "training.fp16: needs a GPU"),
    # the tutorial's names where they could mean two things, or are given twice
    ({"name": "x", "grid": GRID, "evaluation": {"max_length": 64}}, "evaluation.max_length: ambiguous"),
    ({"name": "x", "grid": GRID, "evaluation": {"block_size": 4, "block_length": 8}}, "same setting, given twice"),
    ({"name": "x", "grid": GRID, "training": {"max_length": 64}, "data": {"max_length": 32}},
     "training.max_length and data.max_length"),
    ({"name": "x", "grid": GRID, "training": {"warmup_ratio": 5}}, "training.warmup_ratio: a ratio in [0, 1)"),
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


def test_the_tutorials_names_map_onto_the_spec_where_they_mean_one_thing(tmp_path):
    path = tmp_path / "spec.yaml"
    # YAML 1.1 reads 1e-3 as a string: TrainingArguments' float type reads it as the number it spells
    path.write_text("name: x\ngrid: {unique_tokens: [1000], epochs: [1]}\n"
                    "training: {max_length: 64, learning_rate: 1e-3}\n"
                    "evaluation: {max_new_tokens: 32, block_size: 8, sampler_grid: {steps: [8], block_size: [8]}}\n")
    spec = load_spec(path)
    assert spec.data.max_length == 64 and spec.training.arguments == {"learning_rate": 1e-3}
    assert (spec.evaluation.gen_length, spec.evaluation.block_length) == (32, 8)
    assert spec.evaluation.sampler_grid.block_length == [8]


def test_every_problem_of_a_spec_is_reported_at_once(tmp_path):
    path = write(tmp_path, {"name": "x/y", "arms": ["llada", "llada"], "grid": {"unique_tokens": [], "epochs": [1]},
                            "model": {"hidden_size": 66}, "evaluation": {"gen_length": 16, "block_length": 5},
                            "training": {"per_device_train_batch_size": 0, "learning_rate": "fast",
                                         "num_train_epochs": 3, "colour": 1}})
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", "plan", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = ["name:", "arms: 'llada' listed twice", "grid.unique_tokens", "model.hidden_size: 66",
                "evaluation.block_length", "training.per_device_train_batch_size", "training.learning_rate",
                "training.num_train_epochs", "unknown key 'training.colour'"]
    assert len(lines) == len(expected)
    for part in expected:
        assert sum(part in line for line in lines) == 1, part
    assert all(line.startswith(f"dlmstudy: error: {path}: ") for line in lines)


def test_a_dllm_training_yaml_is_pointed_to_import_dllm(tmp_path):
    path = write(tmp_path, {"model_name_or_path": "llada-100M", "dataset_args": "c4[train:1000]", "max_length": 1024,
                            "learning_rate": 3e-4, "eval_strategy": "steps"})
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert str(err.value) == (f"{path}: a dllm / tutorial training YAML (model_name_or_path, dataset_args, ...), not "
                              f"a study spec (missing key 'name'); `dlmstudy import-dllm {path}` converts it")


@pytest.mark.parametrize("text, expected", [
    ("name: x\ngrid: {unique_tokens: [1000], epochs: [1]}\nname: y\n",
     "line 3: duplicate key 'name' (first given on line 1)"),
    ("name: x\ngrid: {unique_tokens: [1000], epochs: [1], epochs: [2]}\n", "line 2: duplicate key 'epochs'"),
    ("name: x\ngrid: &g {unique_tokens: [1000, *g], epochs: [1]}\n", "an alias refers to a value that contains it"),
    ("name: x\ngrid: " + "[" * 200 + "]" * 200 + "\n", "nested more than 64 deep"),
    ("name: [x\n", "line 2"),
    ("name: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
])
def test_yaml_problems_are_one_line(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases stand for 9**9 values: refused from the composed graph, never expanded."""
    lines = ["name: x", "grid: {unique_tokens: [1000], epochs: [1]}", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="aliases expand to more than 100,000 values"):
        load_spec(path)


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\ngrid: {unique_tokens: [1000], epochs: [1]}\n"
                    "evaluation: &eval {steps: 8, gen_length: 8, block_length: 8}\n"
                    "sft: {epochs: [1], max_length: 64}\n")
    assert load_spec(path).evaluation.steps == 8


def test_a_spec_that_is_not_utf8_gets_one_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes("name: caf\xe9\ngrid: {unique_tokens: [1000], epochs: [1]}\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "dlmstudy.cli", "plan", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dlmstudy: error: {path}: not UTF-8 text (byte 0xe9 on line 1); "
                                   "save the file as UTF-8")


def test_a_second_spec_with_the_same_name_never_shares_its_study_folder(tmp_path):
    from dlmstudy.study.spec import spec_digest

    base = {"name": "same", "grid": GRID, "runs_dir": str(tmp_path / "runs")}
    first = parse_spec(base)
    folder = tmp_path / "runs" / "same"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": "same", "spec_digest": spec_digest(first), "runs": []}))
    assert load_spec(write(tmp_path, base)).name == "same"
    # speed switches and tracking change no result: the same study
    assert load_spec(write(tmp_path, {**base, "training": {"compile": True}, "tracking": {"mode": "disabled"}}))
    other = write(tmp_path, {**base, "training": {"learning_rate": 5e-3}})
    with pytest.raises(UserError) as err:
        load_spec(other)
    assert str(err.value).startswith(f"{other}: name: {folder} holds the runs of another spec named 'same'")
    assert "\n" not in str(err.value)
    (folder / "study.json").write_text(json.dumps({"name": "same", "runs": []}))  # written before digests existed
    assert load_spec(other).name == "same"


def test_parameter_targets_that_solve_to_one_shape_are_refused():
    from dlmstudy.runners.study import plan_tokens, resolve_runs

    spec = parse_spec({"name": "x", "tokenizer": {"vocab_size": 512},
                       "grid": {"unique_tokens": [4096], "epochs": [1], "params": [100_000, 100_500]}})
    with pytest.raises(UserError, match="grid.params 100,000 and 100,500 give arm llada the same shape"):
        resolve_runs(spec, tokens=plan_tokens(spec)[0])


def test_grid_expansion_zip_product_and_total_tokens():
    zipped = parse_spec({"name": "x", "grid": {"unique_tokens": [1024, 2048], "epochs": [4, 1], "pairing": "zip"}})
    assert [(s.unique, s.epochs) for s in data_settings(zipped.grid)] == [(1024, 4.0), (2048, 1.0)]
    prod = parse_spec({"name": "x", "grid": {"unique_tokens": [1024, 2048], "epochs": [4, 1]}})
    assert len(data_settings(prod.grid)) == 4
    total = parse_spec({"name": "x", "grid": {"unique_tokens": [1024, 4096], "total_tokens": 8192}})
    assert [s.epochs_for(s.unique) for s in data_settings(total.grid)] == [8.0, 2.0]


def test_speed_only_evaluation_switches_stay_out_of_run_identity():
    swept = {"steps": [4], "block_length": [16]}
    plain = parse_spec({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": swept}})
    fast = parse_spec({"name": "x", "grid": GRID, "evaluation": {"compiled": True, "sampler_grid": {
        **swept, "compiled": [False, True], "batch_size": [1, 8]}}})
    assert fast.evaluation.identity() == plain.evaluation.identity()
    more = parse_spec({"name": "x", "grid": GRID, "evaluation": {"sampler_grid": {**swept, "steps": [4, 8]}}})
    assert more.evaluation.identity() != plain.evaluation.identity()


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
