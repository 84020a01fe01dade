"""`python -m cli`: the same entry point as the installed `prefcurate` script."""
from cli.main import entry


entry()
