"""The `train` and `serve` commands of `prefcurate` (flows/cli.py registers them): parsers and handlers.

Options these parsers do not know are the trainer's own (`python -m training.trainer --help`): cli.main
passes them through as `args.trainer_options`, and they are checked by the trainer's parser before any
flow starts, so a typo fails at once, not in a scheduled run hours later.
"""
from __future__ import annotations

import os
import sys
import textwrap


# training.config.LossType, kept here so `prefcurate --help` does not import torch; a test checks they agree.
TRAIN_LOSSES = ("dpo", "adaptive-dpo", "balanced-dpo", "ncp-dpo", "cpo", "sft", "ipo")
POLICIES = ("plain", "filter", "adaptive", "balanced", "reliability")  # curation.snapshot.POLICIES
PATTERNS = {"pickapic": "*.parquet", "hpdv2": "*.json", "jsonl": "*.jsonl", "csv": "*.csv", "wmt": "*.csv"}
TRAINER_OPTIONS = "any other option goes to the trainer: see `python -m training.trainer --help`"


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a snapshot (LoRA, Diffusion-DPO and successors)",
                       formatter_class=formatter, allow_abbrev=False,
                       description="Run the training flow on a snapshot: a folder, or with --lake a snapshot "
                                   f"id, name or 'latest'; {TRAINER_OPTIONS}.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate train --lake lake --snapshot latest --model sd15 --loss dpo --output runs/dpo
                             prefcurate train --snapshot lake/snapshots/6fea68cb --model sd15 --loss adaptive-dpo \\
                                 --output runs/adpo --max-steps 2000 --learning-rate 1e-5 --lora-rank 8"""))
    p.add_argument("--snapshot", required=True, help="snapshot folder, or an id, name or 'latest' (needs --lake)")
    p.add_argument("--lake", help="lake whose snapshots a name, id or 'latest' refers to")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (nothing is downloaded)")
    p.add_argument("--loss", choices=TRAIN_LOSSES, default="dpo")
    p.add_argument("--output", required=True, help="output folder: metrics.jsonl, checkpoints, LoRA weights")
    p.add_argument("--num-processes", type=int, default=1,
                   help="training processes (one per GPU; gloo ranks on the CPU): N > 1 runs `accelerate launch "
                        "--num_processes N -m training.trainer`; 1 trains in this process (default)")
    p.add_argument("--track", action="store_true",
                   help="run as a Prefect flow, recorded by the server at PREFECT_API_URL (the default when "
                        "PREFECT_API_URL is set)")

    p = sub.add_parser("serve", help="curate a landing folder on a schedule (needs a Prefect server)",
                       formatter_class=formatter, allow_abbrev=False,
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
    p.add_argument("--format", default="pickapic", choices=sorted(PATTERNS), help="reader of the landing files")
    p.add_argument("--pattern", help="file name pattern in the landing folder (default by format: "
                                     + ", ".join(f"{k} {v}" for k, v in PATTERNS.items()) + ")")
    p.add_argument("--source", help="source label of the pairs (default: the format name)")
    p.add_argument("--image-root", help="folder that image paths are relative to (hpdv2, jsonl, csv)")
    p.add_argument("--scorers", default="sharpness,exposure,prompt_colour,colourfulness",
                   help="comma-separated scorers; '' skips scoring (default: the weight-free ones)")
    p.add_argument("--weights", help="folder with the scorers' checkpoint files")
    p.add_argument("--device", default="cpu", help="torch device for neural scorers")
    p.add_argument("--workers", type=int, default=2, help="image decode processes for scoring; 0 = none")
    p.add_argument("--snapshot-name", default="curated")
    p.add_argument("--policy", choices=POLICIES, default="adaptive")
    p.add_argument("--max-minority-score", type=float, default=0.5, help="filter: drop pairs with u above this")
    p.add_argument("--min-reliability", type=float, help="filter: drop pairs of annotators below this")
    p.add_argument("--train-model", help="local diffusers pipeline folder: train on each new snapshot")
    p.add_argument("--train-output", help="training outputs go to TRAIN_OUTPUT/<snapshot_id>")
    p.add_argument("--train-loss", choices=TRAIN_LOSSES, default="dpo")
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes of each triggered training run (accelerate launch when above 1; default 1)")
    p.add_argument("--train-min-pairs", type=int, help="gate: fewest pairs worth a run (default 1000)")
    p.add_argument("--train-max-minority-share", type=float,
                   help="gate: most pairs with minority score u > 0.5, as a share (default 0.5)")


class TrainerOptionError(ValueError):
    """An option the trainer's parser refuses: a usage error (exit 2), reported in one line."""


def check_trainer_options(snapshot: str, model: str, output: str, loss: str, options: list[str]) -> None:
    """Parse the argv the training flow will get with the trainer's own parser and config checks."""
    from flows.cli import UserError
    from flows.stages import trainer_argv
    from training.config import TrainConfig, build_parser

    def refuse(message: str):
        raise TrainerOptionError(f"{message} (trainer options: python -m training.trainer --help)")

    parser = build_parser()
    parser.error = refuse  # one line instead of the trainer's 40-line usage
    try:
        TrainConfig(**vars(parser.parse_args(trainer_argv(snapshot, model, output, loss, options))))
    except TrainerOptionError:
        raise
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _usage_error(command: str, exc: TrainerOptionError) -> int:
    from flows.cli import EXIT_USAGE

    print(f"prefcurate {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def preflight(snapshot: str | None, model: str, output: str | None, options: list[str]) -> None:
    """training.preflight's checks (model folder layout, snapshot manifest, output folder, optional packages),
    before torch is imported: a mistake is one line (exit 3) in well under a second. `snapshot` None (serve:
    not written yet) checks the model and packages only."""
    import argparse
    from types import SimpleNamespace

    from flows.cli import UserError
    from training.preflight import PreflightError, check_config, check_model, check_packages

    wanted = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the options preflight needs, no torch
    wanted.add_argument("--resume-from")
    wanted.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=False)
    wanted.add_argument("--report-to")
    wanted.add_argument("--overwrite-output", action=argparse.BooleanOptionalAction, default=False)
    known, _ = wanted.parse_known_args(options)
    try:
        if snapshot is None:
            check_packages(use_8bit_adam=known.use_8bit_adam, report_to=known.report_to)
            check_model(model)
        else:  # the trainer's own check of its config, given the same fields
            check_config(SimpleNamespace(model=model, snapshot=snapshot, output=output, **vars(known)))
    except PreflightError as exc:
        raise UserError(str(exc)) from None


def _check_num_processes(n: int) -> None:
    from flows.cli import UserError

    if n < 1:
        raise UserError(f"--num-processes must be at least 1, got {n}")


def cmd_train(args) -> int:
    from flows.cli import EXIT_OK, UserError, _quiet_prefect_defaults, _tracked
    from flows.stages import resolve_snapshot_arg

    _check_num_processes(args.num_processes)
    preflight(None, args.model, None, args.trainer_options)  # the model first: it needs no lake opened
    snapshot = resolve_snapshot_arg(args.snapshot, args.lake)  # a bad name: SnapshotError, one line, exit 3
    preflight(snapshot, args.model, args.output, args.trainer_options)
    try:
        check_trainer_options(snapshot, args.model, args.output, args.loss, args.trainer_options)
    except TrainerOptionError as exc:
        return _usage_error("train", exc)
    from training.snapshot import SnapshotError as UnreadableSnapshot

    try:
        if _tracked(args):
            _quiet_prefect_defaults()
            from flows.train import train_flow

            result = train_flow(snapshot, args.model, args.output, args.loss, args.trainer_options,
                                num_processes=args.num_processes)
        else:
            from flows.stages import run_train

            result = run_train(snapshot, args.model, args.output, args.loss, args.trainer_options,
                               num_processes=args.num_processes)
    except UnreadableSnapshot as exc:
        raise UserError(str(exc)) from None
    print(f"trained {result['global_step']} steps on {snapshot}; final loss {result['final_loss']:.4f}; "
          f"LoRA weights in {result['lora_dir']}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from curation.snapshot import SnapshotPolicy
    from flows.cli import EXIT_OK, UserError

    if args.train_model is None and (args.trainer_options or args.train_output):
        raise UserError("trainer options and --train-output need --train-model; unrecognized: "
                        + " ".join(args.trainer_options or ["--train-output"]))
    if args.interval is not None and args.interval <= 0:
        raise UserError(f"--interval must be positive, got {args.interval}")
    if not os.path.isdir(args.landing):
        raise UserError(f"landing folder {args.landing} does not exist")
    from curation.scorers import SCORERS

    scorers = [s for s in args.scorers.split(",") if s]
    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown:
        raise UserError(f"unknown scorer(s) {', '.join(unknown)}; scorers: {', '.join(sorted(SCORERS))}")
    policy = SnapshotPolicy(kind=args.policy, max_minority_score=args.max_minority_score,
                            min_reliability=args.min_reliability)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before Prefect reads its settings
    from flows.pipeline import TrainGate, TrainRequest
    from flows.serve import ServerError, serve_pipeline

    train = None
    if args.train_model is not None:
        if not args.train_output:
            raise UserError("--train-model needs --train-output, the folder training runs write into")
        gate = {k: v for k, v in (("min_pairs", args.train_min_pairs),
                                  ("max_minority_share", args.train_max_minority_share)) if v is not None}
        _check_num_processes(args.num_processes)
        preflight(None, args.train_model, None, list(args.trainer_options))
        train = TrainRequest(model=os.path.abspath(args.train_model), output_root=os.path.abspath(args.train_output),
                             loss=args.train_loss, options=tuple(args.trainer_options), gate=TrainGate(**gate),
                             num_processes=args.num_processes)
        try:
            check_trainer_options("snapshot", train.model, train.output_root, train.loss, list(train.options))
        except TrainerOptionError as exc:
            return _usage_error("serve", exc)
    score_options = {"weights_dir": args.weights, "device": args.device, "workers": args.workers}
    try:
        serve_pipeline(args.name, args.lake, args.landing, cron=args.cron, interval=args.interval, fmt=args.format,
                       pattern=args.pattern or PATTERNS[args.format], source=args.source,
                       reader_options={"image_root": args.image_root} if args.image_root else None,
                       scorers=scorers, score_options=score_options,
                       snapshot_name=args.snapshot_name, policy=policy, train=train)
    except ServerError as exc:
        raise UserError(str(exc)) from None
    return EXIT_OK
