"""`prefcurate tables`, `verify` and `repair`: describe the lake tables, check and mend the lake's files."""
from __future__ import annotations

import argparse

from prefcurate.cli.errors import EXIT_OK, UserError


def add_parser(sub) -> None:
    p = sub.add_parser("tables", help="describe the lake tables' columns",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  prefcurate tables pairs")
    p.add_argument("names", nargs="*", help="tables to describe (default: all)")

    p = sub.add_parser("verify", help="check every lake file against the sha256 its commit recorded",
                       epilog="example:\n  prefcurate verify --lake lake")
    p.add_argument("--lake", required=True)
    p = sub.add_parser("repair", help="recover from a crash and remove duplicate rows already written",
                       epilog="example:\n  prefcurate repair --lake lake")
    p.add_argument("--lake", required=True)


def _tables(args) -> int:
    from prefcurate.data_schemas import describe
    from prefcurate.data_schemas.tables import CURATION_TABLES, TABLES

    known = [*TABLES, *CURATION_TABLES]
    for name in args.names or known:
        if name not in known:
            raise UserError(f"unknown table {name!r}; tables: {', '.join(known)}")
        print(describe(name) + "\n")
    return EXIT_OK


def _verify(args) -> int:
    from prefcurate.curation.store.lake import Lake

    result = Lake(args.lake).verify()
    if result["problems"]:
        raise UserError(f"{len(result['problems'])} of {result['files']} lake files do not match their commit: "
                        + "; ".join(result["problems"]))
    print(f"ok: {result['files']} lake files, {result['bytes']} bytes, match their commits")
    return EXIT_OK


def _repair(args) -> int:
    from prefcurate.curation.store.lake import Lake

    print("\n".join(Lake(args.lake).repair()) or "nothing to repair")
    return EXIT_OK


def run(args) -> int:
    return {"tables": _tables, "verify": _verify, "repair": _repair}[args.command](args)
