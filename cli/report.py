"""`prefcurate report`: one self-contained HTML page with the lake's plots (and a training run's, with --run)."""
from __future__ import annotations

import argparse
import textwrap

from prefcurate.cli.errors import EXIT_OK, UserError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page with the lake's plots",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
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


def run(args) -> int:
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.report.page import MetricsFileError, write_report

    try:
        print(write_report(Lake(args.lake), args.out, run_dir=args.run).line())
    except MetricsFileError as exc:
        raise UserError(str(exc)) from None
    return EXIT_OK
