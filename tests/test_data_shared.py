"""Real corpora from ../shared: exact token counts of nested unique-token prefixes, a validation set disjoint
from every prefix, the Qwen2 tokenizer with an added mask token, and SFT labels on Alpaca rows.

Each test reads only the first rows of a file (the slice syntax) so the module stays fast."""

import itertools
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from dlmstudy.data.corpus import corpus_streams, load_corpus
from dlmstudy.data.packing import prefix_chunks
from dlmstudy.data.sft import IGNORE, SFTCollator, SFTDataset, load_sft_dataset
from dlmstudy.data.tokenizer import get_tokenizer, special_tokens
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, build_config, build_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
pytestmark = [pytest.mark.shared, pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the repo")]
L = 64


def first_texts(name: str, n: int, field: str = "text") -> list[str]:
    """The file's first n rows, read with nothing but lzma and json (the reference for the pipeline)."""
    with lzma.open(DATA / name, "rt", encoding="utf-8") as f:
        return [json.loads(next(f))[field] for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
    return get_tokenizer("pretrained", path=str(SHARED / "tokenizers" / "qwen2"))


def reference(texts: list[str], tok, order) -> list[list[int]]:
    return [tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for i in order]


@pytest.mark.parametrize("name, n_train, n_test, sample", [("en-docs.jsonl.xz", 60, 8, 200_000),
                                                           ("zh-text.jsonl.xz", 150, 10, 100_000)])
def test_unique_token_prefixes_are_exact_nested_and_disjoint_from_validation(tmp_path, name, n_train, n_test, sample):
    corpus = load_corpus(f"{DATA / name}[train:{n_train},test:{n_test}]", seed=0)
    tok = get_tokenizer("bpe", texts=corpus.tokenizer_texts(), vocab_size=512, cache_dir=tmp_path, sample_bytes=sample)
    train, val = corpus_streams(corpus, tok, tmp_path, validation_tokens=1, num_proc=2)
    texts = first_texts(name, n_train + n_test)
    perm = np.random.default_rng(0).permutation(n_train + n_test)  # docs/data.md: one seeded shuffle of the rows
    train_docs, val_docs = reference(texts, tok, perm[n_test:]), reference(texts, tok, perm[:n_test])
    expect = np.concatenate(train_docs)
    assert train.n_docs == n_train and val.n_docs == n_test
    assert np.array_equal(train.tokens, expect) and np.array_equal(val.tokens, np.concatenate(val_docs))
    # U at a document boundary holds exactly those documents' tokens; other U are cut to whole sequences.
    k = n_train // 3
    boundary = sum(len(d) for d in train_docs[:k])
    assert int(train.doc_ends[k - 1]) == boundary
    sizes = sorted({L, 1000, boundary, 50_021, len(train)})
    chunks = [prefix_chunks(train, u, L) for u in sizes]
    for u, c in zip(sizes, chunks):
        assert c.shape == (u // L, L) and np.array_equal(c.ravel(), expect[: (u // L) * L])
    for small, large in itertools.pairwise(chunks):
        assert np.array_equal(large[: len(small)], small)  # smaller U is a prefix of larger U
    assert {texts[i] for i in perm[:n_test]}.isdisjoint(texts[i] for i in perm[n_test:])
    with pytest.raises(UserError, match="exceed the corpus"):
        prefix_chunks(train, len(train) + 1, L)


def test_qwen2_token_counts_of_the_held_out_split_are_pinned(tmp_path, qwen):
    """Golden counts: a change in slicing, shuffling, EOS insertion or tokenization shows up here."""
    counts = {}
    for src in ("en-docs.jsonl.xz[train:20,test:5]", "zh-text.jsonl.xz[train:40,test:5]"):
        train, val = corpus_streams(load_corpus(str(DATA / src)), qwen, tmp_path, validation_tokens=1)
        counts[src.split(".")[0]] = (len(train), train.n_docs, len(val), val.n_docs)
    assert counts == {"en-docs": (29505, 20, 36943, 5), "zh-text": (42040, 40, 5154, 5)}


def test_qwen2_folder_gains_a_distinct_mask_token_the_model_vocab_covers(qwen):
    torch.manual_seed(0)
    st = special_tokens(qwen)
    assert qwen.mask_token == "<|mask|>" and qwen.mask_token_id == 151646
    assert st.eos_token_id == st.pad_token_id == 151643 and st.mask_token_id not in (st.eos_token_id, st.pad_token_id)
    assert st.vocab_size % 64 == 0 and st.vocab_size >= len(qwen) == 151647
    assert qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645] and qwen.chat_template
    assert qwen("a<|mask|>b", add_special_tokens=False)["input_ids"][1] == st.mask_token_id  # never split
    model = build_model(build_config("llada", ModelSize(hidden_size=32, num_layers=1, num_heads=4), st, causal=False), seed=0)
    logits = model(torch.tensor([[st.mask_token_id, st.eos_token_id]])).logits
    assert logits.shape == (1, 2, st.vocab_size) and torch.isfinite(logits).all()


def test_alpaca_sft_labels_score_exactly_the_answer(tmp_path, qwen):
    src = f"{DATA / 'instructions-alpaca.jsonl.xz'}[train:40,test:8]"
    dd = load_sft_dataset(src, qwen, max_length=4096, cache_dir=tmp_path, progress=lambda s: None)
    with lzma.open(DATA / "instructions-alpaca.jsonl.xz", "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(48)]
    assert len(dd["train"]) + len(dd["test"]) == 48 and len(dd["test"]) == 8
    by_prompt = {}
    for r in rows:
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        by_prompt[f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"] = r["output"]
    for f in dd["train"]:
        n, ids, labels = f["prompt_len"], f["input_ids"], f["labels"]
        prompt = qwen.decode(ids[:n])
        assert prompt in by_prompt, prompt[:80]
        assert qwen.decode(ids[n:]) == by_prompt[prompt] + "<|im_end|>\n<|endoftext|>"
        assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
    batch = SFTCollator(qwen.eos_token_id)([SFTDataset(dd["train"], np.arange(4))[i] for i in range(4)])
    lengths = torch.tensor([len(dd["train"][i]["input_ids"]) for i in range(4)])
    assert (batch["labels"] != IGNORE).sum(1).tolist() == (lengths - batch["prompt_len"]).tolist()
    assert batch["loss_mask"].sum(1).tolist() == (batch["input_ids"].shape[1] - batch["prompt_len"]).tolist()
    reused = load_sft_dataset(src, qwen, max_length=4096, cache_dir=tmp_path, progress=lambda s: None)
    assert reused["train"]["input_ids"] == dd["train"]["input_ids"] and len(list(tmp_path.glob("sft-*"))) == 1
