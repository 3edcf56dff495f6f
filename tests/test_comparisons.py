"""The spec's `comparisons:` key: checked when the spec loads, stored diffusion first; the default pairs every
diffusion arm with every AR arm of `arms:`."""

import pytest

from dlmstudy.errors import UserError
from dlmstudy.study.comparisons import default_comparisons
from dlmstudy.study.spec import parse_spec

BASE = {"name": "x", "grid": {"unique_tokens": [1000], "epochs": [1]}, "arms": ["llada", "qwen", "qwen-ar-reg"]}


def test_listed_pairs_are_kept_in_order_diffusion_first():
    spec = parse_spec({**BASE, "comparisons": [["qwen", "llada"], ["llada", "qwen-ar-reg"]]})
    assert spec.comparisons == [("llada", "qwen"), ("llada", "qwen-ar-reg")]
    assert spec.model_dump()["comparisons"] == [("llada", "qwen"), ("llada", "qwen-ar-reg")]
    assert parse_spec(BASE).comparisons is None


@pytest.mark.parametrize(("pairs", "message"), [
    ([["llada", "llada-ar"]], "names llada-ar, not in arms"),
    ([["qwen", "qwen-ar-reg"]], "must pair a diffusion arm with an AR arm"),
    ([["llada", "qwen"], ["qwen", "llada"]], "listed twice"),
    ([], "at least 1 item"),
])
def test_a_pair_that_cannot_be_compared_is_refused_at_load(pairs, message):
    with pytest.raises(UserError, match=message) as err:
        parse_spec({**BASE, "comparisons": pairs}, "study.yaml")
    assert str(err.value).startswith("study.yaml: comparisons")


def test_the_default_is_every_diffusion_arm_against_every_ar_arm():
    assert default_comparisons(["llada", "qwen", "llada-ar", "qwen-mdm"]) == [
        ("llada", "qwen"), ("llada", "llada-ar"), ("qwen-mdm", "qwen"), ("qwen-mdm", "llada-ar")]
    assert default_comparisons(["toy-diffusion", "qwen"], {"toy-diffusion": "mdm"}) == [("toy-diffusion", "qwen")]
