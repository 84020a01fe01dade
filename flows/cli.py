"""`prefcurate`: the command line. Each command is a thin shell over a stage function (flows/stages.py, the
same functions the Prefect flows wrap) or a curation function.

One-shot commands (ingest, score, curate, snapshot, train) run their stage in this process, with no Prefect
server and without importing Prefect; with `--track`, or when PREFECT_API_URL is set, they run the stage's
flow instead, so the run is recorded by that server. `serve` always uses Prefect.

Exit codes (documented in the README):
  0  success
  2  usage error (unknown option, missing argument) - argparse's own code
  3  input error: missing lake, unreadable source file, refused SQL, unknown name
  1  unexpected internal error (a bug: please report it with the traceback from --debug)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap


EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 3."""


def _quiet_prefect_defaults() -> None:
    # No network here: Prefect's telemetry would log an error on every server start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _tracked(args) -> bool:
    """Run the stage as a Prefect flow: asked for (--track), or a server is configured in the environment."""
    return bool(getattr(args, "track", False) or os.environ.get("PREFECT_API_URL"))


def _add_track(p) -> None:
    p.add_argument("--track", action="store_true",
                   help="run as a Prefect flow, recorded by the server at PREFECT_API_URL (without one, Prefect "
                        "starts a temporary server: 8-16 s); the default when PREFECT_API_URL is set")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefcurate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="prefcurate", formatter_class=formatter,
        description="Curate human-preference pair data and fine-tune text-to-image models on it.",
        epilog=textwrap.dedent("""\
            examples:
              prefcurate demo --out demo-out
              prefcurate ingest --lake lake --format pickapic shards/train-*.parquet
              prefcurate sql --lake lake "SELECT user_id, count(*) FROM pairs GROUP BY 1 ORDER BY 2 DESC LIMIT 5"
              prefcurate score --lake lake --scorers sharpness,exposure,colourfulness
            exit codes: 0 ok, 1 internal error, 2 usage error, 3 input error"""))
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"prefcurate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="ingest source files into a lake", formatter_class=formatter,
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
    p.add_argument("--format", required=True, help="reader: pickapic, hpdv2, jsonl, csv, wmt (see README: formats)")
    p.add_argument("--source", help="source label stored with each pair (default: the format name)")
    p.add_argument("--image-root", help="folder that image paths are relative to (hpdv2, jsonl, csv)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read image paths that are absolute or leave the image root (default: quarantined as "
                        "image_outside_root)")
    p.add_argument("paths", nargs="+", metavar="SOURCE", help="files to ingest")
    _add_track(p)

    p = sub.add_parser("sql", help="run a read-only SQL query over the lake", formatter_class=formatter,
                       description="DuckDB over the lake tables as views (pairs, images, image_refs, quarantine, "
                                   "ingests, scores, and the curation tables when present). Read-only: "
                                   "statements that write, attach or copy out are refused.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate sql --lake lake "SELECT reason, count(*) FROM quarantine GROUP BY 1"
                             prefcurate sql --lake lake --format csv "SELECT * FROM ingests" > ingests.csv"""))
    p.add_argument("--lake", required=True)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format (csv and json write binary columns as hex)")
    p.add_argument("--memory-limit", help="DuckDB memory limit for the query, e.g. 2GB (default: 80%% of RAM)")
    p.add_argument("--threads", type=int, help="DuckDB threads for the query (default: one per core)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the query after this many seconds")
    p.add_argument("query", help="SQL text")

    p = sub.add_parser("score", help="score the images the pairs need, once per (scorer version, image, prompt)",
                       formatter_class=formatter,
                       description="Score every image of the lake's pairs with each scorer: once per prompt it "
                                   "appears with (once per image for prompt-free scorers), skipping what the "
                                   "scores table already holds for the same scorer version. Commits every few "
                                   "batches: after a crash, rerun and only the missing work is done.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate score --lake lake --scorers sharpness,exposure,colourfulness,prompt_colour
                             prefcurate score --lake lake --scorers pickscore,hpsv2,clip,aesthetic --weights ckpts \\
                                 --device cuda --batch-size 128 --workers 8
                             prefcurate score --lake lake --scorers hpsv2 --weights ckpts --device cuda \\
                                 --task-runner ray --ray-address auto
                           scorers: sharpness, colourfulness, exposure, prompt_colour (no weights); pickscore,
                           hpsv2, hpsv2.1, clip, aesthetic, imagereward (checkpoint files in --weights)"""))
    p.add_argument("--lake", required=True)
    p.add_argument("--scorers", required=True, help="comma-separated scorer names")
    p.add_argument("--weights", help="directory holding the scorers' checkpoint files (never downloaded)")
    p.add_argument("--device", default="cpu", help="torch device for neural scorers: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--workers", type=int, default=2, help="decode/preprocess processes; 0 = none (default 2)")
    p.add_argument("--shard-size", type=int, default=4096, help="work items per shard (default 4096)")
    p.add_argument("--task-runner", choices=("local", "threads", "ray"), default="local",
                   help="local: this process, with a progress bar (default); threads or ray: the Prefect flow, "
                        "one task per shard")
    p.add_argument("--ray-address", help="Ray cluster address for --task-runner ray (default: a local Ray)")
    _add_track(p)

    p = sub.add_parser("curate", help="compute votes, consensus, pair metrics and annotator statistics",
                       formatter_class=formatter,
                       description="Recompute the curation tables (votes, consensus, pair_metrics, annotators) from "
                                   "the lake's pairs and scores. A no-op when nothing changed since the last run.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate curate --lake lake
                             prefcurate curate --lake lake --scorers pickscore,hpsv2,clip,aesthetic --tie-policy drop
                             prefcurate sql --lake lake "SELECT * FROM annotators ORDER BY reliability LIMIT 10"
                           """))
    p.add_argument("--lake", required=True)
    p.add_argument("--scorers", help="comma-separated scorers that vote (default: all scored)")
    p.add_argument("--tie-policy", choices=("drop", "scorer_margin", "human_fallback", "human_vote"), default="drop",
                   help="what decides a pair when the scorers' vote splits (default drop: no label, BalancedDPO's "
                        "scorer-only vote; scorer_margin: the scorers' mean normalized margin)")
    p.add_argument("--reliability", choices=("beta_binomial", "dawid_skene"), default="dawid_skene",
                   help="annotator reliability estimator reported as `reliability` (both are computed)")
    _add_track(p)

    p = sub.add_parser("snapshot", help="write an immutable, weighted training snapshot", formatter_class=formatter,
                       description="Write a content-addressed training snapshot of the current curation run. "
                                   "Writing the same snapshot again is a no-op.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate snapshot --lake lake --name clean --policy filter --max-minority-score 0.5
                             prefcurate snapshot --lake lake --name adaptive --policy adaptive
                             prefcurate snapshot --lake lake --name balanced --policy balanced
                             prefcurate snapshot --lake lake --name trusted --policy reliability --min-posterior 0.6"""))
    p.add_argument("--lake", required=True)
    p.add_argument("--name", required=True, help="snapshot name (letters, digits, '_', '.', '-')")
    p.add_argument("--policy", choices=("plain", "filter", "adaptive", "balanced", "reliability"), default="plain")
    p.add_argument("--max-minority-score", type=float, default=0.5, help="filter: drop pairs with u above this")
    p.add_argument("--min-reliability", type=float, help="filter: drop pairs of annotators below this reliability")
    p.add_argument("--consensus", choices=("majority", "calibrated"), default="majority",
                   help="balanced: equal scorer votes (BalancedDPO) or votes weighted by scorer reliability")
    p.add_argument("--min-posterior", type=float, default=0.5,
                   help="reliability: drop pairs whose label is right with probability below this (default 0.5)")
    p.add_argument("--posterior-use", choices=("weight", "soft_target", "both"), default="weight",
                   help="reliability: the posterior as loss weight, as label_smoothing = 1 - p, or both")
    p.add_argument("--flip-above", type=float,
                   help="reliability: flip labels whose other image is better with probability >= this (off)")
    p.add_argument("--annotator-group",
                   help="reliability: comma-separated user ids whose own labels form a preference-group snapshot")
    p.add_argument("--splits", default="train", help="comma-separated source splits to include")
    p.add_argument("--out", help="snapshots folder (default: LAKE/snapshots)")
    _add_track(p)

    p = sub.add_parser("tables", help="describe the lake tables' columns", formatter_class=formatter,
                       epilog="example:\n  prefcurate tables pairs")
    p.add_argument("names", nargs="*", help="tables to describe (default: all)")

    p = sub.add_parser("verify", help="check every lake file against the sha256 its commit recorded",
                       epilog="example:\n  prefcurate verify --lake lake")
    p.add_argument("--lake", required=True)
    p = sub.add_parser("repair", help="recover from a crash and remove duplicate rows already written",
                       epilog="example:\n  prefcurate repair --lake lake")
    p.add_argument("--lake", required=True)

    p = sub.add_parser("sample", help="write the embedded synthetic Pick-a-Pic-shaped sample",
                       formatter_class=formatter, epilog="example:\n  prefcurate sample --out sample --seed 0")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="the small configuration the tests use")

    p = sub.add_parser("demo", help="run the pipeline on the embedded sample, offline", formatter_class=formatter,
                       epilog="example:\n  prefcurate demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="working folder (sample, lake)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="write one self-contained HTML page with the lake's plots",
                       formatter_class=formatter,
                       description="Write an HTML report (no network needed to view it): lake summary, annotator "
                                   "scatter, minority-score histogram, scorer agreement, human/consensus agreement "
                                   "per source, the least reliable annotators, and a training run's loss and "
                                   "implicit accuracy with --run. A stage not run yet is named instead of plotted.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate report --lake lake
                             prefcurate report --lake lake --run runs/dpo-1 --out reports/lake.html"""))
    p.add_argument("--lake", required=True)
    p.add_argument("--run", help="training output folder holding metrics.jsonl (plots its loss and accuracy)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")

    from flows.orchestration_cli import add_parsers

    add_parsers(sub, formatter)  # train, serve
    from flows.eval_cli import add_parser as add_eval_parser

    add_eval_parser(sub, formatter)  # eval
    return parser


def _print_table(table, fmt: str) -> None:
    import polars as pl

    frame = pl.from_arrow(table) if table.num_columns else pl.DataFrame()
    if fmt != "table":  # CSV has no binary type; JSON has no bytes: hex is exact and easy to decode
        frame = frame.with_columns(pl.col(pl.Binary).bin.encode("hex"))
    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        with pl.Config(tbl_rows=50, tbl_cols=20, fmt_str_lengths=60, tbl_hide_dataframe_shape=False):
            print(frame)


def cmd_ingest(args) -> int:
    from curation.ingest import READERS
    from flows import stages

    if args.format not in READERS:
        raise UserError(f"unknown format {args.format!r}; formats: {', '.join(sorted(READERS))}")
    errors = {}
    for path in args.paths:  # before any lake, lock or server: a mistyped path fails at once
        try:
            stages.check_source(path, args.format)
        except stages.SourceError as exc:
            errors[path] = str(exc)
    if len(errors) == len(args.paths):
        raise UserError("; ".join(errors.values()))
    options = {"image_root": args.image_root} if args.image_root else {}
    if args.allow_outside_root:
        options["allow_outside_root"] = True
    if _tracked(args):
        _quiet_prefect_defaults()
        from flows.ingest import ingest_flow

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


def cmd_sql(args) -> int:
    from curation.lake import Lake
    from curation.sql import SqlLimits, query

    limits = SqlLimits(memory_limit=args.memory_limit, threads=args.threads, timeout_s=args.timeout)
    _print_table(query(Lake(args.lake), args.query, limits), args.format)
    return EXIT_OK


def cmd_verify(args) -> int:
    from curation.lake import Lake

    result = Lake(args.lake).verify()
    if result["problems"]:
        raise UserError(f"{len(result['problems'])} of {result['files']} lake files do not match their commit: "
                        + "; ".join(result["problems"]))
    print(f"ok: {result['files']} lake files, {result['bytes']} bytes, match their commits")
    return EXIT_OK


def cmd_repair(args) -> int:
    from curation.lake import Lake

    print("\n".join(Lake(args.lake).repair()) or "nothing to repair")
    return EXIT_OK


def cmd_tables(args) -> int:
    from data_schemas import describe
    from data_schemas.tables import CURATION_TABLES, TABLES

    known = [*TABLES, *CURATION_TABLES]
    for name in args.names or known:
        if name not in known:
            raise UserError(f"unknown table {name!r}; tables: {', '.join(known)}")
        print(describe(name) + "\n")
    return EXIT_OK


def cmd_score(args) -> int:
    from curation.lake import Lake
    from curation.scorers import SCORERS

    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise UserError(f"unknown scorer(s) {', '.join(map(repr, unknown)) or 'none given'}; "
                        f"scorers: {', '.join(sorted(SCORERS))}")
    needs_weights = [n for n in names if getattr(SCORERS[n], "__module__", "") != "curation.scorers.pixel"]
    if needs_weights and not args.weights:
        raise UserError(f"scorer(s) {', '.join(needs_weights)} need --weights DIR, the folder with their "
                        "checkpoint files (see prefcurate score --help)")
    for flag in ("batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    lake = Lake(args.lake)
    if args.task_runner == "local" and not _tracked(args):
        from flows.stages import run_score

        summaries = run_score(args.lake, names, args.weights, args.device, args.batch_size, args.workers,
                              args.shard_size, progress=True)
    else:
        _quiet_prefect_defaults()
        from flows.score import run_score_flow

        runner = "threads" if args.task_runner == "local" else args.task_runner
        summaries = run_score_flow(args.lake, names, task_runner=runner, ray_address=args.ray_address,
                                   weights_dir=args.weights, device=args.device, batch_size=args.batch_size,
                                   workers=args.workers, shard_size=args.shard_size)
    rows = [(s["name"], s["n_scores"], s["n_images"], s["seconds"], s["images_per_s"], s["n_pairs_skipped"])
            for s in summaries]
    for name, n_scores, n_images, seconds, rate, skipped in rows:
        print(f"{name}: {n_scores} scores, {n_images} images in {seconds:.1f} s = {rate:.1f} images/s")
    if rows and rows[0][5]:
        print(f"{rows[0][5]} pairs skipped: images not in the lake yet")
    print("throughput (images/s): " + ", ".join(f"{name} {rate:.1f}" for name, _, _, _, rate, _ in rows))
    return EXIT_OK


def cmd_curate(args) -> int:
    from curation.annotators import AnnotatorStatsConfig
    from curation.curate import CurateConfig
    from curation.lake import Lake

    Lake(args.lake)  # a missing lake is one clear line before Prefect starts
    try:
        config = CurateConfig(scorers=tuple(args.scorers.split(",")) if args.scorers else None,
                              tie_policy=args.tie_policy,
                              annotators=AnnotatorStatsConfig(reliability_method=args.reliability))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if _tracked(args):
        _quiet_prefect_defaults()
        from flows.curate import curate_flow

        print(curate_flow(args.lake, config)["line"])
    else:
        from flows.stages import run_curate

        print(run_curate(args.lake, config)["line"])
    return EXIT_OK


def cmd_snapshot(args) -> int:
    from curation.lake import Lake, check_partition_name
    from curation.snapshot import SnapshotError, SnapshotPolicy

    Lake(args.lake)
    try:
        check_partition_name("snapshot name", args.name)
        policy = SnapshotPolicy(kind=args.policy, max_minority_score=args.max_minority_score,
                                min_reliability=args.min_reliability, splits=tuple(args.splits.split(",")),
                                consensus=args.consensus, min_posterior=args.min_posterior,
                                posterior_use=args.posterior_use, flip_above=args.flip_above,
                                annotator_group=tuple(args.annotator_group.split(",")) if args.annotator_group
                                else None)
    except (SnapshotError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if _tracked(args):
        _quiet_prefect_defaults()
        from flows.curate import snapshot_flow

        print(snapshot_flow(args.lake, args.name, policy, args.out)["line"])
    else:
        from flows.stages import run_snapshot

        print(run_snapshot(args.lake, args.name, policy, args.out)["line"])
    return EXIT_OK


def cmd_sample(args) -> int:
    from curation.sample import SampleConfig, generate_sample

    config = SampleConfig.small(seed=args.seed) if args.small else SampleConfig(seed=args.seed)
    paths = generate_sample(args.out, config)
    print(f"sample written: {paths}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from flows.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return EXIT_OK


def cmd_train(args) -> int:
    from flows.orchestration_cli import cmd_train as run

    return run(args)


def cmd_serve(args) -> int:
    from flows.orchestration_cli import cmd_serve as run

    return run(args)


def cmd_eval(args) -> int:
    from flows.eval_cli import cmd_eval as run

    return run(args)


def cmd_report(args) -> int:
    from curation.lake import Lake
    from curation.report import MetricsFileError, write_report

    try:
        print(write_report(Lake(args.lake), args.out, run_dir=args.run).line())
    except MetricsFileError as exc:
        raise UserError(str(exc)) from None
    return EXIT_OK


COMMANDS = {"ingest": cmd_ingest, "sql": cmd_sql, "score": cmd_score, "curate": cmd_curate,
            "snapshot": cmd_snapshot, "tables": cmd_tables, "sample": cmd_sample, "demo": cmd_demo,
            "report": cmd_report, "train": cmd_train, "serve": cmd_serve, "eval": cmd_eval,
            "verify": cmd_verify, "repair": cmd_repair}
PASSES_UNKNOWN_OPTIONS = ("train", "serve")  # to the trainer: flows/orchestration_cli.py
# Input errors of the modules a command uses, by module: looked up in sys.modules when an error is caught, so
# a command does not import modules it does not use just to name their errors (curation.ingest: ~1 s).
INPUT_ERRORS = {"curation.lake": ("LakeError",), "curation.ingest.raw": ("UnreadableSourceError",),
                "curation.snapshot": ("SnapshotError",), "curation.sql": ("ReadOnlyError",),
                "flows.stages": ("SourceError",), "flows.serve": ("ServerError",)}


def _is_input_error(exc: BaseException, command: str) -> bool:
    if isinstance(exc, (UserError, FileNotFoundError)):
        return True
    types = tuple(getattr(sys.modules[m], name) for m, names in INPUT_ERRORS.items() if m in sys.modules
                  for name in names)
    if types and isinstance(exc, types):
        return True
    duckdb = sys.modules.get("duckdb")
    return command == "sql" and duckdb is not None and isinstance(exc, duckdb.Error)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in PASSES_UNKNOWN_OPTIONS:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.trainer_options = unknown
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        stages = sys.modules.get("flows.stages")
        if stages is not None and isinstance(exc, stages.TrainingFailed) and not args.debug:
            print(f"prefcurate {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_INTERNAL
        if args.debug or not _is_input_error(exc, args.command):
            raise
        text = str(exc).splitlines() if args.command != "sql" else str(exc).splitlines()[:1]
        print(f"prefcurate {args.command}: error: {' '.join(line.strip() for line in text)}", file=sys.stderr)
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


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: flows/orchestration_cli.py raises flows.cli.UserError,
    # which a second copy of the class here would not catch.
    from flows import cli

    cli.entry()
