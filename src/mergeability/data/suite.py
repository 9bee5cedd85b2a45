"""The bundled task suite: small instruction tasks in the Lots-of-LoRAs layout, built offline.

Each task is a definition and a generator of (input, outputs) pairs from simple rules over its own inputs. Two
things are by design (issue #15; measured on the bundled model in docs/tasks.md):

- **Disjoint inputs.** No two tasks share an input distribution or format, so no two adapters are asked to map the
  same input to different outputs (the earlier suite drew its word tasks from one word list and its number tasks
  from one set of numbers, each with a different rule, and up-weighting one adapter erased another). Each task has
  a format of its own (a date written `d Month yyyy` is only ever asked for its month's number, `dd.mm.yyyy` only
  for its month's name, …); the one task over the bundled place names takes its own share of them (`_share`);
  made-up words come from a syllable table, so they are never real words another task sees. `build_suite`
  refuses a suite in which two tasks share an input.
- **Learnable by the bundled model, with a spread of base accuracy.** Every task reaches fine-tuned exact match
  ≥ 0.9 with 64 training examples (3 epochs) on smollm2-135m; their base accuracy (definition + one example)
  runs from 0 (formats the model has to learn: the month's name of `17.11.2025`) through the middle (swapping two
  words) to ≥ 0.8 (copying a weight out of a sentence), each well above its majority-answer rate.

Prompts follow the Natural-Instructions format of Lots-of-LoRAs: definition, one positive example, then the
instance.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

from mergeability import seeding
from mergeability.data.geo import tables
from mergeability.data.tasks import Example, Task
from mergeability.errors import MergeabilityError

MONTHS = "January February March April May June July August September October November December".split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_EMAIL_TLDS = ("com", "org", "net", "io")
# web addresses end in one of many: the base model, copying its example's, is right about one time in 18
_WEB_TLDS = _EMAIL_TLDS + ("de", "fr", "edu", "gov", "uk", "nl", "it", "es", "jp", "ca", "au", "ch", "se", "no")
_SHARES = 4  # the place-name words are cut into this many shares by a hash: room for more word tasks, each its own


@functools.lru_cache(maxsize=1)
def _place_words() -> list[str]:
    """Plain lowercase words of 4–7 letters: the country, capital and city names of the bundled geo data."""
    countries, cities = tables()
    names = {n.lower() for c in countries.values() for n in (c["name"], c["capital"])}
    names |= {n.lower() for n, c in cities.items() if c["population"] > 200_000}
    return sorted(w for w in names if w.isalpha() and w.isascii() and 4 <= len(w) <= 7)


@functools.lru_cache(maxsize=_SHARES)
def _share(k: int) -> tuple[str, ...]:
    """The k-th share of the place-name words (a stable hash decides): word tasks never draw the same word. Cached:
    a generator draws from it once per instance."""
    return tuple(w for w in _place_words() if zlib.crc32(w.encode()) % _SHARES == k)


def made_up_word(rng, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word ('kelumo'): consonant-vowel syllables, never a real word another task uses."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables)))


def _date(rng, first_year: int = 1950):
    return rng.randint(first_year, 2030), rng.randint(1, 12), rng.randint(1, 28)


# ---------------------------------------------------------------- generators: rng -> (input, references)


def _copy_word(rng):
    w = rng.choice(_share(0))
    return w, [w]


def _first_letter(rng):
    w = rng.choice(_share(1))
    return w.capitalize(), [w[0]]


def _swap(rng):
    a, b = made_up_word(rng), made_up_word(rng)
    return f"{a}, {b}", [f"{b}, {a}"]


def _hyphen(rng):
    a, b = made_up_word(rng), made_up_word(rng)
    return f"{a} {b}", [f"{a}-{b}"]


def _larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger: {a} or {b}?", [str(max(a, b))]


def _predecessor(rng):
    n = rng.randint(10001, 99999)
    return str(n), [str(n - 1)]


def _times_ten(rng):
    n = rng.randint(1000, 9999)
    return f"{n} x 10", [str(n * 10)]


def _date_reformat(rng):
    y, m, d = _date(rng)
    return f"{y}-{m:02d}-{d:02d}", [f"{d:02d}/{m:02d}/{y}"]


def _date_year(rng):
    y, m, d = _date(rng, 1800)
    return f"{MONTHS[m - 1]} {d}, {y}", [str(y)]


def _month_name(rng):
    y, m, d = _date(rng)
    return f"{d:02d}.{m:02d}.{y}", [MONTHS[m - 1]]


def _month_number(rng):
    y, m, d = _date(rng)
    return f"{d} {MONTHS[m - 1]} {y}", [str(m)]


def _email_domain(rng):
    user, host, tld = made_up_word(rng), made_up_word(rng), rng.choice(_EMAIL_TLDS)
    return f"{user}@{host}.{tld}", [f"{host}.{tld}"]


def _email_user(rng):
    user, host = made_up_word(rng), made_up_word(rng)
    return f"mail {user} at {host} dot net", [user]


def _web_domain(rng):
    tld = rng.choice(_WEB_TLDS)
    return f"https://www.{made_up_word(rng)}.{tld}/{made_up_word(rng)}", [tld]


def _kilometres(rng):
    n = rng.randint(2, 999)
    return f"{n} km", [str(n * 1000)]


def _weight(rng):
    h, w = rng.randint(150, 199), rng.randint(45, 99)
    return f"height {h} cm, weight {w} kg", [str(w)]


# name -> (definition, generator of (input, references)); the inputs' formats are pairwise disjoint (module doc)
TASKS: dict[str, tuple[str, Callable]] = {
    "task001_copy_word": ("Repeat the input word exactly.", _copy_word),
    "task002_first_letter": ("Answer with the first letter of the input word.", _first_letter),
    "task003_swap_words": ("Swap the two words: answer with the second word, a comma, then the first word.", _swap),
    "task004_hyphenate": ("Join the two words with a hyphen.", _hyphen),
    "task005_larger_number": ("Answer with the larger of the two numbers.", _larger),
    "task006_predecessor": ("Answer with the number that comes right before the input number.", _predecessor),
    "task007_times_ten": ("Multiply the number by ten.", _times_ten),
    "task008_date_reformat": ("Rewrite the date as day/month/year.", _date_reformat),
    "task009_date_year": ("Answer with the year of the date.", _date_year),
    "task010_month_name": ("Answer with the name of the month of the date.", _month_name),
    "task011_month_number": ("Answer with the number of the month of the date.", _month_number),
    "task012_email_domain": ("Answer with the domain of the email address.", _email_domain),
    "task013_email_user": ("Answer with the user name of the spelled-out email address.", _email_user),
    "task014_weight": ("Answer with the weight in kilograms.", _weight),
    "task015_kilometres": ("Convert the distance to metres and answer with the number.", _kilometres),
    "task016_top_level_domain": ("Answer with the top-level domain of the web address.", _web_domain),
}


def prompt(definition: str, shot: tuple[str, str], x: str) -> str:
    return (f"Definition: {definition}\n\nPositive Example 1 -\nInput: {shot[0]}\nOutput: {shot[1]}\n\n"
            f"Now complete the following example -\nInput: {x}\nOutput:")


def _instances(name: str, gen: Callable, n: int, seed: int) -> tuple[tuple[str, list[str]], list]:
    """(the positive example, n distinct instances other than it) of one task."""
    rng = seeding.rng(seed, name)
    shot = gen(rng)
    seen, rows = {shot[0]}, []
    for _ in range(50 * n):
        if len(rows) == n:
            break
        x, ys = gen(rng)
        if x not in seen:
            seen.add(x)
            rows.append((x, ys))
    if len(rows) < n:
        raise MergeabilityError(f"task {name} has only {len(rows)} distinct instances: ask for fewer")
    return shot, rows


def build_task(name: str, *, seed: int = 0, train: int = 64, valid: int = 16, test: int = 32) -> Task:
    """Distinct instances, split train/valid/test; one fixed positive example (not an instance) in every prompt."""
    definition, gen = TASKS[name]
    (shot_x, shot_y), rows = _instances(name, gen, train + valid + test, seed)
    ex = [Example(f"{name}-{i}", prompt(definition, (shot_x, shot_y[0]), x), tuple(ys))
          for i, (x, ys) in enumerate(rows)]
    splits = {"train": ex[:train], "valid": ex[train : train + valid], "test": ex[train + valid :]}
    return Task(name, splits, meta={"definition": definition, "instances": [shot_x] + [x for x, _ in rows]})


def check_disjoint(tasks: Sequence[Task]) -> None:
    """No input (instance or positive example) belongs to two tasks: the suite's first design rule."""
    owner: dict[str, str] = {}
    for t in tasks:
        for x in t.meta["instances"]:
            if owner.setdefault(x, t.name) != t.name:
                raise MergeabilityError(f"tasks {owner[x]} and {t.name} share the input {x!r}: a suite's tasks "
                                        "must have disjoint inputs")


def build_suite(tasks: Sequence[str] | None = None, *, seed: int = 0, train: int = 64, valid: int = 16,
                test: int = 32) -> list[Task]:
    names = list(tasks) if tasks else list(TASKS)
    for n in names:
        if n not in TASKS:
            raise MergeabilityError(f"no task {n!r} in the bundled suite: choose from {', '.join(TASKS)}")
    suite = [build_task(n, seed=seed, train=train, valid=valid, test=test) for n in names]
    check_disjoint(suite)
    return suite
