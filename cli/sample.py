"""`prefcurate sample` and `demo`: the embedded synthetic sample, and the whole pipeline run on it offline."""
from __future__ import annotations

import argparse

from prefcurate.cli.errors import EXIT_OK


def add_parser(sub) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("sample", help="write the embedded synthetic Pick-a-Pic-shaped sample",
                       formatter_class=formatter, epilog="example:\n  prefcurate sample --out sample --seed 0")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="the small configuration the tests use")

    p = sub.add_parser("demo", help="run the pipeline on the embedded sample, offline", formatter_class=formatter,
                       epilog="example:\n  prefcurate demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="working folder (sample, lake)")
    p.add_argument("--seed", type=int, default=0)


def _sample(args) -> int:
    from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample

    config = SampleConfig.small(seed=args.seed) if args.small else SampleConfig(seed=args.seed)
    paths = generate_sample(args.out, config)
    print(f"sample written: {paths}")
    return EXIT_OK


def _demo(args) -> int:
    from prefcurate.flows.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return EXIT_OK


def run(args) -> int:
    return {"sample": _sample, "demo": _demo}[args.command](args)
