"""`prefcurate`: the command line. Each command is a thin shell over a stage function (flows/stages.py, the
same functions the Prefect flows wrap) or a curation function; its parser and handler live in the cli module
of its group (`add_parser(subparsers)`, `run(args) -> int`), and this module puts them together.

One-shot commands (ingest, score, curate, snapshot, train) run their stage in this process, with no Prefect
server and without importing Prefect; with `--track`, or when PREFECT_API_URL is set, they run the stage's
flow instead, so the run is recorded by that server. `serve` always uses Prefect. Exit codes: cli/errors.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from prefcurate import __version__
from prefcurate.cli import curate, evaluate, ingest, lake, orchestration, query, report, sample, score, snapshot, train
from prefcurate.cli.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, UserError


# Command -> its group module, in the order `prefcurate --help` lists them.
COMMANDS = {"ingest": ingest, "sql": query, "score": score, "curate": curate, "snapshot": snapshot,
            "tables": lake, "verify": lake, "repair": lake, "sample": sample, "demo": sample, "report": report,
            "train": train, "serve": orchestration, "eval": evaluate}
PASSES_UNKNOWN_OPTIONS = ("train", "serve")  # to the trainer: cli/train.py
# Input errors of the modules a command uses, by module: looked up in sys.modules when an error is caught, so
# a command does not import modules it does not use just to name their errors (prefcurate.curation.ingest: ~1 s).
INPUT_ERRORS = {
    "prefcurate.curation.store.lake": ("LakeError",), "prefcurate.curation.ingest.raw": ("UnreadableSourceError",),
    "prefcurate.curation.snapshot": ("SnapshotError",), "prefcurate.curation.store.sql": ("ReadOnlyError",),
    "prefcurate.flows.stages": ("SourceError",), "prefcurate.flows.serve": ("ServerError",),
}
EPILOG = """\
    examples:
      prefcurate demo --out demo-out
      prefcurate ingest --lake lake --format pickapic shards/train-*.parquet
      prefcurate sql --lake lake "SELECT user_id, count(*) FROM pairs GROUP BY 1 ORDER BY 2 DESC LIMIT 5"
      prefcurate score --lake lake --scorers sharpness,exposure,colourfulness
    exit codes: 0 ok, 1 internal error, 2 usage error, 3 input error"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefcurate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Curate human-preference pair data and fine-tune text-to-image models on it.",
        epilog=textwrap.dedent(EPILOG))
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"prefcurate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in dict.fromkeys(COMMANDS.values()):  # each group once, in the order of its first command
        group.add_parser(sub)
    return parser


def _is_input_error(exc: BaseException, command: str) -> bool:
    if isinstance(exc, (UserError, FileNotFoundError)):
        return True
    types = tuple(getattr(sys.modules[m], name) for m, names in INPUT_ERRORS.items() if m in sys.modules
                  for name in names)
    if types and isinstance(exc, types):
        return True
    duckdb = sys.modules.get("duckdb")
    return command == "sql" and duckdb is not None and isinstance(exc, duckdb.Error)


def _error_line(command: str, exc: BaseException) -> str:
    text = str(exc).splitlines() if command != "sql" else str(exc).splitlines()[:1]
    return f"prefcurate {command}: error: {' '.join(line.strip() for line in text)}"


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (cli/errors.py; argparse exits 2 itself). Without --debug an
    input error is one line on stderr; any other exception (a bug) propagates with its traceback: exit 1."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in PASSES_UNKNOWN_OPTIONS:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.trainer_options = unknown
    try:
        return COMMANDS[args.command].run(args)
    except Exception as exc:
        stages = sys.modules.get("prefcurate.flows.stages")
        if stages is not None and isinstance(exc, stages.TrainingFailed) and not args.debug:
            print(f"prefcurate {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_INTERNAL
        if args.debug or not _is_input_error(exc, args.command):
            raise
        print(_error_line(args.command, exc), file=sys.stderr)
        return EXIT_INPUT


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`prefcurate tables | head`): what it wanted was written. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again, and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)
