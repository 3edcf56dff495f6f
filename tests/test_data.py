"""Data: source formats and slices, clear errors for bad input, cached streaming token streams, nested
unique-token prefixes with a disjoint validation set, BPE sampling, special tokens and SFT formatting."""

import gzip
import json
import lzma

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from dlmstudy.data import biographies as bio
from dlmstudy.data import sources
from dlmstudy.data.corpus import corpus_streams, holdout_split, load_corpus
from dlmstudy.data.packing import (
    cached_stream,
    epoch_order,
    prefix_chunks,
    select_documents,
    tokenize_stream,
    write_stream,
)
from dlmstudy.data.sft import (IGNORE, SFTCollator, SFTDataset, alpaca_messages, load_sft_dataset, padding_tokens,
                               tokenize_messages)
from dlmstudy.data.sources import iter_rows, parse_source, read_texts, source_splits
from dlmstudy.data.tokenizer import bounded_sample, get_tokenizer, special_tokens, train_bpe
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.training.objectives import ARObjective, MDMObjective

PEOPLE = bio.generate_people(40, seed=0)
DOCS = bio.biographies(PEOPLE, per_person=1, seed=0)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(DOCS, vocab_size=300)


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_slice_syntax_parses_row_counts_with_underscores(tmp_path):
    ref = parse_source("data/c4-en-shuffled[train:1_000_000,test:1000]")
    assert ref.location == "data/c4-en-shuffled" and ref.slices == {"train": 1_000_000, "test": 1000}
    odd = tmp_path / "odd[name].jsonl"
    odd.write_text("")
    assert parse_source(str(odd)).location == str(odd)  # an existing path is never a slice
    for bad in ("x[train=5]", "x[dev:5]", "x[train:many]", "x[train:0]"):
        with pytest.raises(UserError, match=r"x\["):
            parse_source(bad)


def test_every_format_reads_the_same_documents(tmp_path):
    rows = [{"text": d, "n": i} for i, d in enumerate(DOCS[:5])]
    paths = [write_jsonl(tmp_path / "c.jsonl", rows), write_jsonl(tmp_path / "c.jsonl.gz", rows, gzip.open),
             write_jsonl(tmp_path / "c.jsonl.xz", rows, lzma.open)]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS[:5]) + "\n")
    with lzma.open(tmp_path / "c.txt.xz", "wt") as f:
        f.write("\n\n\n".join(DOCS[:5]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    paths += [tmp_path / n for n in ("c.json", "c.txt", "c.txt.xz", "c.parquet", "saved")]
    for p in paths:
        assert read_texts(str(p)) == DOCS[:5], p
    assert read_texts(str(paths[0]), limit=2) == DOCS[:2]


def test_readers_are_lazy_and_limit_stops_before_a_bad_row(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:3]) + "\n{not json\n")
    assert len(list(iter_rows(str(p), limit=3))) == 3
    with pytest.raises(UserError, match="line 4 is not valid JSON"):
        list(iter_rows(str(p)))


@pytest.mark.parametrize("content, field, message", [
    ([{"body": "x"}], "text", "row 0 has no text field 'text'"),
    ([{"text": ["x"]}], "text", "non-string text field"),
    ([], "text", "the corpus is empty"),
])
def test_bad_corpora_are_one_line_user_errors(tmp_path, content, field, message):
    p = write_jsonl(tmp_path / "c.jsonl", content)
    with pytest.raises(UserError, match=message) as err:
        load_corpus(str(p), text_field=field)
    assert "\n" not in str(err.value)


def test_unreadable_unknown_and_missing_sources_are_user_errors(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl.xz").write_bytes(b"this is not xz")
    (tmp_path / "c.csv").write_text("text\nx\n")
    for path, message in ((tmp_path / "c.jsonl.xz", "unreadable"), (tmp_path / "c.csv", "unsupported corpus format"),
                          (tmp_path / "nope.jsonl", "not found"), ("data/missing.jsonl.xz", "not found")):
        with pytest.raises(UserError, match=message):
            load_corpus(str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"hub is not reachable.*save_to_disk.*local path"):
        load_corpus("allenai/c4[train:1000,test:10]")


def test_a_reachable_hub_name_streams_its_splits(tmp_path, monkeypatch, tok):
    splits = {"train": datasets.Dataset.from_dict({"text": DOCS[:20]}), "test": datasets.Dataset.from_dict({"text": DOCS[20:]})}
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=1.5: True)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: list(splits))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: splits[split].to_iterable_dataset())
    train, val = corpus_streams(load_corpus("someone/corpus[train:10,test:3]"), tok, tmp_path, validation_tokens=1)
    assert train.n_docs == 10 and np.array_equal(val.tokens, tokenize_stream(DOCS[20:23], tok).tokens)


def test_an_unresolvable_hub_host_is_unreachable(monkeypatch):
    for var in sources.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    assert sources.hub_reachable(timeout=1.0) is False


def test_streamed_cached_and_pooled_tokenization_agree(tmp_path, tok):
    ref = tokenize_stream(DOCS, tok)
    eos = tok.eos_token_id
    assert ref.n_docs == len(DOCS) and np.all(ref.tokens[ref.doc_ends - 1] == eos)
    assert list(ref.document(3)) == tok(DOCS[3], add_special_tokens=False)["input_ids"] + [eos]
    written = write_stream(iter(DOCS), tok, tmp_path / "w", batch_size=7)
    first = cached_stream(DOCS, tok, tmp_path, name="t")
    again = cached_stream(DOCS, tok, tmp_path, name="t")
    pooled = cached_stream(DOCS, tok, tmp_path / "p", name="t", num_proc=2)
    other = cached_stream(DOCS[:-1], tok, tmp_path, name="t")
    assert isinstance(again.tokens, np.memmap)
    for s in (written, first, again, pooled):
        assert np.array_equal(s.tokens, ref.tokens) and np.array_equal(s.doc_ends, ref.doc_ends)
    assert len(other) == ref.doc_ends[-2]  # a different corpus is a different cache entry
    assert len(list(tmp_path.glob("t-*"))) == 2 and not list(tmp_path.glob(".*tmp*"))


def test_select_documents_reorders_whole_documents(tmp_path, tok):
    stream = tokenize_stream(DOCS[:6], tok)
    picked = select_documents(stream, np.array([4, 0, 2]), tmp_path / "s")
    expect = np.concatenate([stream.document(i) for i in (4, 0, 2)])
    assert np.array_equal(picked.tokens, expect) and picked.n_docs == 3
    assert list(picked.doc_lengths()) == [len(stream.document(i)) for i in (4, 0, 2)]


def test_file_corpus_prefixes_are_nested_exact_and_disjoint_from_validation(tmp_path, tok):
    p = write_jsonl(tmp_path / "c.jsonl", [{"content": d} for d in DOCS])
    corpus = load_corpus(f"{p}[train:30,test:6]", text_field="content", seed=3)
    train, val = corpus_streams(corpus, tok, tmp_path / "cache", validation_tokens=1)
    perm = np.random.default_rng(3).permutation(36)  # the first 36 rows, shuffled once with the data seed
    doc_ids = {i: tok(DOCS[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for i in range(36)}
    expect_train = np.concatenate([doc_ids[i] for i in perm[6:]])
    assert np.array_equal(train.tokens, expect_train) and train.n_docs == 30
    assert np.array_equal(val.tokens, np.concatenate([doc_ids[i] for i in perm[:6]])) and val.n_docs == 6
    L = 16
    chunks = {u: prefix_chunks(train, u, L) for u in (48, 100, int(train.doc_ends[9]), len(train))}
    for u, c in chunks.items():
        assert c.size == (u // L) * L and np.array_equal(c.ravel(), expect_train[: c.size])
    small, large = chunks[48], chunks[len(train)]
    assert np.array_equal(large[: len(small)], small)
    assert int(train.doc_ends[9]) == sum(len(doc_ids[i]) for i in perm[6:16])  # U at a document boundary
    with pytest.raises(UserError, match="exceed the corpus"):
        prefix_chunks(train, len(train) + 1, L)


def test_validation_by_tokens_holds_out_the_fewest_whole_documents(tmp_path, tok):
    p = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    train, val = corpus_streams(load_corpus(str(p)), tok, tmp_path, validation_tokens=500)
    lengths = val.doc_lengths()
    assert len(val) >= 500 and len(val) - lengths[-1] < 500
    assert train.n_docs + val.n_docs == len(DOCS) and len(train) + len(val) == len(tokenize_stream(DOCS, tok))
    with pytest.raises(UserError, match="too small to hold out"):
        corpus_streams(load_corpus(str(p)), tok, tmp_path, validation_tokens=10**9)


def test_a_saved_dataset_dict_uses_its_own_test_split(tmp_path, tok):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:30]}),
                               "test": datasets.Dataset.from_dict({"text": DOCS[30:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert source_splits(str(tmp_path / "dd")) == ("train", "test")
    train, val = corpus_streams(load_corpus(f"{tmp_path / 'dd'}[train:20,test:4]"), tok, tmp_path, validation_tokens=1)
    assert np.array_equal(val.tokens, tokenize_stream(DOCS[30:34], tok).tokens)
    assert train.n_docs == 20 and len(train) == len(tokenize_stream(DOCS[:20], tok))


def test_epoch_order_repeats_each_chunk_once_per_epoch_in_a_fresh_order():
    order = epoch_order(10, 3, seed=1)
    passes = order.reshape(3, 10)
    assert all(sorted(p) == list(range(10)) for p in passes) and not np.array_equal(passes[0], passes[1])
    assert np.array_equal(epoch_order(10, 2.5, seed=1), order[:25])


def test_holdout_split_is_a_seeded_partition():
    held, rest = holdout_split(20, seed=5, rows=4)
    assert len(held) == 4 and sorted(np.concatenate([held, rest])) == list(range(20))
    assert np.array_equal(held, holdout_split(20, seed=5, rows=4)[0]) and not np.array_equal(held, holdout_split(20, seed=6, rows=4)[0])


def test_bpe_trains_on_a_bounded_sample_only(tmp_path):
    texts = ["alpha beta gamma " * 20] * 30 + ["zyxwv qutsr " * 40] * 30
    assert bounded_sample(texts, 1000) == texts[:3]
    tok = get_tokenizer("bpe", texts=iter(texts), vocab_size=300, cache_dir=tmp_path, sample_bytes=2000)
    vocab = tok.get_vocab()
    assert "alpha" in vocab and "zyxwv" not in vocab and "Ġzyxwv" not in vocab
    assert get_tokenizer("bpe", texts=texts, vocab_size=300, cache_dir=tmp_path, sample_bytes=2000).get_vocab() == vocab


def test_special_tokens_cover_every_id_and_reject_a_shared_mask(tok):
    st = special_tokens(tok)
    assert st.vocab_size % 64 == 0 and st.vocab_size >= len(tok) > max(tok.all_special_ids)
    assert len({st.pad_token_id, st.eos_token_id, st.mask_token_id}) == 3
    broken = train_bpe(DOCS[:5], vocab_size=300)
    broken.mask_token = broken.eos_token
    with pytest.raises(UserError, match="mask token"):
        special_tokens(broken)


def test_sft_rows_mask_the_prompt_and_end_the_answer_with_eos(tok):
    row = {"instruction": "Where was Ada born?", "input": "Be brief.", "output": "Oslo"}
    messages = alpaca_messages(row)
    assert messages[0]["content"] == "Where was Ada born?\n\nBe brief." and messages[1]["content"] == "Oslo"
    assert alpaca_messages(row | {"input": ""})[0]["content"] == "Where was Ada born?"
    f = tokenize_messages(messages, tok)
    n = f["prompt_len"]
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(f["input_ids"][:n]) == prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(f["input_ids"][n:]) == "Oslo<|im_end|>\n<|endoftext|>"
    assert f["labels"][:n] == [IGNORE] * n and f["labels"][n:] == f["input_ids"][n:]
    with pytest.raises(UserError, match="no text field 'output'"):
        alpaca_messages({"instruction": "x"})


def test_collator_pads_with_eos_and_gives_each_arm_its_targets():
    eos = 9
    feats = [{"input_ids": [5, 6, 7, 1, 2, eos], "prompt_len": 3, "index": 4},
             {"input_ids": [5, 6, 3, eos], "prompt_len": 2, "index": 5}]
    b = SFTCollator(eos)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, eos], [5, 6, 3, eos, eos, eos]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]  # padding EOS trained on (MDM)
    assert b["labels"].tolist() == [[IGNORE] * 3 + [1, 2, eos], [IGNORE, IGNORE, 3, eos, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]] and b["index"].tolist() == [4, 5]


def test_collator_pads_with_each_schemes_tail_after_the_rows_eos():
    eos, pads = 9, [20, 21, 22]
    feats = [{"input_ids": [5, 6, 7, 1, 2, eos], "prompt_len": 3, "index": 4},
             {"input_ids": [5, 3, eos], "prompt_len": 1, "index": 5}]
    b = SFTCollator(eos, tail_ids=pads)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, eos], [5, 3, eos, 20, 21, 22]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]  # the tail is trained on (MDM)
    assert b["labels"].tolist() == [[IGNORE] * 3 + [1, 2, eos], [IGNORE, 3, eos] + [IGNORE] * 3]  # AR: never
    assert "always_masked" not in b
    cycled = SFTCollator(eos, tail_ids=[20, 21], always_masked=True)(feats[1:] + [{**feats[0], "input_ids": [1] * 8}])
    assert cycled["input_ids"][0].tolist() == [5, 3, eos, 20, 21, 20, 21, 20]
    assert cycled["always_masked"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]


@pytest.mark.parametrize("padding,names", [("eos", None), ("pad", ["<|pad|>"]), ("masked_pad", ["<|pad|>"]),
                                           ("rainbow", [f"<|pad_{k}|>" for k in range(3)])])
def test_padding_tokens_are_added_to_a_copy_of_the_tokenizer(padding, names):
    tok = get_tokenizer("bpe", texts=["Ada was born in Oslo. She studied maths."] * 50, vocab_size=300)
    before = len(tok)
    out, ids = padding_tokens(tok, padding, pad_tokens=3)
    if names is None:
        assert out is tok and ids == [tok.eos_token_id]
        return
    assert ids == out.convert_tokens_to_ids(names) and len(set(ids)) == len(names)
    assert len(tok) == before and all(n not in tok.get_vocab() or n == "<|pad|>" for n in names)
    assert out.decode([5] + ids + [6], skip_special_tokens=True) == out.decode([5, 6], skip_special_tokens=True)


def test_objectives_read_the_collated_sft_batch_as_intended():
    """MDM noises every answer position, padding included, and no prompt position; AR scores answer + first EOS."""
    torch.manual_seed(0)
    eos = 9
    b = SFTCollator(eos)([{"input_ids": [5, 6, 7, 1, 2, eos], "prompt_len": 3, "index": 0},
                          {"input_ids": [5, 6, 3, eos], "prompt_len": 2, "index": 1}])
    tokens = SpecialTokens(vocab_size=64, pad_token_id=0, eos_token_id=eos, mask_token_id=2)
    size = ModelSize(hidden_size=32, num_layers=2, num_heads=4)
    _, metrics = MDMObjective(mask_id=2, eps=0.999)(build_model(build_config("llada", size, tokens, causal=False), seed=0), b)
    assert float(metrics["masked_fraction"]) == 1.0  # masked count == loss_mask count: answer + padding, not prompt
    model = build_model(build_config("qwen", size, tokens, causal=True), seed=0)
    loss, _ = ARObjective()(model, b)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    targets = b["labels"][:, 1:]
    keep = targets != IGNORE
    assert keep.sum() == 5 and torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]), atol=1e-6)


def test_sft_dataset_from_builtin_rows_is_cached_saved_and_reloaded(tmp_path, tok):
    rows = bio.alpaca_rows([q for p in PEOPLE[:3] for q in bio.qa_items(p)])
    dd = load_sft_dataset(rows, tok, max_length=128, cache_dir=tmp_path, progress=lambda s: None)
    assert len(dd["train"]) == len(rows)
    assert [f["input_ids"] for f in dd["train"]] == [tokenize_messages(alpaca_messages(r), tok)["input_ids"] for r in rows]
    assert len(list(tmp_path.glob("sft-*"))) == 1
    dd["train"].save_to_disk(str(tmp_path / "pre"))
    again = load_sft_dataset(str(tmp_path / "pre"), tok, max_length=128, load_preprocessed_data=True)
    assert again["train"]["input_ids"] == dd["train"]["input_ids"] and again["train"]["prompt_len"] == dd["train"]["prompt_len"]
    ds = SFTDataset(dd["train"], np.array([2, 0]))
    assert ds[1]["index"] == 1 and ds[1]["input_ids"] == dd["train"][0]["input_ids"]
    messages = []
    short = load_sft_dataset(rows, tok, max_length=min(len(x) for x in dd["train"]["input_ids"]), progress=messages.append)
    assert 0 < len(short["train"]) < len(rows) and "dropped" in messages[0]
    with pytest.raises(UserError, match="save_to_disk"):
        load_sft_dataset(rows, tok, max_length=128, load_preprocessed_data=True)


def test_preprocessed_sft_from_another_tokenizer_is_rejected(tmp_path, tok):
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 10**6]], "labels": [[IGNORE, 2, 10**6]]}).save_to_disk(str(tmp_path / "p"))
    with pytest.raises(UserError, match="outside the tokenizer"):
        load_sft_dataset(str(tmp_path / "p"), tok, max_length=8, load_preprocessed_data=True)


def test_sft_jsonl_slice_holds_out_test_rows(tmp_path, tok):
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(12)]
    p = write_jsonl(tmp_path / "a.jsonl.xz", rows, lzma.open)
    dd = load_sft_dataset(f"{p}[train:8,test:3]", tok, max_length=64, seed=1)
    assert len(dd["train"]) == 8 and len(dd["test"]) == 3
    answers = lambda split: {tok.decode(f["input_ids"][f["prompt_len"]:]).split("<")[0] for f in dd[split]}
    assert answers("train").isdisjoint(answers("test")) and answers("train") | answers("test") == {str(i) for i in range(11)}
