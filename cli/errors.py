"""Exit codes of `prefcurate` and the error a user can fix: the one definition every cli module imports.

Exit codes (documented in the README):
  0  success
  2  usage error (unknown option, missing argument): argparse's own code, and a trainer option refused
  3  input error: missing lake, unreadable source file, refused SQL, unknown name
  1  internal error: a training run that failed (one line; the ranks printed their own messages), or an
     unexpected exception (a bug: Python prints the traceback and exits 1; please report it)
"""
from __future__ import annotations


EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 3."""
