"""mergeability: measure, explain and exploit how well model updates survive merging."""

from mergeability.errors import MergeabilityError
from mergeability.merging import METHODS, get_method, merge
from mergeability.updates import Dense, LowRank, Update, load_update, save_update
from mergeability.version import __version__

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
