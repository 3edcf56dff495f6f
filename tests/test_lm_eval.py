"""lm_eval for both arms: offline bio tasks end to end from saved checkpoints, the diffusion adapter's
plumbing against an oracle model, model arguments, and clear errors for unknown tasks."""

import json
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from dlmstudy.data.biographies import biographies, generate_people
from dlmstudy.data.tokenizer import special_tokens, train_bpe
from dlmstudy.errors import UserError
from dlmstudy.evaluation import harness
from dlmstudy.evaluation.harness import run_eval
from dlmstudy.evaluation.lm_eval_models import DiffusionLM, parse_model_args
from dlmstudy.evaluation.tasks import TASKS, write_tasks
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.models.registry import get_arm

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
                       log_samples=True, limit=2, model_args="max_length=256,steps=4")
    assert check_outputs(results, out, limit=2)["dlmstudy"]["likelihood"] == "exact"


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
