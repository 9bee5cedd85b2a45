"""mergeability: measure, explain and exploit how well model updates survive merging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeability")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from mergeability.errors import MergeabilityError
from mergeability.updates import Dense, LowRank, Update, load_update, save_update
from mergeability.merging import METHODS, get_method, merge

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
