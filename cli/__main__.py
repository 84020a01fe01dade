"""`python -m prefcurate.cli`: the same entry point as the installed `prefcurate` script."""
from prefcurate.cli.main import entry


entry()
