"""`prefcurate eval`: win rates of a fine-tuned LoRA over its base model (or over a second LoRA), per scorer.

The parser imports nothing heavy, so `prefcurate --help` stays fast; the handler calls evaluation.evaluate.run_eval.
"""
from __future__ import annotations

import argparse
import textwrap

from prefcurate.cli.errors import EXIT_OK, UserError
from prefcurate.data_schemas.vocab import WEIGHT_FREE_SCORERS


PIXEL_SCORERS = ", ".join(WEIGHT_FREE_SCORERS)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="win rates of a fine-tuned LoRA over its base model, per scorer",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       description="Generate one image per prompt and seed with the base model and with the LoRA "
                                   "(same initial noise for both), score both with each scorer, and report the win "
                                   "rate of tuned over base (ties count 0.5) with a bootstrap-over-prompts "
                                   "confidence interval, the tie count, both mean scores and a sign-test p-value. "
                                   "Writes eval.json, eval.md, scores.csv and the images to --out. With --against, "
                                   "two LoRAs are compared (A = --lora over B = --against, same prompts and noise; "
                                   "the 'base' columns are then B). Without --lora the model is compared with itself "
                                   "(every comparison ties).",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate eval --model tiny-sd --lora runs/dpo --prompts imagereward \\
                                 --scorers sharpness,exposure --steps 10 --limit 20
                             prefcurate eval --model sd15 --lora runs/dpo --prompts parti --seeds 2 \\
                                 --scorers pickscore,hpsv2.1,clip,aesthetic --weights ckpts --device cuda
                             prefcurate eval --model sd15 --lora runs/reliability --against runs/dpo \\
                                 --prompts parti --scorers pickscore --weights ckpts --device cuda
                             prefcurate eval --model sd15 --lora runs/dpo --prompts drawbench.csv --limit 100 \\
                                 --scorers pickscore --weights ckpts --device cuda --out eval/drawbench
                           prompt sets: parti (1632, --categories e.g. Animals,Vehicles), imagereward (100),
                           geneval (553, --categories = tags), or a .txt/.tsv/.csv/.json/.jsonl file"""))
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (nothing is downloaded)")
    p.add_argument("--lora", help="LoRA folder written by training (pytorch_lora_weights.safetensors)")
    p.add_argument("--against", help="a second LoRA folder (B): report --lora (A) over B on the same prompts and "
                                     "seeds, instead of over the base model")
    p.add_argument("--prompts", default="parti", help="parti, imagereward, geneval or a prompt file (default parti)")
    p.add_argument("--limit", type=int, help="evenly spaced subset of N prompts")
    p.add_argument("--categories", help="comma-separated categories to keep (Parti Category, GenEval tag)")
    p.add_argument("--scorers", required=True, help=f"comma-separated scorer names (weight-free: {PIXEL_SCORERS}; "
                                                    f"with --weights: pickscore, hpsv2, ...)")
    p.add_argument("--weights", help="directory holding the scorers' checkpoint files")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt per model (default 1)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5; SDXL: 5)")
    p.add_argument("--resolution", type=int, help="square image side in pixels (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="pipeline dtype (default fp16 on CUDA, "
                                                                       "fp32 on the CPU)")
    p.add_argument("--ci", choices=("bootstrap", "wilson"), default="bootstrap",
                   help="interval shown (default bootstrap over prompts; eval.json holds both)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--no-images", action="store_true", help="do not save the generated PNGs")
    p.add_argument("--out", default="eval-out", help="output folder (default eval-out)")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def run(args) -> int:
    from prefcurate.cli.score import scorer_names
    from prefcurate.curation.scorers import CheckpointFormatError
    from prefcurate.evaluation.evaluate import EvalConfig, run_eval, table_rows
    from prefcurate.training.generate import SamplingConfig
    from prefcurate.training.prompts import PromptFileError

    names = tuple(scorer_names(args.scorers))
    try:
        config = EvalConfig(
            model=args.model, out=args.out, lora=args.lora, against=args.against, prompts=args.prompts,
            limit=args.limit,
            categories=tuple(c.strip() for c in args.categories.split(",")) if args.categories else None,
            scorers=names, weights=args.weights, n_seeds=args.seeds,
            sampling=SamplingConfig(steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution,
                                    batch_size=args.batch_size),
            device=args.device, dtype=args.dtype, ci_method=args.ci, confidence=args.confidence,
            n_bootstrap=args.bootstrap, save_images=not args.no_images)
    except ValueError as exc:  # an option out of range
        raise UserError(str(exc)) from None
    try:
        report = run_eval(config)
    except (PromptFileError, CheckpointFormatError) as exc:
        raise UserError(str(exc)) from None
    side = f"{args.lora} over {args.against}" if args.against else "tuned over base"
    print(f"{report['prompts']['n']} prompts ({report['prompts']['set']}) x {len(report['sampling']['seeds'])} "
          f"seed(s), {side}:")
    print(format_table(*table_rows(report)))
    print(f"average win rate {report['average_win_rate']:.3f}; written: {report['files']['eval.json']}, "
          f"{report['files']['eval.md']}")
    return EXIT_OK
