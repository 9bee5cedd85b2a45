"""Training passages from Wikipedia: the plain text of each subject's English Wikipedia page (the paper trains
each fact's update on its subject's page), fetched through the MediaWiki API and cached on disk per title.

One request names up to 50 titles (the API's `titles` limit) and resolves their normalised forms, redirects,
missing and disambiguation pages at once; the API returns a whole-page extract for one page per response, so
the batch is read to its end through the API's continuation. Each page is written to the cache
(`cache_dir()/wikipedia`, one JSON file per requested title, atomically) as soon as its text arrives: a killed
fetch resumes where it stopped and never asks for a cached page again. Delete that directory to refetch.

Requests go one at a time with a descriptive User-Agent, as Wikimedia's API etiquette asks; 429 and 5xx answers
and dropped connections are retried with exponential backoff (honouring Retry-After). Tests mock HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from rich.console import Console

from mergeability.atomic import write_text
from mergeability.console import progress
from mergeability.errors import MergeabilityError, one_line
from mergeability.fetch import cache_dir
from mergeability.version import __version__

API = os.environ.get("MERGEABILITY_WIKIPEDIA_API", "https://en.wikipedia.org/w/api.php")
TITLES_PER_REQUEST = 50  # the API's limit on `titles` for clients without the apihighlimits right
RETRIES = 5  # retries of one request after a 429, a 5xx or a dropped connection
BACKOFF = 2.0  # seconds before the first retry; doubles with each retry
MAX_WAIT = 120.0  # the longest a Retry-After header makes us wait
TIMEOUT = 60  # seconds without data before a request fails
RETRYABLE = frozenset({"maxlag", "ratelimited", "readonly"})  # API error codes that pass with time
# Sections after which a page holds lists of links and sources, not prose about the subject: dropped.
END_SECTIONS = frozenset({"see also", "references", "notes", "notes and references", "footnotes", "citations",
                          "sources", "bibliography", "further reading", "external links"})
HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")  # explaintext with exsectionformat=wiki: "== History =="
# Wikimedia asks API clients to name themselves and give a way to reach them: MERGEABILITY_CONTACT (an e-mail
# address or a URL) adds yours.
CONTACT = os.environ.get("MERGEABILITY_CONTACT")
USER_AGENT = (f"mergeability/{__version__} (research code for 'Will it Merge?', Rahamim et al."
              f"{'; ' + CONTACT if CONTACT else ''}) python-requests/{requests.__version__}")
ELSEWHERE = ("give the passages in a file instead (--passages FILE: a .jsonl/.parquet/.tsv of subj, passage), "
             "or run with --passages wikipedia again once Wikipedia is reachable (fetched pages are cached)")


@dataclass(frozen=True)
class Pages:
    """What a fetch found, by requested title: each page's training text, or why there is none."""

    texts: dict[str, str]
    missing: dict[str, str]


def page_text(extract: str) -> str:
    """A page's plain-text extract as training text: one paragraph per line (the training code trains on each
    line, cut into windows of `max_tokens`), whitespace collapsed, headings and blank lines dropped, and nothing
    from the first end-matter section (See also, References, External links, …) on."""
    lines = []
    for raw in extract.splitlines():
        line = " ".join(raw.split())
        heading = HEADING.match(line)
        if heading:
            if len(heading.group(1)) == 2 and heading.group(2).lower() in END_SECTIONS:
                break
            continue
        if line:
            lines.append(line)
    return "\n".join(lines)


def cache_path(title: str) -> Path:
    return cache_dir() / "wikipedia" / f"{hashlib.sha256(title.encode()).hexdigest()[:32]}.json"


def read_cached(title: str) -> str | None:
    """The cached training text of `title`, or None if it was never fetched."""
    path = cache_path(title)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return page_text(entry["extract"]) if entry.get("title") == title else None


def write_cached(title: str, page: dict) -> None:
    """Keep the raw extract (not the training text), so a change to `page_text` needs no refetch."""
    path = cache_path(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"title": title, "page": page["title"], "pageid": page.get("pageid"), "revid": page.get("lastrevid"),
             "extract": page["extract"]}
    write_text(path, json.dumps(entry, ensure_ascii=False))


def fetch_pages(titles: Sequence[str], *, console: Console | None = None, session: requests.Session | None = None,
                retries: int = RETRIES, backoff: float = BACKOFF) -> Pages:
    """The training text of each title's page: from the cache, else fetched (and cached)."""
    texts: dict[str, str] = {}
    todo = []
    for title in dict.fromkeys(titles):
        cached = read_cached(title)
        if cached is None:
            todo.append(title)
        else:
            texts[title] = cached
    missing = {t: "not a valid page title" for t in todo if not t.strip() or "|" in t}  # "|" separates titles
    todo = [t for t in todo if t not in missing]
    if todo:
        fetched, gone = fetch_all(todo, len(texts), console or Console(stderr=True), session, retries, backoff)
        texts.update(fetched)
        missing.update(gone)
    missing.update({t: "no text" for t, x in texts.items() if not x})
    return Pages({t: x for t, x in texts.items() if x}, missing)


def fetch_all(todo: Sequence[str], cached: int, console: Console, session: requests.Session | None, retries: int,
              backoff: float) -> tuple[dict[str, str], dict[str, str]]:
    """(title → training text, title → why none) for titles not in the cache, batch by batch, with a progress bar."""
    own = session is None
    if own:
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
    console.print(f"fetching {len(todo)} Wikipedia pages ({cached} cached) into {cache_dir() / 'wikipedia'}",
                  highlight=False)
    texts: dict[str, str] = {}
    missing: dict[str, str] = {}
    try:
        with progress(console) as bars:
            bar = bars.stage("wikipedia", len(todo))
            for start in range(0, len(todo), TITLES_PER_REQUEST):
                extracts, gone = fetch_batch(session, todo[start : start + TITLES_PER_REQUEST], bar.advance, retries,
                                             backoff)
                texts.update({t: page_text(x) for t, x in extracts.items()})
                missing.update(gone)
                bar.advance(len(gone))
    finally:
        if own:
            session.close()
    return texts, missing


def resolve(batch: Sequence[str], query: dict) -> dict[str, str]:
    """Requested title → the title of the page the API answered with: normalised (first letter upper-cased,
    underscores as spaces), then redirects followed."""
    normalized = {n["from"]: n["to"] for n in query.get("normalized", [])}
    redirects = {r["from"]: r["to"] for r in query.get("redirects", [])}
    out = {}
    for title in batch:
        t, seen = normalized.get(title, title), set()
        while t in redirects and t not in seen:  # `seen`: a redirect loop ends where it closes
            seen.add(t)
            t = redirects[t]
        out[title] = t
    return out


def fetch_batch(session: requests.Session, batch: Sequence[str], advance: Callable[[int], None], retries: int,
                backoff: float) -> tuple[dict[str, str], dict[str, str]]:
    """(requested title → raw extract, requested title → why none) for up to TITLES_PER_REQUEST titles."""
    params = {"action": "query", "format": "json", "formatversion": "2", "prop": "extracts|pageprops|info",
              "ppprop": "disambiguation", "explaintext": "1", "exsectionformat": "wiki", "exlimit": "1",
              "redirects": "1", "titles": "|".join(batch)}
    pages: dict[str, dict] = {}
    to_page: dict[str, str] = {}
    extracts: dict[str, str] = {}
    cont: dict = {}
    for _ in range(len(batch) + 2):  # one extract per response, plus the first: more means a looping API
        query = api_get(session, {**params, **cont}, retries, backoff)
        to_page = to_page or resolve(batch, query.get("query", {}))
        for page in query.get("query", {}).get("pages", []):
            pages.setdefault(page["title"], {}).update(page)
        for title in batch:
            page = pages.get(to_page[title], {})
            if title not in extracts and "extract" in page and "disambiguation" not in page.get("pageprops", {}):
                extracts[title] = page["extract"]
                write_cached(title, page)
                advance(1)
        if "continue" not in query:
            return extracts, {t: why_missing(pages.get(to_page[t])) for t in batch if t not in extracts}
        cont = query["continue"]
    raise MergeabilityError(f"the Wikipedia API at {API} kept asking to continue a batch of {len(batch)} titles; "
                            f"{ELSEWHERE}")


def why_missing(page: dict | None) -> str:
    if page is None:
        return "not a page of this wiki"  # an interwiki link or a title the API did not answer for
    if page.get("invalid"):
        return f"not a valid page title ({page.get('invalidreason', 'invalid')})"
    if page.get("missing"):
        return "no such page"
    if "disambiguation" in page.get("pageprops", {}):
        return "a disambiguation page"
    return "no text"


def api_get(session: requests.Session, params: dict, retries: int, backoff: float) -> dict:
    """One API response, retrying 429, 5xx, dropped connections and a busy API with exponential backoff."""
    problem = ""
    for attempt in range(retries + 1):
        wait = backoff * 2**attempt
        try:
            r = session.get(API, params=params, timeout=TIMEOUT)
        except (requests.ConnectionError, requests.Timeout) as e:
            problem = one_line(e)
        else:
            if r.status_code == 429 or r.status_code >= 500:
                problem, wait = f"HTTP {r.status_code}", _retry_after(r, wait)
            elif r.status_code != 200:
                raise MergeabilityError(f"the Wikipedia API at {API} answered HTTP {r.status_code}; {ELSEWHERE}")
            else:
                data = _json(r)
                code = data.get("error", {}).get("code")
                if code is None:
                    return data
                problem, wait = f"the API is busy ({code})", _retry_after(r, wait)
        if attempt < retries:
            time.sleep(wait)
    raise MergeabilityError(f"cannot reach Wikipedia ({API}: {problem}, {retries + 1} tries); {ELSEWHERE}")


def _json(r: requests.Response) -> dict:
    """The answer's JSON; an API error that time will not mend (anything but lag and rate limits) raised."""
    try:
        data = r.json()
    except ValueError:
        raise MergeabilityError(f"the Wikipedia API at {API} answered with something other than JSON; "
                                f"{ELSEWHERE}") from None
    if not isinstance(data, dict):
        raise MergeabilityError(f"the Wikipedia API at {API} answered with something other than a query result; "
                                f"{ELSEWHERE}")
    err = data.get("error")
    if err is not None and err.get("code") not in RETRYABLE:
        info = str(err.get("info", "")).strip().splitlines() or [""]
        raise MergeabilityError(f"the Wikipedia API refused the request ({err.get('code')}: {info[0]}); {ELSEWHERE}")
    return data


def _retry_after(r: requests.Response, default: float) -> float:
    try:
        return min(MAX_WAIT, max(default, float(r.headers.get("Retry-After", default))))
    except ValueError:  # an HTTP date instead of seconds: our own backoff will do
        return default
