"""prefcurate: curate human-preference pair data and align text-to-image diffusion models with it.

The project's folders are its subpackages (pyproject.toml maps them): data_schemas <- curation <- flows -> training;
evaluation and cli sit on top. See README.md, "Layout".
"""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Run from a source checkout without installing (PYTHONPATH=REPO, e.g. a copy on a GPU machine): the subpackages
# are the folders beside this one. An installed wheel has them inside this folder, and its parent (site-packages)
# holds no pyproject.toml of ours, so nothing is added there.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "pyproject.toml").is_file() and (_REPO / "curation" / "__init__.py").is_file():
    __path__.append(str(_REPO))

try:
    __version__ = version("prefcurate")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
