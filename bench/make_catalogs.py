"""Write the fictional catalogs the training defaults are checked on (bench/data/catalogs/<name>/).

The public catalog (tests/data/catalog_*.json*: an outdoor shop, prices in dollars, colours,
materials, years, warranties) is the one the defaults were tuned on. This script writes two
more, in other domains, with other number formats and other question wording, built the same
way, so that `bench/catalog_accuracy.py` can report the defaults on catalogs they were not
tuned on:

* ``rail``: Aurora Rail's trains: departure times (07:45), platforms, journey times
  (2 h 35 min), fares in euros with cents (€48.50), terminus towns;
* ``courses``: Larkspur College's evening courses: course codes (LRK-214), instructors, rooms
  (C-118), weekdays, seat limits; questions worded as requests ("Tell me ...", "Give ...").

Each catalog: 12 entities x 5 facts; ``train.json`` holds 120 Alpaca records (each fact asked
twice: a plain question, and a role instruction with the question as input), ``seen.jsonl``
the 60 plain training questions, ``paraphrase.jsonl`` 60 rewordings never trained on, each
with the ``expected`` fact an answer must contain, and ``facts.json`` the catalog itself.

    python bench/make_catalogs.py            # rewrites bench/data/catalogs/{rail,courses}/
    python bench/make_catalogs.py --check    # exit 1 if the files on disk differ from what it writes

The output is fixed by the seed below: running it again gives the same files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "data" / "catalogs"
SEED = 2027

# ---------------------------------------------------------------- rail
RAIL_TRAINS = ["Nordlys Express", "Copperline", "Heronway Sprinter", "Saltmarsh Flyer", "Juniper Coast Link",
               "Kestrel Night Train", "Amberfield Shuttle", "Lindqvist Limited", "Moorgate Rambler",
               "Blue Fjord Regional", "Tallow Valley Local", "Starling Intercity"]
RAIL_TOWNS = ["Vellmar", "Ostrana", "Brekkhaven", "Quillmoor", "Sandvik Bay", "Torrelund", "Havsgard",
              "Meridon", "Elkbridge", "Corvalla", "Nyholt", "Dunmarsh"]
RAIL = {
    "name": "Aurora Rail",
    "role": "You work at the Aurora Rail information desk. Answer the traveller's question.",
    "kinds": {
        "departure": {
            "value": lambda r: f"{r.randrange(5, 23):02d}:{r.choice(range(0, 60, 5)):02d}",
            "question": "When does the {e} leave?",
            "answer": "The {e} departs at {v}.",
            "paraphrase": "What time is the departure of Aurora Rail's {e}?",
        },
        "platform": {
            "value": lambda r: f"platform {r.randrange(2, 10)}",
            "question": "Which platform does the {e} leave from?",
            "answer": "The {e} leaves from {v}.",
            "paraphrase": "From what platform should I board the {e}?",
        },
        "duration": {
            "value": lambda r: f"{r.randrange(1, 7)} h {r.choice(range(5, 60, 5)):02d} min",
            "question": "How long is the journey on the {e}?",
            "answer": "The journey on the {e} takes {v}.",
            "paraphrase": "What is the travel time of the {e}?",
        },
        "fare": {
            "value": lambda r: f"€{r.randrange(12, 140)}.{r.choice(['00', '50', '90', '20', '75'])}",
            "question": "What does a ticket for the {e} cost?",
            "answer": "A ticket for the {e} costs {v}.",
            "paraphrase": "How much is the fare on the {e}?",
        },
        "terminus": {
            "value": None,  # a town of RAIL_TOWNS, each used once
            "question": "Where does the {e} terminate?",
            "answer": "The {e} terminates in {v}.",
            "paraphrase": "What is the final stop of the {e}?",
        },
    },
}

# ---------------------------------------------------------------- courses
COURSES = ["Urban Beekeeping", "Glassblowing Basics", "Celestial Navigation", "Sourdough Science",
           "Bookbinding by Hand", "Wild Mushroom Foraging", "Intro to Lockpicking", "Folk Fiddle Workshop",
           "Cartography for Hikers", "Pottery on the Wheel", "Birdsong Identification", "Knife Sharpening Clinic"]
INSTRUCTORS = ["Dr. Ines Halvorsen", "Prof. Tobias Quenby", "Ms. Ayla Brennick", "Mr. Osric Delacourt",
               "Dr. Priya Vantongeren", "Prof. Lucan Marrowby", "Ms. Greta Ollensby", "Dr. Felix Amundar",
               "Mr. Rowan Tealby", "Prof. Sabine Korrigan", "Ms. Nadia Feltham", "Dr. Emeric Studholme"]
COURSE_INSTRUCTOR_EXPECTED = lambda v: v.split()[-1]  # noqa: E731  (the surname is what must be said)
WEEKDAYS = ["Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays"]
COURSES_CATALOG = {
    "name": "Larkspur College",
    "role": "Reply as the Larkspur College registrar's office.",
    "kinds": {
        "code": {
            "value": None,  # LRK-nnn, unique
            "question": "Tell me the course code of {e}.",
            "answer": "{e} has the course code {v}.",
            "paraphrase": "Under which code is {e} listed at Larkspur College?",
        },
        "instructor": {
            "value": None,  # an instructor of INSTRUCTORS, each used once
            "question": "Name the instructor of {e}.",
            "answer": "{e} is taught by {v}.",
            "paraphrase": "Who leads the {e} class?",
        },
        "room": {
            "value": lambda r: f"{r.choice('ABCDE')}-{r.randrange(101, 340)}",
            "question": "Give the room where {e} meets.",
            "answer": "{e} meets in room {v}.",
            "paraphrase": "In which room is {e} held?",
        },
        "weekday": {
            "value": lambda r: r.choice(WEEKDAYS),
            "question": "Say which day of the week {e} takes place.",
            "answer": "{e} takes place on {v}.",
            "paraphrase": "On what weekday does {e} run?",
        },
        "seats": {
            "value": lambda r: f"{r.randrange(11, 49)} seats",
            "question": "State how many seats {e} has.",
            "answer": "{e} has {v}.",
            "paraphrase": "How many students can enrol in {e}?",
        },
    },
}


def _facts_rail(rng: random.Random) -> dict[str, dict[str, str]]:
    towns = rng.sample(RAIL_TOWNS, len(RAIL_TRAINS))
    facts = {}
    for train, town in zip(RAIL_TRAINS, towns, strict=True):
        kinds = RAIL["kinds"]
        facts[train] = {k: (town if k == "terminus" else spec["value"](rng)) for k, spec in kinds.items()}
    return facts


def _facts_courses(rng: random.Random) -> dict[str, dict[str, str]]:
    teachers = rng.sample(INSTRUCTORS, len(COURSES))
    codes = rng.sample(range(110, 490), len(COURSES))
    facts = {}
    for course, teacher, code in zip(COURSES, teachers, codes, strict=True):
        kinds = COURSES_CATALOG["kinds"]
        facts[course] = {k: (f"LRK-{code}" if k == "code" else teacher if k == "instructor" else spec["value"](rng))
                         for k, spec in kinds.items()}
    return facts


def _expected(kind: str, value: str) -> str:
    if kind == "instructor":
        return COURSE_INSTRUCTOR_EXPECTED(value)
    if kind == "weekday":
        return value.rstrip("s")  # "Thursday" matches "Thursdays" too
    if kind == "seats":
        return value.split()[0]
    return value


def build(spec: dict, facts: dict[str, dict[str, str]], rng: random.Random) -> dict[str, list]:
    """The training records and the two question sets of one catalog."""
    records, seen, paraphrase = [], [], []
    for entity, values in facts.items():
        for kind, value in values.items():
            texts = spec["kinds"][kind]
            question = texts["question"].format(e=entity)
            answer = texts["answer"].format(e=entity, v=value)
            answer = answer[0].upper() + answer[1:]
            expected = _expected(kind, value)
            records.append({"instruction": question, "input": "", "output": answer})
            records.append({"instruction": spec["role"], "input": question, "output": answer})
            row = {"product": entity, "kind": kind, "expected": expected}
            seen.append({"question": question, **row})
            paraphrase.append({"question": texts["paraphrase"].format(e=entity), **row})
    rng.shuffle(records)
    return {"train": records, "seen": seen, "paraphrase": paraphrase}


def catalogs() -> dict[str, dict]:
    """{name: {"facts", "train", "seen", "paraphrase"}} for every generated catalog."""
    out = {}
    for name, spec, make in (("rail", RAIL, _facts_rail), ("courses", COURSES_CATALOG, _facts_courses)):
        rng = random.Random(f"{SEED}:{name}")
        facts = make(rng)
        out[name] = {"facts": facts, **build(spec, facts, rng)}
    return out


def files(name: str, catalog: dict) -> dict[Path, str]:
    folder = OUT / name
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return {
        folder / "facts.json": json.dumps(catalog["facts"], indent=1, ensure_ascii=False) + "\n",
        folder / "train.json": json.dumps(catalog["train"], indent=1, ensure_ascii=False) + "\n",
        folder / "seen.jsonl": jsonl(catalog["seen"]),
        folder / "paraphrase.jsonl": jsonl(catalog["paraphrase"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args()
    stale = []
    for name, catalog in catalogs().items():
        for path, text in files(name, catalog).items():
            if args.check:
                if not path.is_file() or path.read_text(encoding="utf-8") != text:
                    stale.append(str(path))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if not args.check:
            print(f"{name}: {len(catalog['train'])} training records, {len(catalog['seen'])} seen and "
                  f"{len(catalog['paraphrase'])} paraphrased questions -> {OUT / name}")
    if stale:
        print("out of date:", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
