"""Generate a reading-comprehension set no model has memorised: invented people with invented facts.

Each person gets three one-sentence paragraphs (facts) in a "registry" document:

    Velmora Dask was born in the town of Quillbrook.

    Velmora Dask has a pet named Tibbon.

    Velmora Dask works for the company Zantheric.

and three questions whose answers appear only there ("In which town was Velmora Dask born?" ->
"Quillbrook"); each question shares a key word with its fact (town, pet, company).
First names and surnames are shared between people (so retrieval must match both); every answer is
a fresh invented word. A seeded sample of the people is held out for testing: their paragraphs are
in the documents (to index) but not in the training text or the training questions. Many people
(1500 by default), so that a model trained on the rest learns to read the answer from the passage
rather than to memorise the training facts.

Writes to OUT: docs/registry_NN.txt (all people), train_docs.txt (the training people's paragraphs),
qa_train.jsonl and qa_test.jsonl ({"question", "answer", "person", "file", "passage"} per line).

    python scripts/make_rag_set.py --out /tmp/ragset [--people 1500] [--test-people 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gl",
    "qu",
    "th",
    "st",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "m"]
FACTS = {  # fact -> (its sentence in the documents, its question); each pair shares a key word
    "town": ("{name} was born in the town of {value}.", "In which town was {name} born?"),
    "pet": ("{name} has a pet named {value}.", "What is the name of {name}'s pet?"),
    "company": ("{name} works for the company {value}.", "Which company does {name} work for?"),
}


def invented_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable capitalized word of 2-3 syllables that is in no dictionary."""
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
    return word.capitalize()


def unique_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n invented words, none already in `taken` (which they join)."""
    words: list[str] = []
    while len(words) < n:
        word = invented_word(rng, rng.choice((2, 2, 3)))
        if word not in taken and 5 <= len(word) <= 10:
            taken.add(word)
            words.append(word)
    return words


def make_people(rng: random.Random, n: int) -> list[dict[str, str]]:
    """n people with distinct full names (parts shared) and unique invented facts."""
    taken: set[str] = set()
    firsts, lasts = unique_words(rng, max(8, n // 8), taken), unique_words(rng, max(8, n // 8), taken)
    names: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(names) < n:
        pair = (rng.choice(firsts), rng.choice(lasts))
        if pair not in seen:
            seen.add(pair)
            names.append(pair)
    values = {fact: unique_words(rng, n, taken) for fact in FACTS}
    return [
        {"name": f"{f} {s}", **{fact: values[fact][i] for fact in FACTS}} for i, (f, s) in enumerate(names)
    ]


def paragraphs(person: dict[str, str]) -> list[str]:
    """The person's paragraphs: one fact each, in one regular form."""
    return [sentence.format(name=person["name"], value=person[fact]) for fact, (sentence, _) in FACTS.items()]


def questions(person: dict[str, str], file: str) -> list[dict[str, str]]:
    """The person's questions with their answers and the paragraph (in `file`) that holds each answer."""
    return [
        {
            "question": question.format(name=person["name"]),
            "answer": person[fact],
            "person": person["name"],
            "file": file,
            "passage": sentence.format(name=person["name"], value=person[fact]),
        }
        for fact, (sentence, question) in FACTS.items()
    ]


def make_set(out: Path, people: int = 1500, test_people: int = 60, per_file: int = 50, seed: int = 0) -> dict:
    """Write the documents and question files into `out` (must not exist); returns counts."""
    if out.exists():
        raise SystemExit(f"{out} already exists; choose a new --out.")
    if not 0 < test_people < people:
        raise SystemExit(f"--test-people ({test_people}) must be between 1 and --people ({people}) - 1.")
    rng = random.Random(seed)
    everyone = make_people(rng, people)
    test_names = {p["name"] for p in rng.sample(everyone, test_people)}
    (out / "docs").mkdir(parents=True)
    train_paragraphs: list[str] = []
    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for i in range(0, people, per_file):
        file = out / "docs" / f"registry_{i // per_file:02d}.txt"
        group = everyone[i : i + per_file]
        file.write_text("\n\n".join(x for p in group for x in paragraphs(p)) + "\n", encoding="utf-8")
        for p in group:
            split = "test" if p["name"] in test_names else "train"
            rows[split].extend(questions(p, str(file)))
            if split == "train":
                train_paragraphs.extend(paragraphs(p))
    (out / "train_docs.txt").write_text("\n\n".join(train_paragraphs) + "\n", encoding="utf-8")
    for split, items in rows.items():
        with open(out / f"qa_{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return {
        "people": people,
        "test_people": len(test_names),
        **{f"{s}_questions": len(r) for s, r in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument(
        "--people", type=int, default=1500, help="invented people (3 facts each; default 1500)"
    )
    parser.add_argument(
        "--test-people", type=int, default=60, help="people held out for testing (default 60)"
    )
    parser.add_argument("--per-file", type=int, default=50, help="people per document (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    print(json.dumps(make_set(Path(args.out), args.people, args.test_people, args.per_file, args.seed)))


if __name__ == "__main__":
    main()
