"""lm_eval for both arms: offline bio tasks end to end from saved checkpoints, the diffusion adapter's
plumbing against an oracle model, model arguments, and clear errors for unknown tasks."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from dlmstudy.data.biographies import biographies, generate_people
from dlmstudy.data.tokenizer import special_tokens, train_bpe
from dlmstudy.errors import UserError
from dlmstudy.cli import main
from dlmstudy.evaluation import harness, hub, lm_eval_cli
from dlmstudy.evaluation.harness import run_eval
from dlmstudy.evaluation.lm_eval_models import (
    ARLM,
    DiffusionEvalArgs,
    DiffusionLM,
    for_sampler,
    load_lm,
    parse_model_args,
)
from dlmstudy.evaluation.tasks import TASKS, write_tasks
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.models.registry import get_arm

REPO = Path(__file__).resolve().parents[1]
PEOPLE = generate_people(6, seed=0)
METRICS = {"bio_qa_forward": "exact_match,strip", "bio_qa_reverse": "exact_match,strip",
           "bio_mc": "acc,none", "bio_ppl": "byte_perplexity,none"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(biographies(PEOPLE, per_person=2), vocab_size=300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A tiny saved checkpoint per arm; the diffusion one inside a finished run folder."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name in ("llada-mdm", "qwen-ar"):
        arm = get_arm(name)
        config = build_config(arm.backbone, ModelSize(hidden_size=32, num_layers=2, num_heads=4),
                              special_tokens(tokenizer), causal=arm.causal)
        run = root / name
        save_checkpoint(run / "checkpoint", build_model(config, seed=0), tokenizer, arm)
        (run / "run.json").write_text("{}")
        (run / "result.json").write_text("{}")
        paths[name] = run
    return paths


def check_outputs(results, out, limit):
    for task in TASKS:
        value = results["results"][task][METRICS[task]]
        assert value == value and value >= 0  # a number, not nan
        lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == limit and all(json.loads(line)["doc"] for line in lines)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"].keys() >= set(TASKS) and "samples" not in saved
    return saved
    assert 0 <= results["results"]["bio_mc"]["acc,none"] <= 1


def test_diffusion_arm_end_to_end_on_builtin_tasks(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("DLMSTUDY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    out = tmp_path / "eval"
    results = run_eval(checkpoints["llada-mdm"], "bio", output_path=out, log_samples=True, limit=2,
                       model_args="mc_num=2,batch_size=4,steps=4,gen_length=8,block_size=4,cfg=0.0")
    saved = check_outputs(results, out, limit=2)
    assert saved["dlmstudy"]["arm"] == "llada-mdm" and saved["dlmstudy"]["likelihood"] == "mc_elbo_lower_bound"
    assert (tmp_path / "cache" / "tasks").is_dir()  # the built-in tasks were generated on first use


def test_ar_arm_end_to_end_with_include_path(checkpoints, tmp_path):
    torch.manual_seed(0)
    include = write_tasks(tmp_path / "tasks", PEOPLE, max_items=3)
    out = tmp_path / "eval"
    results = run_eval(checkpoints["qwen-ar"] / "checkpoint", list(TASKS), include_path=include, output_path=out,
                       log_samples=True, limit=2, model_args="max_length=256", batch_size="auto", max_batch_size=4)
    saved = check_outputs(results, out, limit=2)
    assert saved["dlmstudy"]["likelihood"] == "exact" and saved["dlmstudy"]["model_args"]["batch_size"] == "auto"


@pytest.fixture
def bundled_tasks(tmp_path, monkeypatch):
    """Stand-in for lm_eval's bundled tasks (a 14k-file index, 10-50 s to build): one hub-backed task."""
    folder = tmp_path / "bundled"
    folder.mkdir()
    (folder / "hub_qa.yaml").write_text(
        "task: hub_qa\ndataset_path: dlmstudy-tests/not-cached\noutput_type: generate_until\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: exact_match\n")

    def indexed(include_path, include_defaults):
        paths = [p for p in (include_path, folder if include_defaults else None) if p]
        return TaskManager(include_path=[str(p) for p in paths], include_defaults=False)

    monkeypatch.setattr(harness, "_indexed", indexed)


def test_unknown_task_and_uncached_hub_task_are_user_errors(checkpoints, bundled_tasks):
    with pytest.raises(UserError, match="unknown task.*no_such_task"):
        run_eval(checkpoints["qwen-ar"], "bio_mc,no_such_task", limit=1)
    with pytest.raises(UserError, match="dlmstudy-tests/not-cached.*not in the local cache"):
        run_eval(checkpoints["qwen-ar"], "hub_qa", limit=1)


def test_unfinished_run_and_conflicting_checkpoints_are_user_errors(checkpoints, tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(UserError, match="not finished"):
        run_eval(tmp_path, "bio_mc")
    with pytest.raises(UserError, match="disagree"):
        run_eval(checkpoints["qwen-ar"], "bio_mc", model_args=f"pretrained={checkpoints['llada-mdm']}")


class Oracle(torch.nn.Module):
    """A 'diffusion model' that knows one token sequence: position i always predicts known[i]."""

    def __init__(self, known: list[int], vocab: int, mask_id: int):
        super().__init__()
        self.known = torch.tensor(known)
        self.vocab = vocab
        self.config = SimpleNamespace(mask_token_id=mask_id)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        logits = torch.full((B, T, self.vocab), -10.0)
        logits[:, torch.arange(T), self.known[:T]] = 10.0
        return SimpleNamespace(logits=logits)


def oracle_lm(tokenizer, text: str, **model_args) -> DiffusionLM:
    known = tokenizer.encode(text)
    return DiffusionLM(Oracle(known, len(tokenizer), tokenizer.mask_token_id), tokenizer, **model_args)


def test_diffusion_lm_generates_scores_and_stops_like_the_model(tokenizer):
    prompt = "Question: Where was Ada Lind born?\nAnswer:"
    lm = oracle_lm(tokenizer, prompt + " Oslo\nQuestion: Who was born in Oslo?",
                   mc_num=4, batch_size=2, block_size=2, steps=3, check_greedy=True)
    gen = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert gen == [" Oslo"]
    scored = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, answer), i) for i, answer in enumerate([" Oslo", " Lyon"])])
    (right, right_greedy), (wrong, wrong_greedy) = scored
    assert right > -1e-3 and wrong < -10
    assert right_greedy and not wrong_greedy


def test_generation_plan_rounds_to_whole_blocks(tokenizer):
    lm = oracle_lm(tokenizer, "Oslo", block_size=4, steps=6)
    assert lm._plan(10) == (12, 4, 6)  # 10 tokens -> 3 blocks of 4; 6 steps = 2 per block
    assert oracle_lm(tokenizer, "Oslo", steps=5)._plan(8) == (8, 8, 5)  # pure diffusion by default


def test_rolling_windows_score_every_token_once_within_max_length(tokenizer):
    lm = oracle_lm(tokenizer, "Oslo", max_length=8)
    seen = []
    lm._log_likelihood = lambda context, continuation: seen.append((context, continuation)) or -1.0
    text = biographies(PEOPLE[:1])[0]
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert [t for _, c in seen for t in c] == tokenizer.encode(text)
    assert all(len(c) + len(x) <= 8 for x, c in seen) and total == -len(seen)


def test_model_args_take_the_tutorials_names(tokenizer):
    args = parse_model_args("pretrained=/ckpt,mc_num=1,max_length=1024,steps=256,block_size=64,cfg=0.0")
    assert args == {"pretrained": "/ckpt", "mc_num": 1, "max_length": 1024, "steps": 256, "block_length": 64,
                    "cfg_scale": 0.0}
    with pytest.raises(UserError, match="conflicts"):
        parse_model_args("block_size=64,block_length=32")
    with pytest.raises(UserError, match="unknown argument"):
        oracle_lm(tokenizer, "Oslo", mc_nums=3)


def test_batch_size_auto_takes_max_batch_size_and_ar_refuses_diffusion_arguments(checkpoints):
    assert load_lm(checkpoints["llada-mdm"], {"batch_size": "auto", "max_batch_size": 4}).args.batch_size == 4
    assert load_lm(checkpoints["llada-mdm"], {"batch_size": "8"}).args.batch_size == 8
    assert load_lm(checkpoints["llada-mdm"]).args.batch_size == DiffusionEvalArgs.batch_size
    assert load_lm(checkpoints["qwen-ar"], {"batch_size": "auto", "max_batch_size": 3}).batch_size == 3
    with pytest.raises(UserError, match=r"^model_args block_size, steps only apply to diffusion checkpoints; this "
                                        r"checkpoint \(arm qwen-ar\) decodes autoregressively$"):
        load_lm(checkpoints["qwen-ar"], "steps=4,block_size=2,max_length=64")
    with pytest.raises(UserError, match="unknown argument.*stepz"):
        load_lm(checkpoints["qwen-ar"], "stepz=4")


def test_a_studys_model_args_reach_each_arm_as_it_decodes():
    assert for_sampler("mc_num=2,block_size=4,max_length=64", "ar") == {"max_length": 64}
    assert for_sampler("mc_num=2,block_size=4", "diffusion") == {"mc_num": 2, "block_size": 4}


def test_lm_eval_finds_both_arms_by_name_and_the_arm_decides_for_dlmstudy(checkpoints, tmp_path):
    """simple_evaluate(model=NAME, model_args=...) is what lm_eval's CLI calls once our module is imported."""
    import lm_eval

    include = write_tasks(tmp_path / "tasks", PEOPLE, max_items=2)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    assert get_model("llada") is get_model("dlmstudy_mdm") is DiffusionLM and get_model("dlmstudy_ar") is ARLM
    results = lm_eval.simple_evaluate(model="dlmstudy", model_args={"pretrained": str(checkpoints["qwen-ar"])},
                                      tasks=["bio_mc"], task_manager=tm, limit=1, batch_size=2, device="cpu")
    assert 0 <= results["results"]["bio_mc"]["acc,none"] <= 1
    with pytest.raises(UserError, match="arm qwen-ar.*use the lm_eval model dlmstudy or dlmstudy_ar"):
        lm_eval.simple_evaluate(model="llada", model_args={"pretrained": str(checkpoints["qwen-ar"])},
                                tasks=["bio_mc"], task_manager=tm, limit=1)


@pytest.mark.slow
def test_lm_eval_cli_runs_the_tutorials_command_on_a_tiny_checkpoint(checkpoints, tmp_path):
    """lm_eval's own CLI (through dlmstudy-lm-eval, which registers the models first) with the tutorial's
    --model llada, --max_batch_size and model_args, on a local task."""
    include = write_tasks(tmp_path / "tasks", PEOPLE, max_items=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--model", "llada", "--tasks", "bio_mc", "--include_path", str(include), "--limit", "2",
            "--max_batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out"), "--model_args",
            f"pretrained={checkpoints['llada-mdm']},is_check_greedy=False,mc_num=2,max_length=256,steps=4,"
            "block_size=4,cfg=0.0"]
    run = subprocess.run([sys.executable, "-m", "dlmstudy.evaluation.lm_eval_cli", *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (saved,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(saved.read_text())
    assert results["config"]["model"] == "llada" and 0 <= results["results"]["bio_mc"]["acc,none"] <= 1


def test_lm_eval_cli_says_a_wrong_arm_in_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    include = write_tasks(tmp_path / "tasks", PEOPLE, max_items=2)
    monkeypatch.setattr(sys, "argv", ["dlmstudy-lm-eval", "--model", "llada", "--tasks", "bio_mc", "--include_path",
                                      str(include), "--model_args", f"pretrained={checkpoints['qwen-ar']}"])
    assert lm_eval_cli.main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"dlmstudy: error: {checkpoints['qwen-ar'] / 'checkpoint'} (arm qwen-ar) decodes with the ar sampler")


def test_offline_only_when_asked_by_flag_or_environment_or_without_network(monkeypatch):
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert hub.offline_reason(False) is None
    assert hub.offline_reason(True) == "--offline"
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert hub.offline_reason(False) == "no network: hub.example.org:8443 cannot be reached"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason(False) == "HF_HUB_OFFLINE=1"


@pytest.fixture
def recorded(monkeypatch):
    """lm_eval.simple_evaluate replaced by a recorder: its keyword arguments and whether the Hub was off."""
    import lm_eval

    calls = []

    def simple_evaluate(**kwargs):
        calls.append({**kwargs, "hub_offline": os.environ.get("HF_HUB_OFFLINE")})
        return {"results": {"bio_mc": {"acc,none": 0.5}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    return calls


def test_eval_runs_online_when_the_user_is_with_lm_evals_flags(checkpoints, recorded, monkeypatch, capsys):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    args = ["eval", "--checkpoint", str(checkpoints["qwen-ar"]), "--model", "hf", "--tasks", "bio_mc",
            "--num_fewshot", "2", "--gen_kwargs", "temperature=0,max_gen_toks=8", "--limit", "3", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == ["bio_mc: acc 0.5"]
    (call,) = recorded
    assert call["hub_offline"] is None and call["num_fewshot"] == 2 and call["limit"] == 3
    assert call["gen_kwargs"] == "temperature=0,max_gen_toks=8"
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert main(args) == 0
    assert recorded[1]["hub_offline"] == "1" and os.environ.get("HF_HUB_OFFLINE") is None  # restored after
    assert capsys.readouterr().err.splitlines()[0] == (
        "dlmstudy: lm_eval runs offline (no network: huggingface.co:443 cannot be reached): hub tasks need their "
        "datasets in the local Hugging Face cache")
    assert main([*args, "--offline"]) == 0 and recorded[2]["hub_offline"] == "1"
    assert "lm_eval runs offline" not in capsys.readouterr().err  # offline as asked: nothing to say


def test_eval_model_name_and_batch_flags_are_checked_in_one_line(checkpoints, recorded, capsys):
    base = ["eval", "--checkpoint", str(checkpoints["qwen-ar"]), "--tasks", "bio_mc", "--offline", "--device", "cpu"]
    assert main([*base, "--model", "llada"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dlmstudy: error: --model llada evaluates diffusion checkpoints, but {checkpoints['qwen-ar'] / 'checkpoint'} "
        "is arm qwen-ar (ar sampler); use --model dlmstudy")
    assert main([*base, "--model", "gpt4"]) == 2
    assert "--model gpt4: use one of dlmstudy, dlmstudy_mdm, llada, dlmstudy_ar, hf" in capsys.readouterr().err
    assert main([*base, "--batch_size", "4", "--model_args", "batch_size=8"]) == 2
    assert capsys.readouterr().err.strip() == "dlmstudy: error: --batch_size 4 and model_args batch_size=8 disagree"
    assert main([*base, "--model", "dlmstudy_ar", "--batch_size", "4", "--model_args", "batch_size=4"]) == 0
    assert recorded and recorded[-1]["model"].batch_size == 4
    assert main([*base, "--max_batch_size", "3"]) == 0 and recorded[-1]["model"].batch_size == 3  # the tutorial's


def test_diffusion_generation_takes_the_tasks_temperature_and_names_unused_gen_kwargs(tokenizer, caplog):
    lm = oracle_lm(tokenizer, "Oslo", temperature=0.3)
    assert lm._temperature({"until": ["\n"], "do_sample": False}) == 0.3
    assert lm._temperature({"temperature": 0.7, "do_sample": True}) == 0.7
    with caplog.at_level("WARNING"):
        lm._temperature({"top_k": 5})
        lm._temperature({"top_k": 5})
    assert [r.getMessage() for r in caplog.records] == [
        "gen_kwargs top_k are not used by the diffusion sampler (it honours until, max_gen_toks, temperature)"]
