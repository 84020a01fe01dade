"""`prefcurate serve`: the pipeline as a scheduled Prefect deployment, with snapshot-triggered training.

With --train-model, options the parser does not know are the trainer's own; they are checked by the trainer's
parser (cli/train.py) before the deployment is served.
"""
from __future__ import annotations

import argparse
import os
import textwrap

from prefcurate.cli.errors import EXIT_OK, UserError
from prefcurate.cli.train import (
    TRAINER_OPTIONS, TrainerOptionError, check_num_processes, check_trainer_options, preflight, usage_error,
)
from prefcurate.data_schemas.vocab import (
    DEFAULT_SNAPSHOT_POLICY, INPUT_FORMATS, LANDING_PATTERNS, LOSS_TYPES, MINORITY_THRESHOLD, SNAPSHOT_POLICIES,
)




def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="curate a landing folder on a schedule (needs a Prefect server)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       description="Serve the pipeline (ingest the landing folder's new files, score, curate, "
                                   "snapshot) as a Prefect deployment on a cron or interval schedule, until "
                                   "stopped. With --train-model, a new snapshot that passes the gate starts a run "
                                   "of the prefcurate-train deployment, served by the same process. Needs "
                                   "PREFECT_API_URL pointing to a running `prefect server start --host 127.0.0.1`."
                                   f" With --train-model, {TRAINER_OPTIONS}.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefect server start --host 127.0.0.1 &
                             export PREFECT_API_URL=http://127.0.0.1:4200/api
                             prefcurate serve --lake lake --landing incoming --cron "0 * * * *"
                             prefcurate serve --lake lake --landing incoming --interval 600 --policy filter \\
                                 --train-model sd15 --train-output runs --train-min-pairs 5000 --max-steps 2000"""))
    p.add_argument("--lake", required=True, help="lake directory (created by the first run with files)")
    p.add_argument("--landing", required=True, help="folder where new source files arrive")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "*/15 * * * *"')
    when.add_argument("--interval", type=float, help="seconds between runs")
    p.add_argument("--name", default="prefcurate", help="deployment name: prefcurate-pipeline/NAME")
    p.add_argument("--format", default="pickapic", choices=sorted(INPUT_FORMATS), help="reader of the landing files")
    p.add_argument("--pattern", help="file name pattern in the landing folder (default by format: "
                                     + ", ".join(f"{k} {v}" for k, v in LANDING_PATTERNS.items()) + ")")
    p.add_argument("--source", help="source label of the pairs (default: the format name)")
    p.add_argument("--image-root", help="folder that image paths are relative to (hpdv2, jsonl, csv)")
    p.add_argument("--scorers", default="sharpness,exposure,prompt_colour,colourfulness",
                   help="comma-separated scorers; '' skips scoring (default: the weight-free ones)")
    p.add_argument("--weights", help="folder with the scorers' checkpoint files")
    p.add_argument("--device", default="cpu", help="torch device for neural scorers")
    p.add_argument("--workers", type=int, default=2, help="image decode processes for scoring; 0 = none")
    p.add_argument("--snapshot-name", default="curated")
    p.add_argument("--policy", choices=SNAPSHOT_POLICIES, default=DEFAULT_SNAPSHOT_POLICY)
    p.add_argument("--max-minority-score", type=float, default=MINORITY_THRESHOLD,
                   help="filter: drop pairs with u above this")
    p.add_argument("--min-reliability", type=float, help="filter: drop pairs of annotators below this")
    p.add_argument("--train-model", help="local diffusers pipeline folder: train on each new snapshot")
    p.add_argument("--train-output", help="training outputs go to TRAIN_OUTPUT/<snapshot_id>")
    p.add_argument("--train-loss", choices=LOSS_TYPES, default="dpo")
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes of each triggered training run (accelerate launch when above 1; default 1)")
    p.add_argument("--train-min-pairs", type=int, help="gate: fewest pairs worth a run (default 1000)")
    p.add_argument("--train-max-minority-share", type=float,
                   help=f"gate: most pairs with minority score u > {MINORITY_THRESHOLD}, as a share (default 0.5)")


def _scorers(text: str) -> list[str]:
    from prefcurate.curation.scorers import SCORERS

    scorers = [s for s in text.split(",") if s]
    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown:
        raise UserError(f"unknown scorer(s) {', '.join(unknown)}; scorers: {', '.join(sorted(SCORERS))}")
    return scorers


def _check_args(args) -> None:
    if args.train_model is None and (args.trainer_options or args.train_output):
        raise UserError("trainer options and --train-output need --train-model; unrecognized: "
                        + " ".join(args.trainer_options or ["--train-output"]))
    if args.interval is not None and args.interval <= 0:
        raise UserError(f"--interval must be positive, got {args.interval}")
    if not os.path.isdir(args.landing):
        raise UserError(f"landing folder {args.landing} does not exist")


def _train_request(args):
    """The TrainRequest of --train-model and its options, checked now (model folder, trainer options): a
    mistake fails here, not in a run triggered hours later. Raises TrainerOptionError (a usage error)."""
    from prefcurate.flows.pipeline import TrainGate, TrainRequest

    if not args.train_output:
        raise UserError("--train-model needs --train-output, the folder training runs write into")
    gate = {k: v for k, v in (("min_pairs", args.train_min_pairs),
                              ("max_minority_share", args.train_max_minority_share)) if v is not None}
    check_num_processes(args.num_processes)
    preflight(None, args.train_model, None, list(args.trainer_options))
    train = TrainRequest(model=os.path.abspath(args.train_model), output_root=os.path.abspath(args.train_output),
                         loss=args.train_loss, options=tuple(args.trainer_options), gate=TrainGate(**gate),
                         num_processes=args.num_processes)
    check_trainer_options("snapshot", train.model, train.output_root, train.loss, list(train.options))
    return train


def run(args) -> int:
    from prefcurate.curation.snapshot import SnapshotPolicy

    _check_args(args)
    scorers = _scorers(args.scorers)
    policy = SnapshotPolicy(kind=args.policy, max_minority_score=args.max_minority_score,
                            min_reliability=args.min_reliability)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before Prefect reads its settings
    from prefcurate.flows.serve import ServerError, serve_pipeline

    try:
        train = _train_request(args) if args.train_model is not None else None
    except TrainerOptionError as exc:
        return usage_error("serve", exc)
    score_options = {"weights_dir": args.weights, "device": args.device, "workers": args.workers}
    try:
        serve_pipeline(args.name, args.lake, args.landing, cron=args.cron, interval=args.interval, fmt=args.format,
                       pattern=args.pattern or LANDING_PATTERNS[args.format], source=args.source,
                       reader_options={"image_root": args.image_root} if args.image_root else None,
                       scorers=scorers, score_options=score_options,
                       snapshot_name=args.snapshot_name, policy=policy, train=train)
    except ServerError as exc:
        raise UserError(str(exc)) from None
    return EXIT_OK
