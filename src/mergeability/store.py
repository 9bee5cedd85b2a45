"""The run's SQLite store: items (or tasks), updates and every trial, each written in its own transaction.

A trial's `correct` is 0/1 for an example-level run and the task's exact-match accuracy for a task-level run.

Keys are unique, so a resumed run can skip what is recorded and never records anything twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergeability.errors import MergeabilityError

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, relation TEXT, subj TEXT, question TEXT, obj TEXT, s_pop REAL,
    options TEXT, gold INTEGER, correct INTEGER, scores TEXT, gold_prob REAL, gold_rank INTEGER, gap REAL
);
CREATE TABLE IF NOT EXISTS updates (
    item_id TEXT PRIMARY KEY, path TEXT, kept INTEGER, train_loss REAL, passage_ppl REAL, passage_tokens INTEGER,
    post_scores TEXT, post_gold_prob REAL, post_gap REAL, fro_norm REAL, top_sv REAL, passage TEXT
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT, key TEXT, result TEXT, PRIMARY KEY (name, key)
);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY, path TEXT, base_acc REAL, ft_acc REAL, base_correct TEXT, ft_correct TEXT, n_test INTEGER,
    train_loss REAL, answer_ppl REAL, prompt_tokens REAL, fro_norm REAL, top_sv REAL, train_tokens REAL
);
CREATE TABLE IF NOT EXISTS trials (
    target TEXT, trial INTEGER, method TEXT, params TEXT, partners TEXT, correct INTEGER, probs TEXT,
    PRIMARY KEY (target, trial, method, params)
);
"""
# What turns a store of schema k into one of schema k + 1. Tables that exist are not recreated by _SCHEMA, so a
# column added to one is added here too, and an older run still opens and resumes.
_MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE updates ADD COLUMN passage TEXT"],  # the training text of each update (leakage audit)
}
# Columns added within a schema version: nullable, so a store without one reads as before (the value is missing,
# None) and an older version of this tool still reads and resumes a store that has one. A writer adds them to a
# store that lacks them. table -> (column, SQL type).
_ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "tasks": [("train_tokens", "REAL")],  # the training context length (paper A.6)
}


class Store:
    """`lock=True` (writers) takes an exclusive lock on the run beside the store: a second live process is refused
    with a one-line error. The OS drops the lock when the holder dies, so a killed run never leaves one behind.

    `read_only=True` (reports, comparisons) opens an existing store as it is: it never creates, initialises,
    migrates or locks anything, so a directory that is not a run is left exactly as it was. A writer checks an
    existing file the same way before it locks or writes anything beside it."""

    def __init__(self, path: str | Path, *, lock: bool = True, read_only: bool = False):
        self.path = Path(path)
        self._lock, self.db = None, None
        if read_only:
            if lock:
                raise ValueError("a read-only store takes no lock")
            self.db = _open_read_only(self.path)
            return
        if self.path.exists() and (not self.path.is_file() or self.path.stat().st_size):
            _open_read_only(self.path).close()  # not a store: refused before the lock file or a table is written
        self._lock = _acquire(self.path.with_name(self.path.name + ".lock")) if lock else None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; we open transactions
            self.db.row_factory = sqlite3.Row
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
        except sqlite3.DatabaseError as e:
            self.close()
            raise MergeabilityError(f"{self.path}: not a readable results store ({e})") from None
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif version in _MIGRATIONS:
            self._migrate(version)
        elif version != SCHEMA_VERSION:
            self.close()
            raise _newer(self.path, version)
        self._add_columns()

    def _add_columns(self) -> None:
        """The `_ADDED_COLUMNS` a store written before them lacks, each added in its own transaction."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    with self.db:
                        self.db.execute("BEGIN")
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _migrate(self, version: int) -> None:
        """Bring an older store up to SCHEMA_VERSION, each step in one transaction (a kill leaves it as it was)."""
        while version < SCHEMA_VERSION:
            with self.db:
                self.db.execute("BEGIN")
                for sql in _MIGRATIONS[version]:
                    self.db.execute(sql)
                version += 1
                self.set_meta("schema_version", version)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    # meta: provenance and the resolved config
    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _insert(self, table: str, row: dict) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        values = [json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for v in row.values()]
        with self.db:  # one transaction per row: a kill leaves either the row or nothing
            self.db.execute("BEGIN")
            self.db.execute(f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({marks})", values)

    def add_item(self, row: dict) -> None:
        self._insert("items", row)

    def add_update(self, row: dict) -> None:
        self._insert("updates", row)

    def add_task(self, row: dict) -> None:
        self._insert("tasks", row)

    def add_trial(self, row: dict) -> None:
        self._insert("trials", row)

    def add_experiment(self, name: str, key: str, result: dict) -> None:
        self._insert("experiments", {"name": name, "key": key, "result": result})

    def experiment_rows(self, name: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT key, result FROM experiments WHERE name = ?", (name,))
        return {k: json.loads(v) for k, v in rows}

    def ids(self, table: str, column: str = "id") -> set[str]:
        return {r[0] for r in self.db.execute(f"SELECT {column} FROM {table}")}

    def rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        return [dict(r) for r in self.db.execute(sql, tuple(params))]

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    # ------------------------------------------------------------------ example-level queries

    def wrong_items(self) -> set[str]:
        """Items the base model answers wrongly: the ones an update is trained for."""
        return {r[0] for r in self.db.execute("SELECT id FROM items WHERE correct = 0")}

    def item_outcomes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT correct FROM items")]

    def update_outcomes(self) -> list[int]:
        """kept (1) or not (0), per trained update."""
        return [r[0] for r in self.db.execute("SELECT kept FROM updates")]

    def kept_updates(self) -> dict[str, str]:
        """item id -> adapter path (relative to the run directory) of every kept update, by id."""
        q = "SELECT item_id, path FROM updates WHERE kept = 1 ORDER BY item_id"
        return {r[0]: r[1] for r in self.db.execute(q)}

    def kept_passages(self) -> dict[str, str | None]:
        """item id -> the text its update was trained on (None where a store of schema 1 did not record it)."""
        q = "SELECT item_id, passage FROM updates WHERE kept = 1 ORDER BY item_id"
        return {r[0]: r[1] for r in self.db.execute(q)}

    def kept_update_rows(self) -> list[dict]:
        """Every column of the item and of its update, per kept update, by id."""
        return self.rows("SELECT i.*, u.path, u.kept, u.train_loss, u.passage_ppl, u.passage_tokens, u.post_scores, "
                         "u.post_gold_prob, u.post_gap, u.fro_norm, u.top_sv "
                         "FROM items i JOIN updates u ON u.item_id = i.id WHERE u.kept = 1 ORDER BY i.id")

    # ------------------------------------------------------------------ task-level queries

    def task_rows(self) -> list[dict]:
        """Every column of every task, by name."""
        return self.rows("SELECT * FROM tasks ORDER BY name")

    def tasks_reaching(self, threshold: float) -> list[str]:
        """Tasks whose fine-tuned accuracy is at least `threshold`, by name."""
        q = "SELECT name FROM tasks WHERE ft_acc >= ? ORDER BY name"
        return [r[0] for r in self.db.execute(q, (threshold,))]

    # ------------------------------------------------------------------ trials

    def done_trials(self, method: str, params: str) -> set[tuple[str, int]]:
        q = "SELECT target, trial FROM trials WHERE method = ? AND params = ?"
        return {(r[0], r[1]) for r in self.db.execute(q, (method, params))}

    def trial_keys(self) -> list[str]:
        """Every distinct trial key (method, parameters and N) the store holds trials under."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT params FROM trials ORDER BY params")]

    def trial_means(self, params: str, first: int, trials: int) -> dict[str, tuple[float, int]]:
        """target -> (mean `correct`, number of trials) over trials first … first + trials − 1 under `params`."""
        q = ("SELECT target, AVG(correct), COUNT(*) FROM trials WHERE params = ? AND trial >= ? AND trial < ? "
             "GROUP BY target")
        return {r[0]: (r[1], r[2]) for r in self.db.execute(q, (params, first, first + trials))}


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing results store (one with our meta table); a one-line error for
    anything else. SQLite's `mode=ro` creates no file and writes nothing."""
    if not path.is_file():
        raise MergeabilityError(f"{path}: no results store there" if not path.exists() else
                                f"{path}: not a results store (not a file)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise MergeabilityError(f"{path}: not a readable results store ({e})") from None
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = None if row is None else json.loads(row[0])
    except (sqlite3.Error, ValueError) as e:
        db.close()
        raise MergeabilityError(f"{path}: not a results store ({e})") from None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        db.close()
        raise _newer(path, version)
    return db


def _newer(path: Path, version) -> MergeabilityError:
    return MergeabilityError(f"{path} was written with store schema {version}, this version reads {SCHEMA_VERSION}: "
                             "use a new --out directory")


def _acquire(lock_path: Path):
    """POSIX record lock (per process: a run resumed in the same process may lock again)."""
    f = open(lock_path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise MergeabilityError(
            f"{lock_path.parent} is in use by process {holder}: wait for it to finish or stop it"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
