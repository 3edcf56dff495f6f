"""The built-in data generator: deterministic, nested, unique reverse answers, name-first facts."""

import random

from dlmstudy.data import biographies as bio
from dlmstudy.data.corpus import builtin_corpus


def test_generator_is_deterministic_and_prefix_stable():
    a = bio.generate_people(50, seed=3)
    assert a == bio.generate_people(50, seed=3)
    assert bio.generate_people(20, seed=3) == a[:20]
    assert a != bio.generate_people(50, seed=4)
    assert bio.biographies(a, seed=1) == bio.biographies(a, seed=1)


def test_names_and_birth_dates_are_unique_so_reverse_questions_have_one_answer():
    people = bio.generate_people(500)
    assert len({p.name for p in people}) == 500
    assert len({p.birth_date for p in people}) == 500


def test_biography_states_every_fact_name_first():
    person = bio.generate_people(1)[0]
    text = bio.biography(person, random.Random(0))
    for attr in bio.ATTRIBUTES:
        value = getattr(person, attr)
        assert value in text
        sentence = next(s for s in text.split(". ") if value in s)
        assert sentence.index(person.name) < sentence.index(value)


def test_qa_items_forward_and_reverse_as_alpaca_rows():
    person = bio.generate_people(1)[0]
    items = bio.qa_items(person)
    forward = [q for q in items if q.direction == "forward"]
    reverse = [q for q in items if q.direction == "reverse"]
    assert len(forward) == len(bio.ATTRIBUTES) and reverse
    assert all(q.output == person.name and person.birth_date in q.instruction for q in reverse)
    rows = bio.alpaca_rows(items)
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert bio.qa_prompt(items[0]).endswith("Answer:") and bio.qa_document(items[0]).startswith(bio.qa_prompt(items[0]))


def test_builtin_corpus_holds_out_probe_qa_and_validation_people():
    corpus = builtin_corpus(100, qa_fraction=0.5, seed=0)
    train_text = "\n".join(corpus.train_docs)
    assert corpus.probes and len(corpus.groups) == len(corpus.train_docs)
    for items in corpus.probes.values():
        assert all(q.instruction not in train_text for q in items)
    val_names = {d.split(" was ")[0] for d in corpus.validation_docs}
    people = {p.name for p in bio.generate_people(100)}
    assert all(not any(name in d for name in people) for d in corpus.validation_docs) or not val_names & people
    assert corpus.groups == sorted(corpus.groups)
