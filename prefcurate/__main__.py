"""`python -m prefcurate ...`: the same command line as the `prefcurate` script."""
from prefcurate.cli.main import entry

entry()
