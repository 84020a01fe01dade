"""prefcurate: curate human-preference pair data and align text-to-image diffusion models with it.

The project's folders are its subpackages (pyproject.toml maps them): data_schemas <- curation <- flows -> training;
evaluation and cli sit on top. See README.md, "Layout".
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefcurate")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
