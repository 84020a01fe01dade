"""`prefcurate ingest`: source files into the lake, each row accepted, deduplicated or quarantined."""
from __future__ import annotations

import argparse
import sys
import textwrap

from prefcurate.cli.errors import EXIT_INPUT, EXIT_OK, UserError
from prefcurate.cli.tracking import add_track, quiet_prefect_defaults, tracked
from prefcurate.data_schemas.vocab import INPUT_FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("ingest", help="ingest source files into a lake",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Ingest preference-pair files into the lake (created if missing). Rows are "
                                   "accepted, deduplicated or quarantined with a reason; a file already "
                                   "ingested is a no-op.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate ingest --lake lake --format pickapic pickapic_v2/train-0000*.parquet
                             prefcurate ingest --lake lake --format pickapic --source pickapic_v2 no_images/*.parquet
                             prefcurate ingest --lake lake --format hpdv2 --image-root HPDv2/train HPDv2/train.json
                             prefcurate ingest --lake lake --format jsonl my_pairs.jsonl"""))
    p.add_argument("--lake", required=True, help="lake directory or fsspec URL")
    # No `choices`: an unknown format is an input error (exit 3) naming the readers, not a usage error.
    p.add_argument("--format", required=True, help=f"reader: {', '.join(INPUT_FORMATS)} (see README: formats)")
    p.add_argument("--source", help="source label stored with each pair (default: the format name)")
    p.add_argument("--image-root", help="folder that image paths are relative to (hpdv2, jsonl, csv)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read image paths that are absolute or leave the image root (default: quarantined as "
                        "image_outside_root)")
    p.add_argument("paths", nargs="+", metavar="SOURCE", help="files to ingest")
    add_track(p)


def _check_sources(paths: list[str], fmt: str) -> None:
    """Before any lake, lock or server: a mistyped path fails at once. Refused only when no file can be read
    (the readable ones are still ingested, the others reported one line each)."""
    from prefcurate.flows import stages

    errors = {}
    for path in paths:
        try:
            stages.check_source(path, fmt)
        except stages.SourceError as exc:
            errors[path] = str(exc)
    if len(errors) == len(paths):
        raise UserError("; ".join(errors.values()))


def run(args) -> int:
    from prefcurate.curation.ingest import READERS
    from prefcurate.flows import stages

    if args.format not in READERS:
        raise UserError(f"unknown format {args.format!r}; formats: {', '.join(sorted(READERS))}")
    _check_sources(args.paths, args.format)
    options = {"image_root": args.image_root} if args.image_root else {}
    if args.allow_outside_root:
        options["allow_outside_root"] = True
    if tracked(args):
        quiet_prefect_defaults()
        from prefcurate.flows.ingest import ingest_flow

        results = ingest_flow(args.lake, args.paths, args.format, args.source, options)
    else:
        results = stages.run_ingest(args.lake, args.paths, args.format, args.source, options)
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            print(f"prefcurate ingest: error: {r['error']}", file=sys.stderr)
        else:
            head = "already ingested: " if r["already_ingested"] else ""
            print(f"{head}{r['source_file']}: read {r['n_read']} = accepted {r['n_accepted']} + duplicates "
                  f"{r['n_duplicates']} + quarantined {r['n_quarantined']}")
    return EXIT_INPUT if failed else EXIT_OK
