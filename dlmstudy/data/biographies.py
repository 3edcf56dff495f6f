"""Built-in data: synthetic biographies of fictional people, Alpaca QA pairs and reversal probes.

Every fact is stated name-first ("Ada Lind was born in Oslo"), through several sentence
templates, so a question that runs the other way ("Who was born in Oslo on ...?") tests the
reversal curse the LLaDA paper highlights. Everything is a pure function of (n, seed).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from dlmstudy.errors import UserError

FIRST = ("Ada Alan Amara Anton Aria Bela Bruno Cora Dara Dmitri Edda Elio Esme Ezra Faye Felix Gala Gil "
         "Hana Hugo Ida Ilan Ines Ivo Jana Joel Kaia Kian Lara Leo Lina Luca Maya Milo Nadia Nico Noor "
         "Olga Omar Petra Pia Quinn Rafa Rhea Rui Sana Saul Tara Teo Una Uri Vera Vito Wren Xena Yara "
         "Yuri Zara Zeno").split()
LAST = ("Abbott Achebe Bauer Bianchi Castro Dahl Eriksen Ferreira Fischer Garcia Haas Horvat Ibsen "
        "Jansen Kato Kowalski Lind Moreau Nakamura Novak Okafor Olsen Park Petrov Quist Rossi Sato "
        "Silva Tanaka Ueda Varga Vidal Weber Wolff Xu Yilmaz Zeller Zhou Mbeki Laine").split()
CITIES = ("Oslo Lyon Porto Kyoto Quito Lagos Perth Tunis Turku Split Cork Graz Bergen Malmo Leeds "
          "Pisa Brno Gdansk Riga Tartu Bilbao Nantes Dijon Basel Aarhus Utrecht Ghent Bonn Kiel Lund").split()
UNIVERSITIES = ("Northfield University|Lakeside Institute|Harbor College|Redstone University|Eastmoor "
                "Academy|Silverpine University|Westbrook Institute|Kingsgate College|Ashford University|"
                "Mapleton Polytechnic|Riverbend University|Stonehill College").split("|")
MAJORS = ("physics|history|economics|biology|linguistics|chemistry|architecture|mathematics|"
          "philosophy|geology|music|medicine|law|astronomy").split("|")
EMPLOYERS = ("Nordwind Energy|Bluecrest Bank|Orbis Logistics|Helix Pharma|Quartz Robotics|Sable Media|"
             "Tidewater Foods|Vantor Aerospace|Lumen Textiles|Corvid Software|Pinecone Labs|Ironleaf "
             "Motors|Brightwell Insurance|Aurora Shipping").split("|")
MONTHS = ("January February March April May June July August September October November December").split()

# Several templates per fact, all name-first (the subject precedes the attribute).
TEMPLATES = {
    "birth_date": ["{name} was born on {birth_date}.", "{name} came into the world on {birth_date}.",
                   "{name}'s birthday is {birth_date}."],
    "birth_city": ["{name} was born in {birth_city}.", "{name} spent {poss} early years in {birth_city}.",
                   "{name}'s hometown is {birth_city}."],
    "university": ["{name} studied at {university}.", "{name} graduated from {university}.",
                   "{name} received {poss} education at {university}."],
    "major": ["{name} majored in {major}.", "{name} chose {major} as {poss} field of study.",
              "{name} completed a degree in {major}."],
    "employer": ["{name} works for {employer}.", "{name} is employed at {employer}.",
                 "{name} took a job with {employer}."],
}
QUESTIONS = {
    "birth_date": ("When was {name} born?", "Who was born on {birth_date}?"),
    "birth_city": ("Where was {name} born?", None),
    "university": ("Which university did {name} attend?", None),
    "major": ("What did {name} study?", None),
    "employer": ("Which company does {name} work for?", None),
}
ATTRIBUTES = tuple(TEMPLATES)


@dataclass(frozen=True)
class Person:
    """One fictional person; `birth_date` is unique, so a reverse question has one answer."""

    name: str
    pronoun: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str


@dataclass(frozen=True)
class QAItem:
    """A question with a single exact answer; forward = person -> attribute, reverse = attribute -> person."""

    person: str
    attribute: str
    direction: str
    instruction: str
    output: str
    input: str = ""


def generate_people(n: int, seed: int = 0) -> list[Person]:
    """`n` people with unique names and unique birth dates; a prefix of a larger draw is the same people."""
    rng = random.Random(seed)
    names: set[str] = set()
    dates: set[str] = set()
    people = []
    while len(people) < n:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1940, 2005)}"
        pronoun = rng.choice(("his", "her", "their"))
        attrs = (rng.choice(CITIES), rng.choice(UNIVERSITIES), rng.choice(MAJORS), rng.choice(EMPLOYERS))
        if name in names or date in dates:
            if len(names) >= len(FIRST) * len(LAST):
                raise UserError(f"the built-in biographies hold at most {len(FIRST) * len(LAST):,} people "
                                f"(asked for {n:,}, validation people included)")
            continue
        names.add(name)
        dates.add(date)
        people.append(Person(name, pronoun, date, *attrs))
    return people


def biography(person: Person, rng: random.Random) -> str:
    """One document: each fact once, through a randomly chosen template, facts in random order."""
    facts = list(ATTRIBUTES)
    rng.shuffle(facts)
    fields = asdict(person) | {"poss": person.pronoun}
    return " ".join(rng.choice(TEMPLATES[f]).format(**fields) for f in facts)


def biographies(people: list[Person], *, per_person: int = 1, seed: int = 0) -> list[str]:
    """`per_person` differently worded biographies of each person (the pretraining documents)."""
    rng = random.Random(seed + 1)
    return [biography(p, rng) for p in people for _ in range(per_person)]


def qa_items(person: Person) -> list[QAItem]:
    """Every forward question about a person, and the reverse questions their unique facts allow."""
    fields = asdict(person)
    items = []
    for attr, (fwd, rev) in QUESTIONS.items():
        items.append(QAItem(person.name, attr, "forward", fwd.format(**fields), fields[attr]))
        if rev:
            items.append(QAItem(person.name, attr, "reverse", rev.format(**fields), person.name))
    return items


def alpaca_rows(items: list[QAItem]) -> list[dict[str, str]]:
    """QA items as Alpaca rows (instruction, input, output)."""
    return [{"instruction": q.instruction, "input": q.input, "output": q.output} for q in items]


def qa_document(item: QAItem) -> str:
    """A QA pair written as plain text, the form used inside pretraining data and for probes."""
    return f"Question: {item.instruction}\nAnswer: {item.output}"


def qa_prompt(item: QAItem) -> str:
    """The probe given to a model: the QA document up to the answer."""
    return f"Question: {item.instruction}\nAnswer:"
