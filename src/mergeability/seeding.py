"""Seeds derived from (run seed, key): every random choice of a run depends on the run's seed and on what is
being drawn, never on the order in which things are drawn, so resumed and reordered runs draw the same."""

from __future__ import annotations

import random
import zlib

SEP = "\x1f"  # joins the parts of a key


def derived_seed(seed: int, *keys: str) -> int:
    """An integer seed for (seed, keys): seed · 1,000,003 + CRC-32 of the joined keys."""
    return seed * 1_000_003 + zlib.crc32(SEP.join(keys).encode())


def rng(seed: int, *keys: str) -> random.Random:
    """A `random.Random` seeded by `derived_seed(seed, *keys)`."""
    return random.Random(derived_seed(seed, *keys))
