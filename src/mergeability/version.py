"""The installed package's version, recorded in every result's provenance."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeability")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
