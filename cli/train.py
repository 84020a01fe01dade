"""`prefcurate train`: fine-tune a model on a snapshot; and the trainer-option checks `serve` shares.

Options the parser does not know are the trainer's own (`python -m prefcurate.training.trainer --help`): cli/main.py
passes them through as `args.trainer_options`, and they are checked by the trainer's parser before any
flow starts, so a typo fails at once, not in a scheduled run hours later.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from prefcurate.cli.errors import EXIT_OK, EXIT_USAGE, UserError
from prefcurate.cli.tracking import quiet_prefect_defaults, tracked
from prefcurate.data_schemas.vocab import LOSS_TYPES


TRAINER_OPTIONS = "any other option goes to the trainer: see `python -m prefcurate.training.trainer --help`"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a snapshot (LoRA, Diffusion-DPO and successors)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
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
    p.add_argument("--loss", choices=LOSS_TYPES, default="dpo")
    p.add_argument("--output", required=True, help="output folder: metrics.jsonl, checkpoints, LoRA weights")
    p.add_argument("--num-processes", type=int, default=1,
                   help="training processes (one per GPU; gloo ranks on the CPU): N > 1 runs `accelerate launch "
                        "--num_processes N -m prefcurate.training.trainer`; 1 trains in this process (default)")
    p.add_argument("--track", action="store_true",
                   help="run as a Prefect flow, recorded by the server at PREFECT_API_URL (the default when "
                        "PREFECT_API_URL is set)")


class TrainerOptionError(ValueError):
    """An option the trainer's parser refuses: a usage error (exit 2), reported in one line."""


def check_trainer_options(snapshot: str, model: str, output: str, loss: str, options: list[str]) -> None:
    """Parse the argv the training flow will get with the trainer's own parser and config checks."""
    from prefcurate.flows.stages import trainer_argv
    from prefcurate.training.config import TrainConfig, build_parser

    def refuse(message: str):
        raise TrainerOptionError(f"{message} (trainer options: python -m prefcurate.training.trainer --help)")

    parser = build_parser()
    parser.error = refuse  # one line instead of the trainer's 40-line usage
    try:
        TrainConfig(**vars(parser.parse_args(trainer_argv(snapshot, model, output, loss, options))))
    except TrainerOptionError:
        raise
    except ValueError as exc:
        raise UserError(str(exc)) from None


def usage_error(command: str, exc: TrainerOptionError) -> int:
    print(f"prefcurate {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def preflight(snapshot: str | None, model: str, output: str | None, options: list[str]) -> None:
    """training.preflight's checks (model folder layout, snapshot manifest, output folder, optional packages),
    before torch is imported: a mistake is one line (exit 3) in well under a second. `snapshot` None (serve:
    not written yet) checks the model and packages only."""
    from types import SimpleNamespace

    from prefcurate.training.preflight import PreflightError, check_config, check_model, check_packages

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


def check_num_processes(n: int) -> None:
    if n < 1:
        raise UserError(f"--num-processes must be at least 1, got {n}")


def _train(args, snapshot: str) -> dict:
    """The training run's result dict: in this process (or accelerate's ranks), or by the Prefect flow."""
    from prefcurate.training.snapshot_reader import SnapshotError as UnreadableSnapshot

    try:
        if tracked(args):
            quiet_prefect_defaults()
            from prefcurate.flows.train import train_flow

            return train_flow(snapshot, args.model, args.output, args.loss, args.trainer_options,
                              num_processes=args.num_processes)
        from prefcurate.flows.stages import run_train

        return run_train(snapshot, args.model, args.output, args.loss, args.trainer_options,
                         num_processes=args.num_processes)
    except UnreadableSnapshot as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    from prefcurate.flows.stages import resolve_snapshot_arg

    check_num_processes(args.num_processes)
    preflight(None, args.model, None, args.trainer_options)  # the model first: it needs no lake opened
    snapshot = resolve_snapshot_arg(args.snapshot, args.lake)  # a bad name: SnapshotError, one line, exit 3
    preflight(snapshot, args.model, args.output, args.trainer_options)
    try:
        check_trainer_options(snapshot, args.model, args.output, args.loss, args.trainer_options)
    except TrainerOptionError as exc:
        return usage_error("train", exc)
    result = _train(args, snapshot)
    print(f"trained {result['global_step']} steps on {snapshot}; final loss {result['final_loss']:.4f}; "
          f"LoRA weights in {result['lora_dir']}")
    return EXIT_OK
