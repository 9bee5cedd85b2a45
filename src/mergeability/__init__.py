"""mergeability: measure, explain and exploit how well model updates survive merging."""

import mergeability.threads  # noqa: F401, I001  (first, out of sort order: sets the OpenMP policy before torch loads)
import importlib

from mergeability.errors import MergeabilityError

# The names below load on first use (PEP 562): most need torch (about 2 s to import), the version reads the
# installed package's metadata (0.1 s); so `mergeability --help` and errors in the input answer at once.
_LAZY = {
    "__version__": "mergeability.version",
    "Update": "mergeability.updates",
    "LowRank": "mergeability.updates",
    "Dense": "mergeability.updates",
    "load_update": "mergeability.updates",
    "save_update": "mergeability.updates",
    "merge": "mergeability.merging",
    "METHODS": "mergeability.merging",
    "get_method": "mergeability.merging",
}

__all__ = [
    "__version__",
    "MergeabilityError",
    "Update",
    "LowRank",
    "Dense",
    "load_update",
    "save_update",
    "merge",
    "METHODS",
    "get_method",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mergeability' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # cached: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
