"""twotower: two-tower (DSSM-style) retrieval for recommendation and search."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("twotower")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
