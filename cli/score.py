"""`prefcurate score`: every image the pairs need, once per (scorer version, image, prompt)."""
from __future__ import annotations

import argparse
import textwrap

from prefcurate.cli.errors import EXIT_OK, UserError
from prefcurate.cli.tracking import add_track, quiet_prefect_defaults, tracked


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score the images the pairs need, once per (scorer version, image, prompt)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add_track(p)


def scorer_names(text: str) -> list[str]:
    """The comma-separated scorer names of `text`, each one known (else a UserError listing the scorers)."""
    from prefcurate.curation.scorers import SCORERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise UserError(f"unknown scorer(s) {', '.join(map(repr, unknown)) or 'none given'}; "
                        f"scorers: {', '.join(sorted(SCORERS))}")
    return names


def _check_options(args, names: list[str]) -> None:
    from prefcurate.data_schemas.vocab import WEIGHT_FREE_SCORERS

    needs_weights = [n for n in names if n not in WEIGHT_FREE_SCORERS]
    if needs_weights and not args.weights:
        raise UserError(f"scorer(s) {', '.join(needs_weights)} need --weights DIR, the folder with their "
                        "checkpoint files (see prefcurate score --help)")
    for flag in ("batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")


def _score(args, names: list[str]) -> list[dict]:
    """One summary dict per scorer: in this process (local, untracked) or by the Prefect flow."""
    if args.task_runner == "local" and not tracked(args):
        from prefcurate.flows.stages import run_score

        return run_score(args.lake, names, args.weights, args.device, args.batch_size, args.workers,
                         args.shard_size, progress=True)
    quiet_prefect_defaults()
    from prefcurate.flows.score import run_score_flow

    runner = "threads" if args.task_runner == "local" else args.task_runner
    return run_score_flow(args.lake, names, task_runner=runner, ray_address=args.ray_address,
                          weights_dir=args.weights, device=args.device, batch_size=args.batch_size,
                          workers=args.workers, shard_size=args.shard_size)


def run(args) -> int:
    from prefcurate.curation.store.lake import Lake

    names = scorer_names(args.scorers)
    _check_options(args, names)
    Lake(args.lake)  # a missing lake is one clear line before any scorer or Prefect starts
    rows = [(s["name"], s["n_scores"], s["n_images"], s["seconds"], s["images_per_s"], s["n_pairs_skipped"])
            for s in _score(args, names)]
    for name, n_scores, n_images, seconds, rate, skipped in rows:
        print(f"{name}: {n_scores} scores, {n_images} images in {seconds:.1f} s = {rate:.1f} images/s")
    if rows and rows[0][5]:
        print(f"{rows[0][5]} pairs skipped: images not in the lake yet")
    print("throughput (images/s): " + ", ".join(f"{name} {rate:.1f}" for name, _, _, _, rate, _ in rows))
    return EXIT_OK
